"""tools/real_experiment.py: its commands are the settings it documents, and one invocation runs every
configuration × seed, summarises them and grafts attention (here on stories260K, a few records a task)."""
import json
import statistics
import sys
from pathlib import Path

import pytest
from conftest import ROOT, shared_path

from minseekr.evaluation.metrics import backward_transfer, overall_performance
from minseekr.run.config import METHODS, ContinualConfig, RunConfig, from_flags, parser_for
from minseekr.run.rundir import RunDir

sys.path.insert(0, str(ROOT / "tools"))
import real_experiment as experiment  # noqa: E402


@pytest.mark.parametrize("config", list(experiment.CONFIGS))
def test_each_configuration_is_train_py_with_the_documented_settings(config):
    argv = experiment.command("MODEL", "DATA", "OUT", config, seed=7)[2:]
    ns = parser_for("train.py", "", RunConfig, ContinualConfig).parse_args(argv)
    cfg, run = from_flags(ContinualConfig, ns), from_flags(RunConfig, ns)
    want = {**experiment.SETTINGS, **experiment.CONFIGS[config], "seed": 7}
    if want.get("pseudo_inputs") == "released":   # SAPT's own pseudo-inputs, beside the data folder
        want["pseudo_inputs"] = str(Path("DATA").parent / "sapt-pseudo")
    for key, value in want.items():
        assert getattr(cfg, key, None) == value or getattr(run, key, None) == value, key
    assert (run.threads, run.device, run.order) == (1, "cpu", ",".join(experiment.ORDER))
    assert cfg.method in METHODS


def test_budgets_are_the_papers_proportions_of_smollm2():
    layers, heads = 30, 9                   # SmolLM2-135M; LLaMA-2-7B: 32 × 32, B_L 24, B_H 128
    assert experiment.SETTINGS["layer_budget"] == int(24 / 32 * layers)
    assert experiment.SETTINGS["head_budget"] == round(128 / 1024 * layers * heads)
    assert round(experiment.SETTINGS["replay_ratio"] * experiment.SETTINGS["train_samples"]) == 10


def test_one_command_runs_summarises_and_grafts(tmp_path, monkeypatch, capsys):
    model, data = shared_path("artifacts", "stories260K-hf"), shared_path("data", "superni")
    monkeypatch.setitem(experiment.SETTINGS, "train_samples", 4)
    monkeypatch.setitem(experiment.SETTINGS, "test_samples", 2)
    monkeypatch.setitem(experiment.SETTINGS, "replay_ratio", 0.5)
    monkeypatch.setitem(experiment.SETTINGS, "layer_budget", 2)     # stories260K: 5 layers × 8 heads
    monkeypatch.setitem(experiment.SETTINGS, "head_budget", 4)
    out, seeds, configs = tmp_path / "real", [0, 1], ["seqft", "seekr"]
    argv = ["--model", str(model), "--data", str(data), "--out", str(out), "--seeds", "0,1",
            "--configs", ",".join(configs), "--jobs", "2"]
    experiment.main(argv)
    summary = json.loads((out / "summary.json").read_text())
    for config in configs:
        runs = summary[config]
        assert [r["method"] for r in runs] == [config] * len(seeds)
        for r in runs:
            assert len(r["R"]) == len(experiment.ORDER)
            assert r["OP"] == pytest.approx(overall_performance(r["R"]))
            assert r["BWT"] == pytest.approx(backward_transfer(r["R"]))
        ops = [r["OP"] for r in runs]
        row = next(line for line in (out / "summary.md").read_text().splitlines()
                   if line.startswith(f"| {config} |"))
        assert f"{statistics.mean(ops):.1f} ± {statistics.stdev(ops):.1f}" in row
    # By default every run keeps every task checkpoint, so that eval.py re-scores it; a finished run's resume
    # point is removed, and the output says so.
    printed = capsys.readouterr().out
    assert "--keep all" in printed
    for config in configs:
        for seed in seeds:
            run = out / f"seed{seed}" / config
            assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"task{k:02d}" for k in range(4)]
            assert not (run / "resume").exists()
            assert [line for line in printed.splitlines()
                    if f"] {config} seed {seed}: " in line and " min; removed resume/ (" in line]
    import eval as eval_cli
    seekr = out / "seed1" / "seekr"
    eval_cli.main([str(seekr), "--out", str(tmp_path / "eval.json")])
    assert json.loads((tmp_path / "eval.json").read_text())["R"] == summary["seekr"][1]["R"]
    rows = json.loads((out / "grafting.json").read_text())
    assert [(r["seed"], r["task"]) for r in rows] == [(s, t) for s in seeds for t in experiment.ORDER[:-1]]
    for r in rows:
        seqft = summary["seqft"][seeds.index(r["seed"])]["R"]
        j = experiment.ORDER.index(r["task"])
        assert r["final"] == seqft[-1][j]
        assert all(0 <= v <= 100 for k, v in r.items() if k.startswith("final +"))
    # Given again, the command finds every run finished and runs none.
    stamp = (out / "seed1" / "seekr" / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    experiment.main(argv)
    assert capsys.readouterr().out.count("done before") == len(seeds) * len(configs)
    assert (out / "seed1" / "seekr" / "results.json").stat().st_mtime_ns == stamp


def test_unknown_configurations_are_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        experiment.main(["--model", "m", "--data", "d", "--configs", "seqft,ewc2"])
    assert stop.value.code == 2
    assert "--configs: unknown ewc2" in capsys.readouterr().err


def finished_run(root: Path, n_checkpoints: int):
    """A run directory as train.py leaves it: task checkpoints task00 ... and a resume point, one small file each."""
    for path in [root / "resume", *(root / "checkpoints" / f"task{k:02d}" for k in range(n_checkpoints))]:
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"x" * 1000)
    return RunDir(root)


