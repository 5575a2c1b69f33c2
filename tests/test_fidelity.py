"""The paper's equations by default, each official-code choice one option away, each checked independently."""
import json
import shutil
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from conftest import shared_path
from minseekr.evaluation.data import Task
from minseekr.evaluation.synthetic import make_records, train_tokenizer
from minseekr.network.model import ModelArgs, Transformer
from minseekr.network.tokenizer import Tokenizer
from minseekr.run.config import ContinualConfig, preset, read_settings, resolve
from minseekr.run.trainer import ContinualTrainer
from minseekr.seekr.buffer import TaskMemory
from minseekr.seekr.distill import logit_mse
from minseekr.seekr.kl import AttentionKL, attention_rows, query_rows


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "demo.model"
    train_tokenizer(path)
    return Tokenizer(str(path))


def tiny_model(vocab, seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, hidden_dim=64))
    model.init_weights()
    return model


def cfg(method="seqft", **kw):
    return ContinualConfig(**{**dict(method=method, lr=1e-3, batch_size=8, epochs=[1], max_len=32, eval_samples=4,
                                     max_new_tokens=8, replay_ratio=0.25, layer_budget=1, head_budget=2,
                                     query_budget=4, lambda2=1.0), **kw})


def lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- gradient accumulation: the step's gradient is the mean over its micro-batches --------------------------

def test_one_batch_of_8_and_two_accumulated_batches_of_4_give_the_same_update_and_gradient_norm(tok, tmp_path):
    tasks = [Task("rev", make_records("rev", 8, 0), [], make_records("rev", 2, 1))]   # equal label counts
    engines = []
    for name, batch, accum in (("one", 8, 1), ("two", 4, 2)):
        trainer = ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks,
                                   cfg(batch_size=batch, grad_accum=accum, clip=0.05), tmp_path / name)
        trainer.train_task(0)
        engines.append(trainer.engine)
        (step,) = lines(tmp_path / name)                  # one optimiser step, logged once
        assert step["step"] == 1 and step["grad_norm"] > 0.05    # clipping was active
        assert step["task_ce"] == pytest.approx(lines(tmp_path / "one")[0]["task_ce"], rel=1e-6)
    assert lines(tmp_path / "two")[0]["grad_norm"] == pytest.approx(lines(tmp_path / "one")[0]["grad_norm"], rel=1e-5)
    for (name, a), (_, b) in zip(engines[0].full_tensors(), engines[1].full_tensors()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_every_optimiser_step_logs_its_gradient_norm_before_clipping(tok, tmp_path):
    tasks = [Task("rev", make_records("rev", 20, 0), [], make_records("rev", 2, 1))]
    trainer = ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, cfg(batch_size=4, grad_accum=2, epochs=[2]),
                               tmp_path)
    trainer.train_task(0)
    steps = lines(tmp_path)
    # 2 epochs × 5 micro-batches = 10 micro-steps: 5 optimiser steps of 2 micro-steps each, across the epoch boundary
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5] and [s["epoch"] for s in steps] == [0, 0, 1, 1, 1]
    assert all(s["grad_norm"] > 0 for s in steps)


def test_each_task_trains_at_its_own_learning_rate_and_one_rate_reads_as_before(tok, tmp_path):
    tasks = [Task(t, make_records(t, 16, 0), [], make_records(t, 2, 1)) for t in ("rev", "rot")]
    trainer = ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, cfg(lr=[1e-3, 3e-4]), tmp_path / "two")
    used, step = [], trainer.engine.optimizer_step
    trainer.engine.optimizer_step = lambda lr: (used.append(lr), step(lr))
    for s in range(2):
        trainer.train_task(s)
    assert used == [1e-3, 1e-3, 3e-4, 3e-4]                  # 16 samples / batch 8: two steps per task
    with pytest.raises(ValueError, match=r"--lr needs one value or one per task \(2\), got 3: "):
        ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, cfg(lr=[1e-3] * 3), tmp_path / "three")
    with pytest.raises(ValueError, match=r"--lr needs one value \(it trains every task at once\)"):
        ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, cfg("mtl", lr=[1e-3, 3e-4]), tmp_path / "mtl")
    # One value, typed or from a run's config.json of before, stays a number: its config and fingerprint unchanged.
    (tmp_path / "config.json").write_text(json.dumps({**asdict(ContinualConfig()), "lr": 1e-05}))
    old = read_settings(tmp_path / "config.json", ContinualConfig)
    assert old.lr == 1e-05 and old.lr_for(3) == 1e-05 and '"lr": 1e-05,' in json.dumps(asdict(old))
    assert ContinualConfig(lr=[2e-4]).lr == 2e-4 and resolve({"lr": 1}).lr == 1.0


# --- query rows and the attention loss's normalisation --------------------------------------------------------

