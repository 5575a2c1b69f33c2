"""Per-rank GPU memory of SEEKR training on LLaMA-2-7B / 13B under minseekr's ZeRO-3 engine, term by term.

    python tools/memory_model.py                                   # 7B and 13B, 8 × 80 GB, Appendix B's setting
    python tools/memory_model.py --model 13b --micro-batch 4 --checkpointing on
    python tools/memory_model.py --gpus 16                         # two nodes: prints the multi-node command

A model, not a measurement. Each row is a formula over `ModelArgs` shapes (parameter counts come from the model
built on the meta device), the engine's memory formula (minseekr/engines/fsdp.py's docstring) and what each op saves for
backward. The per-block activation bytes are checked against autograd: tests/test_memory_model.py counts the
tensors a bf16 `Block` saves on the CPU. Notation: P parameters, N ranks, U the largest block unit, R the root
unit (embeddings, final norm, lm_head), c = 2 bytes (bf16 compute), B sequences per rank per micro-step, S the
sequence length, d = dim, F = hidden_dim, V = vocab, L layers, H query heads and H_kv key/value heads of D dims,
B_H / B_T the head and query budgets, a the labelled (answer) tokens of a replayed sample, ch = the fused KL's
head chunk (a layer's selected heads, as many as fit kl.CHUNK_ELEMENTS per block).

Two peaks are reported, each the sum of the rows of its phase:
- train: a SEEKR replay micro-step, the heaviest one (a new-task step has no teacher logits or attention rows);
- score: the sensitivity pass after each task (Eq. 7), which holds ∂L/∂O of every layer and computes no
  parameter gradients.
Summing is pessimistic: the loss's fp32 logits are freed before a block's backward working set and its unit
gradient exist. The CUDA context, NCCL's buffers and allocator fragmentation are a flat allowance
(`--reserve-gb`), not derived.
"""
import argparse
import functools
from dataclasses import astuple, dataclass
from typing import NamedTuple

import torch

from minseekr.network.model import ModelArgs, Transformer
from minseekr.seekr.kl import CHUNK_ELEMENTS

BF16, FP32 = 2, 4
GiB = 2**30

# LLaMA-2's config.json shapes (Vicuna v1.5 has the same); the remaining fields keep ModelArgs' defaults.
LLAMA2 = {
    "7b": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=32000),
    "13b": dict(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, vocab_size=32000),
}


@dataclass
class Setting:
    gpus: int = 8                # N, ranks in the job
    micro_batch: int = 2         # B, sequences per rank per micro-step
    seq: int = 1536              # S, padded length of a micro-batch (Appendix B's max length)
    checkpointing: bool = True   # per-block activation checkpointing
    answer_tokens: int = 512     # a, labelled tokens per replayed sample (rows of the logit KL)
    head_budget: int = 128       # B_H
    query_budget: int = 100      # B_T
    reserve_gb: float = 4.0      # CUDA context, NCCL, fragmentation (GiB)


class Term(NamedTuple):
    name: str
    phase: str      # "all", "train" or "score"
    formula: str
    bytes: int


def unit_sizes(args: ModelArgs) -> list[int]:
    """Parameter counts of the FSDP units, [root, block 0, block 1, ...], read off the model on the meta device."""
    return list(_unit_sizes(astuple(args)))


@functools.cache  # keyed by the fields (ModelArgs is unhashable); a table asks for the same model many times
def _unit_sizes(fields: tuple) -> tuple[int, ...]:
    with torch.device("meta"):
        model = Transformer(ModelArgs(*fields))
    root = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.layers."))
    return (root, *(sum(p.numel() for p in block.parameters()) for block in model.model.layers))


def block_activations(args: ModelArgs, B: int, S: int, padding_mask: bool = True) -> int:
    """Bytes one bf16 Block saves for backward under SDPA's flash / memory-efficient kernels, tensor by tensor."""
    tokens, d, F, c = B * S, args.dim, args.hidden_dim, BF16
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    # Each RMSNorm: its fp32 input (pow and mul keep it), the fp32 rsqrt (B, S, 1), the bf16 normalised x
    # (the weight's mul keeps it) and the bf16 output (the next linears keep it). The bf16 residual itself
    # is saved by nobody: the norm's .float() keeps no input and the residual adds keep nothing.
    norms = 2 * tokens * (FP32 * d + FP32 + 2 * c * d)
    # RoPE keeps nothing (cos and sin need no grad). SDPA keeps q, k, v after RoPE, its output O = A·V (also
    # o_proj's input) and an fp32 log-sum-exp per row; never an S × S map.
    attention = tokens * c * (2 * q + 2 * kv) + FP32 * B * args.n_heads * S
    # A padding mask reaches SDPA as a bool (B, 1, S, S); it becomes a bias in the compute dtype, saved per layer.
    mask = c * B * S * S if padding_mask else 0
    # SwiGLU: gate output (silu's input), silu output, up output, their product (down_proj's input).
    mlp = 4 * tokens * c * F
    return norms + attention + mask + mlp


