"""Llama-3.x's RoPE scalings, Qwen2, Mistral and Gemma-3 compute what transformers computes, and SEEKR's machinery
stays exact on them: sliding windows, q/k norms, biases, MQA, head_dim ≠ dim/heads and Gemma's query scale.

Each family is a tiny random transformers model (every weight random, norms and biases included, so no term can
hide), saved with `save_pretrained` and loaded with `load_hf`; the reference is transformers' eager attention.
"""
import json

import pytest
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from minseekr.network.checkpoint import load_hf, save_hf
from minseekr.network.generate import generate
from minseekr.network.model import ModelArgs, sequence_loss
from minseekr.seekr import heads
from minseekr.seekr.kl import AttentionKL

BASE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=61, rms_norm_eps=1e-5, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
FAMILIES = {   # name: (config class, model class, settings)
    "llama3": (LlamaConfig, LlamaForCausalLM, dict(rope_parameters=LLAMA3, tie_word_embeddings=True)),
    "linear": (LlamaConfig, LlamaForCausalLM, dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4,
                                                                    "factor": 2.5})),
    "dynamic": (LlamaConfig, LlamaForCausalLM, dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4,
                                                                     "factor": 2.0}, max_position_embeddings=8)),
    "yarn": (LlamaConfig, LlamaForCausalLM, dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                                                  "factor": 4.0, "original_max_position_embeddings": 8})),
    "yarn_ramp": (LlamaConfig, LlamaForCausalLM, dict(head_dim=16, rope_parameters={   # the ramp inside the dims
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 2048,
        "truncate": False, "beta_fast": 24})),
    "llama_biases": (LlamaConfig, LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2_window": (Qwen2Config, Qwen2ForCausalLM, dict(use_sliding_window=True, sliding_window=4,
                                                         max_window_layers=1, num_hidden_layers=3)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=5, head_dim=16)),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(
        head_dim=16, num_key_value_heads=1, sliding_window=5, query_pre_attn_scalar=24, num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
}
S = 12   # longer than every window and than the dynamic and yarn models' trained lengths


