"""SEEKR's SuperNI protocol (Tables 2 and 3, Fig. 2b) on a small model, at a named scale; tables from the runs.

    python tools/paper_tables.py --model weights/smollm2-135m-instruct --data ../shared/data/superni \\
        --scale gpu --out runs/paper-gpu                 # the core: order3; SeqFT, Replay, DER++, SEEKR (1%), MTL
                                                         #   on seeds 0-2; general ability of SeqFT, Replay, SEEKR
    python tools/paper_tables.py ... --scale gpu --out runs/paper-gpu --orders order3,order4 \\
        --configs seqft,lwf,ewc,lfpt5,l2p,pp,olora,replay1,derpp1,seekr1,replay10,derpp10,seekr10,mtl   # all of it
    python tools/paper_tables.py ... --scale cpu --out runs/paper-cpu      # the core on a 2-core CPU

What is the paper's and what is cut: a Scale (SCALES) names the samples, epochs, test records and lengths; the rest
is the paper's: the configurations of Table 3 (CONFIGS), 1% replay as 10 samples a task and 10% as 100 (of the
paper's 1000), SEEKR's budgets in the paper's proportions of the model's layers and heads, the paper's λ's.
Every configuration × order × seed is one train.py run in a process of its own (one CPU thread; bf16 on a GPU),
beside the general-ability scorings, which are processes too. On the CPU one runs a core; on a GPU a short probe
(`probe`: SEEKR on the order's two longest tasks, a batch each) measures one run's peak memory and disk, and as
many start at once as fit (`pack`). A finished run is kept and skipped when the command is given again, so each
call adds its runs to those under --out; the tables are built from every run found there, from the runs' own
files, into --out:

    tables.md / tables.json   Table 3 (OP (BWT) per order, mean ± std over seeds) beside the paper's LLaMA-2-7B
                              numbers; Table 2 (each benchmark, GA, ΔGA) where general ability was scored; Fig. 2b
                              (1% against 10% replay); every run's R
    table3.png, table2.png, fig2b.png   the same with the seeds' std as error bars (with matplotlib)
"""
import argparse
import json
import os
import re
import resource
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_summary import CONFIGS, GENERAL, summarize  # noqa: E402
from real_experiment import KEEP, ROOT, flags, launch, remove  # noqa: E402

from minseekr.evaluation.data import ORDERS  # noqa: E402
from minseekr.methods.pet import attach_saved  # noqa: E402
from minseekr.network.checkpoint import load_hf, read_args  # noqa: E402
from minseekr.network.tokenizer import Tokenizer, find_tokenizer  # noqa: E402
from minseekr.run.config import preset  # noqa: E402
from minseekr.run.rundir import RunDir  # noqa: E402
from minseekr.runtime import atomic_write  # noqa: E402


@dataclass(frozen=True)
class Scale:
    """How much of the protocol a run does. The defaults are the paper's (Sec. 4.1, 4.3, Appendix B)."""
    tasks: tuple = ()                  # task prefixes kept of each order, in the order's own sequence (() = all 12)
    train_samples: int = 1000          # the first N training records of each task (the paper: 1000)
    test_samples: int = 100            # the first N test records scored (the paper: 100)
    epochs: int = 10                   # per task
    batch_size: int = 16               # × grad_accum = 128, the paper's batch
    grad_accum: int = 8
    lr: float = 1e-5
    max_len: int = 1536                # training tokens a sample keeps (1024 of prompt + 512 of answer)
    max_prompt_len: int = 1024
    max_new_tokens: int = 512
    replay: tuple = (10, 100)          # samples kept a task at "1%" and "10%": the paper's share of 1000
    general: str = "mmlu,boolq,piqa,gsm8k,bbh"   # Table 2's benchmarks (its TydiQA is not in minseekr/evaluation/general.py)
    general_samples: int = 0           # items per benchmark (0: all)
    general_max_new_tokens: int = 256
    general_batch: int = 16            # sequences per generation batch of GSM8K and BBH
    device: str = "cuda"


