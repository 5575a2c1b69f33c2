"""Algorithm 1 end to end: what a run directory holds after SeqFT, Replay and SEEKR (mechanics, not scores)."""
import json

import pytest
import torch

from conftest import shared_path
from minseekr.buffer import TaskMemory
from minseekr.continual import ContinualConfig, ContinualTrainer, interleave
from minseekr.data import Task, load_sequence
from minseekr.model import ModelArgs, Transformer
from minseekr.synthetic import make_records, train_tokenizer
from minseekr.tokenizer import Tokenizer


def test_interleave_spreads_replay_evenly_by_volume():
    plan = interleave({"new": 8, 0: 2, 1: 4})
    assert len(plan) == 14 and plan.count(("new", 0)) == 1
    positions = [i for i, (name, _) in enumerate(plan) if name == 0]
    assert positions[1] - positions[0] >= 6                       # two batches, half a plan apart
    assert [j for name, j in plan if name == 1] == [0, 1, 2, 3]   # each stream keeps its order


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
                          max_new_tokens=8, teacher_heads=teacher_heads, log_every=1)
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
    from minseekr.checkpoint import load_hf
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


def test_train_then_eval_cli_agree_on_the_matrix(tmp_path):
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
    eval_cli.main([str(run), "--samples", "6"])
    evaluated = json.loads((run / "eval.json").read_text())
    assert evaluated["R"] == trained["R"] and evaluated["base"] == trained["base"]
    assert evaluated["OP"] == pytest.approx(trained["OP"])
    with pytest.raises(SystemExit, match="run.json not found"):
        eval_cli.main([str(tmp_path)])