@pytest.mark.parametrize("keep, config, kept", [
    ("all", "seekr", ["task00", "task01", "task02", "task03"]),
    ("last", "seekr", ["task03"]),
    ("none", "seekr", []),
    ("all", "seqft", ["task00", "task01", "task02", "task03"]),
    ("none", "seqft", ["task01", "task02", "task03"]),      # the grafting's models
])
def test_a_finished_run_keeps_the_checkpoints_keep_names_and_says_what_it_removed(tmp_path, keep, config, kept):
    run = finished_run(tmp_path / config, 4)
    said = experiment.prune(run, config, keep)
    assert sorted(p.name for p in (run.root / "checkpoints").iterdir()) == kept
    assert not run.resume.exists()
    removed = ["resume/"] + [f"checkpoints/task{k:02d}/" for k in range(4) if f"task{k:02d}" not in kept]
    assert said == f"removed {', '.join(removed)} ({len(removed) * 1000 / 1e9:.2f} GB)"


def test_keep_is_a_flag_whose_help_says_what_each_choice_keeps(capsys):
    with pytest.raises(SystemExit):
        experiment.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--keep {all,last,none}" in text and "(default: all)" in text and "resume point is always removed" in text


def test_with_one_seed_no_error_bars_and_no_mean_over_seeds(tmp_path):
    results = {"seqft": [{"OP": 40.0, "BWT": -6.0}], "mtl": [{"OP": 55.0, "BWT": None}]}
    assert experiment.bars(results, "OP", [3]) == ([40.0, 55.0], None, "OP, seed 3")
    assert experiment.bars(results, "BWT", [3]) == ([-6.0, 0.0], None, "BWT, seed 3")
    two = {"seqft": [{"OP": 40.0, "BWT": -6.0}, {"OP": 42.0, "BWT": -4.0}]}
    assert experiment.bars(two, "OP", [0, 1]) == ([41.0], [statistics.stdev([40.0, 42.0])],
                                                  "OP, mean ± std over seeds 0, 1")
    # The summary's heading says the same.
    run = RunDir(tmp_path / "seed3" / "seqft")
    run.root.mkdir(parents=True)
    run.results.write_text(json.dumps({"method": "seqft", "tasks": experiment.ORDER, "base": [0.0] * 3, "OP": 40.0,
                                       "BWT": -6.0, "R": [[50.0, None, None], [45.0, 60.0, None],
                                                          [40.0, 50.0, 30.0]], "heads": None}))
    text = experiment.summarize(tmp_path, ["seqft"], [3], {})
    assert text.startswith("## OP and BWT (%, seed 3)\n") and "mean ± std" not in text


def test_before_the_runs_it_says_what_they_will_keep_and_the_disk_it_takes(tmp_path):
    model, out = tmp_path / "model", tmp_path / "real"
    model.mkdir()
    with open(model / "model.safetensors", "wb") as f:
        f.truncate(10**7)                                          # a 0.01 GB model
    done = RunDir(out / "seed1" / "seekr")                         # finished before: keeps nothing more
    done.root.mkdir(parents=True)
    done.results.write_text("{}")
    jobs = [("seqft", 0), ("seekr", 0), ("seekr", 1)]
    said = experiment.keeping(model, out, jobs, "all")
    assert said.startswith("--keep all: each finished run keeps every task checkpoint") and "resume/" in said
    assert said.endswith("the 2 runs to do will keep up to 8 checkpoints of 0.01 GB (0.1 GB)")
    said = experiment.keeping(model, out, jobs, "none")
    assert "SeqFT keeps θ_1 ... θ_3" in said and said.endswith("up to 3 checkpoints of 0.01 GB (0.0 GB)")
