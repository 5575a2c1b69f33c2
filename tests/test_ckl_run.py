"""`train.py --knowledge`: continual knowledge learning on LAMA-ckl runs each method with a run directory, resumes
to the uninterrupted result, trains over two ranks as one process, and eval.py re-scores it (stories260K)."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import ROOT, crash_at, logged, refused, shared_path, train_process
from minseekr.network.checkpoint import load_hf
from minseekr.run.knowledge import METHODS, KnowledgeConfig, KnowledgeTrainer
from minseekr.runtime import InputError


def settings(out, method="finetune", **kw):
    return KnowledgeConfig(**{**dict(knowledge=str(shared_path("data", "lama-ckl")), out=str(out),
                                     model=str(shared_path("artifacts", "stories260K-hf")), method=method, learn=6,
                                     keep=2, epochs=2, batch_size=3, max_len=48, lr=1e-3, episodes=4, phi_batch=2,
                                     eval_batch=8, recadam_t0=2, recadam_k=1.0, recadam_gamma=10.0), **kw})


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


CRASHES = {   # method, (class, method, n): the n-th call raises, as a kill at that moment would stop the run; each
    # after a line was logged past the last resume point (φ's at step 3; θ's after epoch 1 of 2 steps)
    "taalm in φ's meta-training": ("taalm", torch.optim.AdamW, "step", 5),
    "taalm in a LoRA φ's meta-training": ("taalm", torch.optim.AdamW, "step", 5),
    "taalm inside the second epoch": ("taalm", "engine", "optimizer_step", 4),
    "taalm between epochs": ("taalm", KnowledgeTrainer, "train_epoch", 3),
    "rho1 between epochs": ("rho1", KnowledgeTrainer, "train_epoch", 3),   # its reference stays θ_0's
    "mixreview inside the second epoch": ("mixreview", "engine", "optimizer_step", 4),
    "recadam inside the second epoch": ("recadam", "engine", "optimizer_step", 4),   # θ_0 stays its anchor
}


@pytest.mark.parametrize("moment", CRASHES)
def test_a_crashed_run_resumes_to_the_uninterrupted_result(tmp_path, moment):
    method, cls, name, n = CRASHES[moment]
    kw = dict(epochs=3, episodes=10, phi_checkpoint_every=3, phi_lora=2 if "LoRA" in moment else 0)
    cut = settings(tmp_path / "cut", method, **kw)
    whole = KnowledgeTrainer(settings(tmp_path / "whole", method, **kw), tmp_path / "whole", "cpu").run_all()
    trainer = KnowledgeTrainer(cut, cut.out, "cpu")
    with crash_at(type(trainer.engine) if cls == "engine" else cls, name, n), \
            pytest.raises(RuntimeError, match="simulated crash"):
        trainer.run_all()
    assert (tmp_path / "cut" / "resume" / "phi.safetensors").is_file() == ("φ" in moment)
    resumed = KnowledgeTrainer(cut, cut.out, "cpu").run_all(resume=True)
    assert resumed == whole
    for file in ("metrics.jsonl", "filter.json"):
        assert (tmp_path / "cut" / file).read_bytes() == (tmp_path / "whole" / file).read_bytes(), file
    if method == "taalm":   # φ bit for bit (safetensors orders a header's metadata as it likes: compared as dicts)
        cut_phi, whole_phi = (tmp_path / run / "phi.safetensors" for run in ("cut", "whole"))
        assert safe_open(str(cut_phi), "pt").metadata() == safe_open(str(whole_phi), "pt").metadata()
        a, b = load_file(cut_phi), load_file(whole_phi)
        assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut" / "resume" / "phi.safetensors").exists()
    a, b = (load_hf(tmp_path / run / "checkpoints" / "final") for run in ("whole", "cut"))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def copy_data(tmp_path, edit=None):
    """A copy of LAMA-ckl in tmp_path/data, each file's rows passed through edit(name, rows) when given."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("variant.jsonl", "invariant_descriptive.jsonl", "invariant_schematic.jsonl"):
        rows = [json.loads(line) for line in shared_path("data", "lama-ckl", name).read_text().splitlines()]
        rows = edit(name, rows) if edit else rows
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def crashed_run(tmp_path, method="taalm", **kw):
    """A run on a copy of the data, crashed before its second epoch (one resume point, φ kept)."""
    cfg = settings(tmp_path / "run", method, epochs=2, knowledge=str(copy_data(tmp_path)), **kw)
    with crash_at(KnowledgeTrainer, "train_epoch", 2), pytest.raises(RuntimeError):
        KnowledgeTrainer(cfg, cfg.out, "cpu").run_all()
    return cfg, tmp_path / "run"


def test_a_resume_refuses_other_inputs_naming_what_changed(tmp_path):
    cfg, run = crashed_run(tmp_path)
    variant = Path(cfg.knowledge) / "variant.jsonl"
    original = variant.read_text()
    first = json.loads(original.splitlines()[0])
    variant.write_text(original.replace(json.dumps(first["evidence"])[1:-1], "Edited evidence.", 1))
    with pytest.raises(InputError, match=r"filter.json was written for other inputs than this run has: "
                                         r"task variant's records"):
        KnowledgeTrainer(cfg, cfg.out, "cpu").run_all(resume=True)
    variant.write_text(original)
    edited = json.loads((run / "knowledge.json").read_text())
    with pytest.raises(InputError, match=r"setting method: 'taalm' → 'oracle'"):
        KnowledgeTrainer(KnowledgeConfig(**{**edited, "method": "oracle"}), cfg.out, "cpu").run_all(resume=True)


