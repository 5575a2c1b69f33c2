"""SAPT (#13): each input's weights over the tasks are a distribution from its max-pooled prompt, ARM's term is
the naive KL and vanishes where the weights keep the saved vectors, and on separable tasks the selection routes each
task's inputs to its own LoRA (what every PET run owes, tests/test_pet_runs.py)."""
import math
import sys

import pytest
import torch
from conftest import ROOT, logged
from test_continual import tiny_model

from minseekr.evaluation.data import Task
from minseekr.evaluation.scoring import prompt_room
from minseekr.evaluation.synthetic import make_records, train_tokenizer
from minseekr.methods.peft import read_method
from minseekr.methods.pet import FILE, attach_saved
from minseekr.methods.pseudo import frame, released
from minseekr.methods.sapt import SAPT
from minseekr.network.checkpoint import load_hf
from minseekr.network.generate import generate
from minseekr.network.model import ModelArgs
from minseekr.network.tokenizer import Tokenizer
from minseekr.run.config import ContinualConfig
from minseekr.run.trainer import ContinualTrainer
from minseekr.runtime import InputError

sys.path.insert(0, str(ROOT / "tools"))
import sapt_routing  # noqa: E402

ARGS = ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, hidden_dim=32, max_seq_len=64)


def sapt(tasks: int, arm_weight: float = 1.0) -> SAPT:
    method = SAPT(ARGS, rank=2, alpha=4.0, arm_weight=arm_weight)
    for k in range(tasks):
        method.begin_task(k)
    return method


def naive_weights(method, pooled):
    """softmax_t(k_t · LN(SiLU(W2 W1 x)) / √d), written out."""
    W1, W2, norm = method.transform[0].weight, method.transform[1].weight, method.transform[3]
    h = W2 @ (W1 @ pooled)
    h = h * torch.sigmoid(h)
    h = (h - h.mean()) / torch.sqrt(h.var(unbiased=False) + norm.eps) * norm.weight + norm.bias
    return torch.softmax(torch.stack([k @ h for k in method.keys]) / math.sqrt(ARGS.dim), 0)


def test_the_weights_are_a_distribution_per_sample_from_the_max_pooled_prompt():
    method = sapt(3)
    embeddings = torch.randn(2, 5, ARGS.dim)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])     # the first input is left-padded
    assert method.choose(embeddings, mask) is None                # weights, no soft prompts
    weights = method.bank.weights
    assert weights.shape == (2, 3) and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(2))
    for b in range(2):
        pooled = embeddings[b][mask[b].bool()].max(0).values
        torch.testing.assert_close(weights[b], naive_weights(method, pooled))
    method.choose(embeddings[:1, 2:], None)                       # padding is not part of the query
    torch.testing.assert_close(method.bank.weights[0], weights[0])


def test_only_the_current_lora_its_key_and_the_transform_train():
    method = sapt(3)
    trainable = {id(p) for p in method.trainable()}
    assert trainable == {id(p) for p in (*method.bank.loras[2].parameters(), method.keys[2],
                                         *method.transform.parameters())}


def memory(method, k, held_out, pseudo):
    """end_task(k) from (n, dim) pooled vectors, given as one-token inputs."""
    method.end_task(k, list(held_out.unsqueeze(1)), list(pseudo.unsqueeze(1)))


def test_arm_is_the_naive_kl_to_the_zero_padded_saved_vectors():
    torch.manual_seed(0)
    method = sapt(1, arm_weight=0.7)
    memory(method, 0, torch.randn(5, ARGS.dim), torch.randn(3, ARGS.dim))
    method.begin_task(1)
    memory(method, 1, torch.randn(5, ARGS.dim), torch.randn(4, ARGS.dim))
    method.begin_task(2)
    want = 0.0
    for anchor, inputs in zip(method.anchors, method.pseudo):
        target = torch.cat([anchor, torch.zeros(3 - anchor.numel())])
        kl = [sum(p * (p / q).log() for p, q in zip(target, naive_weights(method, x)) if p > 0) for x in inputs]
        want = want + 0.7 * sum(kl) / len(kl)
    grads = torch.autograd.grad(want, [method.keys[2], *method.transform.parameters()])
    assert float(want.detach()) > 0.01
    assert method.add_penalty_grad(2)["arm_kl"] == pytest.approx(float(want.detach()), rel=1e-5)   # as logged
    torch.testing.assert_close(method.arm(2), want.detach())
    for p, g in zip([method.keys[2], *method.transform.parameters()], grads):
        torch.testing.assert_close(p.grad, g)
    assert method.keys[0].grad is None and method.keys[1].grad is None    # earlier keys are frozen


