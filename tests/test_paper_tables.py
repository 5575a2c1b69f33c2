"""tools/paper_tables.py: the paper's SuperNI protocol at a scale. Its commands carry the paper's settings, the
runs are packed by what a probe measured, and the tables come from the runs' own files (here the gpu scale cut
down to stories260K, three tasks and a few records, run on the CPU)."""
import importlib.util
import json
import os
import re
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import ROOT, shared_path

from minseekr.run.config import ContinualConfig, RunConfig, from_flags, parser_for
from minseekr.run.demo import PET_SETTINGS
from minseekr.run.rundir import RunDir

sys.path.insert(0, str(ROOT / "tools"))
import paper_summary as ps  # noqa: E402
import paper_tables as pt  # noqa: E402

SUPERNI = ("task363_sst2_polarity_classification", "task1510_evalution_relation_extraction",
           "task591_sciq_answer_generation")


def parsed(argv):
    ns = parser_for("train.py", "", RunConfig, ContinualConfig).parse_args(argv[2:])
    return from_flags(RunConfig, ns), from_flags(ContinualConfig, ns)


# SmolLM2-135M: 30 layers × 9 heads. LLaMA-2-7B's budgets (32 × 32: B_L 24, or 8 at 10%; B_H 128) in proportion,
# and the paper's λ2 (1e3 at 1%, 1e2 at 10%); the replay counts are 10 and 100 of the gpu scale's 200 records.
PAPER_AT = {"1%": dict(replay_ratio=0.05, lambda2=1e3, layer_budget=22),
            "10%": dict(replay_ratio=0.5, lambda2=1e2, layer_budget=8)}


@pytest.mark.parametrize("config", list(pt.CONFIGS))
def test_each_gpu_command_is_train_py_on_cuda_with_the_papers_settings(config):
    run, cfg = parsed(pt.command(pt.SCALES["gpu"], "MODEL", "DATA", "order3", config, 7, "OUT", "cuda", (30, 9)))
    assert (run.device, run.dtype, run.threads, run.order) == ("cuda", "bfloat16", 1, "order3")
    assert (run.train_samples, run.test_samples) == (200, 32)
    assert (cfg.epochs, cfg.batch_size, cfg.grad_accum, cfg.max_len, cfg.max_new_tokens) == ([2], 16, 1, 1024, 64)
    assert (cfg.lambda1, cfg.head_budget, cfg.query_budget, cfg.seed) == (0.5, 34, 100, 7)
    want = PAPER_AT["10%" if config.endswith("10") else "1%"]
    assert {k: getattr(cfg, k) for k in want} == want
    method = pt.CONFIGS[config][1]["method"]
    assert cfg.method == method
    assert cfg.lr == PET_SETTINGS.get(method, {}).get("lr", 1e-4)


def test_a_cpu_command_runs_one_thread_in_fp32_on_each_orders_own_sequence():
    run, cfg = parsed(pt.command(pt.SCALES["cpu"], "MODEL", shared_path("data", "superni"), "order4", "seekr1", 0,
                                 "OUT", "cpu", (30, 9)))
    assert (run.device, run.dtype, run.threads, run.train_samples) == ("cpu", "", 1, 32)
    assert run.order == ",".join([SUPERNI[2], SUPERNI[0], SUPERNI[1]])      # order4: 591 → 363 → 1510
    assert pt.sequence("order3", pt.SCALES["cpu"], shared_path("data", "superni")) == ",".join(SUPERNI)
    assert cfg.replay_ratio == 10 / 32


def paper_rows(text: str, start: str, end: str) -> dict:
    """{row name: its numbers} between two lines of the paper's text."""
    block = text[text.index(start):text.index(end, text.index(start))]
    return {line.split("\t")[0]: [float(x) for x in re.findall(r"-?\d+\.\d+", line)]
            for line in block.splitlines()[1:] if "\t" in line}


def test_the_papers_numbers_are_its_tables_as_printed():
    text = shared_path("paper", "seekr-paper.txt").read_text()
    table3 = paper_rows(text, "\tOrder3\tOrder4", "Table 3:")
    names = {"SeqFT": "seqft", "LwF": "lwf", "LFPT5": "lfpt5", "L2P": "l2p", "PP": "pp", "O-LoRA": "olora",
             "Replay (1%)": "replay1", "DER++ (1%)": "derpp1", "SEEKR (1%)": "seekr1"}
    assert len(table3) == len(names) + 1                     # and MTL, printed "61\t.27" across the two columns
    for row, config in names.items():
        assert [*ps.PAPER_TABLE3[config]["order3"], *ps.PAPER_TABLE3[config]["order4"]] == table3[row]
    assert ps.PAPER_TABLE3["mtl"] == {"order3": (61.27, None), "order4": (61.27, None)}
    table2 = paper_rows(text, "\tMMLU\tGSM", "Vicuna-7B-v1.5")
    columns = ("mmlu", "gsm8k", "bbh", "tydiqa", "boolq", "piqa", "GA")
    for row, key in (("LLaMA-2-7B-Chat", "θ_0"), ("SeqFT", "seqft"), ("Replay (1%)", "replay1"),
                     ("SEEKR (1%)", "seekr1")):
        assert [ps.PAPER_TABLE2[key][c] for c in columns] == table2[row][:7]