def test_a_sample_shorter_than_the_query_budget_stores_each_of_its_rows_once(tok, tmp_path):
    tasks = [Task(t, make_records(t, 16, 0), [], make_records(t, 2, 1)) for t in ("rev", "rot")]
    ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, cfg("seekr", query_budget=100), tmp_path,
                     eval_fn=lambda model, task: 0.0).run_all()
    memory = TaskMemory(tmp_path / "buffer", 0)
    for i in range(len(memory)):
        assert memory[i]["rows"].tolist() == list(range(memory[i]["input_ids"].numel()))
    ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, cfg("seekr", query_budget=0), tmp_path / "zero",
                     eval_fn=lambda model, task: 0.0).run_all()
    memory = TaskMemory(tmp_path / "zero" / "buffer", 0)                # B_T = 0: every row, as the official script
    assert memory[0]["rows"].tolist() == list(range(memory[0]["input_ids"].numel()))


def naive_kl_terms(model, ids, mask, rows, heads, teacher):
    """KL(teacher ‖ student) (B, |H|, T) from the student's full materialised maps, padding rows 0."""
    _, maps = model(ids, mask, return_attn=True)
    out = torch.zeros(len(ids), len(heads), rows.shape[1])
    for j, (layer, head) in enumerate(heads):
        for b in range(len(ids)):
            for t, r in enumerate(rows[b].tolist()):
                if r >= 0:
                    p, a = maps[layer][b, head, r], teacher[b, j, t]
                    keep = a > 0
                    out[b, j, t] = (a[keep] * (a[keep].log() - p[keep].log())).sum()
    return out


def test_both_attention_loss_normalisations_equal_their_naive_definitions():
    torch.manual_seed(0)
    model = tiny_model(61, seed=1).eval()
    ids = torch.randint(1, 61, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[2, 6:] = 0                                                     # a right-padded shorter sample
    rows = torch.tensor([[1, 4, 8], [0, 5, 7], [2, 5, -1]])            # its third row is padding
    heads = [(0, 1), (1, 0), (1, 3)]
    teacher = torch.zeros(3, 3, 3, 9)
    other = tiny_model(61, seed=2).eval()                               # a teacher that differs
    recorded = {}

    def record(layer, q, k, v, out):
        hs = torch.tensor([h for l, h in heads if l == layer])
        if len(hs):
            q_rows, kv = query_rows(q, hs, rows, k.shape[1])
            recorded[layer] = attention_rows(q_rows, k, rows, mask, kv_heads=kv)

    with torch.no_grad():
        other(ids, mask, probe=record)
    teacher = torch.cat([recorded[0], recorded[1]], 1)                 # heads in (layer, head) order
    probe = AttentionKL(heads, rows, teacher, mask)
    with torch.no_grad():
        model(ids, mask, probe=probe)
        naive = naive_kl_terms(model, ids, mask, rows, heads, teacher)
    n_rows = torch.tensor([3, 3, 2])
    # mean: Σ KL / (|H| · Σ_i T_i)
    torch.testing.assert_close(probe.total() / (3 * n_rows.sum()), naive.sum() / (3 * 8), atol=1e-5, rtol=1e-5)
    # official: per layer, batchmean over each sample's heads × rows, ÷ the micro-batch, then the mean over layers
    per_layer = [naive[:, :1].sum((1, 2)) / (1 * n_rows), naive[:, 1:].sum((1, 2)) / (2 * n_rows)]
    official = sum(layer.sum() / 3 for layer in per_layer) / 2
    torch.testing.assert_close(probe.layer_means().sum() / (3 * len(probe.kl)), official, atol=1e-5, rtol=1e-5)


def test_logit_mse_is_der_plus_plus_regression_of_the_stored_logits():
    student = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, -100, -100]])
    teacher = torch.randn(4, 7)
    batch = {"labels": labels, "teacher_logits": teacher}
    got = logit_mse(student, batch)
    predicting = student[:, :-1][labels[:, 1:] != -100]
    torch.testing.assert_close(got.mean(), F.mse_loss(predicting, teacher))
    with pytest.raises(ValueError, match="--logit-topk 0"):
        ContinualConfig(logit_loss="mse", logit_topk=8)


# --- settings: presets and precedence ------------------------------------------------------------------------

def test_the_paper_preset_follows_section_4_1_at_1_and_10_percent_and_for_13b():
    one = preset("paper", 0.01, 32)
    assert (one["lambda2"], one["layer_budget"], one["head_budget"], one["query_budget"]) == (1e3, 24, 128, 100)
    assert one["batch_size"] * one["grad_accum"] == 128 and one["lr"] == 1e-5 and one["lambda1"] == 0.5
    ten = preset("paper", 0.1, 32)
    assert (ten["lambda2"], ten["layer_budget"]) == (1e2, 8)
    assert preset("paper", 0.01, 40)["layer_budget"] == 8              # Vicuna-13B
    official = preset("official", 0.01, 32)
    assert {k: official[k] for k in ("query_budget", "replay_select", "importance", "sensitivity_entries",
                                     "sensitivity_norm", "forgettability_norm", "ad_norm", "lambda2")} == \
        dict(query_budget=0, replay_select="first", importance="official", sensitivity_entries="all",
             sensitivity_norm="mean_square", forgettability_norm="mean_square", ad_norm="official", lambda2=1e3)
    # library defaults, then the preset, then typed flags
    assert resolve(official, {"layer_budget": 2}).layer_budget == 2
    assert resolve(official).importance == "official" and ContinualConfig().importance == "paper"


