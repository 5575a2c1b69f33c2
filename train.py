"""Continual learning with SEEKR and its baselines.

    python train.py                      # the built-in demo: SeqFT, Replay, DER++, SEEKR on a synthetic benchmark (CPU)
    python train.py --demo-methods seqft,seekr,mtl --out runs/demo2   # other methods, into a new folder
    python train.py --model DIR --data ROOT --order order3 --method seekr --out runs/superni-seekr
    torchrun --nproc_per_node 8 train.py --model DIR ...     # the same run, sharded over 8 GPUs (or CPU processes)
    python train.py --resume runs/superni-seekr              # continue after a crash, from the latest resume point
    python train.py --knowledge ../shared/data/lama-ckl --model DIR --method taalm --out runs/ckl
                                                             # continual knowledge learning (TAALM's LAMA-ckl; its
                                                             # flags: python train.py --knowledge x --help)

Every field of `RunConfig` and `ContinualConfig` (minseekr/run/config.py) is a --flag. Settings resolve
in one order: the library's defaults, then the method's authors' (config.METHOD_DEFAULTS), then the order's epochs
(Appendix B), then --preset, then the flags typed here (the demo: the library's and the authors' defaults, its own
settings, then the typed flags). The resolved settings are written into the run directory.
"""
import dataclasses
import json
import sys
from pathlib import Path

import torch

from minseekr.engines.engine import load_engine
from minseekr.evaluation import general
from minseekr.evaluation.data import format_prompts, load_sequence, parse_order
from minseekr.evaluation.metrics import format_matrix, format_summary
from minseekr.evaluation.scoring import prompt_room
from minseekr.methods.pet import attach_saved
from minseekr.network.checkpoint import load_hf, read_args
from minseekr.network.tokenizer import Tokenizer, find_tokenizer
from minseekr.run import demo, knowledge
from minseekr.run.config import (METHOD_DEFAULTS, METHODS, ContinualConfig, RunConfig, from_flags, parser_for, preset,
                                 read_settings, resolve, typed_flags)
from minseekr.run.rundir import RunDir
from minseekr.run.trainer import ContinualTrainer
from minseekr.runtime import InputError, atomic_write, exit_on_input_errors, init_distributed, print0, shutdown


def resumed(run_dir: str, parser, typed: set):
    """The RunConfig and ContinualConfig a run directory was started with, the run directory being the one given;
    typed flags other than --threads would change the run and are refused."""
    run = RunDir(run_dir)
    for file in (run.spec, run.config):
        if not file.is_file():
            parser.error(f"--resume {run.root}: {file} not found (a run directory of train.py --model ...)")
    changed = sorted(typed - {"resume", "threads"})
    if changed:
        parser.error(f"--resume continues {run.root} with its own settings; drop "
                     f"--{', --'.join(n.replace('_', '-') for n in changed)}")
    spec = dataclasses.replace(read_settings(run.spec, RunConfig), resume=str(run.root), out=str(run.root))
    return spec, read_settings(run.config, ContinualConfig)


def main(argv=None):
    with exit_on_input_errors("train.py"):
        train(argv)
        shutdown()


def train(argv):
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--knowledge" or a.startswith("--knowledge=") for a in argv):   # continual knowledge learning
        return knowledge.main(argv)
    parser = parser_for("train.py", __doc__, RunConfig, ContinualConfig)
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
                 from_flags(ContinualConfig, ns, typed), run.fsdp, Path(__file__).parent, device=run.device or "cpu")
        return
    torch.set_num_threads(run.threads or torch.get_num_threads())
    run.threads = torch.get_num_threads()   # recorded: a resumed run computes with the same count, bit for bit
    if not run.data or not run.order:
        parser.error("--model needs --data ROOT and --order NAME (or comma-separated task folders)")
    args = read_args(run.model)                     # the model directory first: it holds the tokenizer too
    tok = Tokenizer(run.tokenizer or find_tokenizer(run.model))
    tok.check_model(args, run.model)
    tasks, epochs = load_sequence(parse_order(run.order), run.data)
    for t in tasks:
        t.train = t.train[:run.train_samples or None]
        t.test = t.test[:run.test_samples or None]
    format_prompts(tasks, run.prompt_format, tok)
    if not run.resume:   # precedence: library defaults < the order's epochs < the preset < typed flags
        typed_cfg = from_flags(ContinualConfig, ns, typed)
        ratio = typed_cfg.get("replay_ratio", ContinualConfig.replay_ratio)
        chosen = preset(run.preset, ratio, args.n_layers) if run.preset else {}
        authors = METHOD_DEFAULTS.get(typed_cfg.get("method", ContinualConfig.method), {})   # its authors' first
        cfg = resolve(authors, {"epochs": epochs}, chosen, typed_cfg)
    if cfg.max_len > args.max_seq_len:
        raise InputError(f"--max-len {cfg.max_len} exceeds the {args.max_seq_len} positions of {run.model} "
                         f"(max_position_embeddings)")
    prompt_room(cfg.max_prompt_len, cfg.max_new_tokens, args)
    if run.general:   # before training, not after it: a missing benchmark file fails in seconds
        general.check(general.data_root(run.general_data), general.parse_names(run.general), args,
                      run.general_max_new_tokens)
    elif run.general_data or run.general_samples:
        raise InputError("--general-data and --general-samples go with --general a,b,...")
    rank, _, device = init_distributed(run.device)
    engine = load_engine(run.model, run.fsdp, frozen=METHODS[cfg.method].adapts, device=device,
                         compute_dtype=getattr(torch, run.dtype) if run.dtype else None,
                         activation_checkpointing=run.activation_checkpointing, betas=cfg.betas,
                         weight_decay=cfg.weight_decay)
    # Paths are stored absolute, so the run resumes from any working directory, moved or copied.
    paths = ("model", "tokenizer", "data", "general_data")
    spec = dataclasses.replace(run, resume="", out="", **{k: str(Path(getattr(run, k)).resolve()) if getattr(run, k)
                                                          else "" for k in paths})
    summary = ContinualTrainer(engine, tok, tasks, cfg, run.out, spec=dataclasses.asdict(spec)).run_all(
        resume=bool(run.resume))
    print0(format_matrix(summary["R"], summary["tasks"], row_names=["all tasks"] if METHODS[cfg.method].joint else None))
    print0(format_summary(summary))
    if run.general:
        del engine   # the two models scored next need its memory
        table_2(RunDir(run.out), summary, cfg.method, tok, run, device, rank == 0)


def table_2(run: RunDir, summary: dict, method: str, tok, settings: RunConfig, device, rank0: bool):
    """General ability (Table 2) on θ_0 (the run's task00) and on its last model, its method attached; printed and
    added to results.json. Every rank scores its share."""
    before = load_hf(run.checkpoint(0), device=device)
    last = run.checkpoint(1 if METHODS[method].joint else len(summary["tasks"]))
    after = attach_saved(load_hf(last, device=device), last, expected=method)
    summary["general"] = general.compare(before, after, tok, general.data_root(settings.general_data),
                                         general.parse_names(settings.general), settings.general_samples,
                                         settings.general_max_new_tokens, progress=rank0)
    if rank0:
        print(general.format_table({"θ_0 (task00)": summary["general"]["before"],
                                    f"last ({last.name})": summary["general"]["after"]}), flush=True)
        atomic_write(run.results, lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))


if __name__ == "__main__":
    main()
