"""Score every head along a chain of checkpoints and draw the paper's Fig. 4 and Fig. 5.

    python tools/head_maps.py --checkpoints base/ after_fomc/ --tasks data/FOMC --out runs/head_maps

`--checkpoints` are HF directories M_0, M_1, ..., M_K and `--tasks` the K TRACE task folders
(`<task>/train.json`, a list of {"prompt", "answer"}) trained between them. For task k the first
`--samples` records (the replay buffer R_k, as the official code takes it) give S^k from M_k and F^k
from M_{k-1} → M_k; at most two models are loaded at once. Written to --out:
- importance.png: the importance I = S·F of every head, layers × heads (Fig. 5);
- variation.png: the histogram of every head's cumulative attention variation F (Fig. 4);
- head_scores.safetensors: the per-task S^k and F^k (`minseekr.seekr.heads.HeadScores`).
The heads selected with --layer-budget/--head-budget are printed: by default the paper's proportions of LLaMA-2-7B's
32 layers × 32 heads (B_L = 24 of 32 layers, B_H = 128 of 1024 heads) for the model at hand; budgets that select
every head are refused (the map would mark them all). `head_maps()` does the same for models and batches already in
memory.
"""
import argparse
import json
from pathlib import Path

import torch

from minseekr.network.checkpoint import load_hf
from minseekr.network.tokenizer import Tokenizer
from minseekr.runtime import InputError
from minseekr.seekr.figures import draw
from minseekr.seekr.heads import HeadScores, forgettability, sample_query_rows, task_sensitivity


def task_batches(task_dir, tokenizer, n_samples, max_len, batch_size):
    """The first n_samples records of <task_dir>/train.json as left-padded batches (BOS prompt answer EOS)."""
    records = json.loads((Path(task_dir) / "train.json").read_text())[:n_samples]
    if not records:
        raise ValueError(f"{task_dir}/train.json has no records")
    encoded = [tokenizer.encode_example(r["prompt"], r["answer"], max_len) for r in records]
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        S = max(len(ids) for ids, _ in chunk)
        batch = {"input_ids": torch.full((len(chunk), S), tokenizer.pad_id),
                 "labels": torch.full((len(chunk), S), -100),
                 "attention_mask": torch.zeros(len(chunk), S, dtype=torch.long)}
        for b, (ids, labels) in enumerate(chunk):
            batch["input_ids"][b, S - len(ids):] = torch.tensor(ids)
            batch["labels"][b, S - len(ids):] = torch.tensor(labels)
            batch["attention_mask"][b, S - len(ids):] = 1
        batches.append(batch)
    return batches


def score_task(scores, name, before, after, batches, query_budget, seed=0):
    """Add task `name`'s S^k (on M_k = after) and F^k (before → after, at B_T sampled rows) to `scores`."""
    generator = torch.Generator().manual_seed(seed)
    rows = None
    if query_budget:
        rows = [sample_query_rows(b["attention_mask"], query_budget, generator) for b in batches]
    scores.add_task(name, task_sensitivity(after, batches), forgettability(after, before, batches, rows=rows))


def paper_budgets(n_layers, n_heads) -> tuple[int, int]:
    """(B_L, B_H) in the paper's proportions of LLaMA-2-7B: 24 of its 32 layers, 128 of its 32 × 32 heads."""
    return max(1, int(24 / 32 * n_layers)), max(1, round(128 / 1024 * n_layers * n_heads))


def budgets(n_layers, n_heads, layer_budget=None, head_budget=None) -> tuple[int, int]:
    """(B_L, B_H) for a model of n_layers × n_heads: those given, else the paper's proportions; refused when out of
    range or when they select every head (the map would mark them all)."""
    default_layers, default_heads = paper_budgets(n_layers, n_heads)
    layer_budget = default_layers if layer_budget is None else layer_budget
    head_budget = default_heads if head_budget is None else head_budget
    if not 1 <= layer_budget <= n_layers:
        raise InputError(f"--layer-budget {layer_budget}: expected 1 to the model's {n_layers} layers")
    if not 1 <= head_budget <= layer_budget * n_heads:
        raise InputError(f"--head-budget {head_budget}: expected 1 to the {layer_budget * n_heads} heads of "
                         f"--layer-budget {layer_budget} layers × {n_heads} heads")
    if head_budget == n_layers * n_heads:
        raise InputError(f"--layer-budget {layer_budget} and --head-budget {head_budget} select every head of the "
                         f"model's {n_layers} layers × {n_heads} heads: give fewer, or leave them out for the "
                         f"paper's proportions ({default_layers} layers, {default_heads} heads)")
    return layer_budget, head_budget


