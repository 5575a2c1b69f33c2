"""Forward+backward time and peak memory of three ways to get the attention-KL loss of one layer.

    python tools/bench_kl.py --batch 1 --heads 32 --selected 4 --head-dim 128 --seq 512 1024 2048 --rows 100

Each route starts from the layer's post-RoPE q, k, v (B, H, S, d) and computes the layer's
attention output plus the KL of `--selected` heads at `--rows` sampled query rows, then backward:
- fused:    SDPA for the output, `attention_kl` on the sampled rows (minseekr.seekr.kl);
- naive:    SDPA for the output, the selected heads' full (B, h, S, S) masked softmax with autograd,
            rows picked afterwards, F.kl_div (the test reference);
- official: eager attention for the whole layer (every head's post-softmax map, softmax in fp32 cast
            to --dtype, A·V), then F.kl_div(log(A + 1e-8), teacher) on the selected heads' rows
            (SEEKR's released code, `attn_distill_budget2_forward`).
With --kl-only the SDPA/eager output is dropped from all three routes (only the KL term is timed).
Every (route, S) runs in a fresh subprocess. Peak memory: CUDA max_memory_allocated; CPU the
resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) above the level before the
measured step (after a warm-up step, with glibc's mmap threshold at 64 KiB so that freed blocks
leave the resident set). Also printed: `work`, the peak less the dq, dk (, dv) buffers of the
layer's full shape that every route must produce (in training they exist anyway), `saved`, the
bytes the autograd graph keeps beyond q, k, v and the teacher (allocator-independent), and, whatever the
device, `ops` and `syncs`: the operations one step dispatches (about a kernel launch each on a GPU) and the
values it reads back (`bench_model.Dispatched`).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from dispatched import Dispatched
from minseekr.seekr.kl import CHUNK_ELEMENTS, attention_kl

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(args, S):
    g = torch.Generator().manual_seed(0)
    dtype, dev = DTYPES[args.dtype], args.device
    q, k, v = (torch.randn(args.batch, args.heads, S, args.head_dim, generator=g).to(dev, dtype).requires_grad_()
               for _ in range(3))
    heads = torch.arange(args.selected, device=dev) * (args.heads // args.selected)   # spread over the layer
    rows = torch.stack([torch.randperm(S, generator=g)[:args.rows].sort().values for _ in range(args.batch)]).to(dev)
    valid = torch.arange(S, device=dev) <= rows[..., None]                            # (B, T, S)
    teacher = torch.rand(args.batch, args.selected, args.rows, S, generator=g).to(dev) * valid[:, None]
    teacher = (teacher / teacher.sum(-1, keepdim=True)).bfloat16()                   # stored as in the buffer
    grad_out = torch.randn(args.batch, args.heads, S, args.head_dim, generator=g).to(dev, dtype)
    return q, k, v, heads, rows, teacher, grad_out


def pick_rows(x, rows):
    """x (B, h, S, ...) at rows (B, T) -> (B, h, T, ...)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None, None],
             torch.arange(x.shape[1], device=x.device)[None, :, None], rows[:, None, :]]


def fused(q, k, v, heads, rows, teacher, args):
    out = None if args.kl_only else F.scaled_dot_product_attention(q, k, v, is_causal=True)
    kl = attention_kl(pick_rows(q[:, heads], rows), k, rows, teacher, kv_heads=heads,
                      chunk_elements=args.chunk_elements)
    return out, kl.sum() / (heads.numel() * rows.shape[1])


def naive(q, k, v, heads, rows, teacher, args):
    out = None if args.kl_only else F.scaled_dot_product_attention(q, k, v, is_causal=True)
    S = q.shape[2]
    scores = q[:, heads].float() @ k[:, heads].float().transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, h, S, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    log_student = pick_rows(scores.masked_fill(~causal, float("-inf")).log_softmax(-1), rows)
    valid = (torch.arange(S, device=q.device) <= rows[..., None])[:, None]             # (B, 1, T, S)
    kl = F.kl_div(log_student.masked_fill(~valid, 0.0), teacher.float(), reduction="none").sum(-1)
    return out, kl.sum() / (heads.numel() * rows.shape[1])


def official(q, k, v, heads, rows, teacher, args):
    S = q.shape[2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])                         # (B, H, S, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    probs = F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
    out = None if args.kl_only else probs @ v
    student = pick_rows(probs[:, heads], rows)                                         # (B, h, T, S)
    loss = F.kl_div(torch.log(student + 1e-8).view(-1, S), teacher.to(q.dtype).view(-1, S), reduction="batchmean")
    return out, loss


ROUTES = {"fused": fused, "naive": naive, "official": official}


