"""The demo, cut down, from a clean build: its numbers equal the committed ones, so any change that moves it shows.

The committed numbers are those of ATen's AVX2 CPU kernels, the path the demo pins; it can pin it only in a
process that has not computed yet, so the demo runs in a fresh process (`python tests/test_demo.py OUT`), as
`python train.py` runs it. MKL's matmul kernels differ by the CPU's vendor even on that path, so there is one file of
numbers a vendor (`expected/demo_quick.<vendor_id>.json`). After a change that moves the demo on purpose, regenerate
the file on each vendor's CPU at hand and commit them with the change (a vendor's file that could not be rewritten is
deleted with it, so that its test skips rather than fails):

    MINSEEKR_REGENERATE=1 python -m pytest tests/test_demo.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minseekr.run import demo

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = Path(__file__).parent / "expected" / f"demo_quick.{demo.cpu_vendor()}.json"
QUICK = dict(seeds=[0], methods=["seqft", "replay", "derpp", "seekr"], n_train=200, n_test=50,
             base=dict(demo.BASE, samples=600, epochs=8), names=["rot", "swp"])


def quick_demo(root: Path):
    """The cut-down demo, as train.py runs it (one thread, nothing computed before it), with root/weights for θ_0;
    prints what the demo prints, then the kernel path it ran on."""
    torch.set_num_threads(1)     # train.py's count for the demo: another count sums in another order
    demo.run(root / "runs", QUICK["seeds"], QUICK["methods"], {"epochs": [6]}, root=root, n_train=QUICK["n_train"],
             n_test=QUICK["n_test"], base=QUICK["base"], names=QUICK["names"])
    print(f"kernels: {torch.backends.cpu.get_cpu_capability()}")


@pytest.mark.skipif(not torch.cpu._is_avx2_supported(), reason="the committed numbers are those of ATen's AVX2 "
                    "kernels, and this CPU has none (the demo's numbers differ there)")
def test_the_cut_down_demo_prints_the_committed_numbers(tmp_path):
    regenerate = os.environ.get("MINSEEKR_REGENERATE")
    if not EXPECTED.is_file() and not regenerate:
        pytest.skip(f"no committed numbers for this CPU's vendor ({demo.cpu_vendor() or 'unknown'}): MKL's matmul "
                    f"kernels differ by vendor; MINSEEKR_REGENERATE=1 writes {EXPECTED.name}")
    env = {k: v for k, v in os.environ.items()          # the demo chooses the kernel path itself
           if k not in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")}
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800, env={**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout
    assert "| seekr |" in printed and "pre-training the demo's θ_0" in printed      # a clean build: θ_0 was built
    assert printed.splitlines()[-1] == f"kernels: {demo.KERNELS}", printed[-3000:]
    # The one note a pinned demo prints: the README's numbers are another vendor's (they are an AMD CPU's).
    assert ("note:" in printed) == (demo.cpu_vendor() != "AuthenticAMD"), printed[-3000:]
    results = json.loads((tmp_path / "runs" / "demo-summary.json").read_text())
    got = {method: {"R": runs[0]["R"], "OP": runs[0]["OP"], "BWT": runs[0]["BWT"], "heads": runs[0]["heads"],
                    "first_losses": first_losses(tmp_path / "runs" / "demo-seed0" / method)}
           for method, runs in results.items()}
    if regenerate:
        EXPECTED.parent.mkdir(exist_ok=True)
        EXPECTED.write_text(json.dumps(got, indent=1) + "\n")
    expected = json.loads(EXPECTED.read_text())
    assert sorted(got) == sorted(expected) == sorted(QUICK["methods"])
    for method, want in expected.items():
        have = got[method]
        # The same code and kernel path on another CPU may round differently; a change to the method moves these by
        # far more.
        assert have["first_losses"] and have["first_losses"] == pytest.approx(want["first_losses"], rel=1e-4), method
        assert [tuple(h) for h in have["heads"]] == [tuple(h) for h in want["heads"]], method
        for row_have, row_want in zip(have["R"], want["R"], strict=True):
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


if __name__ == "__main__":
    quick_demo(Path(sys.argv[1]))
