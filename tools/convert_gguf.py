"""Convert a GGUF file (llama.cpp's format) of a llama, mistral, qwen2 or gemma3 model to the HF directory minseekr
and transformers load.

    pip install -e ".[tools]"     # gguf (reads and dequantizes), tokenizers (writes tokenizer.json)
    python tools/convert_gguf.py SmolLM2-135M-Instruct.Q4_1.gguf weights/smollm2-135m-instruct [--dtype float32]
    python tools/convert_gguf.py gemma-3-270m-q4_k_m.gguf weights/gemma-3-270m

Writes config.json, model.safetensors, tokenizer.json and tokenizer_config.json (BOS, EOS, pad and unknown tokens,
whether BOS is prepended, the chat template; `gguf_tokenizer.py` says how each kind of vocabulary is rebuilt).

The HF config is built from the GGUF metadata (`<arch>.embedding_length`, `.block_count`, `.attention.head_count`,
`.attention.head_count_kv`, `.attention.key_length`, `.feed_forward_length`, `.attention.layer_norm_rms_epsilon`,
`.rope.freq_base`, `.context_length`, `.attention.sliding_window`, ...), in the form transformers' LlamaConfig,
MistralConfig, Qwen2Config or Gemma3TextConfig saves it, read by `ModelArgs.from_hf_config` like any config.json.
Values the file does not carry are what llama.cpp assumes when it runs the file:
- llama: LlamaConfig; attention_bias and mlp_bias where the file has those biases. A llama file whose
  `general.name` contains "mistral" (llama.cpp's converter labels Mistral models llama) is written as a
  MistralConfig, as is a file labelled `mistral`; they compute the same function. Their sliding window is the file's
  `attention.sliding_window`, or none: llama.cpp runs these files with full attention.
- qwen2: Qwen2Config (q, k and v biases are part of the architecture), no sliding window.
- gemma3: Gemma3TextConfig: head_dim from `attention.key_length`; query_pre_attn_scalar = head_dim (dim / heads for
  the 62-layer 27B, as llama.cpp scales it); every 6th layer global and the others local (or the file's
  `attention.sliding_window_pattern`); the global layers' RoPE base from `rope.freq_base`, the local ones' from
  `rope.freq_base_swa` or 10000; no logit softcapping; GELU (tanh).
RoPE scaling (`rope.scaling.type`) of type linear or yarn is carried over (its factor and original context length);
another type and yarn's optional settings stop the conversion with one line. Llama-3.1's and 3.2's scaling (llama3)
has no metadata: llama.cpp's converter keeps only its result, `rope_freqs.weight`, the divisor of each frequency
(θ^(−2i/D) / the llama3-scaled one). It is read back as rope_type llama3 with the factor the largest divisor (that of
the low frequencies) and the band those models use (low_freq_factor 1, high_freq_factor 4, original context 8192),
and dropped. Divisors these settings do not give (to float32 rounding: llama.cpp divides, transformers scales the
frequency), a tensor of another length than head_dim / 2, and a rope_freqs tensor in a file of another architecture
or with `rope.scaling.*` settings stop the conversion with one line. (transformers' GGUF loader ignores the tensor
and runs such a file with plain RoPE.)

What changes on the way:
- Weights are dequantized to float32 (then cast to --dtype) with the `gguf` package, the same dequantization that
  transformers' GGUF loader uses, so both give the same logits. Quantised types the package cannot dequantize,
  architectures other than these four, tensors that are not part of the family's model and missing tensors stop
  the conversion with one line.
- GGUF stores a tensor's dimensions innermost first; the arrays come out in PyTorch's (out, in) order.
- llama and mistral: llama.cpp runs these with interleaved RoPE pairs, so their q and k projections (and biases)
  are stored in Meta's interleaved layout (llama.cpp's converter permutes HF's rows into it; Meta's and Mistral's
  own checkpoints are in it already); they are permuted back into HF's rotate-half layout
  (`model.interleaved_to_half`). qwen2 and gemma3 use rotate-half RoPE in llama.cpp too and are stored unpermuted.
- gemma3: llama.cpp stores every RMSNorm weight w as 1 + w (its norm multiplies by the weight, HF's by 1 + w); 1 is
  subtracted again, as transformers' GGUF loader does.
- A file without `output.weight` ties lm_head to the embeddings, as HF's tie_word_embeddings does.
"""
import argparse
import sys
from pathlib import Path

