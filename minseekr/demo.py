"""The built-in demo: SeqFT, Replay, SEEKR, ... on the synthetic permutation benchmark (`synthetic.py`), on a CPU.

`python train.py` with no --model runs it: a tiny LLaMA is pre-trained on the copy task (θ_0), then every
method runs the four permutation tasks from the same θ_0, and each method's accuracy matrix, OP and BWT are
printed; SEEKR's head importance is drawn when matplotlib is installed.
"""
import copy
import json
from pathlib import Path

import torch

from minseekr.checkpoint import load_hf
from minseekr.config import METHODS, resolve
from minseekr.continual import ContinualTrainer
from minseekr.data import Task
from minseekr.engine import build_engine, export_hf
from minseekr.figures import draw
from minseekr.heads import HeadScores
from minseekr.metrics import format_matrix, format_summary
from minseekr.model import ModelArgs, Transformer
from minseekr.runtime import barrier, init_distributed, print0
from minseekr.synthetic import make_records, train_tokenizer
from minseekr.tokenizer import Tokenizer

TASKS = ["rev", "rot", "swp", "evn"]
SETTINGS = dict(lr=1e-3, weight_decay=0.0, batch_size=32, epochs=[10], max_len=32, replay_ratio=0.05, lambda1=0.5,
                lambda2=10.0, layer_budget=2, head_budget=4, query_budget=12, eval_samples=200, max_new_tokens=8)


def base_model(weights: Path, tok_path: Path):
    """The demo's θ_0: a tiny LLaMA pre-trained on the `cpy` task, cached in weights/demo."""
    rank, _, _ = init_distributed()
    if not tok_path.exists() and rank == 0:
        weights.mkdir(parents=True, exist_ok=True)
        train_tokenizer(tok_path)
    barrier()
    tok = Tokenizer(str(tok_path))
    if (weights / "config.json").exists():
        return load_hf(weights), tok
    print0("pre-training the demo's base model on the copy task (once; cached in weights/demo) ...")
    torch.manual_seed(0)
    # The smallest size that learns all four permutations jointly (dim 64 x 2 layers cannot hold `rev` with the others).
    model = Transformer(ModelArgs(dim=128, n_layers=4, n_heads=4, vocab_size=tok.vocab_size, hidden_dim=256,
                                  max_seq_len=32, tie_embeddings=True))
    model.init_weights()
    cfg = resolve(SETTINGS, {"method": "seqft", "epochs": [4]})
    base = [Task("cpy", make_records("cpy", 2000, seed=0), [], make_records("cpy", 100, seed=1))]
    trainer = ContinualTrainer(model, tok, base, cfg, weights / "pretrain-run")
    trainer.train_task(0)
    export_hf(trainer.engine, weights, dtype=torch.float32)
    return load_hf(weights), tok


def draw_importance(run_dir: Path, selected=None):
    """importance.png (Fig. 5) and variation.png (Fig. 4) of a SEEKR run's head scores, if matplotlib is installed."""
    try:
        draw(HeadScores.load(Path(run_dir) / "head_scores.safetensors"), run_dir, selected)
        print(f"head importance: {Path(run_dir) / 'importance.png'}")
    except ImportError:
        print("(pip install matplotlib, or -e .[tools], to draw the head importance as importance.png)")


def run(out: Path, seeds: list[int], methods: list[str], typed: dict, fsdp="minseekr", root: Path = Path(".")):
    """Every method on every seed from the same θ_0; prints the matrices and a summary, writes demo-summary.json."""
    base, tok = base_model(root / "weights" / "demo", root / "weights" / "demo" / "tokenizer.model")
    results = {}
    for seed in seeds:
        tasks = [Task(t, make_records(t, 1000, seed), [], make_records(t, 200, seed + 1000)) for t in TASKS]
        for method in methods:
            cfg = resolve(SETTINGS, typed, {"method": method, "seed": seed})
            run_dir = Path(out) / f"demo-seed{seed}" / method
            engine = build_engine(copy.deepcopy(base), fsdp, betas=cfg.betas, weight_decay=cfg.weight_decay)
            summary = ContinualTrainer(engine, tok, tasks, cfg, run_dir).run_all()
            results.setdefault(method, []).append(summary)
            print0(f"\n== {method} (seed {seed}): accuracy R[i][j] after task i on task j")
            print0(format_matrix(summary["R"], TASKS, row_names=["all tasks"] if METHODS[method].joint else None))
            print0(format_summary(summary))
            if summary["heads"] and engine.rank == 0:
                draw_importance(run_dir, summary["heads"])
    print0("\n== summary over seeds (mean OP / BWT)")
    for method, runs in results.items():
        op = sum(r["OP"] for r in runs) / len(runs)
        bwt = "" if runs[0]["BWT"] is None else f"  BWT {sum(r['BWT'] for r in runs) / len(runs):6.1f}"
        print0(f"{method:8s} OP {op:6.1f}{bwt}")
    if init_distributed()[0] == 0:
        (Path(out) / "demo-summary.json").write_text(json.dumps(results, indent=1))
    return results
