"""Algorithm 1 end to end: what a run directory holds after SeqFT, Replay and SEEKR (mechanics, not scores)."""
import json
import sys

import pytest
import torch

from conftest import crash_at, logged, refused, shared_path
from minseekr.evaluation.data import Task, load_sequence
from minseekr.evaluation.synthetic import make_records, train_tokenizer
from minseekr.methods.peft import read_method
from minseekr.methods.pet import FILE
from minseekr.network.checkpoint import load_hf
from minseekr.network.model import ModelArgs, Transformer
from minseekr.network.tokenizer import Tokenizer
from minseekr.run.batches import interleave
from minseekr.run.config import METHODS, ContinualConfig
from minseekr.run.trainer import ContinualTrainer
from minseekr.seekr.buffer import TaskMemory


def test_interleave_spreads_replay_evenly_by_volume():
    plan = interleave({"new": 8, 0: 2, 1: 4})
    assert len(plan) == 14 and plan.count(("new", 0)) == 1
    positions = [i for i, (name, _) in enumerate(plan) if name == 0]
    assert positions[1] - positions[0] >= 6                       # two batches, half a plan apart
    assert [j for name, j in plan if name == 1] == [0, 1, 2, 3]   # each stream keeps its order
    # Batch j of n sits at (j + 0.5) / n: one replayed batch among four new ones comes in the middle, not first.
    assert interleave({"new": 4, 0: 1}) == [("new", 0), ("new", 1), (0, 0), ("new", 2), ("new", 3)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "demo.model"
    train_tokenizer(path)
    tok = Tokenizer(str(path))
    tasks = [Task(t, make_records(t, 64, 0), [], make_records(t, 8, 1)) for t in ("rev", "rot")]
    return tok, tasks


def tiny_model(vocab):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, hidden_dim=64))
    model.init_weights()
    return model


@pytest.mark.parametrize("teacher_heads", ["selected", "all"])
def test_seekr_run_writes_buffer_scores_checkpoints_and_results(toy, tmp_path, teacher_heads):
    tok, tasks = toy
    cfg = ContinualConfig(method="seekr", lr=1e-3, batch_size=16, epochs=[1], max_len=32, replay_ratio=0.25,
                          layer_budget=1, head_budget=2, query_budget=4, lambda2=1.0, eval_samples=8,
                          max_new_tokens=8, teacher_heads=teacher_heads)
    summary = ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, cfg, tmp_path).run_all()
    assert json.loads((tmp_path / "config.json").read_text())["teacher_heads"] == teacher_heads
    assert summary["tasks"] == ["rev", "rot"] and len(summary["R"]) == 2
    assert summary["R"][0][1] is not None and summary["R"][0][0] is not None   # FWT needs R[0][1]
    assert {"OP", "BWT", "FWT"} <= set(summary) and len(summary["heads"]) == 2
    assert len({layer for layer, _ in summary["heads"]}) == 1                  # B_L = 1 layer
    memory = TaskMemory(tmp_path / "buffer", 0)
    assert len(memory) == 16                                                   # 25% of 64
    sample = memory[0]
    stored = 2 if teacher_heads == "selected" else 8
    assert sample["attn"].shape == (stored, 4, sample["input_ids"].numel())
    assert sample["logits"].shape[0] == int((sample["labels"] != -100).sum())  # answer + EOS
    torch.testing.assert_close(sample["attn"].float().sum(-1), torch.ones(stored, 4), atol=2e-2, rtol=0)
    for k in (1, 2):
        assert (tmp_path / "checkpoints" / f"task{k:02d}" / "config.json").is_file()
    assert (tmp_path / "head_scores.safetensors").is_file()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("attn_kl" in entry for entry in logged)                         # task 2 replayed with distillation
    assert any("logit_kl" in entry for entry in logged)


def test_seqft_keeps_no_buffer(toy, tmp_path):
    tok, tasks = toy
    cfg = ContinualConfig(method="seqft", lr=1e-3, batch_size=16, epochs=[1], max_len=32, eval_samples=4,
                          max_new_tokens=8)
    summary = ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, cfg, tmp_path).run_all()
    assert not (tmp_path / "buffer").exists() and summary["heads"] == []


def test_bad_method_is_refused_by_name():
    with pytest.raises(ValueError, match="--method must be one of"):
        ContinualConfig(method="magic")


