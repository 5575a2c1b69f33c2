"""Convert a llama-architecture GGUF file (llama.cpp's format) to the HF directory minseekr and transformers load.

    pip install -e ".[tools]"     # gguf (reads and dequantizes), tokenizers (writes tokenizer.json)
    python tools/convert_gguf.py SmolLM2-135M-Instruct.Q4_1.gguf weights/smollm2-135m-instruct [--dtype float32]

Writes config.json, model.safetensors, tokenizer.json (GPT-2-style byte-level BPE with its merges and special
tokens) and tokenizer_config.json (BOS, EOS, pad and unknown tokens, whether BOS is prepended, the chat template).

What changes on the way:
- Weights are dequantized to float32 (then cast to --dtype) with the `gguf` package, the same dequantization that
  transformers' GGUF loader uses, so both give the same logits. Quantised types the package cannot dequantize,
  and architectures other than llama, stop the conversion with one line.
- GGUF stores a tensor's dimensions innermost first; the arrays come out in PyTorch's (out, in) order.
- llama.cpp's converter permutes each q and k projection into Meta's interleaved RoPE layout; they are permuted
  back into HF's rotate-half layout (`model.interleaved_to_half`), which is what makes the logits agree.
- A file without `output.weight` ties lm_head to the embeddings, as HF's tie_word_embeddings does.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from minseekr.network.checkpoint import write_hf
from minseekr.network.model import ModelArgs, interleaved_to_half
from minseekr.runtime import InputError, atomic_write

NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}
BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
         "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
# llama.cpp's pre-tokenizer names whose splitting rule tokenizers can express: GPT-2's regex, SmolLM's adds digits.
PRE_TOKENIZERS = ("gpt2", "default", "smollm")


def field(reader, key, default=None):
    """A GGUF metadata value: a str, a number, or a list of them."""
    import gguf
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise InputError(f"the GGUF file has no {key!r}")
        return default
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    value = f.parts[f.data[0]]
    return bytes(value).decode("utf-8") if f.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]


def model_args(reader) -> ModelArgs:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise InputError(f"general.architecture is {arch!r}; only llama-architecture GGUF files convert")
    names = {t.name for t in reader.tensors}
    return ModelArgs(dim=field(reader, "llama.embedding_length"), n_layers=field(reader, "llama.block_count"),
                     n_heads=field(reader, "llama.attention.head_count"),
                     n_kv_heads=field(reader, "llama.attention.head_count_kv"),
                     vocab_size=len(field(reader, "tokenizer.ggml.tokens")),
                     hidden_dim=field(reader, "llama.feed_forward_length"),
                     norm_eps=float(f"{field(reader, 'llama.attention.layer_norm_rms_epsilon'):.7g}"),  # float32
                     rope_theta=float(field(reader, "llama.rope.freq_base", 10000.0)),
                     max_seq_len=field(reader, "llama.context_length"),
                     tie_embeddings="output.weight" not in names,
                     bos_id=field(reader, "tokenizer.ggml.bos_token_id"),
                     eos_id=field(reader, "tokenizer.ggml.eos_token_id"))


def hf_name(name: str) -> str:
    if name in NAMES:
        return NAMES[name]
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in BLOCK:
        return f"model.layers.{parts[1]}.{BLOCK[parts[2]]}.{parts[3]}"
    raise InputError(f"tensor {name!r} is not part of a llama model")


def state_dict(reader, args: ModelArgs) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32, HF-named, q and k back in the rotate-half layout."""
    from gguf import quants
    state = {}
    for t in reader.tensors:
        try:
            array = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise InputError(f"tensor {t.name!r} is of type {t.tensor_type.name}, which the gguf package cannot "
                             f"dequantize") from None
        w = torch.from_numpy(array.astype("float32", copy=False).reshape(list(reversed(t.shape.tolist()))).copy())
        name = hf_name(t.name)
        if name.endswith("q_proj.weight"):
            w = interleaved_to_half(w, args.n_heads)
        elif name.endswith("k_proj.weight"):
            w = interleaved_to_half(w, args.n_kv_heads)
        state[name] = w
    return state


def write_tokenizer(reader, out: Path) -> None:
    """tokenizer.json (byte-level BPE, special tokens) and tokenizer_config.json from the GGUF's tokenizer fields."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    kind, pre = field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise InputError(f"tokenizer.ggml.model is {kind!r}; only GPT-2-style byte-level BPE converts (a "
                         f"SentencePiece model ships as tokenizer.model)")
    if pre not in PRE_TOKENIZERS:
        raise InputError(f"tokenizer.ggml.pre is {pre!r}; supported: {', '.join(PRE_TOKENIZERS)}")
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    split = [pre_tokenizers.Digits(individual_digits=True)] if pre == "smollm" else []
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(split + [pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    control = 3                                                          # llama.cpp's token type CONTROL
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == control])
    atomic_write(out / "tokenizer.json", lambda tmp: tokenizer.save(str(tmp)))
    special = {key: tokens[field(reader, f"tokenizer.ggml.{key}_token_id")]
               for key in ("bos", "eos", "unknown", "padding") if f"tokenizer.ggml.{key}_token_id" in reader.fields}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special.get("bos"),
              "eos_token": special.get("eos"), "unk_token": special.get("unknown"), "pad_token": special.get("padding"),
              "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
              "model_max_length": field(reader, "llama.context_length"),
              "chat_template": field(reader, "tokenizer.chat_template", "")}
    atomic_write(out / "tokenizer_config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=1)))


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
    args = model_args(reader)
    state = state_dict(reader, args)
    write_hf(args, state.items(), dst, dtype=dtype)
    write_tokenizer(reader, Path(dst))
    return args, sum(t.numel() for t in state.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="a llama-architecture .gguf file")
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
