"""Evaluate a continual-learning run, or one checkpoint, with greedy KV-cache generation.

    python eval.py runs/superni-seekr                      # every task checkpoint of a run: R, OP, BWT, FWT
    python eval.py --model DIR --data ROOT --tasks a,b     # one checkpoint on the test sets of some task folders
    python eval.py runs/x --general ROOT/mmlu,ROOT/gsm     # also GA before (base model) and after (last task), ΔGA

Answers are extracted with the official TRACE rules and scored with each task's metric (0-100), by greedy
decoding up to EOS or --max-new-tokens (512) from prompts cut to --max-prompt-len (1024) tokens, as the official
inference. A run directory is one that `train.py --model ...` wrote (its run.json names the model, data and
order); it is scored on the test records the run itself scored, with its generation settings, unless a flag
says otherwise. The built-in demo prints its own matrices.
"""
import argparse
import json
import sys
from pathlib import Path

from minseekr.checkpoint import load_hf
from minseekr.evaluation import evaluate
from minseekr.data import load_sequence, load_task
from minseekr.metrics import (backward_transfer, delta_general_ability, format_matrix, format_summary,
                              forward_transfer, general_ability, overall_performance)
from minseekr.tokenizer import Tokenizer


def evaluate_run(run: Path, ns):
    spec_file = run / "run.json"
    if not spec_file.is_file():
        sys.exit(f"eval.py: {spec_file} not found: RUN_DIR must be a directory written by train.py --model ...")
    spec = json.loads(spec_file.read_text())
    cfg = json.loads((run / "config.json").read_text())
    order = spec["order"] if spec["order"].startswith("order") else spec["order"].split(",")
    tasks, _ = load_sequence(order, spec["data"])
    for t in tasks:                     # the run's own test records (train.py --test-samples)
        t.test = t.test[:spec.get("test_samples") or None]
    tok = Tokenizer(spec["tokenizer"] or str(Path(spec["model"]) / "tokenizer.model"))
    samples = ns.samples or cfg["eval_samples"]
    prompt_len = ns.max_prompt_len or cfg["max_prompt_len"]
    new_tokens = ns.max_new_tokens or cfg["max_new_tokens"]
    score = lambda model, task: evaluate(model, tok, task, samples, prompt_len, new_tokens, progress=True)
    # θ_0 as the trainer exported and scored it (task00), else the run's --model.
    base_dir = run / "checkpoints" / "task00"
    base_model = load_hf(base_dir if (base_dir / "config.json").is_file() else spec["model"])
    base = [score(base_model, t) for t in tasks]
    T = len(tasks)
    stages = 1 if cfg["method"] == "mtl" else T   # MTL trains once on every task: one row
    R = [[None] * T for _ in range(stages)]
    for i in range(stages):
        ckpt = run / "checkpoints" / f"task{i + 1:02d}"
        if not (ckpt / "config.json").is_file():
            sys.exit(f"eval.py: {ckpt} is missing: the run stopped before task {i + 1} finished")
        model = load_hf(ckpt)
        for j in range(T if stages == 1 else min(i + 2, T)):
            R[i][j] = score(model, tasks[j])
            print(f"after stage {i + 1} on {tasks[j].name}: {R[i][j]:.2f}", flush=True)
    names = [t.name for t in tasks]
    results = run / "results.json"
    heads = json.loads(results.read_text()).get("heads") if results.is_file() else None
    if stages == 1 and T > 1:
        out = {"tasks": names, "R": R, "base": base, "OP": sum(R[0]) / T, "BWT": None, "BWT_T": None, "FWT": None}
    else:
        out = {"tasks": names, "R": R, "base": base, "OP": overall_performance(R), "BWT": backward_transfer(R),
               "BWT_T": backward_transfer(R, over_all_tasks=True), "FWT": forward_transfer(R, base)}
    out.update(heads=heads, run_dir=str(run.resolve()))
    print(format_matrix(R, names, row_names=["all tasks (mtl)"] if stages == 1 and T > 1 else None))
    print(format_summary(out))
    if ns.general:
        general = [load_task(f) for f in ns.general.split(",")]
        before = {t.name: score(base_model, t) for t in general}
        after = {t.name: score(model, t) for t in general}
        out.update(GA_before=general_ability(before), GA_after=general_ability(after),
                   dGA=delta_general_ability(before, after), general_before=before, general_after=after)
        print(f"GA {out['GA_before']:.2f} -> {out['GA_after']:.2f}  (ΔGA {out['dGA']:+.2f})")
    return out


def evaluate_model(ns):
    if not ns.data or not ns.tasks:
        sys.exit("eval.py: --model needs --data ROOT and --tasks a,b,...")
    model = load_hf(ns.model)
    tok = Tokenizer(ns.tokenizer or str(Path(ns.model) / "tokenizer.model"))
    tasks, _ = load_sequence(ns.tasks.split(","), ns.data)
    scores = {t.name: evaluate(model, tok, t, ns.samples, ns.max_prompt_len or 1024, ns.max_new_tokens or 512,
                               progress=True) for t in tasks}
    for name, value in scores.items():
        print(f"{name}: {value:.2f}")
    return {"model": ns.model, "scores": scores}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", help="a run directory written by train.py")
    parser.add_argument("--model", help="an HF checkpoint directory, instead of a run")
    parser.add_argument("--tokenizer", default="", help="tokenizer.model (default: MODEL/tokenizer.model)")
    parser.add_argument("--data", help="folder holding the task folders (with --model)")
    parser.add_argument("--tasks", help="comma-separated task folders (with --model)")
    parser.add_argument("--general", default="", help="comma-separated general-ability task folders (GA, ΔGA)")
    parser.add_argument("--samples", type=int, default=0, help="test records per task (0: the run's, or all)")
    parser.add_argument("--max-prompt-len", type=int, default=0, help="prompt tokens kept (0: the run's, or 1024)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0: the run's setting, or 512")
    parser.add_argument("--out", default="", help="JSON file for the results (default: RUN/eval.json)")
    ns = parser.parse_args(argv)
    if bool(ns.run) == bool(ns.model):
        parser.error("give either RUN_DIR or --model DIR")
    out = evaluate_run(Path(ns.run), ns) if ns.run else evaluate_model(ns)
    path = Path(ns.out or (Path(ns.run) / "eval.json" if ns.run else "eval.json"))
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
