"""A run touches nothing outside its directory, resumes only what it made, and scores a checkpoint only with the
method it was trained with; everything else ends in one line naming the file, field or flag."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from conftest import ROOT, refused, tiny_flags, tiny_run_inputs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_inputs(tmp_path_factory.mktemp("integrity"), n_train=16, n_test=4)


def flags(setup, out, *extra):
    return tiny_flags(setup, out, "--eval-samples", "2", *extra)


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
    """method -> a finished run of it (trained once per module), to copy and damage."""
    import train as train_cli
    made = {}

    def run(method, *extra):
        if method not in made:
            out = tmp_path_factory.mktemp(method) / "run"
            train_cli.main(flags(setup, out, "--method", method, *extra))
            made[method] = out
        return made[method]
    return run


def copy(run, tmp_path, name="copy"):
    """A copy of a finished run with its results removed, so that --resume continues it."""
    target = tmp_path / name
    shutil.copytree(run, target)
    (target / "results.json").unlink()
    return target


def resume(capsys, run):
    return refused(capsys, ["--resume", str(run)])


# --- numbers and lengths ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, expected", [
    (["--lambda2", "inf"], "--lambda2 must be a finite number, got inf"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
    (["--lora-alpha", "inf"], "--lora-alpha must be a finite number, got inf"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--betas", "0.9,0.95,0.99"], "--betas takes two values β1,β2, got 3"),
    (["--lora-targets", "foo,bar"], "--lora-targets must be distinct names among q_proj,"),
    (["--lora-targets", ""], "--lora-targets must be distinct names among q_proj,"),
    (["--seed", str(2**70)], "--seed must be in 0..2^32−1, got 1180591620717411303424"),
    (["--max-len", "2"], "--max-len must be ≥ 3 (BOS, an answer token and EOS), got 2"),
    (["--max-new-tokens", "31"], "--max-new-tokens 31 leaves no room for a prompt in the model's 32 positions"),
])
def test_non_finite_and_impossible_settings_are_one_line(setup, tmp_path, capsys, extra, expected):
    assert expected in refused(capsys, flags(setup, tmp_path / "run", *extra))
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--samples", "-1"], "--samples must be ≥ 0, got -1"),
    (["--max-prompt-len", "1"], "--max-prompt-len must be 0 or ≥ 2, got 1"),
    (["--max-prompt-len", "-7"], "--max-prompt-len must be 0 or ≥ 2, got -7"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be ≥ 0, got -3"),
    (["--max-new-tokens", "31"], "--max-new-tokens 31 leaves no room for a prompt in the model's 32 positions"),
])
def test_eval_refuses_what_train_refuses(finished, capsys, extra, expected):
    assert expected in refused(capsys, [str(finished("seqft")), *extra], script="eval")


def test_a_bad_command_line_is_one_line_not_the_usage_block(tmp_path):
    for script, argv in (("train.py", ["--no-such-flag"]), ("train.py", ["--method", "magic"]), ("eval.py", [])):
        done = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "usage:" not in done.stderr, done.stderr
        assert done.stderr.startswith(f"{script}: error: ") and f"(see {script} --help)" in done.stderr


# --- a checkpoint is scored with its own method, or not at all ---------------------------------------------------

def test_a_checkpoint_without_its_method_file_is_refused_by_eval_and_resume(finished, setup, tmp_path, capsys):
    run = copy(finished("olora", "--lora-rank", "2"), tmp_path)
    task01 = run / "checkpoints" / "task01"
    (task01 / "method.safetensors").unlink()
    expected = f"{task01 / 'method.safetensors'} is missing, but {task01} was trained with --method olora after 1"
    assert expected in refused(capsys, [str(run)], script="eval")
    assert expected in refused(capsys, ["--model", str(task01), "--data", str(setup[1]), "--tasks", "rev",
                                        "--max-new-tokens", "4"], script="eval")
    assert f"{task01} is not whole" in resume(capsys, run) and expected in resume(capsys, run)


def test_another_methods_file_and_a_nan_in_a_method_file_are_refused(finished, tmp_path, capsys):
    run = copy(finished("olora", "--lora-rank", "2"), tmp_path)
    task01 = run / "checkpoints" / "task01"
    foreign = finished("l2p", "--l2p-pool", "4", "--l2p-top-k", "2") / "checkpoints" / "task01" / "method.safetensors"
    original = load_file(task01 / "method.safetensors")
    shutil.copyfile(foreign, task01 / "method.safetensors")
    assert "method.safetensors holds the l2p method after 1 task(s), but" in \
        refused(capsys, [str(run)], script="eval")
    shutil.copyfile(finished("olora") / "checkpoints" / "task01" / "method.safetensors", task01 / "method.safetensors")
    from minseekr.methods.peft import read_method
    info, _ = read_method(task01 / "method.safetensors", tensors=False)
    name = next(iter(original))
    original[name][0] = float("nan")
    save_file(original, task01 / "method.safetensors", metadata={"method": json.dumps(info)})
    assert f"method.safetensors: tensor {name!r} holds NaN or infinite values" in \
        refused(capsys, [str(run)], script="eval")


def test_a_resume_refuses_a_deleted_theta0_checkpoint(finished, tmp_path, capsys):
    run = copy(finished("seqft"), tmp_path)
    shutil.rmtree(run / "checkpoints" / "task00")
    assert f"{run / 'checkpoints' / 'task00'} is not whole" in resume(capsys, run)


def test_eval_names_a_deleted_checkpoint_of_a_finished_run_as_deleted(finished, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(finished("seqft"), run)
    shutil.rmtree(run / "checkpoints" / "task02")
    err = refused(capsys, [str(run)], script="eval")
    assert f"{run / 'checkpoints' / 'task02'} is missing: it was deleted after the run finished" in err


def test_eval_of_a_model_directory_writes_no_file_unless_asked(finished, setup, tmp_path, capsys):
    import eval as eval_cli
    checkpoint = finished("seqft") / "checkpoints" / "task01"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        eval_cli.main(["--model", str(checkpoint), "--data", str(setup[1]), "--tasks", "rev", "--max-new-tokens", "4",
                       "--samples", "2"])
        assert list(tmp_path.iterdir()) == []
        eval_cli.main(["--model", str(checkpoint), "--data", str(setup[1]), "--tasks", "rev", "--max-new-tokens", "4",
                       "--samples", "2", "--out", "scores.json"])
        assert set(json.loads((tmp_path / "scores.json").read_text())["scores"]) == {"rev"}
    finally:
        os.chdir(cwd)


# --- nothing outside the run directory is written, truncated or deleted -------------------------------------------

def test_a_hard_linked_file_inside_a_run_is_refused_and_left_alone(finished, tmp_path, capsys):
    run = copy(finished("seqft"), tmp_path)
    outside = tmp_path / "notes.txt"
    outside.write_text("the user's own notes\n")
    (run / "metrics.jsonl").unlink()
    os.link(outside, run / "metrics.jsonl")
    assert f"{run / 'metrics.jsonl'} is hard-linked (2 names)" in resume(capsys, run)
    assert outside.read_text() == "the user's own notes\n"


def test_a_new_run_needs_an_empty_folder_and_deletes_nothing_of_the_users(setup, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "sub" / ".draft.tmp12").write_text("the user's")
    (mine / ".tmpAbC123").write_text("the user's")
    assert f"{mine} is not empty (.tmpAbC123, sub) and holds no run" in refused(capsys, flags(setup, mine))
    assert (mine / "sub" / ".draft.tmp12").read_text() == (mine / ".tmpAbC123").read_text() == "the user's"


def test_a_resume_removes_the_temporaries_of_a_killed_writer_in_the_runs_own_folders_only(finished, tmp_path):
    import train as train_cli
    run = copy(finished("derpp"), tmp_path)
    left = [run / "buffer" / ".tmpXy12Z9", run / "checkpoints" / "task00" / ".tmpQw34Er",
            run / "checkpoints" / "task01" / ".model.safetensors.tmp4242"]
    (run / "notes").mkdir()
    kept = run / "notes" / ".tmpAb56Cd"
    for file in [*left, kept]:
        file.write_bytes(b"\0" * 1024)
    train_cli.main(["--resume", str(run)])
    assert [f for f in left if f.exists()] == [] and kept.exists()


@pytest.mark.parametrize("damage", ["emptied", "garbled"])
def test_a_metrics_log_changed_before_a_resume_is_refused_not_padded(finished, tmp_path, capsys, damage):
    run = copy(finished("seqft"), tmp_path)
    log = run / "metrics.jsonl"
    before = log.read_bytes()
    log.write_bytes(b"" if damage == "emptied" else before.replace(b'"task": 0', b'"task": 9', 1))
    assert "metrics.jsonl no longer starts with the" in resume(capsys, run)
    assert b"\0" not in log.read_bytes()


# --- resume points and buffers belong to the run that made them --------------------------------------------------

def edit_json(file, **changes):
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def test_a_resume_refuses_edited_settings_and_data_naming_them(finished, setup, tmp_path, capsys):
    run = copy(finished("seqft"), tmp_path)
    edit_json(run / "config.json", clip=2.0)
    assert "was started with other inputs than this resume has: setting clip: 1.0 → 2.0" in resume(capsys, run)
    edit_json(run / "config.json", clip=1.0)
    data = tmp_path / "data"
    shutil.copytree(setup[1], data)
    edit_json(run / "run.json", data=str(data))                   # moved data are fine when they are the same
    records = json.loads((data / "rot" / "train.json").read_text())
    records[0]["answer"] += "x"
    (data / "rot" / "train.json").write_text(json.dumps(records))
    assert "other inputs than this resume has: task rot's records" in resume(capsys, run)


def test_swapped_buffers_and_a_buffer_of_another_model_are_refused(finished, setup, tmp_path, capsys):
    run = copy(finished("derpp"), tmp_path)
    buffer = run / "buffer"
    for ext in ("json", "safetensors"):
        (buffer / f"task00.{ext}").rename(buffer / f"swap.{ext}")
        (buffer / f"task01.{ext}").rename(buffer / f"task00.{ext}")
        (buffer / f"swap.{ext}").rename(buffer / f"task01.{ext}")
    assert "task00.safetensors holds task 'rot''s samples, but task 0 of this run is 'rev'" in resume(capsys, run)

    other_model = tmp_path / "other-model"
    shutil.copytree(setup[0], other_model)
    weights = load_file(other_model / "model.safetensors")
    weights["model.norm.weight"] += 1
    save_file(weights, other_model / "model.safetensors")
    import train as train_cli
    train_cli.main(flags((other_model, setup[1]), tmp_path / "other", "--method", "derpp"))
    shutil.rmtree(buffer)
    shutil.copytree(tmp_path / "other" / "buffer", buffer)
    assert "was written by a run with other inputs (the model's weights (θ_0))" in resume(capsys, run)


def test_ranks_started_with_different_data_stop_together_naming_it(setup, tmp_path):
    """torchrun starts one script with every rank's own argv: here rank 1 alone gets --train-samples 8."""
    script = tmp_path / "uneven.py"
    script.write_text("import os, sys\nsys.path.insert(0, {root!r})\nimport train\n"
                      "extra = ['--train-samples', '8'] if os.environ['RANK'] == '1' else []\n"
                      "train.main(sys.argv[1:] + extra)\n".format(root=str(ROOT)))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           *flags(setup, tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode != 0
    assert "train.py: error: the ranks of this job were started with different inputs (rank 1: task rev's records" \
        in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --- what a user reads ------------------------------------------------------------------------------------------

def test_eval_labels_the_base_models_scores(finished, capsys):
    import eval as eval_cli
    eval_cli.main([str(finished("seqft")), "--out", os.devnull])
    assert "base model θ_0 (before any task): rev " in capsys.readouterr().out


def test_a_second_demo_into_the_same_folder_is_refused_before_anything_runs(tmp_path):
    from minseekr.run import demo
    from minseekr.runtime import InputError
    (tmp_path / "demo-seed0").mkdir()
    with pytest.raises(InputError, match="already holds a demo's output \\(demo-seed0\\): give the demo another --out"):
        demo.run(tmp_path, [0], ["seqft"], {}, root=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-seed0"]       # no θ_0 was built
