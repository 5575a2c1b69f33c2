"""Progressive Prompts (#13): each task's prompt starts as token embeddings ÷ 100 and is read through TRACE's MLP2
(written out below from its formula), before the earlier tasks' prompts, which are kept as MLP(P) without their
MLPs and do not move; a checkpoint's prompts are the ones generation reads (what every PET run owes,
tests/test_pet_runs.py)."""

import pytest
import torch

from minseekr.methods.peft import read_method
from minseekr.methods.pet import FILE, attach_saved
from minseekr.methods.pp import ProgressivePrompts
from minseekr.network.checkpoint import load_hf, read_args
from minseekr.network.generate import generate
from minseekr.network.model import ModelArgs, Transformer

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, hidden_dim=48, max_seq_len=64)


def mlp2(P, weights):
    """TRACE's ResMLP 'MLP2' with its residual, from the formula: P + W3 tanh(W2 relu(W1 P + b1) + b2) + b3."""
    (W1, b1), (W2, b2), (W3, b3) = weights
    hidden = torch.tanh(torch.relu(P @ W1.T + b1) @ W2.T + b2)
    return P + hidden @ W3.T + b3


def layers(method):
    """The open task's MLP weights and biases, (W, b) per Linear in order, copied."""
    linears = [m for m in method.mlp.modules() if isinstance(m, torch.nn.Linear)]
    return [(m.weight.detach().clone(), m.bias.detach().clone()) for m in linears]


def test_prompts_start_as_token_embeddings_over_100_and_are_read_newest_first_through_their_mlp():
    torch.manual_seed(0)
    model = Transformer(ARGS)
    method = ProgressivePrompts(ARGS, n_tokens=3, seed=5)          # bottleneck 0: TRACE's 2·d
    rows = lambda ids: model.model.embed_tokens.weight[ids]   # noqa: E731
    starts, weights = [], []
    for k in range(3):
        method.begin_task(k, rows)
        torch.manual_seed(5 * 1000 + k)
        want = model.model.embed_tokens.weight[torch.randint(0, 61, (3,))].detach() / 100
        torch.testing.assert_close(method.prompts[k], want, rtol=0, atol=0)   # TRACE's init_new_prompt: w/100
        with torch.no_grad():   # as if trained: the prompt moved away from its start
            method.prompts[k].add_(0.05 * torch.randn(3, ARGS.dim))
        starts.append(method.prompts[k].detach().clone())
        weights.append(layers(method))
    assert [tuple(W.shape) for W, _ in weights[0]] == [(64, 32), (32, 64), (32, 32)]   # d→2d→d→d
    assert [p.requires_grad for p in method.prompts] == [False, False, True]
    assert all(p.requires_grad for p in method.mlp.parameters())
    prefix = method.prefix(2)
    assert prefix.shape == (2, 9, ARGS.dim)
    # [MLP_3(P_3); MLP_2(P_2); MLP_1(P_1)]: the earlier two folded when the next task began, their MLPs dropped
    for slot, k in enumerate((2, 1, 0)):
        torch.testing.assert_close(prefix[0, 3 * slot:3 * slot + 3], mlp2(starts[k], weights[k]))
    assert sum(isinstance(m, torch.nn.Linear) for m in method.modules()) == 3       # one MLP: the open task's


def test_a_method_file_keeps_the_open_tasks_mlp_and_load_folds_it(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ARGS)
    method = ProgressivePrompts(ARGS, n_tokens=2, bottleneck=16, seed=1)
    for k in range(2):
        method.begin_task(k, lambda ids: model.model.embed_tokens.weight[ids])
    method.save(tmp_path / FILE)
    info, state = read_method(tmp_path / FILE)
    assert info["mlp"] and sorted(k for k in state if not k.startswith("mlp.")) == ["prompts.0", "prompts.1"]
    loaded = ProgressivePrompts.load(tmp_path / FILE, ARGS)
    assert loaded.mlp is None and not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded.prefix(1)[0, :2], mlp2(method.prompts[1].detach(), layers(method)))
    assert torch.equal(loaded.prompts[0], method.prompts[0])


@pytest.fixture
def run(pet_runs):
    return pet_runs("pp")[1]


def test_earlier_prompts_do_not_move(run):
    first, second = (run / "checkpoints" / f"task{k:02d}" / FILE for k in (1, 2))
    assert (read_method(first)[0]["tasks"], read_method(second)[0]["tasks"]) == (1, 2)
    kept = ProgressivePrompts.load(first, read_args(first.parent)).prompts[0]   # MLP_1(P_1), folded at load
    torch.testing.assert_close(read_method(second)[1]["prompts.0"], kept)   # unmoved while task 2 trained


def test_generation_reads_the_checkpoints_prompts(run):
    checkpoint = run / "checkpoints" / "task02"
    bare = load_hf(checkpoint).eval()
    prompted = attach_saved(load_hf(checkpoint), checkpoint).eval()
    prompts = [[1, 5, 9, 13, 4], [1, 7, 7, 20]]
    method = ProgressivePrompts.load(checkpoint / FILE, bare.args)
    assert generate(prompted, prompts, 6) == generate(bare, prompts, 6, prefix=method.prefix(2))
