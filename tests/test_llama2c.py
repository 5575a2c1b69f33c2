"""llama2.c conversion: Meta's interleaved RoPE on the raw weights equals HF's rotate_half on the permuted ones.

This is the one place the project shows the q/k permutation: a naive llama2.c forward (complex-number
RoPE on consecutive pairs, float64) on the file's own weights gives the logits and attention maps
that minseekr and transformers give on the converted checkpoint, and different ones without it.
"""
import math
import struct
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, shared_path

from minseekr.network.checkpoint import load_hf
from minseekr.network.generate import generate

sys.path.insert(0, str(ROOT / "tools"))
from convert_llama2c import load_llama2c, main, read_llama2c  # noqa: E402


@pytest.fixture(scope="module")
def aidreams():
    return shared_path("artifacts", "aidreams260K", "aidreams260K.bin")


@pytest.fixture(scope="module")
def converted(aidreams, tmp_path_factory):
    dst = tmp_path_factory.mktemp("aidreams260K-hf")
    main([str(aidreams), str(dst)])
    return dst


def meta_forward(raw, n_heads, n_kv_heads, tokens, eps=1e-5, theta=1e4):
    """llama2.c's forward in float64 on its own arrays: logits (S, V) and per-layer maps (H, S, S)."""
    w = {k: v.double() for k, v in raw.items()}
    S, D = len(tokens), w["tok_embeddings"].shape[1]
    head_dim = D // n_heads
    freqs = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    rot = torch.polar(torch.ones(S, head_dim // 2, dtype=torch.float64),
                      torch.arange(S, dtype=torch.float64)[:, None] * freqs)      # (S, D/2) e^{i·pos·f}

    def rope(x):  # pairs (x[2i], x[2i+1]) are the complex number x[2i] + i·x[2i+1]
        z = torch.view_as_complex(x.reshape(S, -1, head_dim // 2, 2).contiguous())  # (S, H, D/2)
        return torch.view_as_real(z * rot[:, None]).reshape(S, -1, head_dim)     # (S, H, D)

    def rmsnorm(x, g):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    causal = torch.ones(S, S, dtype=torch.bool).tril()
    x, maps = w["tok_embeddings"][tokens], []
    for i in range(w["wq"].shape[0]):
        h = rmsnorm(x, w["rms_att"][i])
        q, k = rope(h @ w["wq"][i].T), rope(h @ w["wk"][i].T)                    # (S, H, D), (S, Hkv, D)
        v = (h @ w["wv"][i].T).view(S, n_kv_heads, head_dim)
        k, v = (t.repeat_interleave(n_heads // n_kv_heads, 1) for t in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
        a = scores.masked_fill(~causal, float("-inf")).softmax(-1)                # (H, S, S)
        maps.append(a)
        x = x + torch.einsum("hqk,khd->qhd", a, v).reshape(S, D) @ w["wo"][i].T
        h = rmsnorm(x, w["rms_ffn"][i])
        x = x + (F.silu(h @ w["w1"][i].T) * (h @ w["w3"][i].T)) @ w["w2"][i].T
    head = w.get("wcls", w["tok_embeddings"])
    return rmsnorm(x, w["rms_final"]) @ head.T, maps


TOKENS = [1, 319, 459, 355, 260, 275, 429, 339, 315, 374, 327, 446, 262, 421, 392, 275, 280, 269, 440, 270]


def test_header_and_size_of_the_real_file(aidreams):
    args, raw = read_llama2c(aidreams)
    assert (args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size,
            args.max_seq_len, args.tie_embeddings) == (64, 172, 4, 4, 4, 512, 128, True)
    assert "wcls" not in raw and raw["wq"].shape == (4, 64, 64)


def test_converted_weights_give_meta_rope_logits_and_attention_maps(aidreams, converted):
    _, raw = read_llama2c(aidreams)
    ref_logits, ref_maps = meta_forward(raw, 4, 4, torch.tensor(TOKENS))
    model = load_hf(converted)
    with torch.no_grad():
        logits, maps = model(torch.tensor([TOKENS]), return_attn=True)
    torch.testing.assert_close(logits[0].double(), ref_logits, atol=1e-4, rtol=0)
    for a, ref in zip(maps, ref_maps, strict=True):
        torch.testing.assert_close(a[0].double(), ref, atol=1e-5, rtol=0)
    # transformers reads the converted directory as the same model.
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(converted).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([TOKENS])).logits[0].double(), ref_logits, atol=1e-4, rtol=0)


def test_without_the_permutation_the_attention_maps_are_wrong(aidreams):
    _, raw = read_llama2c(aidreams)
    _, ref_maps = meta_forward(raw, 4, 4, torch.tensor(TOKENS))
    with torch.no_grad():
        _, maps = load_llama2c(aidreams, permute=False)(torch.tensor([TOKENS]), return_attn=True)
    # Layer 0's maps depend only on the embeddings, wq, wk and RoPE; with the permutation they agree
    # to 1e-6, without it some attention weights are off by more than half.
    assert (maps[0][0].double() - ref_maps[0]).abs().max() > 0.5


def test_converted_model_writes_its_kind_of_text(aidreams):
    """A regression pin (read by eye once: coherent English) through llama2.c's own tok512 vocabulary."""
    data = shared_path("artifacts", "aidreams260K", "tok512.bin").read_bytes()
    pieces, offset = [], 4                                   # int32 max_token_length, then (score, len, bytes)
    while offset < len(data):
        _, n = struct.unpack_from("<fi", data, offset)
        pieces.append(data[offset + 8:offset + 8 + n])
        offset += 8 + n
    out = generate(load_llama2c(aidreams), [[1]], 30)[0]
    assert b"".join(pieces[t] for t in out).decode() == ' "Echoes of vectors unfold, a gentle hum of precision, as I sense the nodes'


def write_legacy(path, h, arrays):
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", *h))
        for a in arrays:
            f.write(np.asarray(a, dtype="<f4").tobytes())


def planted_untied_file(path):
    """A GQA model with a negative vocab_size (separate classifier), every array filled with its own index."""
    dim, hidden, L, H, Hkv, V, seq = 8, 12, 2, 2, 1, 10, 6
    head_dim = dim // H
    angles = np.arange(seq)[:, None] * 1e4 ** -(np.arange(0, head_dim, 2) / head_dim)
    shapes = [(V, dim), (L, dim), (L, dim, dim), (L, Hkv * head_dim, dim), (L, Hkv * head_dim, dim),
              (L, dim, dim), (L, dim), (L, hidden, dim), (L, dim, hidden), (L, hidden, dim), (dim,)]
    arrays = [np.full(s, float(i)) for i, s in enumerate(shapes)] + [np.cos(angles), np.sin(angles), np.full((V, dim), 11.0)]
    write_legacy(path, (dim, hidden, L, H, Hkv, -V, seq), arrays)


def test_negative_vocab_size_means_an_untied_classifier_stored_last(tmp_path):
    planted_untied_file(tmp_path / "untied.bin")
    model = load_llama2c(tmp_path / "untied.bin")
    assert not model.args.tie_embeddings and (model.args.vocab_size, model.args.n_kv_heads) == (10, 1)
    layer = "model.layers.1."
    for name, index in [("model.embed_tokens.weight", 0), (layer + "input_layernorm.weight", 1),
                        (layer + "self_attn.q_proj.weight", 2), (layer + "self_attn.k_proj.weight", 3),
                        (layer + "self_attn.v_proj.weight", 4), (layer + "self_attn.o_proj.weight", 5),
                        (layer + "post_attention_layernorm.weight", 6), (layer + "mlp.gate_proj.weight", 7),
                        (layer + "mlp.down_proj.weight", 8), (layer + "mlp.up_proj.weight", 9),
                        ("model.norm.weight", 10), ("lm_head.weight", 11)]:
        assert (model.state_dict()[name] == index).all(), name


def test_a_file_whose_size_disagrees_with_its_header_is_refused(aidreams, tmp_path):
    data = aidreams.read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-4])
    with pytest.raises(ValueError, match=r"short.bin: 932120 bytes, but header .* shared classifier implies 932124"):
        read_llama2c(tmp_path / "short.bin")
    # The same bytes read as an untied model would need a wcls of 512 x 64 more floats.
    (tmp_path / "untied.bin").write_bytes(struct.pack("<i", -512).join([data[:20], data[24:]]))
    with pytest.raises(ValueError, match=r"separate classifier implies 1063196"):
        read_llama2c(tmp_path / "untied.bin")


def test_a_file_with_foreign_rope_tables_is_refused(tmp_path):
    planted_untied_file(tmp_path / "m.bin")
    data = bytearray((tmp_path / "m.bin").read_bytes())
    data[-4 * 80 - 4:-4 * 80] = struct.pack("<f", 0.5)  # last sin entry; wcls (10 x 8) follows it
    (tmp_path / "m.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="RoPE tables are not those of base 10000"):
        read_llama2c(tmp_path / "m.bin")
