"""tools/convert_gguf.py on tiny synthetic GGUF files of each family (written with gguf's GGUFWriter), against
transformers' GGUF loader: the HF config it builds is one transformers' config class accepts and saves with the
same values, its tensors give transformers' logits, and its tokenizers (byte-level BPE with Qwen2's and Llama-3's
split rules, a SentencePiece vocabulary with byte fallback) give the ids transformers' GGUF tokenizers give.
Llama-3.1's `rope_freqs.weight`, which transformers' loader ignores, is checked against llama.cpp's formula and
transformers' llama3 RoPE instead. Gemma 3 on real weights: test_gemma3_real.py; LLaMA on real weights:
test_real_model.py.
"""
import math
import sys

import pytest
import torch

from conftest import ROOT

gguf = pytest.importorskip("gguf", reason="reading GGUF needs the gguf package (pip install -e .[test])")
pytest.importorskip("accelerate", reason="transformers loads GGUF files through accelerate (pip install -e .[test])")
sys.path.insert(0, str(ROOT / "tools"))
from convert_gguf import hf_config, state_dict  # noqa: E402
from gguf_tokenizer import byte_alphabet  # noqa: E402
from minseekr.runtime import InputError  # noqa: E402

DIM, N_HEADS, N_KV, FFN, LAYERS = 64, 4, 2, 96, 2
# Which split ran shows in the merges "1 2" and "3 4": Qwen2's keeps digits apart, Llama-3's cuts "1234567" into
# 123|456|7, GPT-2's keeps it whole; and in "' T", which only the case-insensitive contractions keep together.
BPE_MERGES = ["Ġ t", "h e", "Ġt he", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2", "3 4", "Ċ Ċ", "' s", "' T",
              "' m"]
SPM_PIECES = {"▁": -1, "t": -2, "h": -3, "e": -4, "w": -5, "o": -6, "r": -7, "l": -8, "d": -9, "1": -10, "2": -11,
              "he": -20, "▁t": -30, "▁the": -12, "or": -40, "▁w": -41, "▁wor": -50, "ld": -45, "▁world": -13, "12": -60,
              "x": -61, "y": -62, "z": -63, "yz": -70, "xy": -65}   # "xyz": xy by score, yz by place in the file
TEXTS = ["the world 12 345, it's\n\nok  ", "  the  world\n", "<|im_start|>user\n<tool_call>the world",
         "[INST] the world [/INST]", "Héllo 東京 🙂", "12twelve", "xyz", "1234567 I'm DON'T 3.14159", "Ünïcode²³ ½ ٣٤",
         "\n\n\t  x\r\n", ""]


def bpe_vocab():
    """(tokens, types, merges): GPT-2's byte alphabet, the merged tokens, two control tokens, one user-defined."""
    tokens = list(byte_alphabet().values()) + [m.replace(" ", "") for m in BPE_MERGES]
    return tokens + ["<|endoftext|>", "<|im_start|>", "<tool_call>"], [1] * len(tokens) + [3, 3, 4], BPE_MERGES


