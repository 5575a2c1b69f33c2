"""What every parameter-efficient method owes a run (#13): `train.py --method M` trains only M's parameters (the
base bit-identical in every checkpoint), a checkpoint is evaluated with M's full forward (never the bare model),
and two ranks train as one process."""
import json
import os
import sys

import pytest
import torch
from safetensors import safe_open
from conftest import PET_FLAGS, logged, pet_train

from minseekr.methods.peft import read_method
from minseekr.methods.pet import FILE, attach_saved
from minseekr.network.checkpoint import load_hf
from minseekr.network.generate import generate
from minseekr.run.resume import latest_point


@pytest.fixture(params=list(PET_FLAGS))
def run(request, pet_runs):
    return (request.param, *pet_runs(request.param))


def test_a_run_trains_only_the_methods_parameters(run):
    method, inputs, out = run
    base = load_hf(inputs[0]).state_dict()
    for k in (1, 2):
        exported = load_hf(out / "checkpoints" / f"task{k:02d}").state_dict()
        assert all(torch.equal(exported[name], t) for name, t in base.items()), (method, k)
        assert read_method(out / "checkpoints" / f"task{k:02d}" / FILE)[0]["method"] == method


def test_a_checkpoint_is_evaluated_with_its_method(run):
    method, _, out = run
    checkpoint = out / "checkpoints" / "task02"
    bare = load_hf(checkpoint).eval()
    adapted = attach_saved(load_hf(checkpoint), checkpoint).eval()
    prompts = [[1, 5, 9, 13, 4], [1, 7, 7, 20]]
    answers = generate(adapted, prompts, 6)
    assert answers != generate(bare, prompts, 6), method
    assert answers == generate(adapted, prompts, 6, use_cache=False), method


@pytest.mark.parametrize("engine", ["minseekr", "torch"])
def test_two_ranks_train_as_one_process(run, tmp_path, engine):
    """On either engine (the frozen base sharded, the method's parameters whole on every rank)."""
    method, inputs, out = run
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29600 + os.getpid() % 1000))
    two = pet_train(inputs, method, tmp_path / "two", launcher, extra=["--fsdp", engine])
    assert two["R"] == json.loads((out / "results.json").read_text())["R"]
    for a, b in zip(logged(out), logged(tmp_path / "two")):
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (key, a, b)
    # The frozen base stays sharded without optimiser state: each rank's resume file holds its shards alone.
    for rank in range(2):
        with safe_open(str(latest_point(tmp_path / "two" / "resume") / f"rank{rank:05d}.safetensors"), "pt") as f:
            assert f.keys() and all(key.endswith(".shard") for key in f.keys()), (engine, list(f.keys()))
    _, mine = read_method(out / "checkpoints" / "task02" / FILE)
    _, theirs = read_method(tmp_path / "two" / "checkpoints" / "task02" / FILE)
    for name, t in mine.items():
        # lr up to 3e-2: AdamW turns the last-bit differences of two reduction orders into ~1e-6 on the weights
        torch.testing.assert_close(theirs[name], t, rtol=1e-4, atol=1e-5, msg=name)
