"""O-LoRA (#13): the penalty is the authors' formula, a run trains only its LoRAs (the base stays bit-identical and
earlier LoRAs do not move), checkpoints are evaluated with their LoRAs, and two ranks train as one process."""
import json
import os
import sys

import pytest
import torch
from conftest import logged, tiny_run_inputs, train_process

from minseekr.checkpoint import load_hf
from minseekr.generate import generate
from minseekr.model import ModelArgs
from minseekr.olora import OLoRA
from minseekr.pet import FILE, attach_saved
from minseekr.peft import read_method

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, hidden_dim=48, max_seq_len=64)


def test_penalty_and_its_gradient_are_the_authors_formula():
    torch.manual_seed(0)
    method = OLoRA(ARGS, rank=4, alpha=8, lambda1=0.5, lambda2=0.3)
    for k in range(3):
        method.begin_task(k)
    with torch.no_grad():   # trained Bs (a new B is zero, where a norm has no derivative)
        for p in method.bank.loras[2].B.values():
            p.normal_()
    terms = method.penalty(2)
    total = sum(terms.values())
    total.backward()
    # Naively: every entry of every A_t A_2ᵀ, one by one, and each new tensor's Euclidean norm.
    new = method.bank.loras[2]
    A_new = {key: a.detach().clone().requires_grad_(True) for key, a in new.A.items()}
    B_new = {key: b.detach().clone().requires_grad_(True) for key, b in new.B.items()}
    orth = 0.0
    for old in method.bank.loras[:2]:
        for key in A_new:
            for i in range(4):
                for j in range(4):
                    orth = orth + torch.abs(torch.dot(old.A[key][i].detach(), A_new[key][j]))
    norms = sum(torch.sqrt((t ** 2).sum()) for t in [*A_new.values(), *B_new.values()])
    want = 0.5 * orth + 0.3 * norms
    want.backward()
    torch.testing.assert_close(total, want)
    for key in A_new:
        torch.testing.assert_close(new.A[key].grad, A_new[key].grad)
        torch.testing.assert_close(new.B[key].grad, B_new[key].grad)
    assert all(p.grad is None for lora in method.bank.loras[:2] for p in lora.parameters())   # frozen


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_inputs(tmp_path_factory.mktemp("olora"), n_train=24, n_test=8)


def train(setup, out, *extra, launcher=(sys.executable,)):
    model_dir, data = setup
    flags = ["--model", str(model_dir), "--data", str(data), "--order", "rev,rot", "--method", "olora",
             "--epochs", "2", "--lr", "1e-2", "--batch-size", "6", "--grad-accum", "2",
             "--max-len", "32", "--lora-rank", "4", "--lora-alpha", "8", "--olora-lambda2", "0.01",
             "--lora-dropout", "0",   # each rank draws its own dropout masks: no dropout, so two ranks are one
             "--eval-samples", "8", "--max-new-tokens", "8", "--threads", "1", "--device", "cpu", *extra]
    return train_process(flags, out, launcher)


@pytest.fixture(scope="module")
def run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("olora-run") / "run"
    train(setup, out)
    return out


def test_a_run_trains_only_its_loras(setup, run):
    base = load_hf(setup[0]).state_dict()
    for k in (1, 2):
        exported = load_hf(run / "checkpoints" / f"task{k:02d}").state_dict()
        assert all(torch.equal(exported[name], t) for name, t in base.items())      # the base, bit for bit
    first, second = (read_method(run / "checkpoints" / f"task{k:02d}" / FILE) for k in (1, 2))
    assert (first[0]["tasks"], second[0]["tasks"]) == (1, 2)
    for name, t in first[1].items():           # task 1's LoRA did not move while task 2 trained
        assert torch.equal(second[1][name], t), name
    assert any(name.startswith("bank.loras.1.B") and t.abs().sum() > 0 for name, t in second[1].items())
    lines = logged(run)
    steps = [e for e in lines if "grad_norm" in e]
    assert [e["step"] for e in steps] == list(range(1, len(steps) + 1))   # counted across tasks
    assert all(e["olora_orth"] == 0 for e in steps if e["task"] == 0)
    assert all(e["olora_orth"] > 0 for e in steps if e["task"] == 1)


def test_checkpoints_are_evaluated_with_their_loras(setup, run):
    checkpoint = run / "checkpoints" / "task02"
    bare = load_hf(checkpoint).eval()
    adapted = attach_saved(load_hf(checkpoint), checkpoint).eval()
    prompts = [[1, 5, 9, 13, 4], [1, 7, 7, 20]]
    assert generate(adapted, prompts, 6) != generate(bare, prompts, 6)
    merged = load_hf(checkpoint)
    method = OLoRA.load(checkpoint / FILE, merged.args)
    merged.load_state_dict(method.bank.merged(merged))     # one set of weights: O-LoRA folds into W exactly
    tokens = torch.tensor(prompts[0])[None]
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(tokens), adapted(tokens), atol=1e-5, rtol=1e-5)


def test_two_ranks_train_as_one_process(setup, run, tmp_path):
    sharded = tmp_path / "two"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29600 + os.getpid() % 1000))
    two = train(setup, sharded, launcher=launcher)
    one = json.loads((run / "results.json").read_text())
    assert two["R"] == one["R"]
    for a, b in zip(logged(run), logged(sharded)):
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (key, a, b)
    _, mine = read_method(run / "checkpoints" / "task02" / FILE)
    _, theirs = read_method(sharded / "checkpoints" / "task02" / FILE)
    for name, t in mine.items():
        # lr 1e-2: AdamW turns the last-bit differences of two reduction orders into ~1e-6 on the weights
        torch.testing.assert_close(theirs[name], t, rtol=1e-4, atol=1e-5, msg=name)