@pytest.mark.parametrize("method", ["seqft", "replay", "seekr"])
def test_real_model_on_three_superni_tasks(tmp_path, method):
    """stories260K (real weights, its own tokenizer) on three short-answer SuperNI tasks: the mechanics run."""
    from minseekr.network.checkpoint import load_hf
    model_dir = shared_path("artifacts", "stories260K-hf")
    root = shared_path("data", "superni")
    names = ["task363_sst2_polarity_classification", "task195_sentiment140_classification",
             "task875_emotion_classification"]
    tasks, epochs = load_sequence(names, root)
    for t in tasks:                                   # a slice keeps the CI run short
        t.train, t.test = t.train[:48], t.test[:8]
    tok = Tokenizer(str(model_dir / "tokenizer.model"))
    cfg = ContinualConfig(method=method, lr=1e-4, batch_size=8, epochs=epochs, max_len=256, replay_ratio=0.125,
                          layer_budget=2, head_budget=4, query_budget=16, eval_samples=8, max_new_tokens=4)
    summary = ContinualTrainer(load_hf(model_dir), tok, tasks, cfg, tmp_path).run_all()
    R = summary["R"]
    assert all(R[i][j] is not None and 0 <= R[i][j] <= 100 for i in range(3) for j in range(i + 1))
    assert json.loads((tmp_path / "results.json").read_text())["OP"] == pytest.approx(sum(R[2]) / 3)
    if method != "seqft":
        assert [TaskMemory(tmp_path / "buffer", k).name for k in range(2)] == names[:2]
    if method == "seekr":
        assert len(summary["heads"]) == 4


def test_resume_of_a_directory_train_did_not_write_names_the_missing_file(tmp_path, capsys):
    import train as train_cli
    with pytest.raises(SystemExit):
        train_cli.main(["--resume", str(tmp_path)])
    assert f"{tmp_path / 'run.json'} not found" in capsys.readouterr().err


def test_train_then_eval_cli_agree_on_the_matrix(tmp_path, capsys):
    """`train.py --model ...` writes a run that `eval.py RUN_DIR` re-scores to the same accuracy matrix."""
    import eval as eval_cli
    import train as train_cli
    model_dir = shared_path("artifacts", "stories260K-hf")
    root = shared_path("data", "superni")
    run = tmp_path / "run"
    order = "task363_sst2_polarity_classification,task195_sentiment140_classification"
    train_cli.main(["--model", str(model_dir), "--data", str(root), "--order", order, "--method", "seekr",
                    "--out", str(run), "--train-samples", "32", "--test-samples", "6", "--epochs", "1",
                    "--lr", "1e-4", "--batch-size", "8", "--max-len", "256", "--replay-ratio", "0.125",
                    "--layer-budget", "1", "--head-budget", "2", "--query-budget", "8", "--max-new-tokens", "4"])
    trained = json.loads((run / "results.json").read_text())
    assert json.loads((run / "config.json").read_text())["epochs"] == [1]   # typed, though the default: not the order's 10
    (run / "results.json").unlink()
    train_cli.main(["--resume", str(run)])                  # from the last task's resume point: nothing to redo
    assert json.loads((run / "results.json").read_text()) == trained
    eval_cli.main([str(run)])                               # the run's own 6 test records, its own settings
    evaluated = json.loads((run / "eval.json").read_text())
    assert evaluated["R"] == trained["R"] and evaluated["base"] == trained["base"]
    assert evaluated["OP"] == pytest.approx(trained["OP"])
    assert "run.json not found: RUN_DIR must be a directory written by train.py" in \
        refused(capsys, [str(tmp_path)], script="eval")
    # Each checkpoint carries its tokenizer: eval.py --model needs nothing else.
    ckpt = run / "checkpoints" / "task02"
    assert (ckpt / "tokenizer.model").read_bytes() == (model_dir / "tokenizer.model").read_bytes()
    eval_cli.main(["--model", str(ckpt), "--data", str(root), "--tasks", order, "--samples", "6",
                   "--max-new-tokens", "4", "--out", str(tmp_path / "one.json")])
    assert json.loads((tmp_path / "one.json").read_text())["scores"] == \
        dict(zip(order.split(","), evaluated["R"][1]))


def small_cfg(method, **kw):
    return ContinualConfig(**{**dict(method=method, lr=1e-3, batch_size=16, grad_accum=2, epochs=[2], max_len=32,
                                     replay_ratio=0.25, layer_budget=1, head_budget=2, query_budget=4, lambda2=1.0,
                                     eval_samples=8, max_new_tokens=8, ewc_samples=4), **kw})


