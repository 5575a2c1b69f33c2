"""Continual learning with SEEKR and its baselines.

    python train.py                      # the built-in demo: SeqFT vs Replay vs SEEKR on a synthetic benchmark (CPU)
    python train.py --model DIR --data ROOT --order order3 --method seekr --out runs/superni-seekr
    torchrun --nproc_per_node 8 train.py --model DIR ...     # the same run, sharded over 8 GPUs (or CPU processes)
    python train.py --resume runs/superni-seekr              # continue after a crash, from the latest resume point

Every field of `RunConfig` and `ContinualConfig` is a `--flag` (underscores become dashes); the resolved
configuration is written into the run directory.
"""
import argparse
import copy
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from minseekr.checkpoint import load_hf, read_args
from minseekr.config import PRESETS, ContinualConfig, option, preset, resolve
from minseekr.continual import ContinualTrainer, build_engine
from minseekr.data import Task, load_sequence
from minseekr.fsdp import init_distributed, load_hf_sharded, print0
from minseekr.metrics import format_matrix, format_summary
from minseekr.model import ModelArgs, Transformer
from minseekr.tokenizer import Tokenizer


@dataclass
class RunConfig:
    model: str = option("", "HF checkpoint directory (config.json + safetensors); empty runs the demo")
    tokenizer: str = option("", "SentencePiece tokenizer.model (default: MODEL/tokenizer.model)")
    data: str = option("", "folder holding the task folders")
    order: str = option("", "order1 | order2 | order3 | order4 (Table 5), or comma-separated task folder names")
    out: str = option("runs/run", "run directory")
    preset: str = option("", "every setting as the paper (paper) or the authors' script (official) uses it; "
                         "typed flags still win", ("",) + PRESETS)
    dtype: str = option("", "compute dtype (default: bfloat16 on GPUs, float32 on the CPU)",
                        ("", "float32", "bfloat16"))
    fsdp: str = option("minseekr", "training engine: the hand-written FSDP (minseekr) or PyTorch's FSDP2 (torch)",
                       ("minseekr", "torch"))
    activation_checkpointing: bool = option(False, "recompute each block in backward (long sequences, big models)")
    resume: str = option("", "continue this run directory from its latest resume point, with its own settings")
    threads: int = option(0, "torch CPU threads (0 = torch's default)")
    train_samples: int = option(0, "first N training records per task (0 = all): quick runs")
    test_samples: int = option(0, "first N test records per task kept in the run (0 = all)")
    demo_seeds: str = option("0", "demo only: comma-separated seeds to repeat the comparison over")
    demo_methods: str = option("seqft,replay,seekr", "demo only: the methods compared")


def add_flags(parser, cls):
    """One --flag per dataclass field, with the field's help, its choices and its default."""
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag, help = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if "default" not in help:
            help += f" (default: {','.join(map(str, default)) if isinstance(default, (list, tuple)) else default!r})"
        if isinstance(default, (list, tuple)):
            kind = type(default[0]) if default else int
            parser.add_argument(flag, default=default, help=help, metavar="A,B,...",
                                type=lambda s, kind=kind: [kind(x) for x in s.split(",")])
        elif isinstance(default, bool):
            parser.add_argument(flag, default=default, help=help, choices=(True, False),
                                type=lambda s: s.lower() in ("1", "true", "yes"))
        else:
            parser.add_argument(flag, default=default, type=type(default), help=help,
                                choices=[c for c in choices if c] if choices else None)


def typed_flags(argv) -> set:
    """The field names whose flags were typed on the command line (`--flag value` or `--flag=value`)."""
    return {a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")}


def typed_settings(ns, typed: set) -> dict:
    """The ContinualConfig fields whose flags were typed: they win over every other layer, even at the default."""
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(ContinualConfig) if f.name in typed}


def pick(cls, ns):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


# ---- the built-in demo -----------------------------------------------------------------------------------
DEMO_TASKS = ["rev", "rot", "swp", "evn"]
DEMO = dict(lr=1e-3, weight_decay=0.0, batch_size=32, epochs=[10], max_len=32, replay_ratio=0.05, lambda1=0.5,
            lambda2=10.0, layer_budget=2, head_budget=4, query_budget=12, eval_samples=200, max_new_tokens=8)


def demo_base(weights: Path, tok_path: Path):
    """The demo's θ_0: a tiny LLaMA pre-trained on the `cpy` task, cached in weights/demo."""
    from minseekr.synthetic import make_records, train_tokenizer
    rank, world, _ = init_distributed()
    if not tok_path.exists() and rank == 0:
        weights.mkdir(parents=True, exist_ok=True)
        train_tokenizer(tok_path)
    dist.barrier()
    tok = Tokenizer(str(tok_path))
    if (weights / "config.json").exists():
        return load_hf(weights), tok
    print0("pre-training the demo's base model on the copy task (once; cached in weights/demo) ...")
    torch.manual_seed(0)
    # The smallest size that learns all four permutations jointly (dim 64 x 2 layers cannot hold `rev` with the others).
    model = Transformer(ModelArgs(dim=128, n_layers=4, n_heads=4, vocab_size=tok.vocab_size, hidden_dim=256,
                                  max_seq_len=32, tie_embeddings=True))
    model.init_weights()
    cfg = resolve(DEMO, {"method": "seqft", "epochs": [4]})
    base = [Task("cpy", make_records("cpy", 2000, seed=0), [], make_records("cpy", 100, seed=1))]
    trainer = ContinualTrainer(model, tok, base, cfg, weights / "pretrain-run")
    trainer.train_task(0)
    trainer.engine.export_hf(weights, dtype=torch.float32)
    return load_hf(weights), tok


