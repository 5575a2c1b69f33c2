"""The demo, cut down, from a clean build: its numbers equal the committed ones, so any change that moves it shows.

After a change that moves the demo on purpose, regenerate the expected file and commit it with the change:

    MINSEEKR_REGENERATE=1 python -m pytest tests/test_demo.py
"""
import json
import os
from pathlib import Path

import pytest
import torch

from minseekr import demo

EXPECTED = Path(__file__).parent / "expected" / "demo_quick.json"
QUICK = dict(seeds=[0], methods=["seqft", "replay", "derpp", "seekr"], n_train=200, n_test=50,
             base=dict(demo.BASE, samples=600, epochs=8), names=["rot", "swp"])


@pytest.fixture
def one_thread():
    """The demo computes on one thread (train.py sets it); another count sums in another order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_cut_down_demo_prints_the_committed_numbers(tmp_path, capsys, one_thread):
    results = demo.run(tmp_path / "runs", QUICK["seeds"], QUICK["methods"], {"epochs": [6]},
                       root=tmp_path, n_train=QUICK["n_train"], n_test=QUICK["n_test"], base=QUICK["base"],
                       names=QUICK["names"])
    printed = capsys.readouterr().out
    assert "| seekr |" in printed and "pre-training the demo's θ_0" in printed      # a clean build: θ_0 was built
    got = {method: {"R": runs[0]["R"], "OP": runs[0]["OP"], "BWT": runs[0]["BWT"], "heads": runs[0]["heads"],
                    "first_losses": first_losses(tmp_path / "runs" / "demo-seed0" / method)}
           for method, runs in results.items()}
    if os.environ.get("MINSEEKR_REGENERATE"):
        EXPECTED.parent.mkdir(exist_ok=True)
        EXPECTED.write_text(json.dumps(got, indent=1) + "\n")
    expected = json.loads(EXPECTED.read_text())
    assert sorted(got) == sorted(expected)
    for method, want in expected.items():
        have = got[method]
        # The same code on another CPU may round differently; a change to the method moves these by far more.
        assert have["first_losses"] == pytest.approx(want["first_losses"], rel=1e-4), method
        assert [tuple(h) for h in have["heads"]] == [tuple(h) for h in want["heads"]], method
        for row_have, row_want in zip(have["R"], want["R"]):
            assert row_have == pytest.approx(row_want, abs=2.0), (method, have["R"], want["R"])
        assert have["OP"] == pytest.approx(want["OP"], abs=1.0), method


def first_losses(run_dir: Path) -> list[float]:
    """The loss terms of the first three optimiser steps of each task (metrics.jsonl)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "grad_norm" in line]
    out = []
    for task in sorted({line["task"] for line in steps}):
        for line in [s for s in steps if s["task"] == task][:3]:
            out += [line[key] for key in sorted(line) if key.endswith(("_ce", "_kl"))]
    return out
