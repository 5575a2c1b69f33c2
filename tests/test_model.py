"""The model's own contract: padding, KV cache, attention maps and the probe agree with each other."""
import pytest
import torch

from minseekr.network.model import KVCache, ModelArgs, Transformer, sequence_loss


def tiny(**kw):
    args = ModelArgs(**{**dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, hidden_dim=48), **kw})
    model = Transformer(args)
    model.init_weights(0.2)
    return model.eval()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_match_unpadded_sequences(side):
    model = tiny()
    a, b = torch.randint(0, 61, (1, 9)), torch.randint(0, 61, (1, 5))
    pad = torch.zeros(1, 4, dtype=torch.long)
    b_padded = torch.cat([pad, b], 1) if side == "left" else torch.cat([b, pad], 1)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0 if side == "left" else 1
    mask[1, 5:] = 0 if side == "right" else 1
    with torch.no_grad():
        logits = model(torch.cat([a, b_padded]), mask)
        real = logits[1, 4:] if side == "left" else logits[1, :5]
        torch.testing.assert_close(logits[0], model(a)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(real, model(b)[0], atol=1e-5, rtol=0)


def test_a_right_padded_batch_runs_unmasked_and_trains_as_its_unpadded_sequences(monkeypatch):
    """The trainer's batches are right-padded: SDPA gets no mask (its causal path), and every real token's logits,
    the loss and every parameter's gradient are those of the sequences alone; a left-padded batch keeps the mask."""
    import torch.nn.functional as F
    masks, sdpa = [], F.scaled_dot_product_attention

    def spy(*args, **kw):
        masks.append(kw["attn_mask"])
        return sdpa(*args, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny()
    a, b = torch.randint(0, 61, (1, 9)), torch.randint(0, 61, (1, 5))
    tokens = torch.cat([a, torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], 1)])
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    labels = tokens.masked_fill(mask == 0, -100)
    batch_loss = sequence_loss(model(tokens, mask), labels).sum()
    assert all(m is None for m in masks)
    batch_grads = torch.autograd.grad(batch_loss, list(model.parameters()))
    alone_loss = sequence_loss(model(a), a).sum() + sequence_loss(model(b), b).sum()
    alone_grads = torch.autograd.grad(alone_loss, list(model.parameters()))
    torch.testing.assert_close(batch_loss, alone_loss, atol=1e-6, rtol=1e-6)
    for g, want in zip(batch_grads, alone_grads):
        torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-5)
    masks.clear()
    model(torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)]), mask.flip(1))
    assert all(m is not None for m in masks)


def test_kv_cache_decoding_equals_full_forward():
    model = tiny()
    tokens = torch.randint(0, 61, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    cache = KVCache(model.args, 2, 10)
    with torch.no_grad():
        full = model(tokens, mask)
        steps = [model(tokens[:, :6], mask[:, :6], cache=cache)]
        steps += [model(tokens[:, i:i + 1], mask[:, :i + 1], cache=cache) for i in range(6, 10)]
    assert cache.pos == 10
    torch.testing.assert_close(torch.cat(steps, 1)[0], full[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(steps, 1)[1, 3:], full[1, 3:], atol=1e-5, rtol=0)


def test_attention_maps_are_causal_distributions_and_change_nothing():
    model = tiny()
    tokens = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        logits, maps = model(tokens, return_attn=True)
        torch.testing.assert_close(logits, model(tokens), atol=1e-5, rtol=0)
    assert len(maps) == 2 and maps[0].shape == (2, 4, 7, 7)
    for a in maps:
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 7))
        assert a.triu(1).abs().max() == 0


def test_probe_sees_q_k_v_and_the_head_outputs_of_every_layer():
    model = tiny()
    tokens = torch.randint(0, 61, (1, 6))
    seen = {}

    def probe(layer, q, k, v, out):
        seen[layer] = (q, k, v, out)

    with torch.no_grad():
        _, maps = model(tokens, return_attn=True)
        model(tokens, probe=probe)
    assert sorted(seen) == [0, 1]
    for layer, (q, k, v, out) in seen.items():
        assert q.shape == (1, 4, 6, 8) and k.shape == v.shape == (1, 2, 6, 8)
        # out is A·V with each query head reading its group's value head.
        torch.testing.assert_close(out, maps[layer] @ v.repeat_interleave(2, 1), atol=1e-5, rtol=0)


def test_tied_head_shares_the_embedding():
    model = tiny(tie_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" in model.state_dict()


def test_sequence_loss_is_the_mean_over_labelled_tokens():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, -100, -100, -100]])
    loss = sequence_loss(logits, labels)
    lp = logits.log_softmax(-1)
    expected0 = -(lp[0, 1, 3] + lp[0, 2, 4] + lp[0, 3, 1]) / 3
    expected1 = -lp[1, 0, 2]
    torch.testing.assert_close(loss, torch.stack([expected0, expected1]))


def test_config_refuses_what_is_not_implemented():
    """Each family reads its own keys; what none implements is refused by key (Gemma-2's softcapping, MoE, …)."""
    base = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=10, intermediate_size=8)
    with pytest.raises(ValueError, match="rope_scaling.rope_type='longrope' is not supported"):
        ModelArgs.from_hf_config({**base, "rope_scaling": {"type": "longrope", "factor": 2.0}})
    with pytest.raises(ValueError, match="rope_parameters: partial_rotary_factor not implemented for rope_type"):
        ModelArgs.from_hf_config({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                              "partial_rotary_factor": 0.5}})
    with pytest.raises(ValueError, match="hidden_act must be 'silu'"):
        ModelArgs.from_hf_config({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="model_type must be one of llama, qwen2, mistral, gemma3_text, got 'mixtral'"):
        ModelArgs.from_hf_config({**base, "model_type": "mixtral"})
    with pytest.raises(ValueError, match=r"unsupported keys \['sliding_window'\]"):   # LLaMA has no window
        ModelArgs.from_hf_config({**base, "sliding_window": 4096})
    with pytest.raises(ValueError, match="final_logit_softcapping must be null"):
        ModelArgs.from_hf_config({**base, "model_type": "gemma3_text", "final_logit_softcapping": 30.0})
    with pytest.raises(ValueError, match=r"unsupported keys \['num_local_experts'\]"):
        ModelArgs.from_hf_config({**base, "model_type": "mistral", "num_local_experts": 8})
    with pytest.raises(ValueError, match="missing required key 'vocab_size'"):
        ModelArgs.from_hf_config({k: v for k, v in base.items() if k != "vocab_size"})
    new_form = ModelArgs.from_hf_config({**base, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}})
    old_form = ModelArgs.from_hf_config({**base, "rope_theta": 5e5, "rope_scaling": None})
    assert new_form.rope_theta == old_form.rope_theta == 5e5
    assert ModelArgs.from_hf_config(base).rope_theta == 1e4


def test_the_defaults_are_llama_2_7b_as_its_config_json_states_it():
    """ModelArgs() is LLaMA-2-7B; its HF config.json (meta-llama/Llama-2-7b-hf), written out, reads back as it."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
              "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
              "vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
              "hidden_act": "silu", "rope_scaling": None, "torch_dtype": "float16"}
    assert ModelArgs.from_hf_config(config) == ModelArgs()