def test_arm_vanishes_where_the_weights_keep_the_saved_vectors():
    torch.manual_seed(0)
    method = sapt(1)
    x = torch.randn(1, ARGS.dim).expand(4, -1)
    memory(method, 0, x, x)                   # w̄_0 = [1]: one task so far
    method.begin_task(1)
    assert float(method.arm(1).detach()) > 0           # a random new key takes some of task 0's weight
    with torch.no_grad():                     # a key that scores task 0's inputs far below: w(x) = [1, 0] exactly
        method.keys[1].copy_(-1e4 * method.transform(x[0]))
    assert method.weights(x[:1]).tolist() == [[1.0, 0.0]]
    assert float(method.arm(1).detach()) == 0


def route(arm_weight: float):
    """Two tasks whose inputs are separable; training the selection as the LM loss does when only a task's own
    LoRA helps it (its output Σ_t w_t u_t pulled to u_k), with ARM on task 0's pseudo-inputs while task 1 trains;
    the mean weights of each task's test inputs."""
    torch.manual_seed(0)
    centres = torch.randn(2, ARGS.dim) * 3
    draw = lambda j, n: centres[j] + torch.randn(n, ARGS.dim)   # noqa: E731
    u = torch.eye(2)
    method = SAPT(ARGS, rank=2, alpha=4.0, arm_weight=arm_weight)
    for k in range(2):
        method.begin_task(k)
        optim = torch.optim.AdamW(method.trainable(), lr=1e-2)
        for _ in range(200):
            w = method.weights(draw(k, 16))
            ((w @ u[:k + 1] - u[k]) ** 2).sum(1).mean().backward()
            method.add_penalty_grad(k)
            optim.step()
            optim.zero_grad()
        memory(method, k, draw(k, 32), draw(k, 8))
    with torch.no_grad():
        return [method.weights(draw(j, 64)).mean(0) for j in range(2)]


def test_separable_tasks_are_routed_to_their_own_lora_and_arm_is_what_keeps_the_old_one():
    old, new = route(arm_weight=1.0)
    assert old[0] > 0.9 and new[1] > 0.9
    drifted, _ = route(arm_weight=0.0)   # without ARM the new key takes the old task's inputs too
    assert drifted[0] < 0.5


def test_a_run_saves_the_task_memories_and_logs_arm(pet_runs):
    _, out = pet_runs("sapt")
    info, tensors = read_method(out / "checkpoints" / "task02" / FILE)
    assert info["tasks"] == 2 and tensors["anchor0"].shape == (1,) and tensors["anchor1"].shape == (2,)
    # at most --replay-ratio 0.25 of 24 inputs, written by θ_1: those that reached the prompts' shared ending "="
    assert 1 <= len(tensors["pseudo0"]) <= 6 and tensors["pseudo0"].shape[1] == 32
    assert [r for r in logged(out) if "arm_kl" in r and r["task"] == 0] == []
    steps = [r for r in logged(out) if r.get("task") == 1 and "step" in r]
    assert steps and all(r["arm_kl"] > 0 for r in steps)