def draw_importance(run_dir: Path):
    """importance.png (Fig. 5) and variation.png (Fig. 4) of a SEEKR run's head scores, if matplotlib is installed."""
    from minseekr.heads import HeadScores
    from tools.head_maps import draw
    try:
        draw(HeadScores.load(run_dir / "head_scores.safetensors"), run_dir)
        print(f"head importance: {run_dir / 'importance.png'}")
    except ImportError:
        print("(pip install matplotlib, or -e .[tools], to draw the head importance as importance.png)")


def run_demo(run: RunConfig, overrides: dict):
    from minseekr.synthetic import make_records
    root = Path(__file__).parent
    base, tok = demo_base(root / "weights" / "demo", root / "weights" / "demo" / "tokenizer.model")
    results = {}
    for seed in [int(s) for s in run.demo_seeds.split(",")]:
        tasks = [Task(t, make_records(t, 1000, seed), [], make_records(t, 200, seed + 1000)) for t in DEMO_TASKS]
        for method in run.demo_methods.split(","):
            cfg = resolve(DEMO, overrides, {"method": method, "seed": seed})
            out = Path(run.out) / f"demo-seed{seed}" / method
            engine = build_engine(copy.deepcopy(base), cfg, run.fsdp)
            summary = ContinualTrainer(engine, tok, tasks, cfg, out).run_all()
            results.setdefault(method, []).append(summary)
            print0(f"\n== {method} (seed {seed}): accuracy R[i][j] after task i on task j")
            print0(format_matrix(summary["R"], DEMO_TASKS, row_names=["all tasks"] if method == "mtl" else None))
            print0(format_summary(summary))
            if method == "seekr" and dist.get_rank() == 0:
                draw_importance(out)
    print0("\n== summary over seeds (mean OP / BWT)")
    for method, runs in results.items():
        op = sum(r["OP"] for r in runs) / len(runs)
        bwt = "" if runs[0]["BWT"] is None else f"  BWT {sum(r['BWT'] for r in runs) / len(runs):6.1f}"
        print0(f"{method:8s} OP {op:6.1f}{bwt}")
    if dist.get_rank() == 0:
        (Path(run.out) / "demo-summary.json").write_text(json.dumps(results, indent=1))


def load_engine(run: RunConfig, cfg: ContinualConfig):
    """The model of `--model` in its engine; the hand-written one streams each rank's shard from the files."""
    _, _, device = init_distributed()
    dtype = getattr(torch, run.dtype) if run.dtype else None
    if run.fsdp == "minseekr":
        return load_hf_sharded(run.model, device=device, compute_dtype=dtype, betas=tuple(cfg.betas),
                               weight_decay=cfg.weight_decay, activation_checkpointing=run.activation_checkpointing)
    return build_engine(load_hf(run.model, dtype=torch.float32), cfg, "torch", device, dtype, run.activation_checkpointing)


def resumed(run_dir: str, parser, typed: set):
    """The RunConfig and ContinualConfig a run directory was started with; typed flags other than --threads
    would change the run and are refused."""
    run_dir = Path(run_dir)
    for name in ("run.json", "config.json"):
        if not (run_dir / name).is_file():
            parser.error(f"--resume {run_dir}: {run_dir / name} not found (a run directory of train.py --model ...)")
    changed = sorted(typed - {"resume", "threads"})
    if changed:
        parser.error(f"--resume continues {run_dir} with its own settings; drop --{', --'.join(n.replace('_', '-') for n in changed)}")
    run = RunConfig(**{**json.loads((run_dir / "run.json").read_text()), "resume": str(run_dir)})
    return run, ContinualConfig(**json.loads((run_dir / "config.json").read_text()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, RunConfig)
    add_flags(parser, ContinualConfig)
    argv = sys.argv[1:] if argv is None else argv
    ns = parser.parse_args(argv)
    typed = typed_flags(argv)
    run = pick(RunConfig, ns)
    if run.resume:
        run, cfg = resumed(run.resume, parser, typed)
        if "threads" in typed:
            run.threads = ns.threads
    if run.threads:
        torch.set_num_threads(run.threads)
    if not run.model:
        # The demo's model is tiny: one thread beats several (and several fight over a shared CPU).
        torch.set_num_threads(run.threads or 1)
        return run_demo(run, typed_settings(ns, typed))
    if not run.data or not run.order:
        parser.error("--model needs --data ROOT and --order NAME (or comma-separated task folders)")
    tok = Tokenizer(run.tokenizer or str(Path(run.model) / "tokenizer.model"))
    order = run.order if run.order.startswith("order") else run.order.split(",")
    tasks, epochs = load_sequence(order, run.data)
    for t in tasks:
        t.train = t.train[:run.train_samples or None]
        t.test = t.test[:run.test_samples or None]
    if not run.resume:   # precedence: library defaults < the order's epochs < the preset < typed flags
        typed_cfg = typed_settings(ns, typed)
        ratio = typed_cfg.get("replay_ratio", ContinualConfig.replay_ratio)
        chosen = preset(run.preset, ratio, read_args(run.model).n_layers) if run.preset else {}
        cfg = resolve({"epochs": epochs}, chosen, typed_cfg)
    engine = load_engine(run, cfg)
    if engine.rank == 0:
        Path(run.out).mkdir(parents=True, exist_ok=True)
        spec = dataclasses.asdict(dataclasses.replace(run, resume=""))
        (Path(run.out) / "run.json").write_text(json.dumps(spec, indent=1))
    summary = ContinualTrainer(engine, tok, tasks, cfg, run.out).run_all(resume=bool(run.resume))
    print0(format_matrix(summary["R"], summary["tasks"], row_names=["all tasks"] if cfg.method == "mtl" else None))
    print0(format_summary(summary))


if __name__ == "__main__":
    sys.exit(main())
