"""Shared test fixtures: where ../shared lives (and a skip that says why when it does not), a tiny run's inputs."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def shared_path(*parts) -> Path:
    """A file under ../shared, or a skip naming what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared artifacts live beside the project at ../shared")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_progress_bar_left():
    """A progress bar a test left open (a simulated crash inside a loop) would indent the next test's bars, whose
    stderr some tests read line by line: close them when the test ends."""
    yield
    from tqdm import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


@pytest.fixture(autouse=True, scope="session")
def _on_the_cpu():
    """Every test computes on the CPU, with or without a GPU present: the session's process group is gloo, so every
    engine built in it defaults to the CPU. (Subprocess tests pass --device cpu; GPU-only tests skip.)"""
    from minseekr.runtime import init_distributed
    init_distributed("cpu")


def tiny_run_inputs(root: Path, n_train: int, n_test: int, **family):
    """A tiny HF checkpoint holding its tokenizer (root/model) and two synthetic tasks in TRACE's folder layout
    (root/data/{rev,rot}): what `train.py --model ... --data ... --order rev,rot` needs. `family`: ModelArgs
    fields of another family (tests/test_family_runs.py)."""
    from minseekr.evaluation.synthetic import make_records, train_tokenizer
    from minseekr.network.checkpoint import save_hf
    from minseekr.network.model import ModelArgs, Transformer
    from minseekr.network.tokenizer import Tokenizer
    model_dir, data = root / "model", root / "data"
    model_dir.mkdir(parents=True)
    train_tokenizer(model_dir / "tokenizer.model")
    torch.manual_seed(0)
    vocab = Tokenizer(model_dir / "tokenizer.model").vocab_size
    model = Transformer(ModelArgs(**{**dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab,
                                            hidden_dim=64, max_seq_len=32), **family}))
    model.init_weights()
    save_hf(model, model_dir, dtype=torch.float32)
    for name in ("rev", "rot"):
        (data / name).mkdir(parents=True)
        (data / name / "train.json").write_text(json.dumps(make_records(name, n_train, 0)))
        (data / name / "test.json").write_text(json.dumps(make_records(name, n_test, 1)))
    return model_dir, data


def tiny_flags(inputs, out, *extra):
    """train.py's flags for a small run of two tasks on `tiny_run_inputs` (model dir, data dir) into `out`."""
    model_dir, data = inputs
    return ["--model", str(model_dir), "--data", str(data), "--order", "rev,rot", "--out", str(out), "--lr", "1e-3",
            "--batch-size", "8", "--max-len", "32", "--replay-ratio", "0.25", "--layer-budget", "1", "--head-budget",
            "2", "--query-budget", "4", "--max-new-tokens", "8", "--threads", "1", "--device", "cpu", *extra]


def refused(capsys, argv, script="train"):
    """The one line an entry point (train.py, eval.py) prints for bad input: exit code 2, no traceback."""
    module = __import__(script)
    capsys.readouterr()                          # what came before is not part of the answer
    with pytest.raises(SystemExit) as stop:
        module.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def train_process(flags, out, launcher=(sys.executable,)):
    """`train.py` with `flags` in a process of its own (or under `launcher`, e.g. torchrun), one thread per
    process; its results.json."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*launcher, str(ROOT / "train.py"), *flags, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((Path(out) / "results.json").read_text())


def logged(run):
    """A run's metrics.jsonl without its wall times."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


# One small run of each parameter-efficient method on the tiny inputs (no LoRA dropout: each rank draws its own
# masks, so two ranks would differ), shared by tests/test_pet_runs.py and each method's own tests.
PET_COMMON = ["--order", "rev,rot", "--epochs", "2", "--batch-size", "6", "--grad-accum", "2", "--max-len", "32",
              "--eval-samples", "8", "--max-new-tokens", "8", "--threads", "1", "--device", "cpu"]
PET_FLAGS = {
    "olora": ["--lr", "1e-2", "--lora-rank", "4", "--lora-alpha", "8", "--olora-lambda2", "0.01",
              "--lora-dropout", "0"],
    "pp": ["--lr", "3e-2", "--prompt-tokens", "4", "--prompt-bottleneck", "16"],
    "l2p": ["--lr", "3e-2", "--l2p-pool", "6", "--l2p-length", "2", "--l2p-top-k", "2"],
    "lfpt5": ["--lr", "3e-2", "--prompt-tokens", "4", "--replay-ratio", "0.25"],
    "sapt": ["--lr", "1e-2", "--sapt-rank", "2", "--lora-alpha", "8", "--replay-ratio", "0.25"],
}


def pet_train(inputs, method, out, launcher=(sys.executable,), extra=()):
    """`train.py --method METHOD` (and `extra` flags) on the tiny inputs (model dir, data dir); its results.json."""
    flags = ["--model", str(inputs[0]), "--data", str(inputs[1]), "--method", method, *PET_COMMON,
             *PET_FLAGS[method], *extra]
    return train_process(flags, out, launcher)


@pytest.fixture(scope="session")
def pet_runs(tmp_path_factory):
    """method -> (the tiny inputs, its run directory), trained on first use."""
    inputs, made = tiny_run_inputs(tmp_path_factory.mktemp("pet"), n_train=24, n_test=8), {}

    def run(method):
        if method not in made:
            out = tmp_path_factory.mktemp(f"{method}-run") / "run"
            pet_train(inputs, method, out)
            made[method] = out
        return inputs, made[method]
    return run


@contextlib.contextmanager
def crash_at(cls, name: str, n: int):
    """Inside the block, the n-th call of cls.name raises RuntimeError("simulated crash") (a kill at that moment);
    the method is restored after it."""
    original, calls = getattr(cls, name), []

    def crashing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("simulated crash")
        return original(self, *args, **kwargs)

    setattr(cls, name, crashing)
    try:
        yield
    finally:
        setattr(cls, name, original)