def test_released_pseudo_inputs_take_the_tasks_own_frame(tmp_path):
    prompts = ["Definition: sort.\nInput: b a\nOutput: ", "Definition: sort.\nInput: c d\nOutput: "]
    assert frame(prompts) == ("Definition: sort.\nInput: ", "\nOutput: ")
    folder = tmp_path / "task007_sorting"
    folder.mkdir()
    (folder / "pseudo.json").write_text('{"Definition": ["sort."], "Instances": [{"input": "z y", "output": ""}]}')
    assert released(str(tmp_path), "task007_sort_words", prompts) == ["Definition: sort.\nInput: z y\nOutput: "]
    with pytest.raises(ValueError, match="no folder for task task008"):
        released(str(tmp_path), "task008", prompts)   # a folder given must hold every task


def test_pseudo_inputs_auto_reads_sapt_pseudo_beside_the_data_where_it_has_the_task(tmp_path):
    prompts = ["rev:abc=", "rev:ba="]
    folder = tmp_path / "sapt-pseudo" / "rev"
    folder.mkdir(parents=True)
    (folder / "pseudo.json").write_text('{"Instances": [{"input": "cab", "output": ""}]}')
    data = tmp_path / "superni"
    assert released("auto", "rev", prompts, data) == ["rev:cab="]
    assert released("auto", "rot", prompts, data) is None          # a task it lacks: the model writes them
    assert released("auto", "rev", prompts, tmp_path / "elsewhere" / "data") is None
    assert released("auto", "rev", prompts) is None                # no --data known (the trainer's own check)
    assert released("self", "rev", prompts, data) is None


def test_arms_pseudo_inputs_are_pooled_with_eos_and_the_routing_queries_without(tmp_path):
    """As SAPT's memory_replay (input_ids: the input, its empty label, EOS) and its routing (input_ids_wo_label);
    `--pseudo-inputs auto` finds the released ones beside --data."""
    train_tokenizer(tmp_path / "t.model")
    tok = Tokenizer(str(tmp_path / "t.model"))
    folder = tmp_path / "sapt-pseudo" / "rev"
    folder.mkdir(parents=True)
    (folder / "pseudo.json").write_text('{"Instances": [{"input": "cab", "output": ""}, {"input": "b", "output": ""}]}')
    tasks = [Task(t, make_records(t, 8, 0), make_records(t, 3, 2), make_records(t, 2, 1)) for t in ("rev", "rot")]
    trainer = ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, ContinualConfig(method="sapt"),
                               tmp_path / "run", spec={"data": str(tmp_path / "data")})
    trainer.method.pet.begin_task(0)
    (tmp_path / "task01").mkdir()
    trainer.method.remember(0, tmp_path / "task01", trainer)
    E = tiny_model(tok.vocab_size).model.embed_tokens.weight.detach()
    pooled = lambda ids: E[ids].max(0).values   # noqa: E731
    with_eos = torch.stack([pooled(tok.prompt(p, 1024) + [tok.eos_id]) for p in ("rev:cab=", "rev:b=")])
    without = torch.stack([pooled(tok.prompt(p, 1024)) for p in ("rev:cab=", "rev:b=")])
    assert not torch.equal(with_eos, without)                     # EOS changes these queries
    torch.testing.assert_close(trainer.method.pet.pseudo[0], with_eos)
    read = read_method(tmp_path / "task01" / FILE)[1]             # and the checkpoint keeps them
    torch.testing.assert_close(read["pseudo0"], with_eos)
    # w̄ with a second task: the held-out (eval) prompts' mean weights, queried without EOS
    trainer.method.pet.begin_task(1)
    trainer.method.pet.end_task(1, trainer.method.prompt_embeddings(tok, [r["prompt"] for r in tasks[1].eval]), iter(()))
    held_out = torch.stack([pooled(tok.prompt(r["prompt"], 1024)) for r in tasks[1].eval])
    torch.testing.assert_close(trainer.method.pet.anchors[1], trainer.method.pet.weights(held_out).mean(0).detach())


