"""L2P (#13): the pool starts as unscaled token embeddings, the N prompts nearest to the query by cosine are read
first-nearest, the pull term's gradient is autograd's of the naive formula, and the keys train (what every PET
run owes, tests/test_pet_runs.py)."""

import pytest
import torch
from conftest import logged

from minseekr.methods.l2p import L2P
from minseekr.methods.peft import read_method
from minseekr.methods.pet import FILE
from minseekr.network.model import ModelArgs

ARGS = ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, hidden_dim=32, max_seq_len=64)


def pool():
    torch.manual_seed(0)
    method = L2P(ARGS, pool=6, length=2, top_k=3, pull=0.5)
    with torch.no_grad():
        method.prompts.normal_()
        method.keys.normal_()
    return method


def test_the_nearest_prompts_by_cosine_are_read_nearest_first():
    method = pool()
    embeddings = torch.randn(2, 5, ARGS.dim)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])    # the first input is left-padded
    chosen = method.choose(embeddings, mask)
    assert chosen.shape == (2, 3 * 2, ARGS.dim)
    for b in range(2):
        real = embeddings[b][mask[b].bool()]
        q = real.mean(0)
        cos = [float(q @ k / (q.norm() * k.norm())) for k in method.keys.detach()]
        order = sorted(range(6), key=lambda i: -cos[i])[:3]
        torch.testing.assert_close(chosen[b], torch.cat([method.prompts[i] for i in order]))
    # padding is not part of the query: the padded input chooses as its unpadded self
    alone = method.choose(embeddings[:1, 2:], None)
    torch.testing.assert_close(alone[0], chosen[0])


def test_the_pull_term_and_its_gradient_are_the_naive_formula():
    method = pool()
    embeddings, mask = torch.randn(3, 4, ARGS.dim), torch.ones(3, 4, dtype=torch.long)
    method.choose(embeddings, mask)
    term = method.batch_loss()["l2p_pull"]
    term.backward()
    keys = method.keys.detach().clone().requires_grad_(True)
    want = 0.0
    for b in range(3):
        q = embeddings[b].mean(0)
        cos = [q @ k / (q.norm() * k.norm()) for k in keys]
        for i in sorted(range(6), key=lambda i: -float(cos[i].detach()))[:3]:
            want = want - 0.5 * cos[i]
    want.backward()
    torch.testing.assert_close(term, want)
    torch.testing.assert_close(method.keys.grad, keys.grad)
    assert method.batch_loss() == {}                      # taken once per forward


def test_the_pool_starts_as_unscaled_token_embeddings_and_the_keys_as_their_means():
    torch.manual_seed(0)
    table = torch.randn(ARGS.vocab_size, ARGS.dim)
    method = L2P(ARGS, pool=6, length=2, top_k=3, pull=0.5, seed=7)
    method.begin_task(0, lambda ids: table[ids])
    torch.manual_seed(7 * 1000)
    want = table[torch.randint(0, ARGS.vocab_size, (6 * 2,))].view(6, 2, ARGS.dim)   # TRACE's L2P.py @4bcc56e: w
    torch.testing.assert_close(method.prompts.detach(), want, rtol=0, atol=0)
    torch.testing.assert_close(method.keys.detach(), want.mean(1), rtol=0, atol=0)
    method.begin_task(1, lambda ids: table[ids] * 0)                                   # started once, not again
    torch.testing.assert_close(method.prompts.detach(), want, rtol=0, atol=0)


@pytest.fixture
def run(pet_runs):
    return pet_runs("l2p")[1]


def test_the_keys_train(run):
    (_, first), (info, second) = (read_method(run / "checkpoints" / f"task{k:02d}" / FILE) for k in (1, 2))
    assert info["tasks"] == 2
    assert not torch.equal(first["keys"], second["keys"])         # the keys train (TRACE's never move)
    assert all("l2p_pull" in e for e in logged(run) if "task_ce" in e)