import torch

from minseekr.network.checkpoint import write_hf
from minseekr.network.model import ModelArgs, interleaved_to_half
from minseekr.network.rope import inverse_frequencies
from minseekr.runtime import InputError

from gguf_tokenizer import write_tokenizer  # a sibling in tools/

_REQUIRED = object()   # field()'s default for a key that must be present
NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}
LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}
BLOCK = {**LINEARS, "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
# Gemma 3 normalises each sublayer's input and output; llama.cpp's ffn_norm is its pre-feedforward norm.
GEMMA3_BLOCK = {**LINEARS, "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
                "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Per family: the HF class, the block's tensors, whether q/k are stored interleaved, what a norm weight has added.
FAMILIES = {"llama": ("LlamaForCausalLM", BLOCK, True, 0.0), "mistral": ("MistralForCausalLM", BLOCK, True, 0.0),
            "qwen2": ("Qwen2ForCausalLM", BLOCK, False, 0.0),
            "gemma3": ("Gemma3ForCausalLM", GEMMA3_BLOCK, False, 1.0)}
ROPE_SCALING = ("none", "linear", "yarn")
# The llama3 band of Llama-3.1 and 3.2 (their configs' low_freq_factor, high_freq_factor, trained context).
LLAMA3_BAND = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def field(reader, key, default=_REQUIRED):
    """A GGUF metadata value: a str, a number, or a list of them."""
    import gguf
    f = reader.fields.get(key)
    if f is None:
        if default is _REQUIRED:
            raise InputError(f"the GGUF file has no {key!r}")
        return default
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    value = f.parts[f.data[0]]
    return bytes(value).decode("utf-8") if f.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]


def family(reader) -> tuple[str, str]:
    """(the metadata keys' prefix, the model family) of a GGUF file."""
    arch = field(reader, "general.architecture")
    if arch not in FAMILIES:
        raise InputError(f"general.architecture is {arch!r}; only llama-architecture (llama, mistral), qwen2 and "
                         f"gemma3 GGUF files convert")
    if arch == "llama" and "mistral" in str(field(reader, "general.name", "")).lower():
        return arch, "mistral"
    return arch, arch


def rope_scaling(reader, p: str, head_dim: int, theta: float) -> dict:
    """The file's RoPE scaling as rope_parameters entries ({} for none)."""
    if "rope_freqs.weight" in {t.name for t in reader.tensors}:
        return llama3_scaling(reader, p, head_dim, theta)
    # yarn's optional settings (betas, attention factor) are left at their defaults on both sides; one given is refused.
    read = {f"{p}.rope.scaling.{key}" for key in ("type", "factor", "original_context_length", "finetuned")}
    if unread := sorted(k for k in reader.fields if k.startswith(f"{p}.rope.scaling.") and k not in read):
        raise InputError(f"{unread[0]} is set; this converter reads only the RoPE scaling's type, factor and "
                         f"original context length")
    kind = field(reader, f"{p}.rope.scaling.type", "none")
    if kind not in ROPE_SCALING:
        raise InputError(f"{p}.rope.scaling.type is {kind!r}; supported: {', '.join(ROPE_SCALING)}")
    if kind == "none":
        return {}
    scaling = {"rope_type": kind, "factor": float(field(reader, f"{p}.rope.scaling.factor"))}
    if kind == "yarn":
        scaling["original_max_position_embeddings"] = field(reader, f"{p}.rope.scaling.original_context_length")
    return scaling


def llama3_scaling(reader, p: str, head_dim: int, theta: float) -> dict:
    """Llama-3.1's RoPE scaling, read back from the per-frequency divisors in `rope_freqs.weight`."""
    from gguf import quants
    if p != "llama" or any(key.startswith(f"{p}.rope.scaling.") for key in reader.fields):
        raise InputError(f"tensor 'rope_freqs.weight' holds per-frequency RoPE divisors, which this converter reads "
                         f"only as Llama-3.1's scaling, in a llama file with no {p}.rope.scaling settings")
    t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    divisors = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).astype("float32").reshape(-1))
    if divisors.numel() != head_dim // 2:
        raise InputError(f"tensor 'rope_freqs.weight' holds {divisors.numel()} RoPE divisors; a head of {head_dim} "
                         f"dims rotates {head_dim // 2} frequencies")
    scaling = {"rope_type": "llama3", "factor": float(divisors.max()), **LLAMA3_BAND}
    plain, scaled = (inverse_frequencies(head_dim, theta, s, 0)[0] for s in (None, scaling))
    # llama.cpp divides in float32 where transformers (and minseekr) scale the frequency: at most an ulp apart.
    if not torch.allclose(divisors, plain / scaled, rtol=2 ** -22, atol=0):
        raise InputError(f"tensor 'rope_freqs.weight' holds per-frequency RoPE divisors that Llama-3.1's scaling "
                         f"(factor {scaling['factor']:g}, low_freq_factor 1, high_freq_factor 4, original context "
                         f"8192) does not give")
    return scaling