def test_train_cli_records_the_preset_and_lets_typed_flags_win(tmp_path):
    import train as train_cli
    model_dir = shared_path("artifacts", "stories260K-hf")
    run = tmp_path / "run"
    train_cli.main(["--model", str(model_dir), "--data", str(shared_path("data", "superni")), "--order",
                    "task363_sst2_polarity_classification,task195_sentiment140_classification", "--preset", "official",
                    "--out", str(run), "--train-samples", "16", "--test-samples", "2", "--layer-budget", "2",
                    "--head-budget", "4", "--replay-ratio", "0.125", "--grad-accum", "1", "--max-len", "128",
                    "--max-new-tokens", "2", "--lr", "1e-4"])
    config = json.loads((run / "config.json").read_text())
    assert json.loads((run / "run.json").read_text())["preset"] == "official"
    assert (config["importance"], config["ad_norm"], config["query_budget"], config["replay_select"]) == \
        ("official", "official", 0, "first")
    assert (config["layer_budget"], config["head_budget"], config["replay_ratio"]) == (2, 4, 0.125)   # typed
    results = json.loads((run / "results.json").read_text())
    assert results["BWT_T"] == pytest.approx(results["BWT"] / 2)        # T = 2: ÷ 2 instead of ÷ 1
    assert {"FWT", "heads", "run_dir"} <= set(results) and len(results["heads"]) == 4


# --- guards -------------------------------------------------------------------------------------------------

def test_an_empty_replay_buffer_is_an_error_naming_ratio_task_size_and_fix(tok, tmp_path):
    tasks = [Task(t, make_records(t, 32, 0), [], make_records(t, 2, 1)) for t in ("rev", "rot")]
    with pytest.raises(ValueError, match=r"--replay-ratio 0.01 keeps round\(0.01 × 32\) = 0 samples of task rev "
                                         r"\(32 training samples\).*--replay-ratio ≥ 0.0312"):
        ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, cfg("seekr", replay_ratio=0.01), tmp_path)
    ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, cfg("seqft", replay_ratio=0.01), tmp_path)   # no replay


def test_the_official_preset_sizes_r_k_as_the_official_code_with_int(tok, tmp_path):
    """150 samples at 1%: round gives 2 (the paper's reading), int gives 1 (the official code's `int(0.01·n)`)."""
    tasks = [Task(t, make_records(t, 150, 0), [], make_records(t, 2, 1)) for t in ("rev", "rot")]
    sizes = {rounding: ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks,
                                        cfg("derpp", replay_ratio=0.01, replay_rounding=rounding), tmp_path / rounding)
             .memory.replay_size(0) for rounding in ("round", "floor")}
    assert sizes == {"round": 2, "floor": 1}
    assert preset("official", 0.01, 32)["replay_rounding"] == "floor"
    assert preset("paper", 0.01, 32)["replay_rounding"] == "round" == ContinualConfig().replay_rounding


def test_a_missing_forgettability_snapshot_on_a_mid_task_resume_is_an_error(tok, tmp_path, monkeypatch):
    tasks = [Task(t, make_records(t, 32, 0), [], make_records(t, 2, 1)) for t in ("rev", "rot")]
    settings = cfg("seekr", batch_size=4, checkpoint_every=2)
    step = ContinualTrainer.optimizer_step
    calls = []

    def crash_at_11th(self, *args):
        calls.append(1)
        if len(calls) == 11:                  # task 2, after its first resume point
            raise RuntimeError("simulated crash")
        return step(self, *args)

    monkeypatch.setattr(ContinualTrainer, "optimizer_step", crash_at_11th)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, settings, tmp_path,
                         eval_fn=lambda model, task: 0.0).run_all()
    monkeypatch.setattr(ContinualTrainer, "optimizer_step", step)
    assert json.loads((tmp_path / "resume" / "latest.json").read_text())["dir"].startswith("task01-")
    snapshot = tmp_path / "snapshots" / "task01-rank00000"
    assert sorted(f.name for f in snapshot.iterdir()) == ["batch00000.safetensors", "batch00001.safetensors"]
    shutil.rmtree(snapshot)
    with pytest.raises(FileNotFoundError, match="task01-rank00000: θ_{k−1}'s attention .* missing"):
        ContinualTrainer(tiny_model(tok.vocab_size), tok, tasks, settings, tmp_path,
                         eval_fn=lambda model, task: 0.0).run_all(resume=True)