def memory_terms(args: ModelArgs, s: Setting) -> list[Term]:
    """Every row of the per-rank memory table, in bytes."""
    units = unit_sizes(args)
    N, B, S, c, L = s.gpus, s.micro_batch, s.seq, BF16, args.n_layers
    d, F, V, D, H, Hkv = args.dim, args.hidden_dim, args.vocab_size, args.head_dim, args.n_heads, args.n_kv_heads
    R, U = units[0], max(units[1:])
    shard = sum(-(-n // N) for n in units)           # elements per rank: each unit is padded to a multiple of N
    BH, BT, a = s.head_budget, s.query_budget, s.answer_tokens
    ch = min(H, BH, max(1, CHUNK_ELEMENTS // (B * BT * S)))   # worst case: every head of a layer selected
    if s.checkpointing:  # every block keeps its input; backward recomputes one block's saved tensors at a time
        blocks = Term("block activations: inputs + one recomputed block", "all", "L·c·B·S·d + 1 block",
                      L * c * B * S * d + block_activations(args, B, S))
    else:
        blocks = Term("block activations: every block's saved tensors", "all", "L × 1 block",
                      L * block_activations(args, B, S))
    rows = min(S, max(1, CHUNK_ELEMENTS // (B * H * S)))  # query rows of ∂L/∂A per chunk (heads.py)
    return [
        Term("parameters, fp32 shard", "all", "4·P/N", FP32 * shard),
        Term("gradients, fp32 shard", "all", "4·P/N", FP32 * shard),
        Term("AdamW moments, fp32 shards", "all", "8·P/N", 2 * FP32 * shard),
        Term("gathered bf16: running + prefetched block, root", "all", "c·(2U + R + U/N)",
             c * (2 * U + R + -(-U // N))),
        Term("block's flat gradient in backward, bf16", "train", "c·U", c * U),
        Term("reduce-scatters in flight: fp32 in + out, 2 units", "train", "2·4·U·(1 + 1/N)",
             2 * FP32 * (U + -(-U // N))),
        # The root's flat gradient forms only when the embedding's arrives, at the end of backward; until then
        # autograd holds lm_head's weight gradient, computed first.
        Term("lm_head gradient, held until the root's is done", "train", "c·V·d", c * V * d),
        blocks,
        Term("one block's backward working set (estimate)", "all", "c·B·S·(3F + d) + 8·B·S·d",
             c * B * S * (3 * F + d) + 2 * FP32 * B * S * d),
        Term("outside blocks: RoPE, bool mask, final norm, ids", "all", "B·S·(2cD + S + (4+2c)d + 12)",
             B * S * (2 * c * D + S + (FP32 + 2 * c) * d + FP32 + 8)),
        # token_losses upcasts every position's logits; cross-entropy saves its fp32 log-softmax for backward,
        # whose fp32 gradient then takes the copy's place.
        Term("logits, bf16", "all", "c·B·S·V", c * B * S * V),
        Term("loss: fp32 logits + saved log-softmax", "all", "8·B·S·V", 2 * FP32 * B * S * V),
        # The collated batch tensor, and the per-layer head selections (copies) that the fused KL saves.
        Term("SEEKR: teacher attention rows, batch + per-layer", "train", "2c·B·B_H·B_T·S",
             2 * c * B * BH * BT * S),
        Term("SEEKR: fused KL saves q rows, lse, mass", "train", "B·B_H·B_T·(c·D + 8)", B * BH * BT * (c * D + 8)),
        Term("SEEKR: fused KL chunk blocks + dK, fp32", "train", "24·B·ch·B_T·S + 4·B·S·D·(H_kv+ch)",
             6 * FP32 * B * ch * BT * S + FP32 * B * S * D * (Hkv + ch)),
        # Eq. 3 on the answer rows: teacher (bf16), the student's gathered rows (bf16) and their fp32 copy, and
        # both fp32 log-softmaxes.
        Term("SEEKR/DER++: teacher logits + logit-KL buffers", "train", "(2c + 12)·B·a·V",
             (2 * c + 12) * B * a * V),
        # task_sensitivity's one autograd.grad returns every layer's ∂L/∂O at once, then builds ∂L/∂A = ∂L/∂O·Vᵀ in
        # chunks of rows (product, square, masked square) in fp32. Its probe keeps every layer's O and V too:
        # extra memory only with checkpointing, since SDPA saves both otherwise.
        Term("sensitivity: ∂L/∂O of every layer, bf16", "score", "L·c·B·S·H·D", L * c * B * S * H * D),
        Term("sensitivity: O, V kept by the probe (ckpt only)", "score", "L·c·B·S·(H + H_kv)·D",
             L * c * B * S * (H + Hkv) * D if s.checkpointing else 0),
        Term("sensitivity: ∂L/∂A chunk ×3 (fp32) + valid mask", "score", "12·B·H·rows·S + B·S²",
             3 * FP32 * B * H * rows * S + B * S * S),
        Term("sensitivity: one layer's ∂L/∂O and V in fp32", "score", "4·B·S·(H + H_kv)·D",
             FP32 * B * S * (H + Hkv) * D),
        Term("runtime allowance: CUDA context, NCCL, slack", "all", "--reserve-gb", int(s.reserve_gb * GiB)),
    ]


def peak(terms: list[Term], phase: str) -> int:
    """Bytes of a phase ("train" or "score"): its own rows plus the rows common to both."""
    return sum(t.bytes for t in terms if t.phase in ("all", phase))


def accumulation(global_batch: int, gpus: int) -> list[tuple[int, int]]:
    """(sequences per rank per micro-step, micro-steps per optimiser step) that make exactly `global_batch`."""
    return [(m, global_batch // (m * gpus)) for m in range(1, global_batch // gpus + 1)
            if global_batch % (m * gpus) == 0]


def torchrun_command(s: Setting, grad_accum: int, gpus_per_node: int, name: str) -> str:
    """The launch line for train.py; `--batch-size` is the global micro-batch, summed over ranks."""
    nodes = s.gpus // gpus_per_node
    if nodes > 1:  # run the same line on every node; c10d rendezvous assigns the ranks
        launch = (f"torchrun --nnodes {nodes} --nproc-per-node {gpus_per_node} --rdzv-backend c10d "
                  f"--rdzv-endpoint $HOST:29500 --rdzv-id {name}")
    else:
        launch = f"torchrun --standalone --nproc-per-node {s.gpus}"
    return (f"{launch} train.py --model $MODEL --tokenizer $MODEL/tokenizer.model --data $DATA --order order1 "
            f"--method seekr --batch-size {s.micro_batch * s.gpus} --grad-accum {grad_accum} --max-len {s.seq} "
            f"--lr 1e-5 --dtype bfloat16 --activation-checkpointing {str(s.checkpointing).lower()} "
            f"--checkpoint-every 50 --fsdp minseekr --out runs/{name}")


def print_table(name: str, args: ModelArgs, settings: list[Setting], gpu_gb: float):
    units = unit_sizes(args)
    print(f"\nLLaMA-2-{name.upper()}: P = {sum(units):,} parameters (block unit U = {max(units[1:]):,}, "
          f"root R = {units[0]:,}); N = {settings[0].gpus}, B = {settings[0].micro_batch}, S = {settings[0].seq}")
    tables = [memory_terms(args, s) for s in settings]
    heads = [f"ckpt {'on' if s.checkpointing else 'off'}" for s in settings]
    print(f"{'term':<50} {'formula':<34} {'phase':<6}" + "".join(f"{h:>10}" for h in heads) + "  (GiB)")
    for row in zip(*tables):
        t = row[0]
        print(f"{t.name:<50} {t.formula:<34} {t.phase:<6}" + "".join(f"{r.bytes / GiB:>10.2f}" for r in row))
    for phase, label in (("train", "peak, SEEKR replay micro-step"), ("score", "peak, sensitivity pass")):
        totals = [peak(terms, phase) / GiB for terms in tables]
        print(f"{label:<92}" + "".join(f"{x:>10.2f}" for x in totals))
        fits = f"  fits in {gpu_gb:g} GiB"
        print(f"{fits:<92}" + "".join(f"{'yes' if x <= gpu_gb else 'NO':>10}" for x in totals))


def print_accumulation(names: list[str], base: Setting, checkpointing: list[bool], global_batch: int, gpu_gb: float):
    print(f"\nGlobal batch {global_batch} on {base.gpus} GPUs: peak per rank, max(train, score), in GiB")
    cols = [(n, ck) for n in names for ck in checkpointing]
    print(f"{'per rank':>8} {'--batch-size':>12} {'--grad-accum':>12}" +
          "".join(f"{n + (' ckpt on' if ck else ' ckpt off'):>16}" for n, ck in cols))
    for m, accum in accumulation(global_batch, base.gpus):
        cells = []
        for n, ck in cols:
            s = Setting(**{**vars(base), "micro_batch": m, "checkpointing": ck})
            terms = memory_terms(ModelArgs(**LLAMA2[n]), s)
            gib = max(peak(terms, "train"), peak(terms, "score")) / GiB
            cells.append(f"{gib:>10.1f} {'ok' if gib <= gpu_gb else 'OOM':>5}")
        print(f"{m:>8} {m * base.gpus:>12} {accum:>12}" + "".join(cells))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["7b", "13b", "all"], default="all")
    p.add_argument("--gpus", type=int, default=8, help="N, ranks in the whole job")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-gb", type=float, default=80.0, help="device memory in GiB (an '80 GB' A100/H100 has ~80 GiB)")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per rank per micro-step")
    p.add_argument("--global-batch", type=int, default=128, help="sequences per optimiser step (Appendix B: 128)")
    p.add_argument("--seq", type=int, default=1536, help="padded sequence length")
    p.add_argument("--checkpointing", choices=["on", "off", "both"], default="both")
    p.add_argument("--answer-tokens", type=int, default=512, help="labelled tokens per replayed sample")
    p.add_argument("--head-budget", type=int, default=128, help="B_H")
    p.add_argument("--query-budget", type=int, default=100, help="B_T")
    p.add_argument("--reserve-gb", type=float, default=4.0, help="flat allowance for context, NCCL, fragmentation")
    a = p.parse_args(argv)
    for flag in ("gpus", "gpus_per_node", "micro_batch", "global_batch", "seq", "head_budget", "query_budget"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if a.global_batch % (a.micro_batch * a.gpus):
        p.error(f"--global-batch {a.global_batch} is not a multiple of --micro-batch {a.micro_batch} × "
                f"--gpus {a.gpus}")
    if a.gpus > a.gpus_per_node and a.gpus % a.gpus_per_node:
        p.error(f"--gpus {a.gpus} is not a whole number of nodes of --gpus-per-node {a.gpus_per_node}")
    checkpointing = {"on": [True], "off": [False], "both": [True, False]}[a.checkpointing]
    names = list(LLAMA2) if a.model == "all" else [a.model]
    base = Setting(gpus=a.gpus, micro_batch=a.micro_batch, seq=a.seq, answer_tokens=a.answer_tokens,
                   head_budget=a.head_budget, query_budget=a.query_budget, reserve_gb=a.reserve_gb)
    print("Modelled, not measured: per-rank bytes of minseekr's ZeRO-3 engine, bf16 compute, fp32 master/grads/AdamW")
    for name in names:
        settings = [Setting(**{**vars(base), "checkpointing": ck}) for ck in checkpointing]
        print_table(name, ModelArgs(**LLAMA2[name]), settings, a.gpu_gb)
    print_accumulation(names, base, checkpointing, a.global_batch, a.gpu_gb)
    grad_accum = a.global_batch // (a.micro_batch * a.gpus)
    run = Setting(**{**vars(base), "checkpointing": checkpointing[0]})
    print(f"\nLaunch ({a.micro_batch} sequences per rank × {a.gpus} ranks × {grad_accum} micro-steps = "
          f"{a.global_batch} per step); $MODEL is an HF LLaMA-2 directory, $DATA the TRACE data:")
    print(torchrun_command(run, grad_accum, a.gpus_per_node, f"seekr-{names[0]}-order1"))


if __name__ == "__main__":
    main()
