"""Generation: greedy equals HF's generate and llama2.c's golden, the cache changes nothing, sampling is seeded."""
import json

import pytest
import torch
from conftest import shared_path

from minseekr.network.checkpoint import load_hf
from minseekr.network.generate import generate, next_token
from minseekr.network.model import ModelArgs, Transformer
from minseekr.network.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

EOS, PAD = 2, 0


def tiny_hf(n_kv_heads):
    """A random HF LLaMA and the same weights in minseekr; std 0.3 keeps greedy choices far from ties."""
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, max_position_embeddings=128, initializer_range=0.3,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    model = Transformer(ModelArgs.from_hf_config(hf.config.to_diff_dict()))
    model.load_state_dict(hf.state_dict())
    return hf, model.eval()


def hf_greedy(hf, prompts, max_new_tokens):
    """HF's greedy continuation of each prompt (left-padded batch), cut after its first EOS."""
    T = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                      pad_token_id=PAD, eos_token_id=EOS)[:, T:].tolist()
    return [row[:row.index(EOS) + 1] if EOS in row else row for row in out]


PROMPTS = [[5, 17, 33, 9, 71, 40, 12], [60, 3], [88, 24, 51, 7]]


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_greedy_batch_of_different_lengths_equals_hf_generate(n_kv_heads, use_cache):
    hf, model = tiny_hf(n_kv_heads)
    expected = hf_greedy(hf, PROMPTS, 24)
    got = generate(model, PROMPTS, 24, eos_id=EOS, pad_id=PAD, use_cache=use_cache)
    assert got == expected
    # Each prompt alone (no padding at all) gives what it gets in the padded batch.
    assert [generate(model, [p], 24, eos_id=EOS)[0] for p in PROMPTS] == expected


def test_eos_stops_one_sequence_while_the_others_continue():
    _, model = tiny_hf(2)
    free = generate(model, PROMPTS, 20)                       # no EOS: every row runs 20 tokens
    assert all(len(row) == 20 for row in free)
    # Plant as EOS the 4th token of prompt 0's continuation, one that the others never produce.
    eos = free[0][3]
    assert eos not in free[0][:3] and eos not in free[1] + free[2]
    got = generate(model, PROMPTS, 20, eos_id=eos)
    assert got == [free[0][:4], free[1], free[2]]


@pytest.fixture(scope="module")
def stories():
    path = shared_path("artifacts", "stories260K-hf")
    golden = json.loads(shared_path("artifacts", "goldens", "stories260K_golden.json").read_text())
    return load_hf(path), Tokenizer(path / "tokenizer.model"), golden


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_stories260K_greedy_from_bos_reproduces_llama2c_golden(stories, use_cache):
    model, tok, golden = stories
    ids = golden["greedy_ids_including_bos"]
    assert ids[0] == tok.bos_id and golden["n_generated"] == 200
    got = generate(model, [[tok.bos_id]], 200, use_cache=use_cache)[0]
    assert got == ids[1:]
    assert tok.decode(got) == golden["expected_text"]


def test_sampling_is_reproducible_with_a_seeded_generator_and_greedy_as_top_p_vanishes():
    _, model = tiny_hf(2)
    def sample(seed, **kw):
        return generate(model, PROMPTS, 30, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)
    assert sample(7, top_p=0.9) == sample(7, top_p=0.9)
    assert sample(7, top_p=0.9) != sample(8, top_p=0.9)
    assert sample(7, top_p=0.0) == generate(model, PROMPTS, 30)


def test_nucleus_samples_the_top_p_set_renormalised_at_the_given_temperature():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    # top_p=0.75: {0, 1} is the smallest prefix reaching 0.75, so 2 and 3 never appear.
    freq = torch.bincount(next_token(logits, 1.0, 0.75, g), minlength=4) / 20000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0, 0]) / 0.8, atol=0.015, rtol=0)
    # Temperature 0.5 squares the probabilities before renormalising; top_p=1 keeps them all.
    freq = torch.bincount(next_token(logits, 0.5, 1.0, g), minlength=4) / 20000
    torch.testing.assert_close(freq, probs**2 / (probs**2).sum(), atol=0.015, rtol=0)


def test_generation_runs_without_grad_and_restores_training_mode():
    _, model = tiny_hf(4)
    model.train()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    generate(model, PROMPTS, 3)
    assert model.training and seen and all(s == (False, False) for s in seen)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [[1], []], 3)