@pytest.mark.parametrize("method", ["seekr", "ewc", "lwf", "olora", "pp", "l2p", "lfpt5", "sapt"])
def test_a_crashed_run_resumes_to_the_uninterrupted_result(toy, tmp_path, method):
    """Crash at the 7th optimiser step (task 2, mid-epoch), resume: same weights, results and log."""
    tok, tasks = toy
    tasks = tasks + [Task("swp", make_records("swp", 64, 0), [], make_records("swp", 8, 1))]
    cfg = small_cfg(method, checkpoint_every=3)
    whole = ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, cfg, tmp_path / "whole").run_all()

    with crash_at(ContinualTrainer, "optimizer_step", 7), pytest.raises(RuntimeError, match="simulated crash"):
        ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, cfg, tmp_path / "cut").run_all()
    latest = json.loads((tmp_path / "cut" / "resume" / "latest.json").read_text())["dir"]
    assert latest.startswith("task01-")                 # an in-task resume point, not a task boundary
    resumed = ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, cfg, tmp_path / "cut").run_all(resume=True)

    assert resumed.pop("run_dir").endswith("cut") and whole.pop("run_dir").endswith("whole")
    assert resumed == whole
    assert logged(tmp_path / "cut") == logged(tmp_path / "whole")
    a, b = (load_hf(tmp_path / run / "checkpoints" / "task03") for run in ("whole", "cut"))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    if METHODS[method].adapts:   # and the method's own parameters (and SAPT's task memories)
        a, b = (read_method(tmp_path / run / "checkpoints" / "task03" / FILE)[1] for run in ("whole", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_resume_of_a_directory_without_a_run_names_the_file(toy, tmp_path):
    tok, tasks = toy
    with pytest.raises(ValueError, match="holds no run to resume .config.json not found"):
        ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, small_cfg("seqft"), tmp_path).run_all(resume=True)


def test_a_run_stopped_before_its_first_resume_point_resumes_from_the_start(toy, tmp_path, monkeypatch):
    tok, tasks = toy
    whole = ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, small_cfg("replay"), tmp_path / "whole").run_all()
    step = ContinualTrainer.optimizer_step

    def crash_at_2nd(self, *args):
        if self.engine.step == 1:
            raise RuntimeError("simulated crash")
        return step(self, *args)

    monkeypatch.setattr(ContinualTrainer, "optimizer_step", crash_at_2nd)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, small_cfg("replay"), tmp_path / "cut").run_all()
    monkeypatch.setattr(ContinualTrainer, "optimizer_step", step)
    assert not (tmp_path / "cut" / "resume").exists() and (tmp_path / "cut" / "config.json").is_file()
    resumed = ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, small_cfg("replay"), tmp_path / "cut").run_all(
        resume=True)
    assert resumed.pop("run_dir").endswith("cut") and whole.pop("run_dir").endswith("whole")
    assert resumed == whole and logged(tmp_path / "cut") == logged(tmp_path / "whole")


def test_lwf_distils_the_previous_task_model_from_task_two_on(toy, tmp_path):
    tok, tasks = toy
    ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, small_cfg("lwf"), tmp_path).run_all()
    steps = [e for e in logged(tmp_path) if "step" in e]
    assert all("lwf_kl" not in e for e in steps if e["task"] == 0)
    second = [e for e in steps if e["task"] == 1]
    assert second[0]["lwf_kl"] == pytest.approx(0.0, abs=1e-6)    # before any update θ is θ_{k−1}
    assert max(e["lwf_kl"] for e in second) > 1e-4


def test_ewc_penalises_moving_away_from_the_first_task(toy, tmp_path):
    tok, tasks = toy
    ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, small_cfg("ewc"), tmp_path).run_all()
    steps = [e for e in logged(tmp_path) if "step" in e and "ewc" in e]
    assert all(e["ewc"] == 0.0 for e in steps if e["task"] == 0)       # nothing consolidated yet
    assert max(e["ewc"] for e in steps if e["task"] == 1) > 0


def test_mtl_trains_once_on_every_task_and_reports_one_row(toy, tmp_path):
    tok, tasks = toy
    scores = iter(range(100))
    summary = ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, small_cfg("mtl"), tmp_path,
                               eval_fn=lambda model, task: float(next(scores))).run_all()
    assert summary["base"] == [0.0, 1.0] and summary["R"] == [[2.0, 3.0]]
    assert summary["OP"] == 2.5 and summary["BWT"] is None and summary["FWT"] is None
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["task00", "task01"]
    steps = [e for e in logged(tmp_path) if "step" in e]
    assert len(steps) == 2 * 8 // 2        # one line per optimiser step: 2 epochs × 128/16 batches ÷ grad_accum 2


def test_budgets_larger_than_the_model_are_refused_before_training(toy, tmp_path):
    tok, tasks = toy
    with pytest.raises(ValueError, match=r"--layer-budget \(B_L\) must be in 1..2"):
        ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, small_cfg("seekr", layer_budget=24), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_demo_draws_seekrs_head_importance_or_says_how_to(toy, tmp_path, monkeypatch, capsys):
    from minseekr.run import demo
    tok, tasks = toy
    summary = ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, small_cfg("seekr", epochs=[1]), tmp_path,
                               eval_fn=lambda model, task: 0.0).run_all()
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # as if matplotlib were not installed
    demo.draw_importance(tmp_path, summary["heads"])
    assert "pip install matplotlib" in capsys.readouterr().out and not (tmp_path / "importance.png").exists()
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    demo.draw_importance(tmp_path, summary["heads"])
    assert (tmp_path / "importance.png").stat().st_size > 0


def test_demo_flags_typed_at_the_library_default_still_override_the_demo_settings():
    import argparse

    from minseekr.run.config import add_flags, from_flags, typed_flags
    parser = argparse.ArgumentParser()
    add_flags(parser, ContinualConfig)
    argv = ["--lambda2", "1000", "--epochs=3"]                 # 1000 is ContinualConfig's default, the demo's is not
    typed = typed_flags(argv)
    assert from_flags(ContinualConfig, parser.parse_args(argv), typed) == {"lambda2": 1000.0, "epochs": [3]}
