"""Training-step speed and memory of minseekr's Transformer against transformers' LlamaForCausalLM.

Both models hold the same weights and run the same forward + cross-entropy + backward on the same batch.
Timing interleaves the two (ours, HF, ours, HF, ...) after warmup, so load from other processes hits
both alike, and reports medians. Peak memory of one step above the model's own weights:
on CUDA torch.cuda.max_memory_allocated; on CPU the growth of the peak RSS (VmHWM) of a fresh process
per implementation, with glibc told to return large blocks to the OS at once so that freed activations
are not hidden in its caches.

    python tools/bench_model.py                          # CPU, fp32, a 5M-parameter model
    python tools/bench_model.py --device cuda --dtype bfloat16 --dim 2048 --n_layers 16 --seq 2048
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from minseekr.network.model import ModelArgs, Transformer


def add_model_flags(p, n_kv_heads: int):
    """The flags `build` reads besides the length: the model's shape, the batch, dtype and device."""
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_heads", type=int, default=8)
    p.add_argument("--n_kv_heads", type=int, default=n_kv_heads)
    p.add_argument("--hidden_dim", type=int, default=704)
    p.add_argument("--vocab_size", type=int, default=4000)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_flags(p, n_kv_heads=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads; more than the idle cores makes OpenMP spin and times meaningless")
    p.add_argument("--memory_child", choices=["ours", "hf"], help=argparse.SUPPRESS)  # internal: one CPU memory run
    return p.parse_args()


def build(opt):
    """The same random weights in both implementations, and a batch."""
    torch.manual_seed(0)
    args = ModelArgs(dim=opt.dim, n_layers=opt.n_layers, n_heads=opt.n_heads, n_kv_heads=opt.n_kv_heads,
                     hidden_dim=opt.hidden_dim, vocab_size=opt.vocab_size, max_seq_len=max(opt.seq, 4096))
    dtype = getattr(torch, opt.dtype)
    ours = Transformer(args)
    ours.init_weights()
    ours.to(device=opt.device, dtype=dtype)
    hf = LlamaForCausalLM(LlamaConfig(**args.to_hf_config(dtype), attn_implementation="sdpa"))
    hf.load_state_dict(ours.state_dict())
    hf.to(device=opt.device, dtype=dtype)
    tokens = torch.randint(0, args.vocab_size, (opt.batch, opt.seq), device=opt.device)
    return {"ours": ours.train(), "hf": hf.train()}, tokens


def step(name, model, tokens):
    """One forward + next-token cross-entropy + backward; gradients dropped after."""
    logits = model(tokens) if name == "ours" else model(tokens).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_rss():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024


def cpu_memory_child(opt):
    models, tokens = build(opt)
    model = models[opt.memory_child]
    del models
    step(opt.memory_child, model, tokens[:, :8])  # load kernels and allocator state before the baseline
    base = peak_rss()
    step(opt.memory_child, model, tokens)
    print(json.dumps({"peak": peak_rss() - base}))


def cpu_memory(script, child):
    """The peak RSS growth that `script --memory_child child` prints from a fresh process, with glibc told to return
    large blocks to the OS at once (so freed activations are not hidden in its caches)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, script, *sys.argv[1:], "--memory_child", child],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def cuda_memory(run):
    """Peak CUDA memory that run() allocates above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main():
    opt = parse()
    torch.set_num_threads(opt.threads)
    if opt.memory_child:
        return cpu_memory_child(opt)
    models, tokens = build(opt)
    n_params = sum(p.numel() for p in models["ours"].parameters())
    losses = {name: step(name, m, tokens) for name, m in models.items()}
    assert abs(losses["ours"] - losses["hf"]) < 1e-2, f"the two models disagree: {losses}"
    for _ in range(opt.warmup):
        for name, m in models.items():
            step(name, m, tokens)
    times = {name: [] for name in models}
    for _ in range(opt.iters):
        for name, m in models.items():
            sync(opt.device)
            t = time.perf_counter()
            step(name, m, tokens)
            sync(opt.device)
            times[name].append(time.perf_counter() - t)
    if opt.device.startswith("cuda"):
        memory = {name: cuda_memory(lambda: step(name, m, tokens)) for name, m in models.items()}
    else:
        del models
        memory = {name: cpu_memory(__file__, name) for name in ("ours", "hf")}
    tokens_per_step = opt.batch * opt.seq
    print(f"{n_params / 1e6:.1f}M parameters, batch {opt.batch} x {opt.seq}, {opt.dtype} on {opt.device} ({opt.threads} CPU threads), "
          f"median of {opt.iters} fwd+bwd steps (losses {losses['ours']:.4f} / {losses['hf']:.4f})")
    rate = {name: tokens_per_step / statistics.median(ts) for name, ts in times.items()}
    for name, label in (("ours", "minseekr"), ("hf", "transformers")):
        print(f"  {label:13s} {rate[name]:10.0f} tokens/s   peak step memory {memory[name] / 2**20:8.1f} MiB")
    print(f"  ratio minseekr/transformers: speed {rate['ours'] / rate['hf']:.3f}x, "
          f"memory {memory['ours'] / memory['hf']:.3f}x")


if __name__ == "__main__":
    main()
