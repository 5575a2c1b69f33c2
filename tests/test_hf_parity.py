"""minseekr computes what transformers' LlamaForCausalLM computes, and the two read each other's checkpoints."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minseekr.network.checkpoint import load_hf, save_hf
from minseekr.network.model import ModelArgs, Transformer

BASE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=64, rms_norm_eps=1e-5, max_position_embeddings=64)
CONFIGS = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2),
    "mqa_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "rope_theta_5e5": dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
    "odd_vocab": dict(vocab_size=97),
    "explicit_head_dim": dict(head_dim=16, num_key_value_heads=2),  # heads * head_dim != hidden_size
    "large_eps": dict(rms_norm_eps=0.5),  # at 1e-5 a misread epsilon hides below the tolerance
}


def hf_llama(**overrides) -> LlamaForCausalLM:
    """A tiny LlamaForCausalLM with every weight random, norms included, so no term can hide."""
    cfg = LlamaConfig(**{**BASE, **overrides}, attn_implementation="eager")
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p))
    return model.eval()


def ours_from(hf: LlamaForCausalLM, directory, **save_kw) -> Transformer:
    hf.save_pretrained(directory, **save_kw)
    return load_hf(directory)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name, tmp_path):
    hf = hf_llama(**CONFIGS[name])
    ours = ours_from(hf, tmp_path)
    tokens = torch.randint(0, hf.config.vocab_size, (2, 13))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max()
    assert diff <= 1e-4


@pytest.mark.parametrize("form", ["2023", "rope_parameters"])
def test_both_config_forms_give_the_rope_base(form, tmp_path):
    hf = hf_llama(rope_parameters={"rope_type": "default", "rope_theta": 3e3})
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_theta"] == 3e3
    if form == "2023":  # what LLaMA-2 / Vicuna repos on the Hub carry
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        cfg["rope_scaling"] = None
        cfg["torch_dtype"] = cfg.pop("dtype")
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = load_hf(tmp_path)
    assert ours.args.rope_theta == 3e3
    tokens = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["mha", "gqa", "explicit_head_dim"])
def test_attention_maps_match_transformers_eager(name, tmp_path):
    hf = hf_llama(**CONFIGS[name])
    ours = ours_from(hf, tmp_path)
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        logits, maps = ours(tokens, return_attn=True)
        ref = hf(tokens, output_attentions=True)
    assert len(maps) == len(ref.attentions) == 2
    for a, b in zip(maps, ref.attentions):
        assert a.shape == b.shape == (2, 4, 9, 9)
        assert (a - b).abs().max() <= 1e-5
    assert (logits - ref.logits).abs().max() <= 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_match_transformers_on_real_tokens(side, tmp_path):
    hf = hf_llama(num_key_value_heads=2)
    ours = ours_from(hf, tmp_path)
    tokens = torch.randint(0, 64, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    if side == "left":
        mask[1, :4], mask[2, :7] = 0, 0
    else:
        mask[1, 6:], mask[2, 3:] = 0, 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits, maps = ours(tokens, mask, return_attn=True)
        ref = hf(tokens, attention_mask=mask, position_ids=positions, output_attentions=True)
    real = mask.bool()
    assert (logits[real] - ref.logits[real]).abs().max() <= 1e-4
    for a, b in zip(maps, ref.attentions):  # rows of real queries: (n_real, H, S)
        assert (a.transpose(1, 2)[real] - b.transpose(1, 2)[real]).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_transformers_checkpoint_loads_to_the_same_model(dtype, tmp_path):
    hf = hf_llama(num_key_value_heads=2).to(dtype)
    hf.save_pretrained(tmp_path, max_shard_size="10KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) >= 3
    ours = load_hf(tmp_path)
    assert all(p.dtype == dtype for p in ours.parameters())
    hf_state = hf.state_dict()
    for name, p in ours.state_dict().items():
        assert torch.equal(p, hf_state[name]), name
    # Cast up on load, the bf16 checkpoint gives HF's fp32 logits for the same weights.
    ours32 = load_hf(tmp_path, dtype=torch.float32)
    hf32 = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    tokens = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert (ours32(tokens) - hf32(tokens).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shard", ["5GB", "30KB"])
def test_save_hf_loads_in_transformers_to_the_same_logits(tied, shard, tmp_path):
    args = ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=48,
                     rope_theta=2e4, norm_eps=1e-6, tie_embeddings=tied)
    ours = Transformer(args)
    ours.init_weights(0.3)
    save_hf(ours, tmp_path, max_shard_size=shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard == "30KB")
    hf = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.config.tie_word_embeddings == tied
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tied
    tokens = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max() <= 1e-4
