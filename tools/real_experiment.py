"""SEEKR and its baselines on a real language model, on a CPU: SmolLM2-135M-Instruct on three SuperNI tasks.

    python tools/convert_gguf.py SmolLM2-135M-Instruct.Q4_1.gguf weights/smollm2      # once (README)
    python tools/real_experiment.py --model weights/smollm2 --data ../shared/data/superni --out runs/real
    python tools/real_experiment.py ... --configs seekr,seekr-random --seeds 0,1 --tag ablations   # a subset

Every configuration × seed is one `train.py` run in its own process on one thread, `--jobs` at a time (default:
one per core; on a small CPU two threads in one process make every small op several times slower than one). A
finished run (its results.json) is kept and skipped when the command is given again, so an interrupted
experiment continues where it stopped. A finished run's resume point is removed (a finished run never resumes),
and `--keep` says which of its task checkpoints stay (each a full model, ~0.5 GB for SmolLM2-135M): every one by
default, so that `eval.py RUN` re-scores the run; SeqFT always keeps θ_1 ... θ_T, the grafting's models. Each
removal is printed. Then, from the runs' own files, it writes into --out:

    summary.md / summary.json   OP and BWT (mean ± std over seeds), each run's R matrix, the wall times
                                (summary-TAG.md etc. with --tag)
    results.png                 OP and BWT per configuration, with the seeds' std as error bars
    grafting.md / grafting.png  Fig. 1: the final SeqFT model with an earlier task model's attention maps grafted
                                in at inference (every head; SEEKR's selected heads; as many random heads)
    seed*/seekr/importance.png  Fig. 5 with the selected heads marked

The task order (ORDER) and the settings (SETTINGS) are the experiment: read their comments before changing them.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minseekr.evaluation.data import load_sequence  # noqa: E402
from minseekr.evaluation.metrics import format_matrix  # noqa: E402
from minseekr.evaluation.scoring import evaluate  # noqa: E402
from minseekr.network.checkpoint import load_hf  # noqa: E402
from minseekr.network.tokenizer import Tokenizer, find_tokenizer  # noqa: E402
from minseekr.run.demo import draw_importance  # noqa: E402
from minseekr.run.rundir import RunDir  # noqa: E402
from minseekr.seekr.grafting import Grafted  # noqa: E402
from minseekr.seekr.heads import random_heads  # noqa: E402

# The task order: short prompts (median 102, 84 and 43 tokens with the SmolLM2 tokenizer), three task types
# (information extraction, classification, question answering) whose answers conflict in form: "word1 Relation
# word2", then a label (POS or NEG), then a free-form science answer. Chosen on seed 100 (not reported): in six
# steps the model learns relation extraction's format well (ROUGE-L 0 -> ~66), and SeqFT then loses half of it.
ORDER = ["task1510_evalution_relation_extraction", "task363_sst2_polarity_classification",
         "task591_sciq_answer_generation"]

# CPU-sized: 48 training and 20 test records per task, one epoch, batch 8 (six steps a task), no sample cut (the
# longest is 127 + 6 tokens), answers of at most 8 new tokens (every gold answer here is shorter). lr 2e-4 chosen
# on seed 100 between 1e-4 (SeqFT forgets nothing in six steps) and 3e-4. Replay keeps 10 samples a task (the
# count of the paper's 1% of 1000); `replay-all` keeps every sample (4.8×: the paper's "SEEKR at 1% ≈ Replay at
# 10%"). SEEKR's budgets are the paper's proportions of LLaMA-2-7B's 32 layers × 32 heads for SmolLM2's 30 × 9:
# B_L = 24/32 → 22 layers, B_H = 128/1024 → 34 heads; B_T = 100 as the paper (every row of these samples); λ1 as
# the paper; λ2 = 1e2, the paper's value at ratios of 10% or more (10 of 48 is 21%), not tuned.
SETTINGS = dict(train_samples=48, test_samples=20, epochs=[1], batch_size=8, lr=2e-4, max_len=256,
                max_new_tokens=8, replay_ratio=10 / 48, lambda1=0.5, lambda2=1e2, layer_budget=22, head_budget=34,
                query_budget=100)

# The compared configurations: the methods of Table 1, Table 4's head-scoring ablations and more replay.
CONFIGS = {
    "seqft": dict(method="seqft"),
    "replay": dict(method="replay"),
    "derpp": dict(method="derpp"),
    "seekr": dict(method="seekr"),
    "mtl": dict(method="mtl"),
    "seekr-random": dict(method="seekr", head_score="random"),
    "seekr-sensitivity": dict(method="seekr", head_score="sensitivity"),
    "seekr-forgettability": dict(method="seekr", head_score="forgettability"),
    "replay-all": dict(method="replay", replay_ratio=1.0),
    # Two parameter-efficient methods (#13), the model frozen, each with its authors' defaults (olora.py, sapt.py)
    # and O-LoRA's lr, 1e-3, for both (SAPT's 5e-5 is for 50 epochs, not six steps); not tuned. SAPT replays
    # its own released pseudo-inputs (../sapt-pseudo beside --data).
    "olora": dict(method="olora", lr=1e-3),
    "sapt": dict(method="sapt", lr=1e-3, pseudo_inputs="released"),
    # SAPT without ARM: whether ARM's pull is what keeps every input on the first task's LoRA (tools/sapt_routing.py)
    "sapt-noarm": dict(method="sapt", lr=1e-3, pseudo_inputs="released", arm_weight=0.0),
}


def flags(settings: dict) -> list[str]:
    """train.py's command-line flags for a dict of its settings."""
    out = []
    for key, value in settings.items():
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        out += [f"--{key.replace('_', '-')}", text]
    return out


