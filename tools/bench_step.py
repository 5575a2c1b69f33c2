"""One training step of CE, DER++ and SEEKR in minseekr, against transformers (sdpa) and the official route.

On the same weights and the same padded batch (one sample right-padded by S/8, as the trainer pads, the last
`--answer` real tokens of each labelled), in one process, forward + loss + backward, timed interleaved after
warmup (medians):

    CE            minseekr, cross-entropy on the answer tokens, the batch's padding mask
    CE unpadded   the same tokens with no mask: what the padding costs (a right-padded batch runs SDPA's causal
                  path too, model.py)
    DER++         CE + KL to stored teacher logits on the answer tokens (Eq. 3)
    SEEKR         DER++ + the fused attention KL of the selected heads at B_T sampled rows (Eq. 12)
    HF sdpa CE    transformers' LlamaForCausalLM (sdpa) on the same batch and loss
    official      the authors' route: transformers eager with output_attentions, DER++'s terms, and the KL on the
                  selected heads' full maps at the rows, log(A + 1e-8)

Peak memory of a step above the weights: torch.cuda.max_memory_allocated on CUDA; on the CPU the growth of the
peak RSS over the first step of a fresh process per route. TFLOP/s counts 6·N·tokens for the matmul parameters N
(no attention term). Whatever the device, each route's dispatched operations (about a kernel launch each on a
GPU) and reads back to the host (a synchronisation each on a GPU) are counted (`dispatched.py`). The
configuration of #14 on one GPU:

    python tools/bench_step.py --device cuda --dtype bfloat16 --dim 4096 --n_layers 8 --n_heads 32 \\
        --n_kv_heads 32 --hidden_dim 11008 --vocab_size 32000 --seqs 1024,2048,4096 --answer 256
    python tools/bench_step.py                       # CPU, fp32, a 5M-parameter model, S = 256 and 512
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from bench_model import add_model_flags, build, cpu_memory, cuda_memory, peak_rss, sync
from dispatched import Dispatched
from minseekr.network.model import token_losses
from minseekr.seekr.distill import logit_kl
from minseekr.seekr.heads import sample_query_rows
from minseekr.seekr.kl import AttentionKL

ROUTES = ("CE", "CE unpadded", "DER++", "SEEKR", "HF sdpa CE", "official")
RATIOS = {"SEEKR / DER++": ("SEEKR", "DER++"), "CE padded / unpadded": ("CE", "CE unpadded"),
          "minseekr / HF sdpa CE": ("CE", "HF sdpa CE"), "official / SEEKR": ("official", "SEEKR")}


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_flags(p, n_kv_heads=8)
    p.add_argument("--seqs", default="256,512", help="comma-separated sequence lengths S")
    p.add_argument("--answer", type=int, default=32, help="labelled tokens at the end of each sample")
    p.add_argument("--heads", type=int, default=8, help="selected heads (B_H), spread over --layers layers")
    p.add_argument("--layers", type=int, default=2, help="layers holding the selected heads (B_L)")
    p.add_argument("--rows", type=int, default=100, help="sampled query rows per sample (B_T)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory_child", help=argparse.SUPPRESS)   # internal: "route|S", one CPU memory run
    return p.parse_args()


def setup(opt, S):
    """Models (minseekr, HF sdpa, HF eager: one set of weights) and the step's inputs at length S."""
    opt.seq = S
    models, tokens = build(opt)
    ours, hf = models["ours"], models["hf"]
    eager = LlamaForCausalLM(LlamaConfig(**{**hf.config.to_dict(), "attn_implementation": "eager"}))
    eager.load_state_dict(hf.state_dict())
    eager.to(device=opt.device, dtype=getattr(torch, opt.dtype)).train()
    B, dev = opt.batch, opt.device
    mask = torch.ones(B, S, dtype=torch.long, device=dev)
    mask[1, S - S // 8:] = 0                                       # sample 1 right-padded by S/8, as the trainer's
    real = mask.sum(1, keepdim=True)
    at = torch.arange(S, device=dev)
    labels = tokens.masked_fill((at < real - opt.answer) | (at >= real), -100)   # each sample's last real tokens
    n_answer = int((labels[:, 1:] != -100).sum())
    gen = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(n_answer, opt.vocab_size, generator=gen).to(dev)
    per_layer = opt.heads // opt.layers
    pairs = [(layer, h) for layer in range(opt.layers) for h in range(per_layer)]
    rows = sample_query_rows(mask.cpu(), opt.rows, gen).to(dev)                       # (B, T), −1 padding
    keys = torch.arange(S, device=dev)
    allowed = (keys <= rows.clamp(min=0)[..., None]) & mask.bool()[:, None]         # (B, T, S)
    scores = torch.randn(B, len(pairs), rows.shape[1], S, generator=gen).to(dev)
    teacher_rows = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    batch = dict(tokens=tokens, mask=mask, labels=labels, positions=(mask.cumsum(-1) - 1).clamp(min=0),
                 teacher_logits=teacher_logits, pairs=pairs, rows=rows, teacher_rows=teacher_rows, n_answer=n_answer,
                 n_rows=int((rows >= 0).sum()))   # counted on the host, as the trainer's collate counts them
    return {"ours": ours, "hf": hf, "eager": eager}, batch


def ce(logits, b):
    return token_losses(logits, b["labels"]).sum() / b["n_answer"]


def der(logits, b):
    predicting = b["labels"][:, 1:] != -100
    kl = logit_kl(logits[:, :-1][predicting], {"teacher_logits": b["teacher_logits"]}).sum() / b["n_answer"]
    return 0.5 * ce(logits, b) + 0.5 * kl


def official_attention_kl(attentions, b):
    """The selected heads' full maps at the rows, KL(teacher ‖ A) with log(A + 1e-8), batchmean per layer."""
    total, rows = 0.0, b["rows"].clamp(min=0)
    B = rows.shape[0]
    for layer in sorted({layer for layer, _ in b["pairs"]}):
        slots = [i for i, (l, _) in enumerate(b["pairs"]) if l == layer]
        heads = [b["pairs"][i][1] for i in slots]
        maps = attentions[layer][:, heads]                                          # (B, h, S, S)
        student = maps[torch.arange(B)[:, None, None], torch.arange(len(heads))[None, :, None], rows[:, None]]
        teacher = b["teacher_rows"][:, slots]
        S = student.shape[-1]
        total = total + F.kl_div(torch.log(student + 1e-8).reshape(-1, S), teacher.reshape(-1, S),
                                 reduction="batchmean")
    return total


def step(route, models, b):
    """One forward + loss + backward of `route`; gradients dropped after; the loss."""
    if route in ("CE", "DER++", "SEEKR", "CE unpadded"):
        mask = None if route == "CE unpadded" else b["mask"]
        probe = AttentionKL(b["pairs"], b["rows"], b["teacher_rows"], b["mask"]) if route == "SEEKR" else None
        logits = models["ours"](b["tokens"], mask, probe=probe)
        loss = ce(logits, b) if route in ("CE", "CE unpadded") else der(logits, b)
        if probe is not None:
            loss = loss + 10.0 * probe.total() / (len(b["pairs"]) * b["n_rows"])
        model = models["ours"]
    elif route == "HF sdpa CE":
        model = models["hf"]
        loss = ce(model(b["tokens"], attention_mask=b["mask"], position_ids=b["positions"]).logits, b)
    else:
        model = models["eager"]
        out = model(b["tokens"], attention_mask=b["mask"], position_ids=b["positions"], output_attentions=True)
        loss = der(out.logits, b) + 10.0 * official_attention_kl(out.attentions, b)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


def cpu_memory_child(opt):
    route, S = opt.memory_child.split("|")
    models, b = setup(opt, int(S))
    base = peak_rss()                            # the first step of a fresh process, kernels' state included
    step(route, models, b)
    print(json.dumps({"peak": peak_rss() - base}))


def measure(opt, S):
    models, b = setup(opt, S)
    ce_ours, ce_hf = step("CE", models, b), step("HF sdpa CE", models, b)
    assert abs(ce_ours - ce_hf) < 1e-2 * max(1.0, abs(ce_hf)), f"minseekr and HF disagree: {ce_ours}, {ce_hf}"
    for _ in range(opt.warmup):
        for route in ROUTES:
            step(route, models, b)
    times = {route: [] for route in ROUTES}
    for _ in range(opt.iters):
        for route in ROUTES:
            sync(opt.device)
            t = time.perf_counter()
            step(route, models, b)
            sync(opt.device)
            times[route].append(time.perf_counter() - t)
    dispatched = {}
    for route in ROUTES:
        with Dispatched() as counted:
            step(route, models, b)
        dispatched[route] = counted
    n_matmul = sum(p.numel() for name, p in models["ours"].named_parameters() if "norm" not in name
                   and "embed_tokens" not in name)
    if opt.device.startswith("cuda"):
        memory = {route: cuda_memory(lambda: step(route, models, b)) for route in ROUTES}
    else:
        del models
        memory = {route: cpu_memory(__file__, f"{route}|{S}") for route in ROUTES}
    return {route: statistics.median(ts) for route, ts in times.items()}, memory, n_matmul, dispatched


def main():
    opt = parse()
    torch.set_num_threads(opt.threads)
    if opt.memory_child:
        return cpu_memory_child(opt)
    print(f"batch {opt.batch}, {opt.dtype} on {opt.device} ({opt.threads} CPU threads), sample 1 right-padded by "
          f"S/8, {opt.answer} answer tokens, {opt.heads} heads in {opt.layers} layers, B_T = {opt.rows}; "
          f"median of {opt.iters} steps, peak step memory above the weights")
    results = {}
    for S in (int(s) for s in opt.seqs.split(",")):
        seconds, memory, n_matmul, dispatched = measure(opt, S)
        tflops = 6 * n_matmul * opt.batch * S / seconds["CE"] / 1e12
        print(f"S = {S} ({n_matmul / 1e6:.1f}M matmul parameters; CE step {tflops:.3f} TFLOP/s)")
        for route in ROUTES:
            print(f"  {route:12s} {seconds[route] * 1e3:9.1f} ms   {memory[route] / 2**20:9.1f} MiB   "
                  f"{dispatched[route].ops:5d} ops {dispatched[route].syncs:3d} syncs")
        ratio = {name: (seconds[a] / seconds[b], memory[a] / memory[b]) for name, (a, b) in RATIOS.items()}
        print("  " + "; ".join(f"{name} {t:.3f}x time, {m:.3f}x memory" for name, (t, m) in ratio.items()))
        results[S] = {"seconds": seconds, "memory": memory, "tflops_ce": tflops,
                      "ops": {route: d.ops for route, d in dispatched.items()},
                      "syncs": {route: d.syncs for route, d in dispatched.items()}}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
