"""`train.py --knowledge`: continual knowledge learning on LAMA-ckl runs each method with a run directory, resumes
to the uninterrupted result, trains over two ranks as one process, and eval.py re-scores it (stories260K)."""
import json
import os
import sys

import pytest
import torch

from conftest import ROOT, logged, refused, shared_path, train_process
from minseekr.network.checkpoint import load_hf
from minseekr.run.knowledge import METHODS, KnowledgeConfig, KnowledgeTrainer


def settings(out, method="finetune", **kw):
    return KnowledgeConfig(**{**dict(knowledge=str(shared_path("data", "lama-ckl")), out=str(out),
                                     model=str(shared_path("artifacts", "stories260K-hf")), method=method, learn=6,
                                     keep=2, epochs=2, batch_size=3, max_len=48, lr=1e-3, episodes=4, phi_batch=2,
                                     eval_batch=8), **kw})


def flags(cfg):
    return ["--knowledge", cfg.knowledge, "--model", cfg.model, "--method", cfg.method, "--learn", str(cfg.learn),
            "--keep", str(cfg.keep), "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size), "--max-len",
            str(cfg.max_len), "--lr", str(cfg.lr), "--threads", "1", "--device", "cpu"]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_learns_with_the_authors_table(tmp_path, method):
    cfg = settings(tmp_path / "run", method)
    results = KnowledgeTrainer(cfg, cfg.out, "cpu").run_all()
    assert len(results["tl"]) == len(results["nf"]) == cfg.epochs + 1 and results["tl"][0] == 0.0   # TL: θ_0 knew none
    assert results["top_acc"] == max(results["tl"]) and results["learn"] == 6
    chosen = json.loads((tmp_path / "run" / "filter.json").read_text())
    assert len(chosen["variant_scores"]) == 500 and len(chosen["learn"]) == 6
    epochs = [e for e in logged(tmp_path / "run") if "tl" in e]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert (tmp_path / "run" / "phi.safetensors").is_file() == (method == "taalm")


def test_a_crashed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    whole = KnowledgeTrainer(settings(tmp_path / "whole", "taalm", epochs=3), tmp_path / "whole", "cpu").run_all()
    step, calls = KnowledgeTrainer.train_epoch, []

    def crash_in_the_third(self, epoch, *args):
        calls.append(epoch)
        if epoch == 2:
            raise RuntimeError("simulated crash")
        return step(self, epoch, *args)

    monkeypatch.setattr(KnowledgeTrainer, "train_epoch", crash_in_the_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        KnowledgeTrainer(settings(tmp_path / "cut", "taalm", epochs=3), tmp_path / "cut", "cpu").run_all()
    monkeypatch.setattr(KnowledgeTrainer, "train_epoch", step)
    resumed = KnowledgeTrainer(settings(tmp_path / "cut", "taalm", epochs=3), tmp_path / "cut", "cpu").run_all(
        resume=True)
    assert resumed == whole
    a, b = (load_hf(tmp_path / run / "checkpoints" / "final") for run in ("whole", "cut"))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("fsdp", ["minseekr", "torch"])
def test_two_ranks_train_as_one_process_and_eval_rescores_the_run(tmp_path, capsys, fsdp):
    cfg = settings(tmp_path, "oracle")
    single = train_process([*flags(cfg), "--fsdp", fsdp], tmp_path / "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29800 + os.getpid() % 1000)]
    sharded = train_process([*flags(cfg), "--fsdp", fsdp], tmp_path / "two", torchrun)
    assert sharded["tl"] == pytest.approx(single["tl"], abs=1e-6) and sharded["learn"] == single["learn"]
    sys.path.insert(0, str(ROOT))
    import eval as eval_cli
    eval_cli.main([str(tmp_path / "one")])
    scored = json.loads((tmp_path / "one" / "eval.json").read_text())
    assert scored["final"]["tl"] == pytest.approx(single["tl"][-1], abs=1e-6) and scored["θ_0"]["tl"] == 0.0


def test_bad_input_is_one_line(tmp_path, capsys):
    cfg = settings(tmp_path / "run")
    assert "needs --model DIR" in refused(capsys, ["--knowledge", cfg.knowledge, "--out", str(tmp_path / "a")])
    err = refused(capsys, ["--knowledge", str(tmp_path), "--model", cfg.model, "--out", str(tmp_path / "b")])
    assert "variant.jsonl not found" in err
    err = refused(capsys, [*flags(cfg), "--method", "mtl", "--out", str(tmp_path / "c")])
    assert "--method" in err and "finetune" in err


def test_the_curves_are_drawn_where_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib", reason="the curves need matplotlib (pip install -e .[tools])")
    from minseekr.run.knowledge import draw_curves
    assert draw_curves(tmp_path / "c.png", {"taalm": {"tl": [0.0, 0.3], "nf": [1.0, 0.9]},
                                            "finetune": {"tl": [0.0, 0.1], "nf": [None, None]}})
    assert (tmp_path / "c.png").stat().st_size > 1000
