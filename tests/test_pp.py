"""Progressive Prompts (#13): each task's prompt is read before the earlier ones', earlier prompts do not move,
the base stays bit-identical, a checkpoint is evaluated with its prompts, and two ranks train as one process."""
import json
import os
import sys

import pytest
import torch
from conftest import logged, tiny_run_inputs, train_process

from minseekr.checkpoint import load_hf
from minseekr.generate import generate
from minseekr.model import ModelArgs, Transformer
from minseekr.peft import read_method
from minseekr.pet import FILE, attach_saved
from minseekr.pp import ProgressivePrompts

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, hidden_dim=48, max_seq_len=64)


def test_prompts_start_as_token_embeddings_and_are_read_newest_first():
    torch.manual_seed(0)
    model = Transformer(ARGS)
    method = ProgressivePrompts(ARGS, n_tokens=3, bottleneck=16, seed=5)
    rows = lambda ids: model.model.embed_tokens.weight[ids]   # noqa: E731
    for k in range(3):
        method.begin_task(k, rows)
    for k in range(3):
        torch.manual_seed(5 * 1000 + k)
        torch.testing.assert_close(method.prompts[k], model.model.embed_tokens.weight[torch.randint(0, 61, (3,))])
    assert [p.requires_grad for p in method.prompts] == [False, False, True]
    prefix = method.prefix(2)
    assert prefix.shape == (2, 9, ARGS.dim)
    for slot, k in enumerate((2, 1, 0)):      # [MLP_3(P_3); MLP_2(P_2); MLP_1(P_1)]
        mlp = method.mlps[k]
        want = method.prompts[k] + mlp.up(torch.tanh(mlp.down(method.prompts[k])))
        torch.testing.assert_close(prefix[0, 3 * slot:3 * slot + 3], want)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_inputs(tmp_path_factory.mktemp("pp"), n_train=24, n_test=8)


def train(setup, out, launcher=(sys.executable,)):
    model_dir, data = setup
    flags = ["--model", str(model_dir), "--data", str(data), "--order", "rev,rot", "--method", "pp",
             "--epochs", "2", "--lr", "3e-2", "--batch-size", "6", "--grad-accum", "2", "--max-len", "32",
             "--prompt-tokens", "4", "--prompt-bottleneck", "16", "--eval-samples", "8", "--max-new-tokens", "8",
             "--threads", "1", "--device", "cpu"]
    return train_process(flags, out, launcher)


@pytest.fixture(scope="module")
def run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("pp-run") / "run"
    train(setup, out)
    return out


def test_a_run_trains_only_the_new_prompt(setup, run):
    base = load_hf(setup[0]).state_dict()
    exported = load_hf(run / "checkpoints" / "task02").state_dict()
    assert all(torch.equal(exported[name], t) for name, t in base.items())
    (first_info, first), (second_info, second) = (read_method(run / "checkpoints" / f"task{k:02d}" / FILE)
                                                  for k in (1, 2))
    assert (first_info["tasks"], second_info["tasks"]) == (1, 2)
    for name, t in first.items():
        assert torch.equal(second[name], t), name            # task 1's prompt and MLP did not move


def test_a_checkpoint_is_evaluated_with_its_prompts(run):
    checkpoint = run / "checkpoints" / "task02"
    bare = load_hf(checkpoint).eval()
    prompted = attach_saved(load_hf(checkpoint), checkpoint).eval()
    prompts = [[1, 5, 9, 13, 4], [1, 7, 7, 20]]
    answers = generate(prompted, prompts, 6)
    assert answers != generate(bare, prompts, 6)
    assert answers == generate(prompted, prompts, 6, use_cache=False)
    method = ProgressivePrompts.load(checkpoint / FILE, bare.args)
    assert answers == generate(bare, prompts, 6, prefix=method.prefix(2))


def test_two_ranks_train_as_one_process(setup, run, tmp_path):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29700 + os.getpid() % 1000))
    two = train(setup, tmp_path / "two", launcher)
    assert two["R"] == json.loads((run / "results.json").read_text())["R"]
    for a, b in zip(logged(run), logged(tmp_path / "two")):
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (key, a, b)