def common_config(reader, p: str, fam: str) -> dict:
    """The keys every family's config shares, read from the `p.`-prefixed metadata."""
    n_heads, dim = field(reader, f"{p}.attention.head_count"), field(reader, f"{p}.embedding_length")
    token = lambda key: field(reader, f"tokenizer.ggml.{key}_token_id", None)
    return {"architectures": [FAMILIES[fam][0]], "model_type": "gemma3_text" if fam == "gemma3" else fam,
            "vocab_size": field(reader, f"{p}.vocab_size", None) or len(field(reader, "tokenizer.ggml.tokens")),
            "hidden_size": dim, "intermediate_size": field(reader, f"{p}.feed_forward_length"),
            "num_hidden_layers": field(reader, f"{p}.block_count"), "num_attention_heads": n_heads,
            "num_key_value_heads": field(reader, f"{p}.attention.head_count_kv", n_heads),
            "head_dim": field(reader, f"{p}.attention.key_length", None)
            or field(reader, f"{p}.rope.dimension_count", dim // n_heads),
            "max_position_embeddings": field(reader, f"{p}.context_length"),
            # GGUF stores eps as float32: 1e-6 reads as 9.99999997e-07; the config gets the decimal it came from.
            "rms_norm_eps": float(f"{field(reader, f'{p}.attention.layer_norm_rms_epsilon'):.7g}"),
            "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
            "bos_token_id": token("bos"), "eos_token_id": token("eos"), "pad_token_id": token("padding"),
            "attention_dropout": 0.0}


def hf_config(reader) -> dict:
    """The config.json that transformers' class for the file's family saves for this model."""
    p, fam = family(reader)
    config, theta = common_config(reader, p, fam), float(field(reader, f"{p}.rope.freq_base", 10000.0))
    scaling = rope_scaling(reader, p, config["head_dim"], theta)
    rope = {"rope_type": "default", "rope_theta": theta, **scaling}
    names = {t.name for t in reader.tensors}
    if fam == "llama":
        config.update(hidden_act="silu", rope_parameters=rope, attention_bias="blk.0.attn_q.bias" in names,
                      mlp_bias="blk.0.ffn_up.bias" in names)
    elif fam == "mistral":
        config.update(hidden_act="silu", rope_parameters=rope,
                      sliding_window=field(reader, f"{p}.attention.sliding_window", None))
    elif fam == "qwen2":
        head_dim, n = config.pop("head_dim"), config["num_hidden_layers"]
        if head_dim * config["num_attention_heads"] != config["hidden_size"]:
            raise InputError(f"{p}.attention.key_length is {head_dim}; a Qwen2 head is embedding_length / "
                             f"head_count wide")
        config.update(hidden_act="silu", rope_parameters=rope, use_sliding_window=False, sliding_window=None,
                      max_window_layers=n, layer_types=["full_attention"] * n)
    else:
        config.update(gemma3_config(reader, p, config, theta, scaling))
    return config


def gemma3_config(reader, p: str, config: dict, theta: float, scaling: dict) -> dict:
    """Gemma3TextConfig's own keys: local and global layers, their RoPE, the attention scale, the activation."""
    n, head_dim = config["num_hidden_layers"], config["head_dim"]
    pattern = field(reader, f"{p}.attention.sliding_window_pattern", 6)
    # llama.cpp's pattern: an int n makes every n-th layer global (0: none), a list says per layer whether it is local.
    local = pattern if isinstance(pattern, list) else [pattern == 0 or bool((i + 1) % pattern) for i in range(n)]
    if len(local) != n:
        raise InputError(f"{p}.attention.sliding_window_pattern names {len(local)} layers; the model has {n}")
    local_theta = float(field(reader, f"{p}.rope.freq_base_swa", 10000.0))
    return {"hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": config["hidden_size"] // config["num_attention_heads"] if n == 62 else head_dim,
            "sliding_window": field(reader, f"{p}.attention.sliding_window"),
            "layer_types": ["sliding_attention" if is_local else "full_attention" for is_local in local],
            "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": theta, **scaling},
                                "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
            "final_logit_softcapping": None, "attn_logit_softcapping": None, "attention_bias": False,
            "use_bidirectional_attention": False}


