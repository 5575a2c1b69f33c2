"""Step time and per-rank peak memory: minseekr's hand-written ZeRO-3 against PyTorch's FSDP2 (`fully_shard`).

Each engine trains the same model on the same batch in its own fresh set of processes (forward, backward,
clip, AdamW). Memory is the per-rank peak during the timed steps: `torch.cuda.max_memory_allocated` on GPUs,
the peak resident set above the process's own baseline (after `import torch` and the process group) on CPU.

    python tools/bench_fsdp.py                                  # 2 processes on the CPU (gloo)
    python tools/bench_fsdp.py --device cuda --nproc 8 --dim 2048 --layers 16 --dtype bf16
"""
import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minseekr.engines.fsdp import FSDP
from minseekr.engines.fsdp_torch import apply_torch_fsdp, decay_groups
from minseekr.network.model import ModelArgs, Transformer, token_losses

LR, MAX_NORM = 1e-4, 1.0


def rss_mib(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_mib(device, baseline):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return rss_mib("VmHWM") - baseline


def worker(rank, world, cfg, tmp):
    device = torch.device(cfg["device"], rank) if cfg["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{tmp}/pg",
                            rank=rank, world_size=world)
    baseline = rss_mib("VmRSS")
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16)[cfg["dtype"]]
    args = ModelArgs(dim=cfg["dim"], n_layers=cfg["layers"], n_heads=cfg["heads"], vocab_size=cfg["vocab"],
                     hidden_dim=cfg["hidden"], max_seq_len=cfg["seq"])
    with torch.device("meta"):  # neither engine ever holds the whole model
        model = Transformer(args)
    if cfg["engine"] == "minseekr":
        engine = FSDP(model, device=device, compute_dtype=dtype, activation_checkpointing=cfg["ac"],
                      prefetch=not cfg["no_prefetch"], weight_decay=0.1)
        for u in engine.units:  # init_weights' values on the shards: N(0, 0.02), norms at one
            u.shard.normal_(0.0, 0.02)
            for i, a, b, _, _ in u.owned():
                if u.names[i].endswith("norm.weight"):
                    u.shard[a:b] = 1.0
        model, clip = engine.model, lambda: engine.clip_grad_norm_(MAX_NORM)

        def step():
            engine.optimizer_step(LR)
            engine.zero_grad()
    else:
        apply_torch_fsdp(model, device, compute_dtype=dtype, activation_checkpointing=cfg["ac"])
        model.to_empty(device=device)
        model.init_weights()
        opt = torch.optim.AdamW(decay_groups(model, 0.1), lr=LR)
        clip = lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)

        def step():
            opt.step()
            opt.zero_grad()
    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, args.vocab_size, (cfg["batch"], cfg["seq"]), generator=g).to(device)
    n_global = cfg["batch"] * (cfg["seq"] - 1) * world
    times = []
    for i in range(cfg["warmup"] + cfg["steps"]):
        if i == cfg["warmup"]:
            reset_peak(device)
        dist.barrier()
        t0 = time.perf_counter()
        loss = token_losses(model(tokens), tokens).sum() * world / n_global
        loss.backward()
        clip()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    result = dict(step_s=statistics.median(times[cfg["warmup"]:]), peak_mib=peak_mib(device, baseline))
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def bench(engine, cfg):
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(cfg["nproc"], {**cfg, "engine": engine}, tmp), nprocs=cfg["nproc"],
                           start_method="spawn")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(cfg["nproc"])]
    return max(r["step_s"] for r in ranks), [r["peak_mib"] for r in ranks]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--nproc", type=int, default=2, help="processes (one per GPU on cuda)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype (master copy is fp32)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ac", action="store_true", help="activation checkpointing per block")
    p.add_argument("--no-prefetch", action="store_true", help="minseekr: no one-unit-ahead all-gather")
    p.add_argument("--repeat", type=int, default=2, help="interleaved runs per engine; the fastest counts")
    cfg = vars(p.parse_args())
    print(json.dumps(cfg))
    runs = {"minseekr": [], "torch": []}
    for _ in range(cfg["repeat"]):  # interleaved, so load from other processes hits both engines alike
        for name in runs:
            runs[name].append(bench(name, cfg))
    results = {name: min(r, key=lambda x: x[0]) for name, r in runs.items()}
    for name, (step_s, peaks) in results.items():
        label = "minseekr ZeRO-3" if name == "minseekr" else "torch FSDP2"
        print(f"{label:16s} step {step_s * 1e3:8.1f} ms   peak/rank MiB {' '.join(f'{m:8.1f}' for m in peaks)}")
    (ours_s, ours_m), (torch_s, torch_m) = results["minseekr"], results["torch"]
    print(f"speed  (FSDP2 step time / ours): {torch_s / ours_s:.3f}x   target >= 0.9")
    print(f"memory (ours / FSDP2, max rank): {max(ours_m) / max(torch_m):.3f}x   target <= 1.1")


if __name__ == "__main__":
    main()