def test_a_missing_pseudo_input_folder_stops_the_run_before_training(tmp_path):
    train_tokenizer(tmp_path / "t.model")
    tok = Tokenizer(str(tmp_path / "t.model"))
    tasks = [Task(t, make_records(t, 8, 0), [], make_records(t, 2, 1)) for t in ("rev", "rot")]
    cfg = ContinualConfig(method="sapt", pseudo_inputs=str(tmp_path / "none"), replay_ratio=0.25)
    with pytest.raises(ValueError, match=f"--pseudo-inputs {tmp_path / 'none'}: no folder for task rev"):
        ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # and a task of which the model wrote no pseudo-input keeps an empty memory
    trainer = ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, ContinualConfig(method="sapt"), tmp_path / "r")
    trainer.method.pet.begin_task(0)
    trainer.method.pet.end_task(0, trainer.method.prompt_embeddings(tok, ["rev:abc="]), trainer.method.prompt_embeddings(tok, []))
    assert trainer.method.pet.pseudo[0].shape == (0, 32) and trainer.method.pet.anchors[0].tolist() == [1.0]


def test_a_task_without_pseudo_inputs_adds_nothing_to_arm():
    torch.manual_seed(0)
    method = sapt(1)
    memory(method, 0, torch.randn(3, ARGS.dim), torch.zeros(0, ARGS.dim))   # the model wrote none for task 0
    method.begin_task(1)
    memory(method, 1, torch.randn(3, ARGS.dim), torch.randn(2, ARGS.dim))
    method.begin_task(2)
    assert method.pseudo[0].shape == (0, ARGS.dim)
    target = torch.cat([method.anchors[1], torch.zeros(1)])
    want = sum(sum(p * (p / q).log() for p, q in zip(target, naive_weights(method, x)) if p > 0)
               for x in method.pseudo[1]) / 2
    torch.testing.assert_close(method.arm(2).detach(), want.detach())
    assert sapt(1).add_penalty_grad(0) == {}
    empty = sapt(1)
    memory(empty, 0, torch.randn(3, ARGS.dim), torch.zeros(0, ARGS.dim))
    empty.begin_task(1)
    assert empty.add_penalty_grad(1) == {"arm_kl": 0.0}          # nothing to reflect on, and no error


def test_the_routing_tool_reports_the_weights_generation_routes_each_tasks_test_inputs_with(pet_runs, capsys):
    """tools/sapt_routing.py against the routing that generation itself sets, input by input, at each checkpoint."""
    (model_dir, _), out = pet_runs("sapt")
    table = sapt_routing.routing(out)
    assert [[row["task"] for row in rows] for rows in table] == [["rev"], ["rev", "rot"]]
    tok = Tokenizer(str(model_dir / "tokenizer.model"))
    for k, rows in enumerate(table, 1):
        checkpoint = out / "checkpoints" / f"task{k:02d}"
        model = attach_saved(load_hf(checkpoint), checkpoint).eval()
        method, saved = model.soft_prompts.__self__, read_method(checkpoint / FILE)[1]
        for j, row in enumerate(rows):
            weights = []
            for record in make_records(row["task"], 8, 1):        # the run's test records (--eval-samples 8)
                generate(model, [tok.prompt(record["prompt"], prompt_room(1024, 8, model.args))], 1)
                weights.append(method.bank.weights[0])
            w = torch.stack(weights)
            assert w.shape == (8, k) and row["inputs"] == 8
            torch.testing.assert_close(torch.tensor(row["mean"]), w.mean(0))
            assert row["above_half"] == (w > 0.5).sum(0).tolist()
            assert row["saved"] == saved[f"anchor{j}"].tolist()
    w = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.95, 0.05]])
    assert sapt_routing.summary(w) == {"inputs": 3, "mean": pytest.approx([1.85 / 3, 1.15 / 3]), "above_half": [2, 1]}
    sapt_routing.main([str(out)])
    printed = capsys.readouterr().out
    assert "θ_2" in printed and f"task 2 rot: 8 test inputs, mean [{table[1][1]['mean'][0]:.3f} " in printed
    with pytest.raises(InputError, match="the run's method is lfpt5"):
        sapt_routing.routing(pet_runs("lfpt5")[1])