SCALES = {
    # All 12 tasks; 200 records a task (task1572 has 160) for 2 epochs, 25 steps of 16 a task, at lr 1e-4 (not
    # tuned: between the paper's 1e-5, for a 7B model and 80 steps of 128, and tools/real_experiment.py's 2e-4 for
    # six steps). 1% keeps 10 a task, 10% keeps 100: the paper's counts (5% and 50% of 200). The paper's prompt
    # length; 64 new tokens hold the 95th percentile of every task's gold answers (the longest: task1572's 59);
    # 32 test records a task, one generation batch. Budget: the core within 9 minutes on one H200, estimated, not
    # measured (no GPU was lent to the session that wrote it): README, "The paper's protocol".
    "gpu": Scale(train_samples=200, test_samples=32, epochs=2, grad_accum=1, lr=1e-4, max_len=1024,
                 max_new_tokens=64, general_samples=100, general_batch=64),
    # One task of three of the four types, the shortest of each (prompts of 43-107 tokens, answers of at most 7:
    # summarisation's 183-458 would cost 3-5 times as much), in each order's sequence; 32 records a task, one
    # epoch, batch 8 (four steps a task) at tools/real_experiment.py's lr, chosen there for SmolLM2 on these tasks.
    # 10% keeps all 32. General ability by BoolQ and PIQA alone, 32 items each: MMLU scores at least one item of
    # each of 57 subjects, GSM8K and BBH prompt with 800-2000 tokens of examples and generate 256, minutes a model
    # on one core. Budget: the core within 60 minutes on a 2-core machine, one single-thread run per core.
    "cpu": Scale(tasks=("task363", "task1510", "task591"), train_samples=32, test_samples=16, epochs=1,
                 batch_size=8, grad_accum=1, lr=2e-4, max_len=256, max_prompt_len=256, max_new_tokens=8,
                 replay=(10, 32), general="boolq,piqa", general_samples=32, device="cpu"),
    # The paper's protocol itself (hours of one H200 for the core; not run).
    "paper": Scale(),
}

# CONFIGS and GENERAL name the tables' rows, so they live in tools/paper_summary.py, which imports nothing of this file.
CORE = ("seqft", "replay1", "derpp1", "seekr1", "mtl")
SHARES = {"1%": 0.01, "10%": 0.1}


def budgets(share: str, n_layers: int, n_heads: int) -> dict:
    """SEEKR's settings at a replay share on a model of n_layers × n_heads: the paper's λ1, λ2 and B_T, and its B_L
    and B_H for LLaMA-2-7B's 32 × 32 in proportion (config.preset's column), to the nearest by Python's round:
    3/4 of SmolLM2's 30 layers is 22.5 → 22 (as tools/real_experiment.py), 1/4 is 7.5 → 8 (the paper's 8)."""
    paper = preset("paper", SHARES[share], 32)
    return dict(lambda1=paper["lambda1"], lambda2=paper["lambda2"], query_budget=paper["query_budget"],
                layer_budget=max(1, round(paper["layer_budget"] * n_layers / 32)),
                head_budget=max(1, round(paper["head_budget"] * n_layers * n_heads / (32 * 32))))


def sequence(order: str, scale: Scale, data) -> str:
    """train.py's --order for an order at this scale: its name, or its kept task folders in its sequence."""
    if not scale.tasks:
        return order
    names = [t for t in ORDERS[order][0] if t in scale.tasks]
    return ",".join(next(Path(data).glob(f"{t}_*")).name for t in names)


def command(scale: Scale, model, data, order: str, config: str, seed: int, out_dir, device: str,
            shape: tuple[int, int]) -> list[str]:
    """The train.py command of one run (`order` a name or task folders), on one CPU thread."""
    own = dict(CONFIGS[config][1])
    share = own.pop("share", "1%")
    settings = dict(train_samples=scale.train_samples, test_samples=scale.test_samples, epochs=scale.epochs,
                    batch_size=scale.batch_size, grad_accum=scale.grad_accum, lr=scale.lr, max_len=scale.max_len,
                    max_prompt_len=scale.max_prompt_len, max_new_tokens=scale.max_new_tokens,
                    replay_ratio=min(1.0, scale.replay[list(SHARES).index(share)] / scale.train_samples),
                    **budgets(share, *shape), seed=seed)
    settings.update(own)   # a PET method's learning rate
    on = ["--device", device, "--threads", "1"] + (["--dtype", "bfloat16"] if device == "cuda" else [])
    order = order if "," in order or order not in ORDERS else sequence(order, scale, data)
    return [sys.executable, str(ROOT / "train.py"), "--model", str(model), "--data", str(data), "--order", order,
            "--out", str(out_dir), *on, *flags(settings)]


# ---- child processes: the probe and a model's general ability ------------------------------------------------------

