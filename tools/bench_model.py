"""Training-step speed and memory of minseekr's Transformer against transformers' sdpa model of each family.

`--family` picks the model: llama (LlamaForCausalLM), qwen2 (Qwen2ForCausalLM: biases on q, k and v), mistral
(MistralForCausalLM with a sliding window `--window` shorter than the sequence, in every layer) or gemma3
(Gemma3ForCausalLM: Gemma-3's norms, GeGLU, q/k norms and scaled embeddings; sliding and full layers, the last of
every six and the last layer full). transformers builds it with random weights (every one perturbed, norms and
biases too, so no term is left out of the comparison) and `attn_implementation="sdpa"`; it is saved with
`save_pretrained` and minseekr loads the directory with `load_hf`. Before timing, the two models' logits on the
batch must agree, and every attention call's mask is recorded: minseekr's sliding layers must hand SDPA one
(B, 1, S, S) bool mask (`Transformer.attention_mask`: an expanded view of one S×S mask, so the batch shares it),
broadcast over all heads and shared by every layer of that window, never a per-head (B, H, S, S) one; the full
layers run SDPA's causal path with no mask. The line naming the family reports what both libraries handed SDPA
and the kernel torch picks for each call (CPU: flash, masks and grouped queries included; on a GPU, where flash
takes no mask and the memory-efficient kernel no grouped queries, "math" would mean S×S scores for every head).

Both models then run the same forward + cross-entropy + backward on the same batch.
Timing interleaves the two (ours, HF, ours, HF, ...) after warmup, so load from other processes hits
both alike, and reports medians. Peak memory of one step above the model's own weights:
on CUDA torch.cuda.max_memory_allocated; on CPU the growth of the peak RSS (VmHWM) of a fresh process
per implementation, with glibc told to return large blocks to the OS at once so that freed activations
are not hidden in its caches.

    python tools/bench_model.py                          # CPU, fp32, a 5M-parameter LLaMA
    python tools/bench_model.py --family gemma3 --window 64
    python tools/bench_model.py --device cuda --dtype bfloat16 --dim 2048 --n_layers 16 --seq 2048
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging

from minseekr.network.args import ModelArgs
from minseekr.network.checkpoint import load_hf

FAMILIES = ("llama", "qwen2", "mistral", "gemma3")


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
    p.add_argument("--family", default="llama", choices=FAMILIES, help="the transformers model to compare with")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--window", type=int, help="mistral's and gemma3's sliding window (default: seq // 4)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads; more than the idle cores makes OpenMP spin and times meaningless")
    p.add_argument("--memory_child", choices=["ours", "hf"], help=argparse.SUPPRESS)  # internal: one CPU memory run
    opt = p.parse_args()
    if opt.window is None:
        opt.window = opt.seq // 4
    if not 1 <= opt.window < opt.seq:
        p.error(f"--window {opt.window} must be at least 1 and shorter than --seq {opt.seq}")
    return opt


def family_fields(family: str, window: int, n_layers: int, head_dim: int) -> dict:
    """What a family sets beyond the model's shape, as ModelArgs fields (its config.json, written by to_hf_config)."""
    gemma_layers = ["full_attention" if (i + 1) % 6 == 0 or i == n_layers - 1 else "sliding_attention"
                    for i in range(n_layers)]   # Gemma-3's five sliding layers to one full, and a full last one
    return {
        "llama": {},
        "qwen2": dict(family="qwen2", qkv_bias=True, rope_theta=1e6),
        "mistral": dict(family="mistral", sliding_window=window),
        "gemma3": dict(family="gemma3_text", sliding_window=window, layer_types=gemma_layers, rope_theta=1e6,
                       rope_local_theta=1e4, activation="gelu_tanh", norm_offset=True, embed_scale=True,
                       sandwich_norms=True, qk_norm=True, query_pre_attn_scalar=head_dim, tie_embeddings=True,
                       norm_eps=1e-6),
    }[family]