def head_maps(models, task_batches_list, out_dir, *, names=None, query_budget=100, layer_budget=None,
              head_budget=None, seed=0):
    """Score the chain `models` (K+1 Transformers or a lazy sequence of them) on K tasks; draw, save, select
    (B_L and B_H as `budgets` resolves them for the first model, before any scoring)."""
    scores, before = None, None
    names = names or [f"task{k + 1}" for k in range(len(task_batches_list))]
    for k, after in enumerate(models):
        if before is None:
            layer_budget, head_budget = budgets(after.args.n_layers, after.args.n_heads, layer_budget, head_budget)
        else:
            if scores is None:
                scores = HeadScores(after.args.n_layers, after.args.n_heads)
            score_task(scores, names[k - 1], before, after, task_batches_list[k - 1], query_budget, seed + k)
        before = after
    if scores is None:
        raise ValueError("head_maps needs at least two models (M_0 and M_1)")
    selected = scores.select(layer_budget, head_budget)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    draw(scores, out_dir, selected)
    scores.save(Path(out_dir) / "head_scores.safetensors")
    return scores, selected


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoints", nargs="+", required=True, help="HF dirs M_0 ... M_K")
    p.add_argument("--tasks", nargs="+", required=True, help="K TRACE task folders, the k-th trained M_{k-1} → M_k")
    p.add_argument("--tokenizer", help="SentencePiece model (default: tokenizer.model in the first checkpoint)")
    p.add_argument("--out", default="runs/head_maps", help="where the figures and scores go (default: %(default)s)")
    p.add_argument("--samples", type=int, default=50,
                   help="records per task (the replay buffer R_k) (default: %(default)s)")
    p.add_argument("--query-budget", type=int, default=100,
                   help="B_T rows for forgettability; 0 = every row (default: %(default)s)")
    p.add_argument("--layer-budget", type=int, help="B_L, the layers that may hold selected heads (default: 3/4 "
                                                    "of the model's layers, the paper's 24 of 32)")
    p.add_argument("--head-budget", type=int, help="B_H, the selected heads (default: 1/8 of the model's heads, "
                                                   "the paper's 128 of 32 × 32); at most B_L × heads")
    p.add_argument("--max-len", type=int, default=1536, help="tokens per record (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="records per forward (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the draw of B_T rows (default: %(default)s)")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if len(args.tasks) != len(args.checkpoints) - 1:
        p.error(f"--tasks needs one folder per step: {len(args.checkpoints) - 1} for "
                f"{len(args.checkpoints)} checkpoints, got {len(args.tasks)}")
    tokenizer = Tokenizer(args.tokenizer or Path(args.checkpoints[0]) / "tokenizer.model")
    batches = [task_batches(t, tokenizer, args.samples, args.max_len, args.batch_size) for t in args.tasks]
    models = (load_hf(c, dtype=torch.float32) for c in args.checkpoints)   # lazily: two alive at a time
    names = [Path(t).name for t in args.tasks]
    try:
        scores, selected = head_maps(models, batches, args.out, names=names, query_budget=args.query_budget,
                                     layer_budget=args.layer_budget, head_budget=args.head_budget, seed=args.seed)
    except InputError as e:
        p.error(str(e))
    print(f"wrote {args.out}/importance.png, variation.png, head_scores.safetensors (tasks: {scores.tasks})")
    layer_budget, head_budget = budgets(scores.n_layers, scores.n_heads, args.layer_budget, args.head_budget)
    print(f"{len(selected)} heads selected (B_H = {head_budget} of the model's {scores.n_layers} × {scores.n_heads}) "
          f"in {len({l for l, _ in selected})} layers (B_L = {layer_budget}):")
    for layer in sorted({l for l, _ in selected}):
        print(f"  layer {layer}: heads {[h for l, h in selected if l == layer]}")


if __name__ == "__main__":
    main()
