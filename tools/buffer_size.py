"""Bytes per replay sample: minseekr's buffer against the official SEEKR layout, at a LLaMA-2-7B shape.

    python tools/buffer_size.py                       # a few typical (length, answer) pairs
    python tools/buffer_size.py --length 900 --answer 60 --padded 1536

Official (notes §3): fp32 logits over the full vocabulary at every position of the task's padded length L_k,
plus bf16 attention rows of the selected heads over L_k keys. minseekr (minseekr/buffer.py): the logits that
predict the a labelled tokens and the attention rows over the sample's own n keys, both in `--dtype-bytes`.
Token ids, labels and rows (a few KB) are left out of both.
"""
import argparse


def official(L_k, V, heads, B_T):
    return L_k * V * 4 + heads * B_T * L_k * 2


def ours(n, a, V, heads, B_T, dtype_bytes):
    return a * V * dtype_bytes + heads * B_T * n * dtype_bytes


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
    p.add_argument("--dtype-bytes", type=int, default=2, help="2 for bf16 signals (the default), 4 for fp32")
    args = p.parse_args()
    cases = [(args.length, args.answer)] if args.length else [(1536, 512), (1000, 100), (400, 100), (300, 2)]
    print(f"V={args.vocab}, B_H={args.head_budget}, B_T={args.query_budget}, L_k={args.padded}")
    print(f"{'n':>6} {'a':>5} {'official MB':>12} {'ours MB (selected)':>19} {'ratio':>7} {'ours MB (all heads)':>20} {'ratio':>7}")
    all_heads = args.layers * args.heads_per_layer
    for n, a in cases:
        off = official(args.padded, args.vocab, args.head_budget, args.query_budget)
        sel = ours(n, a, args.vocab, args.head_budget, args.query_budget, args.dtype_bytes)
        every = ours(n, a, args.vocab, all_heads, args.query_budget, args.dtype_bytes)
        print(f"{n:>6} {a:>5} {off / 1e6:>12.1f} {sel / 1e6:>19.1f} {off / sel:>6.1f}x {every / 1e6:>20.1f} {off / every:>6.1f}x")


if __name__ == "__main__":
    main()
