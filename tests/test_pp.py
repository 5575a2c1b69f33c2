"""Progressive Prompts (#13): each task's prompt starts as token embeddings and is read before the earlier ones',
earlier prompts do not move, and a checkpoint's prompts are the ones generation reads (what every PET run owes,
tests/test_pet_runs.py)."""

import pytest
import torch

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


@pytest.fixture
def run(pet_runs):
    return pet_runs("pp")[1]


def test_earlier_prompts_do_not_move(run):
    (first_info, first), (second_info, second) = (read_method(run / "checkpoints" / f"task{k:02d}" / FILE)
                                                  for k in (1, 2))
    assert (first_info["tasks"], second_info["tasks"]) == (1, 2)
    for name, t in first.items():
        assert torch.equal(second[name], t), name            # task 1's prompt and MLP did not move


def test_generation_reads_the_checkpoints_prompts(run):
    checkpoint = run / "checkpoints" / "task02"
    bare = load_hf(checkpoint).eval()
    prompted = attach_saved(load_hf(checkpoint), checkpoint).eval()
    prompts = [[1, 5, 9, 13, 4], [1, 7, 7, 20]]
    method = ProgressivePrompts.load(checkpoint / FILE, bare.args)
    assert generate(prompted, prompts, 6) == generate(bare, prompts, 6, prefix=method.prefix(2))
