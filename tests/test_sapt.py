"""SAPT (#13): each input's weights over the tasks are a distribution from its max-pooled prompt, ARM's term is
the naive KL and vanishes where the weights keep the saved vectors, and on separable tasks the selection routes each
task's inputs to its own LoRA (what every PET run owes, tests/test_pet_runs.py)."""
import math

import pytest
import torch
from conftest import logged

from minseekr.model import ModelArgs
from minseekr.peft import read_method
from minseekr.pet import FILE
from minseekr.pseudo import frame, released
from minseekr.sapt import SAPT

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
    method = sapt(1)
    memory(method, 0, torch.randn(5, ARGS.dim), torch.randn(3, ARGS.dim))
    method.begin_task(1)
    memory(method, 1, torch.randn(5, ARGS.dim), torch.randn(4, ARGS.dim))
    method.begin_task(2)
    assert method.add_penalty_grad(2)["arm_kl"] == pytest.approx(float(method.arm(2).detach()))
    want = 0.0
    for anchor, inputs in zip(method.anchors, method.pseudo):
        target = torch.cat([anchor, torch.zeros(3 - anchor.numel())])
        kl = [sum(p * (p / q).log() for p, q in zip(target, naive_weights(method, x)) if p > 0) for x in inputs]
        want = want + sum(kl) / len(kl)
    grads = torch.autograd.grad(want, [method.keys[2], *method.transform.parameters()])
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
    assert all(r["arm_kl"] > 0 for r in logged(out) if r.get("task") == 1 and "step" in r)


def test_released_pseudo_inputs_take_the_tasks_own_frame(tmp_path):
    prompts = ["Definition: sort.\nInput: b a\nOutput: ", "Definition: sort.\nInput: c d\nOutput: "]
    assert frame(prompts) == ("Definition: sort.\nInput: ", "\nOutput: ")
    folder = tmp_path / "task007_sorting"
    folder.mkdir()
    (folder / "pseudo.json").write_text('{"Definition": ["sort."], "Instances": [{"input": "z y", "output": ""}]}')
    assert released(tmp_path, "task007_sort_words", prompts) == ["Definition: sort.\nInput: z y\nOutput: "]
    with pytest.raises(ValueError, match="no folder for task task008"):
        released(tmp_path, "task008", prompts)


def test_a_missing_pseudo_input_folder_stops_the_run_before_training(tmp_path):
    from minseekr.config import ContinualConfig
    from minseekr.continual import ContinualTrainer
    from minseekr.data import Task
    from minseekr.synthetic import make_records, train_tokenizer
    from minseekr.tokenizer import Tokenizer
    from test_continual import tiny_model
    train_tokenizer(tmp_path / "t.model")
    tok = Tokenizer(str(tmp_path / "t.model"))
    tasks = [Task(t, make_records(t, 8, 0), [], make_records(t, 2, 1)) for t in ("rev", "rot")]
    cfg = ContinualConfig(method="sapt", pseudo_inputs=str(tmp_path / "none"), replay_ratio=0.25)
    with pytest.raises(ValueError, match=f"--pseudo-inputs {tmp_path / 'none'}: no folder for task rev"):
        ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # and a task of which the model wrote no pseudo-input keeps an empty memory
    trainer = ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, ContinualConfig(method="sapt"), tmp_path / "r")
    trainer.pet.begin_task(0)
    trainer.pet.end_task(0, trainer.prompt_embeddings(["rev:abc="]), trainer.prompt_embeddings([]))
    assert trainer.pet.pseudo[0].shape == (0, 32) and trainer.pet.anchors[0].tolist() == [1.0]


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
