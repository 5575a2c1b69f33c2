"""Continual learning with SEEKR and its baselines.

    python train.py                      # the built-in demo: SeqFT, Replay, DER++, SEEKR, MTL on a synthetic benchmark (CPU)
    python train.py --model DIR --data ROOT --order order3 --method seekr --out runs/superni-seekr
    torchrun --nproc_per_node 8 train.py --model DIR ...     # the same run, sharded over 8 GPUs (or CPU processes)
    python train.py --resume runs/superni-seekr              # continue after a crash, from the latest resume point

Every field of `RunConfig` (below) and of `ContinualConfig` (minseekr/config.py) is a --flag. Settings resolve
in one order: the library's defaults, then the order's epochs (Appendix B), then --preset, then the demo's
settings, then the flags typed here. The resolved settings are written into the run directory.
"""
import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from minseekr import demo
from minseekr.checkpoint import read_args
from minseekr.config import (METHODS, PRESETS, ContinualConfig, add_flags, from_flags, option, preset, resolve,
                             typed_flags)
from minseekr.continual import ContinualTrainer
from minseekr.data import load_sequence, parse_order
from minseekr.engine import ENGINES, load_engine
from minseekr.metrics import format_matrix, format_summary
from minseekr.rundir import RunDir
from minseekr.runtime import atomic_write, init_distributed, print0
from minseekr.tokenizer import Tokenizer, find_tokenizer


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
                       tuple(ENGINES))
    activation_checkpointing: bool = option(False, "recompute each block in backward (long sequences, big models)")
    resume: str = option("", "continue this run directory from its latest resume point, with its own settings")
    threads: int = option(0, "torch CPU threads (0 = torch's default)")
    train_samples: int = option(0, "first N training records per task (0 = all): quick runs")
    test_samples: int = option(0, "first N test records per task kept in the run (0 = all)")
    demo_seeds: str = option("0", "demo only: comma-separated seeds to repeat the comparison over")
    demo_methods: str = option("seqft,replay,seekr", "demo only: the methods compared")


def resumed(run_dir: str, parser, typed: set):
    """The RunConfig and ContinualConfig a run directory was started with; typed flags other than --threads
    would change the run and are refused."""
    run = RunDir(run_dir)
    for file in (run.spec, run.config):
        if not file.is_file():
            parser.error(f"--resume {run.root}: {file} not found (a run directory of train.py --model ...)")
    changed = sorted(typed - {"resume", "threads"})
    if changed:
        parser.error(f"--resume continues {run.root} with its own settings; drop "
                     f"--{', --'.join(n.replace('_', '-') for n in changed)}")
    spec = RunConfig(**{**json.loads(run.spec.read_text()), "resume": str(run.root)})
    return spec, ContinualConfig(**json.loads(run.config.read_text()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, RunConfig)
    add_flags(parser, ContinualConfig)
    argv = sys.argv[1:] if argv is None else argv
    ns = parser.parse_args(argv)
    typed = typed_flags(argv)
    run = from_flags(RunConfig, ns)
    if run.resume:
        run, cfg = resumed(run.resume, parser, typed)
        if "threads" in typed:
            run.threads = ns.threads
    if not run.model:
        # The demo's model is tiny: one thread beats several (and several fight over a shared CPU).
        torch.set_num_threads(run.threads or 1)
        demo.run(Path(run.out), [int(s) for s in run.demo_seeds.split(",")], run.demo_methods.split(","),
                 from_flags(ContinualConfig, ns, typed), run.fsdp, Path(__file__).parent)
        return
    if run.threads:
        torch.set_num_threads(run.threads)
    if not run.data or not run.order:
        parser.error("--model needs --data ROOT and --order NAME (or comma-separated task folders)")
    tok = Tokenizer(run.tokenizer or find_tokenizer(run.model))
    tasks, epochs = load_sequence(parse_order(run.order), run.data)
    for t in tasks:
        t.train = t.train[:run.train_samples or None]
        t.test = t.test[:run.test_samples or None]
    if not run.resume:   # precedence: library defaults < the order's epochs < the preset < typed flags
        typed_cfg = from_flags(ContinualConfig, ns, typed)
        ratio = typed_cfg.get("replay_ratio", ContinualConfig.replay_ratio)
        chosen = preset(run.preset, ratio, read_args(run.model).n_layers) if run.preset else {}
        cfg = resolve({"epochs": epochs}, chosen, typed_cfg)
    _, _, device = init_distributed()
    engine = load_engine(run.model, run.fsdp, device=device, compute_dtype=getattr(torch, run.dtype) if run.dtype else None,
                         activation_checkpointing=run.activation_checkpointing, betas=cfg.betas,
                         weight_decay=cfg.weight_decay)
    rundir = RunDir(run.out)
    if engine.rank == 0:
        rundir.root.mkdir(parents=True, exist_ok=True)
        spec = json.dumps(dataclasses.asdict(dataclasses.replace(run, resume="")), indent=1)
        atomic_write(rundir.spec, lambda tmp: tmp.write_text(spec))
    summary = ContinualTrainer(engine, tok, tasks, cfg, run.out).run_all(resume=bool(run.resume))
    print0(format_matrix(summary["R"], summary["tasks"], row_names=["all tasks"] if METHODS[cfg.method].joint else None))
    print0(format_summary(summary))


if __name__ == "__main__":
    sys.exit(main())
