"""tools/real_experiment.py: its commands are the settings it documents, and one invocation runs every
configuration × seed, summarises them and grafts attention (here on stories260K, a few records a task)."""
import json
import statistics
import sys
from pathlib import Path

import pytest
from conftest import ROOT, shared_path

from minseekr.config import METHODS, ContinualConfig, RunConfig, from_flags, parser_for
from minseekr.metrics import backward_transfer, overall_performance

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
    # SeqFT keeps its task models (the grafting's), every other run only its results.
    assert sorted(p.name for p in (out / "seed0" / "seqft" / "checkpoints").iterdir()) == ["task01", "task02", "task03"]
    assert not (out / "seed0" / "seekr" / "checkpoints").exists() or \
        not any((out / "seed0" / "seekr" / "checkpoints").iterdir())
    assert not (out / "seed0" / "seekr" / "resume").exists()
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
