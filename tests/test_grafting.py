"""Attention grafting (Fig. 1): a model run with a source model's attention weights at chosen heads.

The reference is independent of the grafting code: when `source` differs from `final` only in its queries and
keys, grafting every head whose map differs must give exactly `source`'s own logits (same values, output
projection and MLPs), and grafting none must give `final`'s.
"""
import copy

import pytest
import torch

from minseekr.network.generate import generate
from minseekr.network.model import ModelArgs, Transformer
from minseekr.seekr.grafting import Grafted

ARGS = ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=61, hidden_dim=48, max_seq_len=64)
HEAD_DIM = ARGS.dim // ARGS.n_heads


def pair(changed_heads):
    """final, and source = final with other query weights at `changed_heads` [(layer, head)]."""
    torch.manual_seed(0)
    final = Transformer(ARGS)
    final.init_weights(std=0.3)
    source = copy.deepcopy(final)
    with torch.no_grad():
        for layer, head in changed_heads:
            rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            source.model.layers[layer].self_attn.q_proj.weight[rows] = torch.randn(HEAD_DIM, ARGS.dim)
    return final.eval(), source.eval()


def padded_batch():
    tokens = torch.randint(3, ARGS.vocab_size, (2, 12))
    mask = torch.ones_like(tokens)
    mask[1, :5] = 0                   # the second prompt is left-padded
    return tokens, mask


ALL = [(layer, head) for layer in range(ARGS.n_layers) for head in range(ARGS.n_heads)]
SOME = [(0, 1), (2, 2), (2, 3)]       # heads of both key/value groups, in two layers


@pytest.mark.parametrize("changed", [ALL, SOME])
def test_grafting_the_changed_heads_gives_the_source_logits(changed):
    final, source = pair(changed)
    tokens, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want, theirs = source(tokens, mask), final(tokens, mask)
        got = Grafted(final, source, changed)(tokens, mask)
        none = Grafted(final, source, [])(tokens, mask)
    assert (want - theirs)[real].abs().max() > 1e-2                  # the maps differ enough to matter
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(none[real], theirs[real], atol=1e-5, rtol=1e-5)


def test_grafting_part_of_the_changed_heads_is_neither_model():
    final, source = pair(SOME)
    tokens, mask = padded_batch()
    with torch.no_grad():
        partial = Grafted(final, source, SOME[:1])(tokens, mask)
        assert (partial - source(tokens, mask))[mask.bool()].abs().max() > 1e-3
        assert (partial - final(tokens, mask))[mask.bool()].abs().max() > 1e-3


def test_grafted_generation_with_the_cache_equals_without():
    final, source = pair(ALL)
    source.model.layers[1].mlp.up_proj.weight.data.normal_()          # a source unlike final everywhere
    prompts = [[5, 17, 33, 9, 41, 40, 12], [60, 3], [38, 24, 51, 7]]
    grafted = Grafted(final, source, SOME)
    cached = generate(grafted, prompts, 10)
    assert cached == generate(grafted, prompts, 10, use_cache=False)
    assert cached != generate(final, prompts, 10)


def test_models_of_different_shapes_are_refused():
    final = Transformer(ARGS)
    other = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=61, hidden_dim=48, max_seq_len=64))
    with pytest.raises(ValueError, match="same shape"):
        Grafted(final, other, [])
