"""tools/convert_gguf.py on tiny synthetic GGUF files of each family (written with gguf's GGUFWriter), against
transformers' GGUF loader: the HF config it builds is one transformers' config class accepts and saves with the
same values, its tensors give transformers' logits, and its tokenizers (Qwen2's byte-level BPE with Qwen2's split
rule, a SentencePiece vocabulary with byte fallback) give the ids transformers' GGUF tokenizers give. Gemma 3 on
real weights: test_gemma3_real.py; LLaMA on real weights: test_real_model.py.
"""
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
# Qwen2's split keeps digits apart, GPT-2's does not: the merge "1 2" shows which one ran.
BPE_MERGES = ["Ġ t", "h e", "Ġt he", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2", "Ċ Ċ", "' s"]
SPM_PIECES = {"▁": -1, "t": -2, "h": -3, "e": -4, "w": -5, "o": -6, "r": -7, "l": -8, "d": -9, "1": -10, "2": -11,
              "he": -20, "▁t": -30, "▁the": -12, "or": -40, "▁w": -41, "▁wor": -50, "ld": -45, "▁world": -13, "12": -60,
              "x": -61, "y": -62, "z": -63, "yz": -70, "xy": -65}   # "xyz": xy by score, yz by place in the file
TEXTS = ["the world 12 345, it's\n\nok  ", "  the  world\n", "<|im_start|>user\n<tool_call>the world",
         "[INST] the world [/INST]", "Héllo 東京 🙂", "12twelve", "xyz", ""]


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
                             "llama.rope.scaling.yarn_beta_fast is set"),
               "rope_freqs": (lambda w: w.add_tensor("rope_freqs.weight", torch.ones(8).numpy()),
                              "tensor 'rope_freqs.weight' holds per-frequency RoPE factors")}
    for case, (extra, message) in refused.items():
        with pytest.raises(InputError, match=message):
            hf_config(gguf.GGUFReader(str(write_gguf(tmp_path / f"{case}.gguf", "llama", extra=extra))))
    reader = gguf.GGUFReader(str(write_gguf(tmp_path / "q.gguf", "qwen2")))
    with pytest.raises(InputError, match="tensor 'blk.0.attn_q.bias' is not part of a llama model"):
        state_dict(reader, {**hf_config(reader), "model_type": "llama"}, "llama")


@pytest.mark.parametrize("spm", [False, True], ids=["qwen2-bpe", "sentencepiece"])
def test_token_ids_equal_transformers_gguf_tokenizer(tmp_path, spm):
    from transformers import AutoTokenizer

    from convert_gguf import convert
    from minseekr.network.tokenizer import Tokenizer
    src = write_gguf(tmp_path / "tiny.gguf", "llama" if spm else "qwen2", spm=spm)
    convert(src, tmp_path / "out")
    tok, reference = Tokenizer(tmp_path / "out"), AutoTokenizer.from_pretrained(tmp_path, gguf_file=src.name)
    assert tok.add_bos == spm
    for text in TEXTS:
        expected = reference.encode(text, add_special_tokens=False)
        assert tok.encode(text, bos=False) == expected, text
        assert tok.encode(text) == reference.encode(text), text
    split_digits = tok.encode("12", bos=False) == [tok.hf.token_to_id("1"), tok.hf.token_to_id("2")]
    assert split_digits != spm                      # Qwen2 splits digits before the merges; SentencePiece merges them