def spm_vocab():
    """(tokens, types, scores): unk, BOS, EOS, [INST] control tokens, 256 byte tokens, pieces ranked by score."""
    tokens = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"] + [f"<0x{b:02X}>" for b in range(256)] + list(SPM_PIECES)
    types = [2, 3, 3, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    return tokens, types, [0.0] * 261 + list(map(float, SPM_PIECES.values()))


def write_gguf(path, arch, name="tiny", spm=False, pre="qwen2", head_dim=16, extra=lambda w: None):
    """A tiny GGUF file of `arch` with random float32 weights, its metadata as llama.cpp writes it (and `extra`'s)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    extra(w)
    w.add_context_length(256), w.add_embedding_length(DIM), w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN), w.add_head_count(N_HEADS), w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-6), w.add_rope_freq_base(5e5)
    if arch == "gemma3":
        w.add_key_length(head_dim), w.add_value_length(head_dim), w.add_sliding_window(3)
    if spm:
        tokens, types, scores = spm_vocab()
        w.add_tokenizer_model("llama"), w.add_token_scores(scores), w.add_bos_token_id(1), w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    else:
        tokens, types, merges = bpe_vocab()
        w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre(pre), w.add_token_merges(merges)
        w.add_bos_token_id(len(tokens) - 3), w.add_eos_token_id(len(tokens) - 3)
    w.add_token_list(tokens), w.add_token_types(types)
    g = torch.Generator().manual_seed(0)
    shapes = {"attn_q": (N_HEADS * head_dim, DIM), "attn_k": (N_KV * head_dim, DIM), "attn_v": (N_KV * head_dim, DIM),
              "attn_output": (DIM, N_HEADS * head_dim), "ffn_gate": (FFN, DIM), "ffn_up": (FFN, DIM),
              "ffn_down": (DIM, FFN), "attn_norm": (DIM,), "ffn_norm": (DIM,)}
    if arch == "qwen2":
        shapes.update({f"{p}.bias": (s[0],) for p, s in shapes.items() if p in ("attn_q", "attn_k", "attn_v")})
    if arch == "gemma3":
        shapes.update(attn_q_norm=(head_dim,), attn_k_norm=(head_dim,), post_attention_norm=(DIM,),
                      post_ffw_norm=(DIM,))
    tensors = {"token_embd.weight": (len(tokens), DIM), "output_norm.weight": (DIM,)}
    tensors |= {f"blk.{i}.{p}" + ("" if p.endswith(".bias") else ".weight"): s
                for i in range(LAYERS) for p, s in shapes.items()}
    for key, shape in tensors.items():   # norms near 1 (as llama.cpp stores Gemma's 1 + w), the rest small
        t = torch.randn(shape, generator=g) * (0.1 if len(shape) == 1 else 0.2) + (len(shape) == 1)
        w.add_tensor(key, t.numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    return path


# (architecture, general.name, family, config class, transformers' class for the file). transformers' loader reads a
# Mistral file labelled llama as LLaMA (the same function; it fails on one named exactly "mistral").
FAMILIES = [("llama", "tiny", "llama", "LlamaConfig", "LlamaForCausalLM"),
            ("llama", "Mistral 7B", "mistral", "MistralConfig", "LlamaForCausalLM"),
            ("qwen2", "tiny", "qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
            ("gemma3", "tiny", "gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM")]


@pytest.mark.parametrize("arch, name, family, config_class, reference_class", FAMILIES, ids=[f[2] for f in FAMILIES])
def test_the_config_and_tensors_of_each_family_give_transformers_gguf_logits(tmp_path, arch, name, family,
                                                                             config_class, reference_class):
    import transformers
    # Gemma 3's attention scale: llama.cpp's (head_dim) and transformers' GGUF default (256) agree at 256.
    src = write_gguf(tmp_path / "tiny.gguf", arch, name, head_dim=256 if arch == "gemma3" else 16)
    reader = gguf.GGUFReader(str(src))
    config = hf_config(reader)
    saved = getattr(transformers, config_class)(**config).to_dict()
    assert config and {key: saved[key] for key in config} == config
    assert (config["hidden_size"], config["num_key_value_heads"], config["rms_norm_eps"]) == (DIM, N_KV, 1e-6)
    model_class = getattr(transformers, config["architectures"][0])
    model = model_class(getattr(transformers, config_class)(**config)).eval()
    missing, unexpected = model.load_state_dict(state_dict(reader, config, family), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected           # tied: the file has no output.weight
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=src.name, dtype=torch.float32)
    assert type(reference).__name__ == reference_class
    ids = torch.randint(0, config["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.eval()(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


def test_a_file_labelled_mistral_converts_as_mistral_and_what_is_not_read_is_refused_by_name(tmp_path):
    config = hf_config(gguf.GGUFReader(str(write_gguf(tmp_path / "m.gguf", "mistral"))))
    assert config["model_type"] == "mistral" and config["sliding_window"] is None
    linear = lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), w.add_rope_scaling_factor(8.0))
    config = hf_config(gguf.GGUFReader(str(write_gguf(tmp_path / "l.gguf", "gemma3", extra=linear))))
    assert config["rope_parameters"]["full_attention"] == {"rope_type": "linear", "rope_theta": 5e5, "factor": 8.0}
    assert config["rope_parameters"]["sliding_attention"] == {"rope_type": "default", "rope_theta": 10000.0}
    refused = {"longrope": (lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE),
                            "llama.rope.scaling.type is 'longrope'"),
               "yarn beta": (lambda w: w.add_float32("llama.rope.scaling.yarn_beta_fast", 16.0),
                             "llama.rope.scaling.yarn_beta_fast is set")}
    for case, (extra, message) in refused.items():
        with pytest.raises(InputError, match=message):
            hf_config(gguf.GGUFReader(str(write_gguf(tmp_path / f"{case}.gguf", "llama", extra=extra))))
    reader = gguf.GGUFReader(str(write_gguf(tmp_path / "q.gguf", "qwen2")))
    with pytest.raises(InputError, match="tensor 'blk.0.attn_q.bias' is not part of a llama model"):
        state_dict(reader, {**hf_config(reader), "model_type": "llama"}, "llama")


def llama3_divisors(factor, low=1.0, high=4.0, original=8192, head_dim=16, theta=5e5):
    """rope_freqs.weight as llama.cpp's converter computes it (LlamaModel.generate_extra_tensors), in float32."""
    f = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    wavelength = 2 * math.pi / f
    smooth = (original / wavelength - low) / (high - low)
    band = torch.where(wavelength > original / low, factor, 1 / ((1 - smooth) / factor + smooth))
    return torch.where(wavelength < original / high, 1.0, band)


@pytest.mark.parametrize("factor", [8.0, 32.0], ids=["llama-3.1", "llama-3.2"])
def test_rope_freqs_become_llama3_scaling_and_other_divisors_are_refused(tmp_path, factor):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from convert_gguf import convert
    divisors = llama3_divisors(factor)
    assert {1.0, factor} < set(divisors.tolist())             # high, low and in-between frequencies all present
    src = write_gguf(tmp_path / "l.gguf", "llama", extra=lambda w: w.add_tensor("rope_freqs.weight", divisors.numpy()))
    config = hf_config(gguf.GGUFReader(str(src)))
    assert config["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 5e5, "factor": factor,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192}
    hf = transformers.LlamaConfig(**config)
    assert {key: hf.to_dict()[key] for key in config} == config
    plain = 1.0 / 5e5 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    torch.testing.assert_close(ROPE_INIT_FUNCTIONS["llama3"](hf)[0], plain / divisors, rtol=2 ** -22, atol=0)
    args, _ = convert(src, tmp_path / "out")                  # the tensor is dropped, the scaling reaches ModelArgs
    assert args.rope_scaling == {k: v for k, v in config["rope_parameters"].items() if k != "rope_theta"}
    tensor = lambda t: (lambda w: w.add_tensor("rope_freqs.weight", t.numpy()))
    refused = {"perturbed": ("llama", tensor(divisors * (1 + (torch.arange(8) == 4) * 1e-3)), "that Llama-3.1's"),
               "other band": ("llama", tensor(llama3_divisors(factor, low=2.0)), "that Llama-3.1's"),
               "too short": ("llama", tensor(divisors[:6]), "6 RoPE divisors; a head of 16 dims"),
               "with linear": ("llama", lambda w: (tensor(divisors)(w), w.add_rope_scaling_type(
                   gguf.RopeScalingType.LINEAR)), "no llama.rope.scaling settings"),
               "qwen2": ("qwen2", tensor(divisors), "only as Llama-3.1's scaling, in a llama file")}
    for case, (arch, extra, message) in refused.items():
        with pytest.raises(InputError, match=f"tensor 'rope_freqs.weight' holds .*{message}"):
            hf_config(gguf.GGUFReader(str(write_gguf(tmp_path / f"{case}.gguf", arch, extra=extra))))


# (architecture, tokenizer.ggml.pre, the file's add_bos_token (None: unset), the pieces of " 1234567 DON'T").
TOKENIZERS = {"qwen2-bpe": ("qwen2", "qwen2", None, "Ġ 1 2 3 4 5 6 7 Ġ D O N 'T"),
              "llama-bpe": ("llama", "llama-bpe", True, "Ġ 12 3 4 5 6 7 Ġ D O N 'T"),   # Llama-3 prepends BOS
              "sentencepiece": ("llama", None, None,
                                "▁ 12 <0x33> <0x34> <0x35> <0x36> <0x37> ▁ <0x44> <0x4F> <0x4E> <0x27> <0x54>")}


@pytest.mark.parametrize("case", TOKENIZERS)
def test_token_ids_equal_transformers_gguf_tokenizer(tmp_path, case):
    from transformers import AutoTokenizer

    from convert_gguf import convert
    from minseekr.network.tokenizer import Tokenizer
    arch, pre, add_bos, pieces = TOKENIZERS[case]
    extra = (lambda w: w.add_add_bos_token(add_bos)) if add_bos is not None else (lambda w: None)
    src = write_gguf(tmp_path / "tiny.gguf", arch, spm=pre is None, pre=pre, extra=extra)
    convert(src, tmp_path / "out")
    tok, reference = Tokenizer(tmp_path / "out"), AutoTokenizer.from_pretrained(tmp_path, gguf_file=src.name)
    assert tok.add_bos == (pre is None or bool(add_bos))
    for text in TEXTS:
        expected = reference.encode(text, add_special_tokens=False)
        assert tok.encode(text, bos=False) == expected, text
        assert tok.encode(text) == reference.encode(text), text
    assert [tok.hf.id_to_token(i) for i in tok.encode(" 1234567 DON'T", bos=False)] == pieces.split()