def probe_child(out_file: str, train_argv: list[str]):
    """train.py's run in this process, then its peak memory into `out_file`: on CUDA the allocator's peak, the
    context beside it and the device's memory; on the CPU the peak resident set and the memory available."""
    import train
    start = time.time()
    train.main(train_argv)
    if torch.cuda.is_initialized():
        free, total = torch.cuda.mem_get_info()
        figures = dict(peak_allocated=torch.cuda.max_memory_allocated(), peak=torch.cuda.max_memory_reserved(),
                       context=total - free - torch.cuda.memory_reserved(), capacity=total)
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        available = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        figures = dict(peak_allocated=rss, peak=rss, context=0,
                       capacity=int(available.group(1)) * 1024 if available else rss * os.cpu_count())
    Path(out_file).write_text(json.dumps({**figures, "seconds": time.time() - start}))


def general_child(spec: dict):
    """One model's general ability (minseekr/evaluation/general.py's score_general) into spec["out"]."""
    from minseekr.evaluation.general import score_general
    torch.set_num_threads(1)
    model = attach_saved(load_hf(spec["model"], dtype=torch.bfloat16 if spec["device"] == "cuda" else None,
                                 device=spec["device"]), spec["model"])
    result = score_general(model, Tokenizer(find_tokenizer(spec["model"])), spec["root"], spec["names"].split(","),
                           spec["samples"], spec["max_new_tokens"], progress=False, batch_size=spec["batch"])
    atomic_write(Path(spec["out"]), lambda tmp: tmp.write_text(json.dumps(result, indent=1)))


def general_ready() -> str:
    """"" when minseekr/evaluation/general.py offers score_general; else why the general-ability step is skipped."""
    try:
        import minseekr.evaluation.general as general
    except ImportError as e:
        return f"general ability skipped: minseekr/evaluation/general.py has no score_general yet ({e})"
    return "" if hasattr(general, "score_general") else \
        "general ability skipped: minseekr/evaluation/general.py has no score_general yet"


# ---- packing runs onto the device ----------------------------------------------------------------------------------