def command(model, data, out_dir, config: str, seed: int) -> list[str]:
    """The train.py command of one run, on one thread."""
    settings = {**SETTINGS, **CONFIGS[config], "seed": seed}
    if settings.get("pseudo_inputs") == "released":
        settings["pseudo_inputs"] = str(Path(data).parent / "sapt-pseudo")
    return [sys.executable, str(ROOT / "train.py"), "--model", str(model), "--data", str(data),
            "--order", ",".join(ORDER), "--out", str(out_dir), "--device", "cpu", "--threads", "1", *flags(settings)]


# What --keep keeps of a finished run's task checkpoints (its resume point is always removed).
KEEP = {"all": "every task checkpoint (eval.py RUN re-scores the run)",
        "last": "the last task's checkpoint (eval.py --model RUN/checkpoints/taskNN scores the final model)",
        "none": "no task checkpoint"}


def run_one(model, data, out: Path, config: str, seed: int, keep: str = "all") -> tuple[str, int, float, str, str]:
    """One run (skipped if it finished before): (config, seed, minutes, error or "", what was removed or "")."""
    run = RunDir(out / f"seed{seed}" / config)
    if run.results.is_file():
        return config, seed, 0.0, "", ""
    shutil.rmtree(run.root, ignore_errors=True)   # an interrupted run starts over: its settings are ours
    run.root.mkdir(parents=True)
    start = time.time()
    log = run.root.parent / f"{config}.log"
    rc = launch(command(model, data, run.root, config, seed), log)
    if rc != 0:   # a failed run keeps every file, to be read; the next command starts it over
        return config, seed, (time.time() - start) / 60, f"exit {rc}, see {log}", ""
    return config, seed, (time.time() - start) / 60, "", prune(run, config, keep)


def launch(cmd: list[str], log: Path, while_running=None) -> int:
    """`cmd` in a process of its own on one CPU thread, its output into `log`; `while_running()` is called every
    few seconds until the process ends; its exit code."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(log, "w") as out, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env) as process:
        try:
            while True:
                try:
                    return process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    if while_running:
                        while_running()
        except BaseException:   # interrupted: the run goes with the command
            process.kill()
            raise


def prune(run: RunDir, config: str, keep: str) -> str:
    """Remove a finished run's resume point and the task checkpoints that `keep` does not keep (SeqFT keeps
    θ_1 ... θ_T, the grafting's models); returns what was removed, in words ("" for nothing)."""
    checkpoints = sorted((run.root / "checkpoints").glob("task*"))
    kept = {"all": checkpoints, "last": checkpoints[-1:], "none": []}[keep]
    if config == "seqft":
        kept = [c for c in checkpoints if c in kept or c.name != "task00"]
    return remove(run, kept)


def remove(run: RunDir, kept) -> str:
    """Remove a run's resume point and every task checkpoint not in `kept`; what was removed, in words ("" for
    nothing)."""
    checkpoints = sorted((run.root / "checkpoints").glob("task*"))
    removed = [p for p in (run.resume, *checkpoints) if p.exists() and p not in kept]
    if not removed:
        return ""
    size = sum(f.stat().st_size for p in removed for f in p.rglob("*") if f.is_file())
    for path in removed:
        shutil.rmtree(path)
    return f"removed {', '.join(f'{p.relative_to(run.root)}/' for p in removed)} ({size / 1e9:.2f} GB)"


def keeping(model, out: Path, jobs, keep: str) -> str:
    """What `keep` keeps of the runs still to do, in words, with the disk it takes."""
    todo = [c for c, s in jobs if not RunDir(out / f"seed{s}" / c).results.is_file()]
    per_run = {"all": len(ORDER) + 1, "last": 1, "none": 0}[keep]
    n = sum(max(per_run, len(ORDER)) if c == "seqft" else per_run for c in todo)
    size = sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) / 1e9
    seqft = "" if keep == "all" else f"; SeqFT keeps θ_1 ... θ_{len(ORDER)}, the grafting's models"
    return (f"--keep {keep}: each finished run keeps {KEEP[keep]} and loses its resume/{seqft}; the {len(todo)} "
            f"runs to do will keep up to {n} checkpoints of {size:.2f} GB ({n * size:.1f} GB)")


