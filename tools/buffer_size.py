"""Bytes per replay sample: minseekr's buffer against the official SEEKR layout, at a LLaMA-2-7B shape.

    python tools/buffer_size.py                       # a few typical (length, answer) pairs, top-64 logits
    python tools/buffer_size.py --length 900 --answer 60 --padded 1536 --topk 16
    python tools/buffer_size.py --attn-bytes 1                # attention rows in float8_e5m2 (--attn-dtype)

Official (notes §3): fp32 logits over the full vocabulary at every position of the task's padded length L_k,
plus bf16 attention rows of the selected heads over L_k keys. minseekr (minseekr/seekr/buffer.py), signals in
`--dtype-bytes`: the teacher's distributions that predict the a labelled tokens, either all V logits or the
top-k log-probabilities with their token ids (2 bytes while V fits int16, else 4), plus each attention row's
causal prefix only. Query rows are drawn uniformly among the n positions, so a row keeps (n+1)/2 keys on
average, B_T·(n+1)/2 per head. "dense rows" is the layout before prefixes: every row over all n keys.
Token ids, labels and rows (a few KB) are left out of all layouts.
"""
import argparse


def official(L_k, V, heads, B_T):
    return L_k * V * 4 + heads * B_T * L_k * 2


def attention(n, heads, B_T, dtype_bytes, prefix=True):
    """Expected bytes of the stored rows: causal prefixes (B_T·(n+1)/2 keys per head) or dense (B_T·n)."""
    keys = B_T * (n + 1) / 2 if prefix else B_T * n
    return heads * keys * dtype_bytes


def logits(a, V, dtype_bytes, topk=0):
    """Full-vocabulary logits (a·V) or top-k log-probabilities plus their ids (a·k)."""
    if not topk:
        return a * V * dtype_bytes
    return a * topk * (dtype_bytes + (2 if V <= 32767 else 4))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads-per-layer", type=int, default=32)
    p.add_argument("--head-budget", type=int, default=128, help="B_H")
    p.add_argument("--query-budget", type=int, default=100, help="B_T")
    p.add_argument("--padded", type=int, default=1536, help="L_k, the task's longest sample (official layout)")
    p.add_argument("--length", type=int, default=0, help="n, this sample's length (0: a table of typical cases)")
    p.add_argument("--answer", type=int, default=0, help="a, its labelled tokens (answer + EOS)")
    p.add_argument("--topk", type=int, default=64, help="k teacher tokens kept per labelled token")
    p.add_argument("--dtype-bytes", type=int, default=2, help="2 for bf16 signals (the default), 4 for fp32")
    p.add_argument("--attn-bytes", type=int, default=0, help="attention rows' bytes (1: float8_e5m2); 0: --dtype-bytes")
    args = p.parse_args()
    if not 0 < args.topk <= args.vocab:
        p.error(f"--topk must be in [1, {args.vocab}], got {args.topk}")
    cases = [(args.length, args.answer)] if args.length else [(1536, 512), (1000, 100), (400, 100), (300, 2)]
    V, B_T, db, k = args.vocab, args.query_budget, args.dtype_bytes, args.topk
    ab = args.attn_bytes or db
    all_heads = args.layers * args.heads_per_layer
    print(f"V={V}, B_H={args.head_budget}, B_T={B_T}, L_k={args.padded}, k={k}, logits {db} B, attention {ab} B; "
          f"MB (ratio to official)")
    columns = ["dense rows, full", "prefix rows, full", f"prefix rows, top-{k}", f"all heads, top-{k}"]
    print(f"{'n':>6} {'a':>5} {'official':>9}" + "".join(f" {c:>18}" for c in columns))
    for n, a in cases:
        off = official(args.padded, V, args.head_budget, B_T)
        ours = [
            logits(a, V, db) + attention(n, args.head_budget, B_T, ab, prefix=False),
            logits(a, V, db) + attention(n, args.head_budget, B_T, ab),
            logits(a, V, db, k) + attention(n, args.head_budget, B_T, ab),
            logits(a, V, db, k) + attention(n, all_heads, B_T, ab),
        ]
        print(f"{n:>6} {a:>5} {off / 1e6:>9.1f}" + "".join(f" {f'{b / 1e6:.1f} ({off / b:.1f}x)':>18}" for b in ours))


if __name__ == "__main__":
    main()