def hf_model(name):
    config_class, model_class, settings = FAMILIES[name]
    torch.manual_seed(0)
    model = model_class(config_class(**{**BASE, **settings}, attn_implementation="eager"))
    with torch.no_grad():
        for key, p in model.named_parameters():
            one = 1.0 if key.endswith("norm.weight") and name != "gemma3" else 0.0   # Gemma's norm is x̂·(1 + w)
            p.copy_(one + 0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(name, transformers model, ours loaded from its save_pretrained directory, the directory)."""
    hf = hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, load_hf(folder), folder


def padded(side: str):
    torch.manual_seed(1)
    tokens = torch.randint(3, 61, (3, S))
    mask = torch.ones(3, S, dtype=torch.long)
    if side == "left":
        mask[1, :4], mask[2, :7] = 0, 0
    elif side == "right":
        mask[1, 8:], mask[2, 5:] = 0, 0
    return tokens, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("side", ["none", "left", "right"])
def test_logits_and_attention_equal_transformers_eager(pair, side):
    name, hf, ours, _ = pair
    tokens, mask, positions = padded(side)
    with torch.no_grad():
        logits, maps = ours(tokens, mask, return_attn=True)
        ref = hf(tokens, attention_mask=mask, position_ids=positions, output_attentions=True)
    real = mask.bool()
    scale = ref.logits[real].abs().max()
    assert (logits[real] - ref.logits[real]).abs().max() <= 1e-5 * max(1.0, scale)
    for ours_map, hf_map in zip(maps, ref.attentions, strict=True):   # real query rows; zeros outside a window
        assert (ours_map.transpose(1, 2)[real] - hf_map.transpose(1, 2)[real]).abs().max() <= 1e-5


def test_gradients_equal_transformers(pair):
    name, hf, ours, _ = pair
    tokens, mask, positions = padded("left")
    # Only what real rows predict: a pad row's output is each library's own (it predicts the first real token).
    labels = tokens.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    sequence_loss(ours(tokens, mask), labels).sum().backward()
    hf.zero_grad()
    sequence_loss(hf(tokens, attention_mask=mask, position_ids=positions).logits, labels).sum().backward()
    hf_grads = dict(hf.named_parameters())
    for key, p in ours.named_parameters():
        reference = hf_grads[key].grad
        assert (p.grad - reference).abs().max() <= 1e-5 * max(1.0, reference.abs().max()), key
    ours.zero_grad()
    hf.zero_grad()


def test_the_config_reads_back_and_save_hf_loads_in_transformers(pair, tmp_path):
    name, hf, ours, folder = pair
    config = json.loads((folder / "config.json").read_text())
    assert ModelArgs.from_hf_config(ours.args.to_hf_config()) == ours.args == ModelArgs.from_hf_config(config)
    save_hf(ours, tmp_path)
    again = type(hf).from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens, mask, positions = padded("none")
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, hf(tokens).logits)


def test_seekr_attention_rows_and_fused_kl_respect_each_layer(pair):
    """The probe's rows (q scaled, q/k normed, within the window) are the eager maps' rows, and the fused KL and
    its gradient equal the naive KL of the model's own maps."""
    name, hf, ours, _ = pair
    tokens, mask, _ = padded("right")
    rows = heads.sample_query_rows(mask, 5, torch.Generator().manual_seed(2))
    batch = {"input_ids": tokens, "labels": tokens, "attention_mask": mask}
    got = heads.attention_at_rows(ours, [batch], [rows])[0]                        # (L, B, H, T, S)
    with torch.no_grad():
        _, maps = ours(tokens, mask, return_attn=True)
    take = rows.clamp(min=0)[:, None, :, None].expand(-1, ours.args.n_heads, -1, S)
    for layer, full in enumerate(maps):
        expected = full.gather(2, take) * (rows >= 0)[:, None, :, None]
        assert (got[layer] - expected).abs().max() <= 1e-5
    pairs = [(l, h) for l in range(ours.args.n_layers) for h in (0, ours.args.n_heads - 1)]
    teacher = torch.softmax(torch.randn(3, len(pairs), rows.shape[1], S), -1) * (rows >= 0)[:, None, :, None]
    hidden = ~torch.stack([expected_entries(ours.args.windows[l], rows, mask) for l, _ in pairs], 1)
    teacher = teacher.masked_fill(hidden, 0.0)
    teacher = teacher / teacher.sum(-1, keepdim=True).clamp(min=1e-12)
    probe = AttentionKL(pairs, rows, teacher, mask, windows=ours.args.windows)
    ours(tokens, mask, probe=probe)
    fused = probe.total()
    fused_grads = torch.autograd.grad(fused, list(ours.parameters()), allow_unused=True)
    _, maps = ours(tokens, mask, return_attn=True)
    naive = 0.0
    for i, (layer, head) in enumerate(pairs):
        student = maps[layer][:, head].gather(1, rows.clamp(min=0)[..., None].expand(-1, -1, S))
        a = teacher[:, i]
        naive = naive + (torch.xlogy(a, a) - a * student.clamp(min=1e-30).log()).masked_fill(hidden[:, i], 0).sum()
    naive_grads = torch.autograd.grad(naive, list(ours.parameters()), allow_unused=True)
    assert abs(fused.item() - naive.item()) <= 1e-5 * max(1.0, abs(naive.item()))
    for f, n in zip(fused_grads, naive_grads):
        if n is not None:
            assert (f - n).abs().max() <= 1e-5 * max(1.0, n.abs().max())


def expected_entries(window, rows, mask):
    """(B, T, S) bool: the keys a real query row attends to (causal, real, within the layer's window)."""
    keys, real = torch.arange(S), mask.bool()
    visible = (keys <= rows[..., None]) & real[:, None, :] & ((rows >= 0) & real.gather(1, rows.clamp(min=0)))[..., None]
    if window is not None:
        visible &= keys > rows[..., None] - window
    return visible


def test_sensitivity_is_the_norm_of_dl_da_over_each_layers_attention(pair):
    """Eq. 7 on a windowed model: ‖∂L/∂A‖ over the entries that are attention in each layer, against autograd
    through the model's own maps."""
    name, hf, ours, _ = pair
    tokens, mask, _ = padded("right")
    labels = tokens.masked_fill(mask == 0, -100)
    batch = {"input_ids": tokens, "labels": labels, "attention_mask": mask}
    got = heads.task_sensitivity(ours, [batch])
    logits, maps = ours(tokens, mask, return_attn=True)
    grads = torch.autograd.grad(sequence_loss(logits, labels).sum(), maps)
    every = torch.arange(S).expand(3, S)
    expected = torch.stack([
        (g.square() * expected_entries(w, every, mask)[:, None]).sum((-2, -1)).sqrt().mean(0)
        for g, w in zip(grads, ours.args.windows)])
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max())


def test_greedy_generation_with_the_kv_cache_equals_transformers(pair):
    name, hf, ours, _ = pair
    prompt = torch.randint(3, 61, (1, 6), generator=torch.Generator().manual_seed(3))
    got = generate(ours, prompt.tolist(), max_new_tokens=8, eos_id=2)   # both stop after EOS
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0)
    assert got[0] == ref[0, prompt.shape[1]:].tolist()


def test_forgettability_is_the_change_of_each_layers_attention_where_it_attends(pair):
    """Eq. 9 between the model and a perturbed copy, every row: ‖A_after − A_before‖_F over each layer's own
    entries (causal, real, within its window), against the two models' full maps."""
    name, hf, ours, folder = pair
    other = load_hf(folder)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokens, mask, _ = padded("right")
    batch = {"input_ids": tokens, "labels": tokens, "attention_mask": mask}
    got = heads.forgettability(other, ours, [batch])
    with torch.no_grad():
        _, before = ours(tokens, mask, return_attn=True)
        _, after = other(tokens, mask, return_attn=True)
    every = torch.arange(S).expand(3, S)
    expected = torch.stack([((a - b).square() * expected_entries(w, every, mask)[:, None]).sum((-2, -1)).sqrt().mean(0)
                            for a, b, w in zip(after, before, ours.args.windows)])
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max())