def over_seeds(seeds) -> str:
    """What a number over `seeds` is: a mean ± std, or with one seed that seed's value."""
    return f"mean ± std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"


def spread(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def summarize(out: Path, configs, seeds, minutes: dict, tag: str = "") -> str:
    """summary.md and summary.json from the runs' results.json, and results.png (`-tag` after each name when
    given); returns the markdown."""
    results = {c: [json.loads(RunDir(out / f"seed{s}" / c).results.read_text()) for s in seeds] for c in configs}
    lines = [f"## OP and BWT (%, {over_seeds(seeds)})", "",
             "| configuration | OP | BWT | " + " | ".join(f"seed {s} OP / BWT" for s in seeds) + " |",
             "|---|---|---|" + "---|" * len(seeds)]
    for c, runs in results.items():
        cells = [f"{r['OP']:.1f}" + (f" / {r['BWT']:.1f}" if r["BWT"] is not None else "") for r in runs]
        lines.append(f"| {c} | {spread([r['OP'] for r in runs])} | {spread([r['BWT'] for r in runs])} | "
                     + " | ".join(cells) + " |")
    lines += ["", "## Each run's R[i][j]: score on task j after task i (row θ_0: before training)", ""]
    for c, runs in results.items():
        for s, r in zip(seeds, runs):
            rows = ["all tasks"] if c == "mtl" else None
            lines += [f"{c}, seed {s}:", "```", "θ_0 " + "  ".join(f"{b:.2f}" for b in r["base"]),
                      format_matrix(r["R"], [t.split("_")[0] for t in r["tasks"]], row_names=rows), "```"]
    if minutes:
        lines += ["", "Wall time of the runs (minutes, one thread each): "
                      + ", ".join(f"{c} {statistics.mean(m):.1f}" for c, m in minutes.items())]
    text = "\n".join(lines) + "\n"
    suffix = f"-{tag}" if tag else ""
    (out / f"summary{suffix}.md").write_text(text)
    (out / f"summary{suffix}.json").write_text(json.dumps(results, indent=1))
    figure(draw_results, out / f"results{suffix}.png", results, seeds)
    for s, r in zip(seeds, results.get("seekr", [])):
        draw_importance(out / f"seed{s}" / "seekr", r["heads"])
    return text


def figure(draw, path: Path, *args):
    """A PNG, when matplotlib (an optional extra: pip install -e .[tools]) is installed."""
    try:
        draw(path, *args)
    except ImportError:
        print(f"(pip install matplotlib, or -e .[tools], to draw {path.name})")


def bars(results: dict, key: str, seeds) -> tuple[list[float], list[float] | None, str]:
    """One panel of results.png: each configuration's mean `key`, the seeds' std as error bars (None with one
    seed: no error bar), the title."""
    values = [[r[key] for r in runs if r[key] is not None] for runs in results.values()]
    means = [statistics.mean(v) if v else 0.0 for v in values]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values] if len(seeds) > 1 else None
    return means, stds, f"{key}, {over_seeds(seeds)}"


