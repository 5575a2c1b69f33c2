"""Evaluate a continual-learning run, or one checkpoint, with greedy KV-cache generation; and general ability.

    python eval.py runs/superni-seekr                      # every task checkpoint of a run: R, OP, BWT, FWT
    python eval.py --model DIR --data ROOT --tasks a,b     # one checkpoint on the test sets of some task folders
                                                           # (printed; --out FILE also writes them)
    python eval.py runs/x --general mmlu,boolq,piqa,gsm8k,bbh --general-samples 200
                                                           # also Table 2: each benchmark on θ_0 and the last model,
                                                           # GA and ΔGA (into eval.json)
    python eval.py --model DIR --general boolq,piqa        # the benchmarks alone, on any model directory
    python eval.py runs/ckl-taalm                          # a train.py --knowledge run: θ_0 and its final θ
                                                           # re-scored on the run's own TL and NF facts

Answers are extracted with the official TRACE rules and scored with each task's metric (0-100), by greedy
decoding up to EOS or --max-new-tokens (512) from prompts cut to --max-prompt-len (1024) tokens, as the official
inference. A run directory is one that `train.py --model ...` wrote (its run.json names the model, data and
order); it is scored on the test records the run itself scored, with its generation settings, unless a flag
says otherwise. The built-in demo prints its own matrices.

The general-ability benchmarks (MMLU 0-shot, BoolQ, PIQA by log-likelihood; GSM8K 5-shot, BBH 3-shot CoT by greedy
generation) are read from --general-data, by default ../shared/data/general beside the project; `minseekr/evaluation/general.py`
says how each is scored. A run's θ_0 is its checkpoints/task00, its last model the last checkpoint with its method.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from minseekr.evaluation.data import format_prompts, load_sequence, parse_order
from minseekr.evaluation.general import check as check_general
from minseekr.evaluation.general import compare, data_root, format_table, parse_names, score_general
from minseekr.evaluation.metrics import format_matrix, format_summary
from minseekr.evaluation.scoring import evaluate, prompt_room
from minseekr.methods.pet import attach_saved
from minseekr.network.checkpoint import load_hf, read_args
from minseekr.network.tokenizer import Tokenizer, find_tokenizer
from minseekr.run import knowledge
from minseekr.run.config import (METHODS, NONNEGATIVE, ContinualConfig, GeneralSettings, RunConfig, from_flags, option,
                                 parser_for, read_settings, validate)
from minseekr.run.rundir import RunDir, summarize
from minseekr.runtime import InputError, atomic_write, exit_on_input_errors, read_json


@dataclass
class EvalConfig(GeneralSettings):
    model: str = option("", "an HF checkpoint directory to score instead of a run")
    tokenizer: str = option("", "tokenizer.model or tokenizer.json (default: the one in MODEL)")
    prompt_format: str = option("plain", "with --model: plain (TRACE's text) or chat (the model's chat template)",
                                ("plain", "chat"))
    data: str = option("", "folder holding the task folders (with --model)")
    tasks: str = option("", "comma-separated task folders (with --model)")
    samples: int = option(0, "test records per task (0: the run's, or all)", check=NONNEGATIVE)
    max_prompt_len: int = option(0, f"prompt tokens kept (0: the run's, or {ContinualConfig.max_prompt_len})",
                                 check=(lambda v: v == 0 or v >= 2, "0 or ≥ 2"))
    max_new_tokens: int = option(0, f"generation length (0: the run's, or {ContinualConfig.max_new_tokens})",
                                 check=NONNEGATIVE)
    out: str = option("", "JSON file for the results (default: RUN/eval.json; with --model, none)")

    def __post_init__(self):
        validate(self)
        if self.general:
            parse_names(self.general)
        elif self.general_data or self.general_samples:
            raise InputError("--general-data and --general-samples go with --general a,b,...")


def evaluate_run(run: RunDir, ns: EvalConfig):
    if (run.root / "knowledge.json").is_file():   # a continual-knowledge-learning run (train.py --knowledge)
        return knowledge.evaluate(run.root)
    if not run.spec.is_file():
        raise InputError(f"{run.spec} not found: RUN_DIR must be a directory written by train.py --model ...")
    spec, cfg = read_settings(run.spec, RunConfig), read_settings(run.config, ContinualConfig)
    base_dir = run.checkpoint(0)   # θ_0 as the trainer exported and scored it, else the run's --model
    base_dir = base_dir if (base_dir / "config.json").is_file() else Path(spec.model)
    samples = ns.samples or cfg.eval_samples
    prompt_len = ns.max_prompt_len or cfg.max_prompt_len
    new_tokens = ns.max_new_tokens or cfg.max_new_tokens
    args = read_args(base_dir)
    prompt_room(prompt_len, new_tokens, args)
    if ns.general:
        check_general(data_root(ns.general_data), parse_names(ns.general), args, ns.general_max_new_tokens)
    tasks, _ = load_sequence(parse_order(spec.order), spec.data)
    for t in tasks:                     # the run's own test records (train.py --test-samples)
        t.test = t.test[:spec.test_samples or None]
    tok = Tokenizer(spec.tokenizer or find_tokenizer(spec.model))
    tok.check_model(args, base_dir)
    format_prompts(tasks, spec.prompt_format, tok)
    score = lambda model, task: evaluate(model, tok, task, samples, prompt_len, new_tokens, progress=True)
    n_tasks, joint = len(tasks), METHODS[cfg.method].joint
    stages = 1 if joint else n_tasks       # MTL trains once on every task: one row
    checkpoints = [run.checkpoint(i + 1) for i in range(stages)]
    for ckpt in checkpoints:   # before any scoring: a run whose later checkpoints are gone is named at once
        if not (ckpt / "config.json").is_file():
            why = "it was deleted after the run finished (results.json)" if run.results.is_file() else \
                "the run stopped before that task finished (continue it with train.py --resume)"
            raise InputError(f"{ckpt} is missing: {why}")
    base_model = attach_saved(load_hf(base_dir), base_dir, expected=cfg.method)
    base = [score(base_model, t) for t in tasks]
    print("base model θ_0 (before any task): " + "  ".join(f"{t.name} {v:.2f}" for t, v in zip(tasks, base)),
          flush=True)
    R = [[None] * n_tasks for _ in range(stages)]
    for i, ckpt in enumerate(checkpoints):
        model = attach_saved(load_hf(ckpt), ckpt, expected=cfg.method)
        for j in range(n_tasks if joint else min(i + 2, n_tasks)):
            R[i][j] = score(model, tasks[j])
            print(f"after stage {i + 1} on {tasks[j].name}: {R[i][j]:.2f}", flush=True)
    heads = read_json(run.results, dict).get("heads") if run.results.is_file() else None
    out = summarize(R, base, [t.name for t in tasks], cfg.method, joint, heads, run.root)
    print(format_matrix(R, out["tasks"], row_names=["all tasks (mtl)"] if joint else None))
    print(format_summary(out))
    if ns.general:
        out["general"] = compare(base_model, model, tok, data_root(ns.general_data), parse_names(ns.general),
                                 ns.general_samples, ns.general_max_new_tokens)
        print(format_table({"θ_0 (task00)": out["general"]["before"], f"last ({checkpoints[-1].name})":
                            out["general"]["after"]}))
    return out


def evaluate_model(ns: EvalConfig):
    if bool(ns.data) != bool(ns.tasks) or not (ns.tasks or ns.general):
        raise InputError("--model needs --data ROOT and --tasks a,b,..., or --general a,b,... (or both)")
    prompt_len = ns.max_prompt_len or ContinualConfig.max_prompt_len
    new_tokens = ns.max_new_tokens or ContinualConfig.max_new_tokens
    args = read_args(ns.model)
    if ns.tasks:
        prompt_room(prompt_len, new_tokens, args)
    if ns.general:
        check_general(data_root(ns.general_data), parse_names(ns.general), args, ns.general_max_new_tokens)
    tok = Tokenizer(ns.tokenizer or find_tokenizer(ns.model))
    tok.check_model(args, ns.model)
    model = attach_saved(load_hf(ns.model), ns.model)
    out = {"model": ns.model}
    if ns.tasks:
        tasks, _ = load_sequence(ns.tasks.split(","), ns.data)
        format_prompts(tasks, ns.prompt_format, tok)
        out["scores"] = {t.name: evaluate(model, tok, t, ns.samples, prompt_len, new_tokens, progress=True)
                         for t in tasks}
        for name, value in out["scores"].items():
            print(f"{name}: {value:.2f}")
    if ns.general:
        out["general"] = score_general(model, tok, data_root(ns.general_data), parse_names(ns.general),
                                       ns.general_samples, ns.general_max_new_tokens)
        print(format_table({Path(ns.model).name: out["general"]["scores"]}))
    return out


def main(argv=None):
    with exit_on_input_errors("eval.py"):
        evaluate_cli(argv)


def evaluate_cli(argv):
    parser = parser_for("eval.py", __doc__, EvalConfig)
    parser.add_argument("run", nargs="?", help="a run directory written by train.py")
    ns = parser.parse_args(argv)
    cfg = from_flags(EvalConfig, ns)
    if bool(ns.run) == bool(cfg.model):
        parser.error("give either RUN_DIR or --model DIR")
    out = evaluate_run(RunDir(ns.run), cfg) if ns.run else evaluate_model(cfg)
    if path := cfg.out or (RunDir(ns.run).root / "eval.json" if ns.run else ""):
        atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(out, indent=1)))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