def expected_names(config: dict, fam: str) -> set[str]:
    """Every tensor name the family's HF model holds for this config."""
    block = FAMILIES[fam][1]
    biases = {"attn_q", "attn_k", "attn_v"} if fam == "qwen2" else set()
    if config.get("attention_bias"):
        biases |= {"attn_q", "attn_k", "attn_v", "attn_output"}
    if config.get("mlp_bias"):
        biases |= {"ffn_gate", "ffn_up", "ffn_down"}
    per_layer = [f"{hf}.weight" for hf in block.values()] + [f"{block[b]}.bias" for b in biases]
    top = ["model.embed_tokens.weight", "model.norm.weight"] + ["lm_head.weight"] * (not config["tie_word_embeddings"])
    return set(top) | {f"model.layers.{i}.{name}" for i in range(config["num_hidden_layers"]) for name in per_layer}


def hf_name(name: str, block: dict) -> str | None:
    """The HF name of a GGUF tensor, None for a name the family does not know."""
    if name in NAMES:
        return NAMES[name]
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in block and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{block[parts[2]]}.{parts[3]}"
    return None


def state_dict(reader, config: dict, fam: str) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32 and HF-named, q and k in the rotate-half layout, norms as HF's."""
    from gguf import quants
    _, block, interleaved, norm_offset = FAMILIES[fam]
    expected, state = expected_names(config, fam), {}
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight" and config.get("rope_parameters", {}).get("rope_type") == "llama3":
            continue   # read into the config by llama3_scaling
        name = hf_name(t.name, block)
        if name not in expected:
            raise InputError(f"tensor {t.name!r} is not part of a {fam} model of this configuration")
        try:
            array = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise InputError(f"tensor {t.name!r} is of type {t.tensor_type.name}, which the gguf package cannot "
                             f"dequantize") from None
        w = torch.from_numpy(array.astype("float32", copy=False).reshape(list(reversed(t.shape.tolist()))).copy())
        proj = name.split(".")[-2]
        if interleaved and proj in heads:
            w = interleaved_to_half(w.view(w.shape[0], -1), heads[proj]).view(w.shape)   # a bias as one column
        if t.name.endswith("norm.weight"):
            w -= norm_offset
        state[name] = w
    if missing := sorted(expected - set(state)):
        raise InputError(f"the GGUF file lacks {len(missing)} tensors of a {fam} model, such as {missing[0]!r}")
    return state


def convert(src, dst, dtype=torch.float32):
    """The GGUF file at `src` as an HF directory at `dst`; returns its ModelArgs and parameter count."""
    try:
        import gguf
    except ImportError:
        raise InputError("reading GGUF needs the gguf package: pip install -e .[tools]") from None
    try:
        reader = gguf.GGUFReader(str(src))
    except (OSError, ValueError) as e:
        raise InputError(f"{src} is not a readable GGUF file ({e})") from None
    config = hf_config(reader)
    try:
        args = ModelArgs.from_hf_config(config, source=f"{src}'s HF config")
    except ValueError as e:
        raise InputError(str(e)) from None
    state = state_dict(reader, config, family(reader)[1])
    write_hf(args, state.items(), dst, dtype=dtype)
    write_tokenizer(lambda key, default=_REQUIRED: field(reader, key, default), Path(dst),
                    field(reader, "general.architecture"), config["max_position_embeddings"])
    return args, sum(t.numel() for t in state.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="a .gguf file of a llama, mistral, qwen2 or gemma3 model")
    parser.add_argument("dst", type=Path, help="output directory (config.json, safetensors, tokenizer files)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    a = parser.parse_args(argv)
    try:
        args, n_parameters = convert(a.src, a.dst, getattr(torch, a.dtype))
    except InputError as e:
        sys.exit(f"convert_gguf.py: error: {e}")
    print(f"wrote {a.dst} ({n_parameters} parameters, {args})")


if __name__ == "__main__":
    main()