def test_runs_are_packed_by_the_probes_memory_the_disk_and_the_cores():
    GiB = 2**30
    figures = dict(peak=8 * GiB, context=GiB // 2, capacity=140 * GiB, checkpoint=GiB // 4, resume=3 * GiB // 2,
                   buffer=GiB // 16)
    # memory: 1.25 × 8 + 0.5 = 10.5 GiB a run, 0.9 × 140 / 10.5 = 12; disk: 3 × 0.25 + 2 × 1.5 + 12 × 1/16
    # = 4.5 GiB a run, 0.9 × 70 / 4.5 = 14
    jobs, why = pt.pack(figures, 12, "last", {"1%"}, 70 * GiB, 16, 15)
    assert jobs == 12 and why.startswith("12 at a time") and "→ 12 in 140 GiB" in why and "→ 14 in 70 GiB" in why
    # every checkpoint kept (13 × 0.25) and 10% buffers (× 10): 3.25 + 3 + 7.5 = 13.75 GiB a run → 4
    assert pt.pack(figures, 12, "all", {"1%", "10%"}, 70 * GiB, 16, 15)[0] == 4
    assert pt.pack(figures, 12, "last", {"1%"}, 70 * GiB, 2, 15)[0] == 2           # one run a core
    assert pt.pack(dict(figures, peak=200 * GiB), 12, "last", {"1%"}, 70 * GiB, 2, 15)[0] == 1


def test_a_running_run_keeps_its_newest_two_checkpoints(tmp_path):
    run = RunDir(tmp_path / "run")
    for k in range(5):
        (run.checkpoint(k)).mkdir(parents=True)
    pt.thin(run)
    assert sorted(p.name for p in (run.root / "checkpoints").iterdir()) == ["task03", "task04"]


def test_the_probe_measures_one_runs_peak_and_disk_once(tmp_path):
    model, data = shared_path("artifacts", "stories260K-hf"), shared_path("data", "superni")
    figures = pt.probe(tiny_gpu_scale(), model, data, "order3", tmp_path, "cpu", (5, 8))
    assert min(figures[k] for k in ("peak", "capacity", "checkpoint", "resume", "buffer")) > 0
    log = (tmp_path / "probe.log").read_text()                # SEEKR on the two tasks with the longest prompts
    assert "task363" in log and "task1510" in log and "task591" not in log
    assert not (tmp_path / "probe").exists()
    stamp = (tmp_path / "probe.json").stat().st_mtime_ns      # measured once per --out and scale
    assert pt.probe(tiny_gpu_scale(), model, data, "order3", tmp_path, "cpu", (5, 8)) == figures
    assert (tmp_path / "probe.json").stat().st_mtime_ns == stamp


def test_without_general_py_the_general_ability_step_is_skipped_with_a_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "minseekr.evaluation.general", None)          # as before general.py was written
    assert pt.general_ready().startswith("general ability skipped: minseekr/evaluation/general.py has no score_general yet")


def tiny_gpu_scale():
    """The gpu scale cut down for stories260K (5 layers × 8 heads) on the CPU: three tasks, a few records."""
    return replace(pt.SCALES["gpu"], tasks=("task363", "task1510", "task591"), train_samples=4, test_samples=2,
                   epochs=1, batch_size=2, max_len=128, max_prompt_len=96, max_new_tokens=4, replay=(1, 2),
                   general="boolq,piqa", general_samples=2, general_batch=2)


def plant(out: Path, runs, general) -> dict:
    """Overwrite the runs' results (OP, BWT_T, BWT) and general ability with numbers of our own; returns them."""
    planted = {}
    for n, (config, seed) in enumerate(runs):
        run = RunDir(out / "order3" / f"seed{seed}" / config)
        r = json.loads(run.results.read_text())
        r.update(OP=10.0 + 7 * n + seed, BWT_T=None if config == "mtl" else -3.0 - n * seed, BWT=-99.0)
        run.results.write_text(json.dumps(r))
        planted[config, seed] = r
        if config in general:
            g = json.loads((run.root / "general.json").read_text())
            g["scores"]["boolq"]["score"], g["scores"]["piqa"]["score"] = 40.0 + n + seed, 60.0 - seed
            (run.root / "general.json").write_text(json.dumps(g))
            planted[config, seed, "general"] = g
    return planted