def step(route, inputs, args):
    q, k, v, heads, rows, teacher, grad_out = inputs
    out, loss = ROUTES[route](q, k, v, heads, rows, teacher, args)
    tensors, grads = [loss], [torch.ones_like(loss)]
    if out is not None:
        tensors.append(out)
        grads.append(grad_out)
    torch.autograd.backward(tensors, grads)
    q.grad = k.grad = v.grad = None


def sync(args):
    if args.device == "cuda":
        torch.cuda.synchronize()


def rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def saved_bytes(route, inputs, args):
    """Bytes the autograd graph of one forward keeps beyond q, k, v and the teacher (held anyway)."""
    held = {t.untyped_storage().data_ptr() for t in (*inputs[:3], inputs[5])}
    seen = {}
    def pack(t):
        if t.untyped_storage().data_ptr() not in held:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ROUTES[route](*inputs[:6], args)
    return sum(seen.values())


def child(args):
    """Measure one route at one S; print one JSON line."""
    torch.set_num_threads(args.threads)
    S, route = args.child_seq, args.child_route
    inputs = make_inputs(args, S)
    sync(args)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(route, inputs, args)
        sync(args)
        peak = torch.cuda.max_memory_allocated() - before
    else:
        step(route, inputs, args)                                                      # lazy library init
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                                                # reset VmHWM
        before = rss_kib("VmRSS")
        step(route, inputs, args)
        peak = (rss_kib("VmHWM") - before) * 1024
    times = []
    for _ in range(args.repeat):
        sync(args)
        t0 = time.perf_counter()
        step(route, inputs, args)
        sync(args)
        times.append(time.perf_counter() - t0)
    # dq, dk (and dv) buffers of the layer's full shape, which every route ends up holding.
    grads = sum(x.numel() * x.element_size() for x in inputs[:2 if args.kl_only else 3])
    with Dispatched() as counted:
        step(route, inputs, args)
    print(json.dumps(dict(peak=peak, work=peak - grads, saved=saved_bytes(route, inputs, args),
                          time=statistics.median(times), ops=counted.ops, syncs=counted.syncs)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32, help="query heads of the layer")
    p.add_argument("--selected", type=int, default=4, help="distilled heads of the layer (B_H / B_L ≈ 5)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--rows", type=int, default=100, help="sampled query rows B_T")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="q, k, v and the official route's maps")
    p.add_argument("--chunk-elements", type=int, default=CHUNK_ELEMENTS,
                   help="attention_kl's entries per (B, h, T, S) block (default: kl.CHUNK_ELEMENTS)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads in each run")
    p.add_argument("--repeat", type=int, default=3, help="timed steps after the memory step (median)")
    p.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES))
    p.add_argument("--kl-only", action="store_true", help="time the KL term alone, without the attention output")
    p.add_argument("--child-route", help=argparse.SUPPRESS)
    p.add_argument("--child-seq", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.heads % args.selected:
        p.error(f"--selected {args.selected} must divide --heads {args.heads}")
    if args.child_route:
        return child(args)

    print(f"B={args.batch} H={args.heads} selected={args.selected} d={args.head_dim} T={args.rows} "
          f"dtype={args.dtype} device={args.device} threads={args.threads} "
          f"{'KL only' if args.kl_only else 'attention output + KL'}, forward+backward")
    print(f"{'S':>5} {'route':>9} {'time ms':>9} {'peak MiB':>9} {'work MiB':>9} {'saved MiB':>9} "
          f"{'time/fused':>10} {'peak/fused':>10} {'work/fused':>10} {'ops':>5} {'syncs':>5}")
    # glibc serves blocks >= 64 KiB by mmap and unmaps them on free, so the resident set follows live tensors.
    child_env = {"OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "65536"}
    for S in args.seq:
        results = {}
        for route in args.routes:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child-route", route, "--child-seq", str(S)]
            run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **child_env})
            if run.returncode:
                print(f"{S:>5} {route:>9} failed: {run.stderr.strip().splitlines()[-1]}")
                continue
            results[route] = r = json.loads(run.stdout.strip().splitlines()[-1])
            base = results.get("fused", r)
            print(f"{S:>5} {route:>9} {r['time'] * 1e3:9.1f} {r['peak'] / 2**20:9.1f} {r['work'] / 2**20:9.1f} "
                  f"{r['saved'] / 2**20:9.1f} {r['time'] / base['time']:10.2f} {r['peak'] / max(base['peak'], 1):10.2f} "
                  f"{r['work'] / max(base['work'], 1):10.2f} {r['ops']:5d} {r['syncs']:5d}", flush=True)


if __name__ == "__main__":
    main()