def test_a_resume_refuses_an_edited_log_filter_or_phi(tmp_path):
    cfg, run = crashed_run(tmp_path)
    log, text = run / "metrics.jsonl", (run / "metrics.jsonl").read_text()
    for damaged in (text.replace('"epoch": 0', '"epoch": 9'), None):
        log.write_text(damaged) if damaged else log.unlink()
        with pytest.raises(InputError, match="metrics.jsonl no longer starts with"):
            KnowledgeTrainer(cfg, cfg.out, "cpu").run_all(resume=True)
    log.write_text(text)
    chosen = json.loads((run / "filter.json").read_text())
    (run / "filter.json").write_text(json.dumps({**chosen, "learn": ["nope"] + chosen["learn"][1:]}))
    with pytest.raises(InputError, match="filter.json: learn names 'nope', which variant.jsonl does not hold"):
        KnowledgeTrainer(cfg, cfg.out, "cpu").run_all(resume=True)
    (run / "filter.json").write_text(json.dumps(chosen))
    phi, whole = run / "phi.safetensors", (run / "phi.safetensors").read_bytes()
    tensors = load_file(phi)
    tensors["phi.trunk.lm_head.bias"][0] = float("nan")
    save_file(tensors, phi, metadata=safe_open(str(phi), "pt").metadata())
    with pytest.raises(InputError, match="phi.safetensors: phi.trunk.lm_head.bias holds NaN"):
        KnowledgeTrainer(cfg, cfg.out, "cpu").run_all(resume=True)
    phi.write_bytes(whole[:1000])
    with pytest.raises(InputError, match="phi.safetensors: unreadable .*delete it to meta-train φ again"):
        KnowledgeTrainer(cfg, cfg.out, "cpu").run_all(resume=True)


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


def test_eval_refuses_to_rescore_a_run_on_edited_data(tmp_path, capsys):
    cfg = settings(tmp_path / "run", knowledge=str(copy_data(tmp_path)), epochs=1)
    KnowledgeTrainer(cfg, cfg.out, "cpu").run_all()
    variant = Path(cfg.knowledge) / "variant.jsonl"
    variant.write_text(variant.read_text().replace('"evidence": "', '"evidence": "Edited. ', 1))
    sys.path.insert(0, str(ROOT))
    err = refused(capsys, [cfg.out], script="eval")
    assert "are not those the run was trained and filtered on" in err


def test_bad_input_is_one_line(tmp_path, capsys):
    cfg = settings(tmp_path / "run")
    assert "needs --model DIR" in refused(capsys, ["--knowledge", cfg.knowledge, "--out", str(tmp_path / "a")])
    err = refused(capsys, ["--knowledge", str(tmp_path), "--model", cfg.model, "--out", str(tmp_path / "b")])
    assert "variant.jsonl not found" in err
    err = refused(capsys, [*flags(cfg), "--method", "mtl", "--out", str(tmp_path / "c")])
    assert "--method" in err and "finetune" in err
    err = refused(capsys, [*flags(cfg), "--max-len", "100000", "--out", str(tmp_path / "d")])
    assert "--max-len 100000" in err and "512 positions" in err
    err = refused(capsys, [*flags(cfg), "--method", "recadam", "--lr", "1e-3", "--out", str(tmp_path / "e")])
    assert "--lr 0.001 with --recadam-gamma 5000: the penalty step lr·γ = 5 overshoots θ_0" in err


def test_the_device_defaults_and_a_run_without_nf_facts_reports_none(tmp_path, capsys, monkeypatch):
    """No --device: the CPU where no GPU is visible. Facts θ_0 does not know as NF: NF is null, not a crash."""
    def unknowable(name, rows):
        return rows if name != "invariant_descriptive.jsonl" else [
            {**r, "object": "Zqxv Wjyk", "task_descriptive": f"{r['subject']} is Zqxv Wjyk .",
             "task_schematic": f"Guess the object. subject is {r['subject']} , object is Zqxv Wjyk"} for r in rows]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = settings(tmp_path / "run", knowledge=str(copy_data(tmp_path, unknowable)), epochs=1)
    sys.path.insert(0, str(ROOT))
    import train
    train.main([a for a in flags(cfg) if a not in ("--device", "cpu")] + ["--out", cfg.out])
    assert "NF Acc — (no NF fact kept)" in capsys.readouterr().err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["keep"] == 0 and results["nf_acc"] is None


def test_the_curves_are_drawn_where_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib", reason="the curves need matplotlib (pip install -e .[tools])")
    from minseekr.run.knowledge import draw_curves
    assert draw_curves(tmp_path / "c.png", {"taalm": {"tl": [0.0, 0.3], "nf": [1.0, 0.9]},
                                            "finetune": {"tl": [0.0, 0.1], "nf": [None, None]}})
    assert (tmp_path / "c.png").stat().st_size > 1000