def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def probe(scale: Scale, model, data, order: str, out: Path, device: str, shape) -> dict:
    """One run's peak memory and disk, measured once per --out (probe.json): SEEKR (1%) on the order's two tasks
    with the longest prompts, one batch each (the second replays the first with its attention distilled)."""
    saved = out / "probe.json"
    key = json.loads(json.dumps(dict(scale=asdict(scale), device=device, model=str(Path(model).resolve()))))
    if saved.is_file() and (figures := json.loads(saved.read_text())).get("key") == key:
        return figures
    n = scale.batch_size * scale.grad_accum
    folders = sequence(order, replace(scale, tasks=scale.tasks or tuple(ORDERS[order][0])), data).split(",")
    longest = sorted(folders, key=lambda f: -max(len(r["prompt"]) for r in json.loads(
        (Path(data) / f / "train.json").read_text())[:n]))[:2]
    small = replace(scale, train_samples=max(n, scale.replay[0]), test_samples=1, epochs=1, max_new_tokens=1)
    run = RunDir(out / "probe")
    shutil.rmtree(run.root, ignore_errors=True)
    run.root.mkdir(parents=True)
    cmd = command(small, model, data, ",".join(f for f in folders if f in longest), "seekr1", 0, run.root, device,
                  shape)
    rc = launch([sys.executable, __file__, "--probe-child", str(run.root / "peak.json"), *cmd[2:]],
                out / "probe.log")
    if rc != 0:
        sys.exit(f"the probe failed (exit {rc}): see {out / 'probe.log'}")
    buffers = len(list(run.buffer.glob("task*.safetensors")))
    figures = dict(json.loads((run.root / "peak.json").read_text()), key=key, resume=du(run.resume),
                   checkpoint=du(run.checkpoint(0)), buffer=du(run.buffer) // max(1, buffers))
    shutil.rmtree(run.root)
    saved.write_text(json.dumps(figures, indent=1))
    return figures


MARGIN = 1.25   # on the probe's peak: a later batch may be longer than the probe's, a replayed one larger


def pack(figures: dict, n_tasks: int, keep: str, shares: set, disk_free: int, cores: int, n_jobs: int):
    """How many runs fit at once: by memory (MARGIN × the probe's peak + the context a process holds, within 90% of
    the device's), by disk (3 task checkpoints, or every one with --keep all, two resume points while the next is
    written, and the buffer: the probe's one task × the tasks × 10 for a 10% share), by cores; and why, in words."""
    footprint = MARGIN * figures["peak"] + figures["context"]
    by_memory = int(0.9 * figures["capacity"] // footprint)
    buffer = figures["buffer"] * n_tasks * (10 if "10%" in shares else 1)
    disk = (n_tasks + 1 if keep == "all" else 3) * figures["checkpoint"] + 2 * figures["resume"] + buffer
    by_disk = int(0.9 * disk_free // max(disk, 1))
    jobs = max(1, min(by_memory, by_disk, cores, n_jobs))
    GiB = 2**30
    return jobs, (f"{jobs} at a time: a run's peak {figures['peak'] / GiB:.2f} GiB (×{MARGIN}) + "
                  f"{figures['context'] / GiB:.2f} GiB beside it → {by_memory} in {figures['capacity'] / GiB:.0f} "
                  f"GiB; {disk / GiB:.1f} GiB of disk a run → {by_disk} in {disk_free / GiB:.0f} GiB free; "
                  f"{cores} cores; {n_jobs} to do")


def thin(run: RunDir):
    """While a run runs: remove its task checkpoints older than the newest two (the trainer reads only the newest:
    to score it, and LwF's teacher), so that runs side by side stay within the disk."""
    checkpoints = sorted((run.root / "checkpoints").glob("task*"))
    for path in checkpoints[:-2]:
        shutil.rmtree(path, ignore_errors=True)


# ---- the runs ------------------------------------------------------------------------------------------------------

def run_job(a, scale: Scale, out: Path, order: str, config: str, seed: int, shape) -> str:
    """One run (skipped if it finished before), then its general ability where Table 2 has its row; the finished
    run's resume point and the checkpoints --keep does not keep removed. What happened, in words."""
    run, said = RunDir(out / order / f"seed{seed}" / config), []
    log = run.root.parent / f"{config}.log"
    if not run.results.is_file():
        shutil.rmtree(run.root, ignore_errors=True)   # an interrupted run starts over: its settings are ours
        run.root.mkdir(parents=True)
        start = time.time()
        rc = launch(command(scale, a.model, a.data, order, config, seed, run.root, a.device, shape), log,
                    None if a.keep == "all" else lambda: thin(run))
        if rc != 0:   # a failed run keeps every file, to be read; the next command starts it over
            return f"FAILED (exit {rc}), see {log}"
        said.append(f"{(time.time() - start) / 60:.1f} min")
    last = max((run.root / "checkpoints").glob("task*"), default=None)
    general = run.root / "general.json"
    if config in GENERAL and a.score_general and not general.is_file():
        if last is None:
            return "; ".join(said + ["no checkpoint left to score its general ability (--keep none before)"])
        said.append(score_job(a, scale, last, general, run.root.parent / f"{config}-general.log"))
        if "FAILED" in said[-1]:   # the run keeps its checkpoints, to be scored by the next command
            return "; ".join(said)
    checkpoints = sorted((run.root / "checkpoints").glob("task*"))
    removed = remove(run, {"all": checkpoints, "last": checkpoints[-1:], "none": []}[a.keep])
    return "; ".join(said + [removed]) if said or removed else "done before"


def score_job(a, scale: Scale, model_dir: Path, out_file: Path, log: Path) -> str:
    """A model's general ability into `out_file`, by a process of its own; what happened, in words."""
    spec = dict(model=str(model_dir), out=str(out_file), device=a.device, names=scale.general, root=a.general_data,
                samples=scale.general_samples, max_new_tokens=scale.general_max_new_tokens, batch=scale.general_batch)
    start = time.time()
    rc = launch([sys.executable, __file__, "--general-child", json.dumps(spec)], log)
    return f"general ability FAILED (exit {rc}), see {log}" if rc else \
        f"general ability {(time.time() - start) / 60:.1f} min"


# ---- the command ---------------------------------------------------------------------------------------------------

def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", required=True, help="an HF model directory (SmolLM2-135M-Instruct: convert_gguf.py)")
    parser.add_argument("--data", required=True, help="the SuperNI folder (../shared/data/superni)")
    parser.add_argument("--scale", required=True, choices=list(SCALES), help="how much of the protocol (SCALES)")
    parser.add_argument("--out", required=True, help="where the runs and the tables go")
    parser.add_argument("--orders", default="order3", help="comma-separated: order3, order4 (default: order3)")
    parser.add_argument("--configs", default=",".join(CORE), help=f"comma-separated, among {', '.join(CONFIGS)} "
                        f"(default: the core, {','.join(CORE)})")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--device", default="", choices=["", "cuda", "cpu"],
                        help="the runs' device (default: the scale's; cpu runs the gpu scale on the CPU, to test it)")
    parser.add_argument("--jobs", type=int, default=0, help="runs at a time (default 0: as many as fit, `pack`)")
    parser.add_argument("--keep", default="last", choices=list(KEEP), help="the task checkpoints a finished run "
                        "keeps (default: last, after its general ability); with last or none a run keeps only its "
                        "newest two while it runs")
    parser.add_argument("--general-data", default="", help="the general-ability benchmarks (default: "
                        "../shared/data/general beside the project)")
    a = parser.parse_args(argv)
    a.orders, a.configs, a.seeds = a.orders.split(","), a.configs.split(","), [int(s) for s in a.seeds.split(",")]
    for name, given, known in (("--orders", a.orders, ("order3", "order4")), ("--configs", a.configs, CONFIGS)):
        if unknown := [x for x in given if x not in known]:
            parser.error(f"{name}: unknown {', '.join(unknown)}; expected some of {', '.join(known)}")
    for path, what in ((a.model, "config.json"), (a.data, "task363_sst2_polarity_classification")):
        if not (Path(path) / what).exists():
            parser.error(f"{Path(path) / what} not found")
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe-child"]:
        return probe_child(argv[1], argv[2:])
    if argv[:1] == ["--general-child"]:
        return general_child(json.loads(argv[1]))
    a, start = parse(argv), time.time()
    scale, out = SCALES[a.scale], Path(a.out)
    a.device = a.device or scale.device
    out.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps({**asdict(scale), "scale": a.scale, "device": a.device}))
    written = out / "scale.json"
    if written.is_file() and json.loads(written.read_text()) != settings:   # one table, one scale
        sys.exit(f"{out} holds runs at another scale or device ({written}): give another --out")
    written.write_text(json.dumps(settings, indent=1))
    args = read_args(a.model)
    shape = (args.n_layers, args.n_heads)
    # Table 2's step: skipped, with a message, where minseekr/evaluation/general.py cannot score yet
    a.score_general = bool(scale.general and set(a.configs) & set(GENERAL))
    if a.score_general and (skipped := general_ready()):
        print(skipped)
        a.score_general = False
    if a.score_general:
        from minseekr.evaluation.general import data_root
        a.general_data = str(data_root(a.general_data))
    jobs = [(o, c, s) for o in a.orders for c in a.configs for s in a.seeds]
    base = out / "general-base.json"
    todo = [j for j in jobs if not RunDir(out / j[0] / f"seed{j[2]}" / j[1]).results.is_file()]
    n_jobs = len(todo) + (a.score_general and not base.is_file())
    n_tasks = len(scale.tasks) or len(ORDERS["order3"][0])
    workers, why = a.jobs, f"{a.jobs} at a time (--jobs)" if n_jobs else "nothing to run"
    if not workers and n_jobs and a.device == "cpu":   # one single-thread run a core
        workers, why = min(os.cpu_count(), n_jobs), f"{min(os.cpu_count(), n_jobs)} at a time: one a core"
    elif not workers and n_jobs:
        figures = probe(scale, a.model, a.data, a.orders[0], out, a.device, shape)
        shares = {CONFIGS[c][1].get("share", "1%") for _, c, _ in todo}
        workers, why = pack(figures, n_tasks, a.keep, shares, shutil.disk_usage(out).free, os.cpu_count(), n_jobs)
    print(f"scale {a.scale} on {a.device}: {scale}\n{len(jobs)} runs ({len(todo)} to do), {why}; logs in "
          f"{out}/<order>/seed*/<configuration>.log", flush=True)
    failed = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        done = {}
        if a.score_general and not base.is_file():   # θ_0's general ability, once, beside the runs
            done[pool.submit(score_job, a, scale, Path(a.model), base, out / "general-base.log")] = "θ_0 general"
        for o, c, s in jobs:
            done[pool.submit(run_job, a, scale, out, o, c, s, shape)] = f"{o} {c} seed {s}"
        for n, future in enumerate(as_completed(done), 1):
            said = future.result()
            failed += [f"{done[future]}: {said}"] if "FAILED" in said else []
            print(f"[{n}/{len(done)}] {done[future]}: {said}", flush=True)
    print(summarize(out))
    used = resource.getrusage(resource.RUSAGE_CHILDREN)   # what the runs cost, whatever else shared the machine
    print(f"wall time: {(time.time() - start) / 60:.1f} min; the processes' CPU time "
          f"{(used.ru_utime + used.ru_stime) / 60:.1f} min; tables and figures in {out}")
    if failed:
        sys.exit("failed:\n  " + "\n  ".join(failed))


if __name__ == "__main__":
    main()
