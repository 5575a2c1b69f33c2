"""Where SAPT's selection routes each task's test inputs, checkpoint by checkpoint.

    python tools/sapt_routing.py runs/superni-sapt

For a run of `train.py --method sapt`, every task checkpoint θ_k (`checkpoints/taskKK`, its method file) gives,
for each task j ≤ k, the mean routing weight vector w(x) over LoRAs 1..k of task j's test inputs, how many of them
put more than 0.5 on each LoRA, and w̄_j, the vector that ARM pulls task j's pseudo-inputs back to. The inputs are
the test records the run scored (its --test-samples, --eval-samples), each prompt read as evaluation reads it (BOS
and its newest tokens); w(x) is the same for every generated token, so it is the mixture each answer was written
with. w(x) depends on the frozen token embeddings and the method alone: the model is loaded once.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minseekr.evaluation.data import format_prompts, load_sequence, parse_order  # noqa: E402
from minseekr.evaluation.scoring import prompt_room  # noqa: E402
from minseekr.methods.pet import FILE, saved_method  # noqa: E402
from minseekr.methods.sapt import SAPT  # noqa: E402
from minseekr.network.checkpoint import load_hf  # noqa: E402
from minseekr.network.tokenizer import Tokenizer, find_tokenizer  # noqa: E402
from minseekr.run.config import ContinualConfig, RunConfig, read_settings  # noqa: E402
from minseekr.run.rundir import RunDir  # noqa: E402
from minseekr.runtime import InputError, exit_on_input_errors  # noqa: E402


def summary(w) -> dict:
    """Of weight vectors w (inputs, LoRAs): how many, their mean, and how many put more than 0.5 on each LoRA."""
    return {"inputs": len(w), "mean": w.mean(0).tolist(), "above_half": (w > 0.5).sum(0).tolist()}


@torch.no_grad()
def routing(run_dir) -> list[list[dict]]:
    """Per finished checkpoint k (1, 2, ...) and task j ≤ k: {"task", "inputs", "mean", "above_half", "saved"},
    the mean w(x) of the task's test inputs, how many put > 0.5 on each LoRA, and the w̄_j checkpoint k keeps."""
    run = RunDir(run_dir)
    if not run.spec.is_file():
        raise InputError(f"{run.spec} not found: RUN_DIR must be a directory written by train.py --model ...")
    spec, cfg = read_settings(run.spec, RunConfig), read_settings(run.config, ContinualConfig)
    if cfg.method != "sapt":
        raise InputError(f"{run.config}: the run's method is {cfg.method}; routing weights are SAPT's (--method sapt)")
    tasks, _ = load_sequence(parse_order(spec.order), spec.data)
    tok = Tokenizer(spec.tokenizer or find_tokenizer(spec.model))
    format_prompts(tasks, spec.prompt_format, tok)
    finished = [k for k in range(1, len(tasks) + 1) if (run.checkpoint(k) / "config.json").is_file()]
    if not finished:
        raise InputError(f"{run.root} holds no task checkpoint ({run.checkpoint(1)} not found)")
    model = load_hf(run.checkpoint(finished[-1]), dtype=torch.float32)
    room = prompt_room(cfg.max_prompt_len, cfg.max_new_tokens, model.args)
    embeddings = [[model.model.embed_tokens(torch.tensor(tok.prompt(r["prompt"], room)))
                   for r in t.test[:spec.test_samples or None][:cfg.eval_samples or None]] for t in tasks]
    out = []
    for k in finished:
        saved_method(run.checkpoint(k), expected="sapt")   # the checkpoint's record and method file agree
        method = SAPT.load(run.checkpoint(k) / FILE, model.args)
        rows = []
        for j in range(k):
            if not embeddings[j]:
                raise InputError(f"task {tasks[j].name} has no test record to route")
            w = torch.cat([method.weights(method.pool(x[None], None)) for x in embeddings[j]])   # (inputs, k)
            rows.append({"task": tasks[j].name, **summary(w), "saved": method.anchors[j].tolist()})
        out.append(rows)
    return out


def vector(values) -> str:
    return "[" + " ".join(f"{v:.3f}" for v in values) + "]"


def show(run_dir, out) -> str:
    """The table `routing` returns, one block per checkpoint."""
    lines = []
    for k, rows in enumerate(out, 1):
        lines.append(f"θ_{k} ({run_dir}/checkpoints/task{k:02d}): weights over the LoRAs of tasks 1..{k}")
        for j, r in enumerate(rows, 1):
            lines.append(f"  task {j} {r['task']}: {r['inputs']} test inputs, mean {vector(r['mean'])}, "
                         f"> 0.5 on each {r['above_half']}; saved w̄_{j} {vector(r['saved'])}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tools/sapt_routing.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", metavar="RUN_DIR", help="a run directory of train.py --method sapt")
    args = parser.parse_args(argv)
    with exit_on_input_errors("tools/sapt_routing.py"):
        print(show(args.run, routing(args.run)))


if __name__ == "__main__":
    main()