def test_the_gpu_profile_runs_on_the_cpu_and_its_tables_come_from_the_runs(tmp_path, monkeypatch, capsys):
    model, data = shared_path("artifacts", "stories260K-hf"), shared_path("data", "superni")
    monkeypatch.setitem(pt.SCALES, "gpu", tiny_gpu_scale())
    out, seeds, configs = tmp_path / "paper", [0, 1], ["seqft", "replay1", "seekr1", "seekr10", "mtl"]
    argv = ["--model", str(model), "--data", str(data), "--scale", "gpu", "--device", "cpu", "--out", str(out),
            "--seeds", "0,1", "--configs", ",".join(configs)]
    pt.main(argv)
    printed = capsys.readouterr().out
    assert f"{min(2, os.cpu_count())} at a time: one a core" in printed      # on the CPU; on a GPU: `pack`
    for config in configs:
        for seed in seeds:
            run = RunDir(out / "order3" / f"seed{seed}" / config)
            r, cfg = json.loads(run.results.read_text()), json.loads(run.config.read_text())
            assert r["tasks"] == list(SUPERNI) and (cfg["method"], cfg["seed"]) == (pt.CONFIGS[config][1]["method"],
                                                                                    seed)
            assert cfg["replay_ratio"] == {"seekr10": 0.5, "seekr1": 0.25}.get(config, 0.25)
            last = "task01" if config == "mtl" else "task03"   # --keep last; the resume point removed
            assert [p.name for p in (run.root / "checkpoints").iterdir()] == [last] and not run.resume.exists()
            assert (run.root / "general.json").is_file() == (config in pt.GENERAL)
    assert json.loads((out / "general-base.json").read_text())["samples"] == 2
    planted = plant(out, [(c, s) for c in configs for s in seeds], pt.GENERAL)
    capsys.readouterr()
    text, said = pt.summarize(out), capsys.readouterr().out
    for png in ("table3.png", "table2.png", "fig2b.png"):   # drawn, or said why not
        assert (out / png).is_file() if importlib.util.find_spec("matplotlib") else f"to draw {png})" in said
    table3, table2, fig2b = ({line.split(" | ")[0][2:]: line for line in part.splitlines() if line.startswith("| ")}
                             for part in text.split("\n## ")[:3])

    def cell(config):
        ops = [planted[config, s]["OP"] for s in seeds]
        bwts = [planted[config, s]["BWT_T"] for s in seeds]
        bwt = "" if config == "mtl" else f" ({statistics.mean(bwts):.1f} ± {statistics.stdev(bwts):.1f})"
        return f"{statistics.mean(ops):.1f} ± {statistics.stdev(ops):.1f}{bwt}, n=2"
    for config in configs:                                   # Table 3, the paper's numbers beside
        label, paper = pt.CONFIGS[config][0], ps.PAPER_TABLE3.get(config, {}).get("order3")
        assert table3[label].startswith(f"| {label} | {cell(config)} | ")
        assert table3[label].endswith(" |  |" if paper is None else f"{paper[0]:.2f} |" if paper[1] is None
                                    else f"{paper[0]:.2f} ({paper[1]:.2f}) |")
    assert fig2b["SEEKR"] == f"| SEEKR | order3 | {cell('seekr1')} | {cell('seekr10')} |"     # Fig. 2b
    base = json.loads((out / "general-base.json").read_text())
    for config in pt.GENERAL:                                # Table 2: GA of the planted scores, ΔGA against θ_0
        gas = [(planted[config, s, "general"]["scores"]["boolq"]["score"]
                + planted[config, s, "general"]["scores"]["piqa"]["score"]) / 2 for s in seeds]
        deltas = [g - base["GA"] for g in gas]
        assert f" | {statistics.mean(gas):.1f} ± {statistics.stdev(gas):.1f} " \
               f"({statistics.mean(deltas):.1f} ± {statistics.stdev(deltas):.1f}) | " in table2[pt.CONFIGS[config][0]]
    assert text.count("```\nθ_0 ") == len(configs) * len(seeds)              # every run's R
    assert json.loads((out / "tables.json").read_text())["runs"]["order3/seekr1"]["1"]["OP"] == \
        planted["seekr1", 1]["OP"]
    # Given again, the command finds every run finished: no probe, no run, the tables again.
    pt.main(argv)
    printed = capsys.readouterr().out
    assert printed.count(": done before") == len(configs) * len(seeds) and "probe" not in printed


def test_one_out_holds_one_scale(tmp_path, capsys):
    out = tmp_path / "paper"
    out.mkdir()
    (out / "scale.json").write_text(json.dumps({"scale": "cpu"}))
    with pytest.raises(SystemExit, match="holds runs at another scale"):
        pt.main(["--model", str(shared_path("artifacts", "stories260K-hf")), "--data",
                 str(shared_path("data", "superni")), "--scale", "gpu", "--out", str(out)])


def test_unknown_configurations_and_orders_are_refused(capsys):
    for flag, value in (("--configs", "seqft,seekr5"), ("--orders", "order1")):
        with pytest.raises(SystemExit) as stop:
            pt.main(["--model", "m", "--data", "d", "--scale", "cpu", "--out", "o", flag, value])
        assert stop.value.code == 2 and f"{flag}: unknown {value.split(',')[-1]}" in capsys.readouterr().err