def draw_results(path: Path, results: dict, seeds):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key in zip(axes, ("OP", "BWT")):
        means, stds, title = bars(results, key, seeds)
        ax.bar(range(len(names)), means, yerr=stds, capsize=3 if stds else 0, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set(ylabel=f"{key} (%)", title=title)
        ax.axhline(0, color="black", linewidth=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def graft_seed(model, data, out: Path, seed: int) -> list[dict]:
    """Fig. 1 for one seed: each earlier task j scored by the final SeqFT model with θ_j's maps grafted in."""
    torch.set_num_threads(1)
    seqft, seekr = RunDir(out / f"seed{seed}" / "seqft"), RunDir(out / f"seed{seed}" / "seekr")
    done, chosen = json.loads(seqft.results.read_text()), json.loads(seekr.results.read_text())["heads"]
    tok = Tokenizer(find_tokenizer(model))
    tasks, _ = load_sequence(ORDER, data)
    final = load_hf(seqft.checkpoint(len(ORDER)))
    args = final.args
    gen = torch.Generator().manual_seed(seed)
    heads = {"every head": [(l, h) for l in range(args.n_layers) for h in range(args.n_heads)],
             "SEEKR's selected heads": [tuple(h) for h in chosen],
             "as many random heads": random_heads(args.n_layers, args.n_heads, len(chosen), gen)}
    rows = []
    for j, task in enumerate(tasks[:-1]):
        task.test = task.test[:SETTINGS["test_samples"]]
        source = load_hf(seqft.checkpoint(j + 1))
        row = {"seed": seed, "task": task.name, "after the task": done["R"][j][j], "final": done["R"][-1][j]}
        for name, picked in heads.items():
            row[f"final + {name}"] = evaluate(Grafted(final, source, picked), tok, task,
                                              max_new_tokens=SETTINGS["max_new_tokens"])
        rows.append(row)
    return rows


def grafting(model, data, out: Path, seeds, jobs: int) -> str:
    """grafting.md and grafting.png over the seeds; returns the markdown."""
    with get_context("spawn").Pool(min(jobs, len(seeds))) as pool:
        rows = [r for part in pool.starmap(graft_seed, [(model, data, out, s) for s in seeds]) for r in part]
    columns = ["after the task", "final", "final + every head", "final + SEEKR's selected heads",
               "final + as many random heads"]

    lines = ["## Attention grafting (Fig. 1): earlier tasks scored by the final SeqFT model", "",
             "| task | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for task in ORDER[:-1]:
        mine = [r for r in rows if r["task"] == task]
        lines.append(f"| {task.split('_')[0]} | " + " | ".join(spread([r[c] for r in mine]) for c in columns)
                     + " |")
    lines += ["", f"({over_seeds(seeds)}; 'after the task' is θ_j on its own task j)"]
    text = "\n".join(lines) + "\n"
    (out / "grafting.md").write_text(text)
    (out / "grafting.json").write_text(json.dumps(rows, indent=1))
    figure(draw_grafting, out / "grafting.png", rows, columns, seeds)
    return text


def draw_grafting(path: Path, rows, columns, seeds):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(columns)
    for c, column in enumerate(columns):
        values = [[r[column] for r in rows if r["task"] == t]
                  for t in ORDER[:-1]]
        stds = [statistics.stdev(v) for v in values] if len(seeds) > 1 else None   # one seed: no error bars
        ax.bar([i + c * width for i in range(len(values))], [statistics.mean(v) for v in values], width,
               yerr=stds, capsize=2 if stds else 0, label=column)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ORDER) - 1)], [t.split("_")[0] for t in ORDER[:-1]])
    ax.set(ylabel="score (%)", title=f"earlier tasks after sequential fine-tuning, with grafted attention "
                                     f"({over_seeds(seeds)})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", required=True, help="SmolLM2-135M-Instruct as an HF directory (convert_gguf.py)")
    parser.add_argument("--data", required=True, help="the SuperNI folder (../shared/data/superni)")
    parser.add_argument("--out", default="runs/real", help="where the runs and the summary go")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (settings were chosen on 100)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated configurations")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="runs at a time, one thread each")
    parser.add_argument("--tag", default="", help="written as summary-TAG.md (etc.), beside other summaries")
    parser.add_argument("--keep", default="all", choices=list(KEEP),
                        help="which task checkpoints a finished run keeps (default: all): all, every one (eval.py "
                             "re-scores the run); last, the final model's; none. SeqFT always keeps θ_1 ... θ_T "
                             "(the grafting's models); a finished run's resume point is always removed")
    a = parser.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    configs = a.configs.split(",")
    if unknown := [c for c in configs if c not in CONFIGS]:
        parser.error(f"--configs: unknown {', '.join(unknown)}; expected some of {', '.join(CONFIGS)}")
    for path, what in ((a.model, "config.json"), (a.data, ORDER[0])):
        if not (Path(path) / what).exists():
            parser.error(f"{Path(path) / what} not found")
    out = Path(a.out)
    start, minutes, failed = time.time(), {}, []
    jobs = [(c, s) for c in configs for s in seeds]   # a configuration over every seed before the next
    print(f"{len(jobs)} runs, {a.jobs} at a time; logs in {out}/seed*/<configuration>.log")
    print(keeping(a.model, out, jobs, a.keep))
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        for n, (config, seed, took, error, removed) in enumerate(
                pool.map(lambda job: run_one(a.model, a.data, out, *job, keep=a.keep), jobs), 1):
            if error:
                failed.append(f"{config} seed {seed}: {error}")
            elif took:
                minutes.setdefault(config, []).append(took)
            done = error or (f"{took:.1f} min" if took else "done before")
            print(f"[{n}/{len(jobs)}] {config} seed {seed}: {done}" + (f"; {removed}" if removed else ""), flush=True)
    if failed:
        sys.exit("failed runs:\n  " + "\n  ".join(failed))
    print(summarize(out, configs, seeds, minutes, a.tag))
    if {"seqft", "seekr"} <= set(configs):
        print(grafting(a.model, a.data, out, seeds, a.jobs))
    print(f"wall time: {(time.time() - start) / 60:.1f} min; summaries and figures in {out}")


if __name__ == "__main__":
    main()
