"""Convert a llama2.c checkpoint (legacy version-0 `.bin`) to the HF layout minseekr and transformers load.

    python tools/convert_llama2c.py stories260K.bin weights/stories260K

The legacy file is a header of 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len) and then float32 arrays in this order: token embeddings, attention RMSNorm weights, wq, wk,
wv, wo (each stacked over layers, PyTorch's (out, in) layout), FFN RMSNorm weights, w1, w2, w3, the
final RMSNorm, RoPE's cos and sin tables (seq_len, head_dim/2), and the classifier wcls only when it
is not shared with the embeddings, which the header says with a negative vocab_size. llama2.c fixes
RMSNorm's eps at 1e-5 and RoPE's base at 1e4; the stored cos/sin tables are checked against that base.

llama2.c rotates consecutive pairs (q[2i], q[2i+1]) of each head, Meta's complex-number form; HF and
minseekr rotate the two halves (q[i], q[i + D/2]) instead. Both are the same rotation once each
head's q and k rows are reordered so that pair i's two components land at rows i and i + D/2: the
scores q·k, hence the attention maps and logits, are then unchanged (tests/test_llama2c.py shows it,
and shows that without the reordering they change).
"""
import argparse
import math
from pathlib import Path

import numpy as np
import torch

from minseekr.network.checkpoint import save_hf
from minseekr.network.model import ModelArgs, Transformer, interleaved_to_half

HEADER = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
NORM_EPS, ROPE_THETA = 1e-5, 10000.0  # hard-coded in llama2.c's run.c and model.py


def array_shapes(h: dict, shared_classifier: bool) -> list[tuple[str, tuple]]:
    """The float32 arrays of a legacy file in storage order, with their shapes."""
    L, D, F, V = h["n_layers"], h["dim"], h["hidden_dim"], h["vocab_size"]
    head_dim = D // h["n_heads"]
    kv = h["n_kv_heads"] * head_dim
    shapes = [("tok_embeddings", (V, D)), ("rms_att", (L, D)), ("wq", (L, D, D)), ("wk", (L, kv, D)),
              ("wv", (L, kv, D)), ("wo", (L, D, D)), ("rms_ffn", (L, D)), ("w1", (L, F, D)),
              ("w2", (L, D, F)), ("w3", (L, F, D)), ("rms_final", (D,)),
              ("freq_cis_real", (h["seq_len"], head_dim // 2)), ("freq_cis_imag", (h["seq_len"], head_dim // 2))]
    return shapes if shared_classifier else shapes + [("wcls", (V, D))]


def read_llama2c(path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """The ModelArgs and the raw arrays (Meta's interleaved RoPE layout) of a legacy llama2.c file."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 4 * len(HEADER):
        raise ValueError(f"{path}: {len(data)} bytes is too short for llama2.c's 28-byte header")
    h = dict(zip(HEADER, np.frombuffer(data, dtype="<i4", count=len(HEADER)).tolist()))
    shared = h["vocab_size"] > 0
    h["vocab_size"] = abs(h["vocab_size"])
    if min(h.values()) <= 0 or h["dim"] % h["n_heads"] or h["n_heads"] % h["n_kv_heads"]:
        raise ValueError(f"{path}: header {h} is not a llama2.c legacy header (positive sizes, heads dividing dim)")
    shapes = array_shapes(h, shared)
    expected = 4 * len(HEADER) + 4 * sum(math.prod(s) for _, s in shapes)
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes, but header {h} with "
                         f"{'shared' if shared else 'separate'} classifier implies {expected}")
    raw, offset = {}, 4 * len(HEADER)
    for name, shape in shapes:
        n = math.prod(shape)
        raw[name] = torch.from_numpy(np.frombuffer(data, dtype="<f4", count=n, offset=offset).copy()).view(shape)
        offset += 4 * n
    args = ModelArgs(dim=h["dim"], n_layers=h["n_layers"], n_heads=h["n_heads"], n_kv_heads=h["n_kv_heads"],
                     vocab_size=h["vocab_size"], hidden_dim=h["hidden_dim"], norm_eps=NORM_EPS,
                     rope_theta=ROPE_THETA, max_seq_len=h["seq_len"], tie_embeddings=shared)
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim)
    angles = torch.arange(h["seq_len"]).float()[:, None] * inv_freq                 # (seq_len, D/2)
    if not (torch.allclose(raw["freq_cis_real"], angles.cos(), atol=1e-4)
            and torch.allclose(raw["freq_cis_imag"], angles.sin(), atol=1e-4)):
        raise ValueError(f"{path}: stored RoPE tables are not those of base {ROPE_THETA}")
    return args, raw


def hf_state_dict(args: ModelArgs, raw: dict[str, torch.Tensor], permute: bool = True) -> dict[str, torch.Tensor]:
    """HF-named tensors of the raw arrays; permute=False skips the q/k reordering (only to show it matters)."""
    qk = interleaved_to_half if permute else (lambda w, n_heads: w)
    state = {"model.embed_tokens.weight": raw["tok_embeddings"], "model.norm.weight": raw["rms_final"],
             "lm_head.weight": raw["tok_embeddings"] if args.tie_embeddings else raw["wcls"]}
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": raw["rms_att"][i],
            p + "self_attn.q_proj.weight": qk(raw["wq"][i], args.n_heads),
            p + "self_attn.k_proj.weight": qk(raw["wk"][i], args.n_kv_heads),
            p + "self_attn.v_proj.weight": raw["wv"][i],
            p + "self_attn.o_proj.weight": raw["wo"][i],
            p + "post_attention_layernorm.weight": raw["rms_ffn"][i],
            p + "mlp.gate_proj.weight": raw["w1"][i],
            p + "mlp.down_proj.weight": raw["w2"][i],
            p + "mlp.up_proj.weight": raw["w3"][i],
        }
    return state


def load_llama2c(path, permute: bool = True) -> Transformer:
    """A minseekr Transformer (eval mode) with the weights of a legacy llama2.c file."""
    args, raw = read_llama2c(path)
    model = Transformer(args)
    model.load_state_dict(hf_state_dict(args, raw, permute))
    return model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="llama2.c legacy checkpoint (.bin)")
    parser.add_argument("dst", type=Path, help="output directory for config.json + model.safetensors")
    a = parser.parse_args(argv)
    model = load_llama2c(a.src)
    save_hf(model, a.dst)
    print(f"wrote {a.dst} ({sum(p.numel() for p in model.parameters())} parameters, {model.args})")


if __name__ == "__main__":
    main()