def build(opt, family="llama", window=None):
    """The same random weights in transformers' sdpa model of `family` and in minseekr (loaded from the former's
    save_pretrained directory), and a batch."""
    torch.manual_seed(0)
    args = ModelArgs(dim=opt.dim, n_layers=opt.n_layers, n_heads=opt.n_heads, n_kv_heads=opt.n_kv_heads,
                     hidden_dim=opt.hidden_dim, vocab_size=opt.vocab_size, max_seq_len=max(opt.seq, 4096),
                     **family_fields(family, window, opt.n_layers, opt.dim // opt.n_heads))
    dtype = getattr(torch, opt.dtype)
    config = args.to_hf_config()
    config = AutoConfig.for_model(config.pop("model_type"), **config, attn_implementation="sdpa")
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():
        for p in hf.parameters():   # HF's init leaves norms at 1 (Gemma's at 0) and biases at 0
            p.add_(0.02 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as folder:
        logging.disable_progress_bar()   # save_pretrained's bar for a temporary directory
        hf.save_pretrained(folder)
        ours = load_hf(folder, dtype=dtype, device=opt.device)
    hf.to(device=opt.device, dtype=dtype)
    tokens = torch.randint(0, args.vocab_size, (opt.batch, opt.seq), device=opt.device)
    return {"ours": ours.train(), "hf": hf.train()}, tokens


class SDPACalls(TorchFunctionMode):
    """Every scaled_dot_product_attention call made under it, in call order: its attn_mask (None: the causal path)
    and the kernel that torch picks for it (`_fused_sdp_choice`: on a GPU, "math" materialises the scores of
    every head)."""

    def __init__(self):
        super().__init__()
        self.masks, self.kernels = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:   # _fused_sdp_choice takes SDPA's arguments
            self.masks.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
            self.kernels.append(SDPBackend(torch._fused_sdp_choice(*args, **kwargs)).name.lower())
        return func(*args, **kwargs)

    def said(self) -> str:
        """In words: how many calls were masked, the distinct masks (by storage), their shapes, the kernels."""
        given = [m for m in self.masks if m is not None]
        kinds = sorted({f" {tuple(m.shape)} {str(m.dtype).removeprefix('torch.')}" for m in given})
        kernels = ", ".join(f"{k} ×{self.kernels.count(k)}" for k in sorted(set(self.kernels)))
        return (f"{len(given)} of {len(self.masks)} calls masked, {len({m.data_ptr() for m in given})} distinct "
                f"mask(s){','.join(kinds)}, kernels {kernels}")


def check(models, tokens, opt) -> str:
    """Refuses two models whose logits differ; checks that minseekr's sliding layers share one (B, 1, S, S) bool
    mask per window; returns the masks each library handed SDPA, in words."""
    recorded = {}
    with torch.no_grad():
        for name, model in models.items():
            with SDPACalls() as calls:
                out = model(tokens)
            recorded[name] = (out if name == "ours" else out.logits, calls)
    (ours, calls), (ref, hf_calls) = recorded["ours"], recorded["hf"]
    masks = calls.masks
    error, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    tol = 1e-4 if opt.dtype == "float32" else 5e-2
    assert error <= tol * max(1.0, scale), f"logits differ by {error:.3g} (largest {scale:.3g}): not the same model"
    windows = models["ours"].args.windows
    assert len(masks) == len(windows), f"{len(masks)} SDPA calls for {len(windows)} layers"
    B, S = tokens.shape
    for window in set(windows):
        shared = [m for m, w in zip(masks, windows) if w == window]
        if window is None:
            assert all(m is None for m in shared), "a full layer was handed a mask: SDPA's causal path expected"
            continue
        shapes = [None if m is None else (tuple(m.shape), m.dtype) for m in shared]
        assert all(s == ((B, 1, S, S), torch.bool) for s in shapes), \
            f"window {window}: SDPA was handed masks {shapes}, expected one ({B}, 1, {S}, {S}) bool for every head"
        assert len({m.data_ptr() for m in shared}) == 1, f"window {window}: the layers build masks of their own"
    return f"minseekr {calls.said()}; transformers {hf_calls.said()}"


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
    models, tokens = build(opt, opt.family, opt.window)
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
    models, tokens = build(opt, opt.family, opt.window)
    masks = check(models, tokens, opt)
    windows = models["ours"].args.windows
    sliding = f", {opt.n_layers - windows.count(None)} sliding (window {opt.window})" if any(windows) else ""
    family = (f"{opt.family}: transformers' {type(models['hf']).__name__} (sdpa), {windows.count(None)} full layers"
              f"{sliding}; SDPA: {masks}")
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
    if opt.family != "llama":   # llama's output is what it always was
        print(family)
    print(f"{n_params / 1e6:.1f}M parameters, batch {opt.batch} x {opt.seq}, {opt.dtype} on {opt.device} ({opt.threads} CPU threads), "
          f"median of {opt.iters} fwd+bwd steps (losses {losses['ours']:.4f} / {losses['hf']:.4f})")
    rate = {name: tokens_per_step / statistics.median(ts) for name, ts in times.items()}
    for name, label in (("ours", "minseekr"), ("hf", "transformers")):
        print(f"  {label:13s} {rate[name]:10.0f} tokens/s   peak step memory {memory[name] / 2**20:8.1f} MiB")
    print(f"  ratio minseekr/transformers: speed {rate['ours'] / rate['hf']:.3f}x, "
          f"memory {memory['ours'] / memory['hf']:.3f}x")


if __name__ == "__main__":
    main()
