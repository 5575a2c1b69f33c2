"""Bad input, kills, full disks, shared directories: each ends in a correct run or in one clear line."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, refused, tiny_flags, tiny_run_inputs
from minseekr.evaluation.data import Task
from minseekr.evaluation.synthetic import make_records, train_tokenizer
from minseekr.network.checkpoint import load_hf
from minseekr.network.model import ModelArgs, Transformer
from minseekr.network.tokenizer import Tokenizer
from minseekr.run import resume as resume_module
from minseekr.run.config import ContinualConfig
from minseekr.run.rundir import RunDir
from minseekr.run.trainer import ContinualTrainer
from minseekr.runtime import DiskFullError, InputError, NonFiniteError, init_distributed, umask
from minseekr.seekr.buffer import TaskMemory
from minseekr.seekr.distill import teacher_signals


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_inputs(tmp_path_factory.mktemp("reliability"), n_train=32, n_test=4)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "demo.model"
    train_tokenizer(path)
    return Tokenizer(path)


flags = tiny_flags


def tiny_model(vocab):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, hidden_dim=64))
    model.init_weights()
    return model


def toy_tasks(n=16):
    return [Task(t, make_records(t, n, 0), [], make_records(t, 2, 1)) for t in ("rev", "rot")]


def cfg(method="seekr", **kw):
    return ContinualConfig(**{**dict(method=method, lr=1e-3, batch_size=4, epochs=[1], max_len=32, replay_ratio=0.25,
                                     layer_budget=1, head_budget=2, query_budget=4, lambda2=1.0, eval_samples=2,
                                     max_new_tokens=8), **kw})


# --- flags and files: one line naming what is wrong ------------------------------------------------------------

@pytest.mark.parametrize("extra, expected", [
    (["--clip", "-1"], "--clip must be > 0, got -1.0"),
    (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--lambda2", "-1000"], "--lambda2 must be ≥ 0, got -1000.0"),
    (["--lambda1", "3"], "--lambda1 must be in [0, 1], got 3.0"),
    (["--epochs", "0"], "--epochs must be ≥ 1, got [0]"),
    (["--train-samples", "-1"], "--train-samples must be ≥ 0, got -1"),
    (["--max-len", "2000"], "--max-len 2000 exceeds the 32 positions of"),
    (["--replay-ratio", "0.01"], "--replay-ratio 0.01 keeps round(0.01 × 32) = 0 samples of task rev"),
    (["--layer-budget", "3"], "--layer-budget (B_L) must be in 1..2 (the model's layers), got 3"),
])
def test_out_of_range_settings_are_one_line_each(setup, tmp_path, capsys, extra, expected):
    assert expected in refused(capsys, flags(setup, tmp_path / "run", *extra))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_enumerations_and_dtypes_are_refused_by_the_flag(setup, tmp_path):
    for flag, value in (("--dtype", "bf16"), ("--signal-dtype", "bf16"), ("--method", "magic"), ("--device", "tpu")):
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags(setup, tmp_path / "run", flag, value)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and f"argument {flag}: invalid choice: '{value}'" in done.stderr
        assert "Traceback" not in done.stderr


def test_a_missing_model_directory_is_named_as_such(setup, tmp_path, capsys):
    argv = flags(setup, tmp_path / "run")
    argv[1] = str(tmp_path / "no-model")
    assert f"checkpoint directory {tmp_path / 'no-model'} does not exist" in refused(capsys, argv)


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(setup, tmp_path, capsys):
    big = ROOT.parent / "shared" / "artifacts" / "llama2-tokenizer" / "tokenizer.model"
    if not big.exists():
        pytest.skip(f"{big} is absent: the shared artifacts live beside the project at ../shared")
    err = refused(capsys, flags(setup, tmp_path / "run", "--tokenizer", str(big)))
    assert "has 32000 tokens but" in err and "embeds" in err


def test_bad_data_files_name_the_file(setup, tmp_path, capsys):
    model_dir, data = setup
    bad = tmp_path / "data"
    for name in ("rev", "rot"):
        (bad / name).mkdir(parents=True)
        (bad / name / "train.json").write_bytes((data / name / "train.json").read_bytes())
    (bad / "rot" / "train.json").write_bytes(b'[{"prompt": "\xff\xfe", "answer": "x"}]')
    assert f"{bad / 'rot' / 'train.json'}: not UTF-8 text" in refused(capsys, flags((model_dir, bad), tmp_path / "a"))
    (bad / "rot" / "train.json").write_text('[{"prompt": "x", "answer": "y"},')
    assert f"{bad / 'rot' / 'train.json'}: not valid JSON" in refused(capsys, flags((model_dir, bad), tmp_path / "b"))


def test_task_names_stay_under_the_data_folder(setup, tmp_path, capsys):
    argv = flags(setup, tmp_path / "run")
    argv[argv.index("--order") + 1] = "rev,../data/rot"
    assert "task '../data/rot' is not a folder under" in refused(capsys, argv)


def test_a_nan_weight_is_refused_at_load_naming_the_tensor(setup, tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in setup[0].iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 4] = float("nan")
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(InputError, match="tensor 'model.layers.1.mlp.down_proj.weight' holds 1 NaN"):
        load_hf(model_dir)
    for fsdp in ("minseekr", "torch"):
        err = refused(capsys, flags((model_dir, setup[1]), tmp_path / f"run-{fsdp}", "--fsdp", fsdp))
        assert "'model.layers.1.mlp.down_proj.weight' holds 1 NaN or infinite values" in err


# --- non-finite training stops before anything is written -------------------------------------------------------

def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_resume_point(tok, tmp_path, monkeypatch):
    trainer = ContinualTrainer(tiny_model(tok.vocab_size), tok, toy_tasks(), cfg(checkpoint_every=2), tmp_path,
                               eval_fn=lambda model, task: 0.0)
    step = ContinualTrainer.optimizer_step

    def poison_after_3rd(self, *args):
        terms = step(self, *args)
        if self.engine.step == 3:   # the weights turn NaN after the 3rd update
            self.engine.units[1].shard[0] = float("nan")
        return terms

    monkeypatch.setattr(ContinualTrainer, "optimizer_step", poison_after_3rd)
    with pytest.raises(NonFiniteError, match=r"optimiser step 4: the loss term task_ce is nan; nothing of this step"):
        trainer.run_all()
    point = resume_module.latest_point(tmp_path / "resume")
    assert point.name == "task00-ep000-mb0000002"                  # written at step 2, before the poison
    state = load_file(point / "rank00000.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values())


def test_nan_teacher_signals_leave_no_buffer(tok, tmp_path, monkeypatch):
    import minseekr.run.memory as memory_module

    def nan_teacher(*args, **kwargs):
        signals = teacher_signals(*args, **kwargs)
        signals[1]["logits"][0, 0] = float("nan")
        return signals

    monkeypatch.setattr(memory_module, "teacher_signals", nan_teacher)
    with pytest.raises(NonFiniteError, match=r"task 0 \(rev\): θ_k's logits of replay sample 1 holds NaN"):
        ContinualTrainer(tiny_model(tok.vocab_size), tok, toy_tasks(), cfg(), tmp_path,
                         eval_fn=lambda model, task: 0.0).run_all()
    assert not (tmp_path / "buffer" / "task00.json").exists()


# --- the buffer is checked against its manifest and the model ---------------------------------------------------

@pytest.fixture
def finished_run(tok, tmp_path):
    ContinualTrainer(tiny_model(tok.vocab_size), tok, toy_tasks(), cfg(), tmp_path,
                     eval_fn=lambda model, task: 0.0).run_all()
    return tmp_path


def edit_manifest(run, edit):
    path = run / "buffer" / "task00.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m["heads"].reverse(), "heads differ from what task00.safetensors was written with"),
    (lambda m: m.update(n_samples=3), "n_samples differ from what"),
    (lambda m: m.update(heads=[[7, 0], [1, 1]]), "heads differ"),
])
def test_an_edited_manifest_is_refused(finished_run, tok, edit, expected):
    edit_manifest(finished_run, edit)
    with pytest.raises(InputError, match=expected):
        TaskMemory(finished_run / "buffer", 0)


def test_heads_outside_the_model_and_damaged_or_missing_files_are_refused(finished_run, tok):
    args = tiny_model(tok.vocab_size).args
    memory = TaskMemory(finished_run / "buffer", 0, args)
    assert len(memory) == 4 and memory.heads
    deepest = max(layer for layer, _ in memory.heads)
    with pytest.raises(InputError, match=rf"heads \[\({deepest}, \d\)(, \({deepest}, \d\))*\] are not heads of the model"):
        TaskMemory(finished_run / "buffer", 0, SimpleNamespace(n_layers=deepest, n_heads=4, vocab_size=args.vocab_size))
    with pytest.raises(InputError, match=f"teacher logits over {args.vocab_size} tokens, but the model has"):
        TaskMemory(finished_run / "buffer", 0, SimpleNamespace(n_layers=2, n_heads=4, vocab_size=args.vocab_size + 1))
    data = finished_run / "buffer" / "task00.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-3] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="does not match the checksum"):
        TaskMemory(finished_run / "buffer", 0)
    (finished_run / "buffer" / "task00.json").unlink()
    with pytest.raises(FileNotFoundError, match="no buffer manifest for task 0"):
        TaskMemory(finished_run / "buffer", 0)


def test_a_resume_whose_buffer_manifest_is_gone_is_an_error_not_a_shorter_replay(finished_run, tok):
    (finished_run / "buffer" / "task00.json").unlink()
    trainer = ContinualTrainer(tiny_model(tok.vocab_size), tok, toy_tasks(), cfg(), finished_run,
                               eval_fn=lambda model, task: 0.0)
    with pytest.raises(FileNotFoundError, match="task00.json: no buffer manifest"):
        trainer.run_all(resume=True)


# --- resume points, the run directory and the lock ----------------------------------------------------------

def test_latest_json_cannot_point_outside_resume(finished_run):
    (finished_run / "resume" / "latest.json").write_text(json.dumps({"dir": "../buffer"}))
    with pytest.raises(InputError, match="names '../buffer', which is not a resume point inside"):
        resume_module.latest_point(finished_run / "resume")


def test_a_resume_point_without_the_trainers_state_is_named(finished_run, tok):
    point = resume_module.latest_point(finished_run / "resume")
    manifest = json.loads((point / "manifest.json").read_text())
    del manifest["meta"]["R"]
    (point / "manifest.json").write_text(json.dumps(manifest))
    trainer = ContinualTrainer(tiny_model(tok.vocab_size), tok, toy_tasks(), cfg(), finished_run)
    with pytest.raises(InputError, match="the trainer's state lacks R"):
        trainer.run_all(resume=True)


def test_a_second_run_into_a_finished_run_directory_is_refused(finished_run, tok):
    with pytest.raises(InputError, match="already holds a run .*--resume"):
        ContinualTrainer(tiny_model(tok.vocab_size), tok, toy_tasks(), cfg(), finished_run).run_all()


def test_a_directory_in_use_is_refused_naming_the_holder(setup, tmp_path, capsys):
    with RunDir(tmp_path / "run").claim():
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags(setup, tmp_path / "run")], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"is in use by process {os.getpid()} on" in done.stderr


def test_the_claim_refuses_symlinks_and_drops_dead_temporaries(tmp_path):
    run = tmp_path / "run"
    (run / "buffer").mkdir(parents=True)
    stale = run / "buffer" / ".task00.safetensors.tmp99999"
    stale.write_text("half a file")
    with RunDir(run).claim():
        pass
    assert not stale.exists()
    (run / "metrics.jsonl").symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(InputError, match="metrics.jsonl is a symlink"):
        with RunDir(run).claim():
            pass


def test_files_get_the_users_umask(finished_run):
    point = resume_module.latest_point(finished_run / "resume")
    for path in (finished_run / "buffer" / "task00.safetensors", finished_run / "checkpoints" / "task01" /
                 "model.safetensors", point / "rank00000.safetensors", finished_run / "results.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask(), path


def test_a_full_disk_is_one_error_naming_the_file_and_keeps_the_last_resume_point(tok, tmp_path, monkeypatch):
    writes = []
    real = resume_module.save_file

    def fills_up(tensors, path, *args, **kwargs):
        writes.append(path)
        if len(writes) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(resume_module, "save_file", fills_up)
    trainer = ContinualTrainer(tiny_model(tok.vocab_size), tok, toy_tasks(), cfg(checkpoint_every=1), tmp_path,
                               eval_fn=lambda model, task: 0.0)
    with pytest.raises(DiskFullError) as full:
        trainer.run_all()
    assert "rank00000.safetensors: no space left on the device to write it: it needs" in full.value.strerror
    point = resume_module.latest_point(tmp_path / "resume")
    assert point.name == "task00-ep000-mb0000002" and (point / "rank00000.safetensors").is_file()


def test_resume_restores_the_thread_count_and_names_an_edited_config(setup, tmp_path, capsys):
    import train as train_cli
    run, threads = tmp_path / "run", torch.get_num_threads()
    try:
        train_cli.main(flags(setup, run, "--method", "seqft", "--threads", "1"))
        assert json.loads((run / "run.json").read_text())["threads"] == 1
        torch.set_num_threads(2)
        (run / "results.json").unlink()
        train_cli.main(["--resume", str(run)])
        assert torch.get_num_threads() == 1                    # the run's own count, not this process's
    finally:
        torch.set_num_threads(threads)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "lr": "fast"}))
    assert f"{run / 'config.json'}: --lr must be a float, got 'fast'" in refused(capsys, ["--resume", str(run)])
    (run / "config.json").write_text(json.dumps({**config, "signal_dtype": "bf16"}))
    assert "--signal-dtype must be one of bfloat16|float16|float32, got 'bf16'" in refused(capsys, ["--resume", str(run)])
    (run / "config.json").write_text("{not json")
    assert f"{run / 'config.json'}: not valid JSON" in refused(capsys, ["--resume", str(run)])


# --- devices ----------------------------------------------------------------------------------------------------

def test_cuda_without_a_gpu_and_more_ranks_than_gpus_are_one_line(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="--device cuda: no CUDA device is visible"):
        init_distributed("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(InputError, match=r"torchrun started 2 ranks on this node but 1 GPU\(s\) are visible: .*"
                                         r"--nproc-per-node 1.*--device cpu"):
        init_distributed("cuda")


# --- resume from the command line, after a kill, is bitwise the uninterrupted run --------------------------------

def run_cli(argv, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_a_killed_train_py_resumed_from_a_moved_copy_in_another_directory_is_bitwise_the_uninterrupted_run(
        setup, tmp_path):
    argv = ["--method", "seekr", "--batch-size", "4", "--epochs", "1,20", "--checkpoint-every", "1"]
    whole = run_cli(flags(setup, tmp_path / "whole", *argv))
    assert whole.wait(timeout=600) == 0, whole.stderr.read()
    cut = run_cli(flags(setup, tmp_path / "cut", *argv))
    latest = tmp_path / "cut" / "resume" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and cut.poll() is None:   # kill inside task 2, wherever its writes are
        if latest.exists() and json.loads(latest.read_text())["dir"] >= "task01-ep002":
            break
        time.sleep(0.05)
    cut.send_signal(signal.SIGKILL)
    cut.wait()
    assert not (tmp_path / "cut" / "results.json").exists()
    (tmp_path / "cut").rename(tmp_path / "moved")             # moved, then resumed from another working directory
    other = tmp_path / "elsewhere"
    other.mkdir()
    resumed = run_cli(["--resume", "../moved"], cwd=other)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert json.loads((tmp_path / "moved" / "results.json").read_text())["R"] == \
        json.loads((tmp_path / "whole" / "results.json").read_text())["R"]
    a, b = (load_hf(tmp_path / run / "checkpoints" / "task02") for run in ("whole", "moved"))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert not (tmp_path / "cut").exists()                   # nothing was written where the run used to be
