"""train.py and eval.py as a user meets them: help, flag validation, settings precedence, resume's rules."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, refused, tiny_flags, tiny_run_inputs
from minseekr.engines.engine import build_engine
from minseekr.network.model import ModelArgs, Transformer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_inputs(tmp_path_factory.mktemp("cli"), n_train=16, n_test=4)


flags = tiny_flags


def cli(*argv, script="train.py"):
    return subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


def test_help_gives_every_flag_a_description_and_its_choices():
    done = cli("--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "--fsdp {minseekr,torch} training engine" in text
    assert "--method {seqft,replay,derpp,seekr,lwf,ewc,mtl,olora,pp,l2p,lfpt5,sapt} continual-learning method" in text
    assert "--importance {paper,official}" in text and "--ad-norm {mean,official}" in text
    assert "--epochs A,B,... epochs per task (one value repeats); default: the order's" in text
    assert "--lambda2 LAMBDA2 λ2 of Eq. 13: the attention-distillation weight (default: 1000.0)" in text


def test_a_misspelt_engine_is_refused_by_the_flag_and_by_the_library():
    done = cli("--fsdp", "torhc")
    assert done.returncode == 2 and "argument --fsdp: invalid choice: 'torhc'" in done.stderr
    with pytest.raises(ValueError, match="--fsdp must be one of minseekr|torch, got 'torhc'"):
        build_engine(Transformer(ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=11, hidden_dim=8)), "torhc")


@pytest.mark.parametrize("fsdp", ["minseekr", "torch"])
def test_train_loads_through_the_checked_loader_on_both_engines(setup, tmp_path, fsdp, capsys):
    """An extra tensor and an int8 weight are refused by name through train.py, as by load_hf."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in setup[0].iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    tensors = load_file(model_dir / "model.safetensors")
    save_file({**tensors, "model.layers.9.mlp.up_proj.weight": torch.zeros(2)}, model_dir / "model.safetensors")
    err = refused(capsys, flags((model_dir, setup[1]), tmp_path / "run", "--fsdp", fsdp))
    assert "model.safetensors: unexpected tensor 'model.layers.9.mlp.up_proj.weight'" in err
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int8)
    save_file(tensors, model_dir / "model.safetensors")
    assert "tensor 'model.norm.weight' has dtype I8" in refused(capsys, flags((model_dir, setup[1]), tmp_path / "run",
                                                                             "--fsdp", fsdp))


def test_resume_refuses_flags_that_would_change_the_run_and_accepts_threads(setup, tmp_path, capsys):
    import train as train_cli
    run = tmp_path / "run"
    train_cli.main(flags(setup, run, "--method", "replay"))
    with pytest.raises(SystemExit):
        train_cli.main(["--resume", str(run), "--lr", "1e-2", "--method", "seekr"])
    assert "--resume continues" in capsys.readouterr().err
    before = json.loads((run / "results.json").read_text())
    (run / "results.json").unlink()
    train_cli.main(["--resume", str(run), "--threads", "1"])           # nothing left to train: results again
    assert json.loads((run / "results.json").read_text()) == before


def test_settings_resolve_defaults_then_order_then_preset_then_typed(setup, tmp_path):
    import train as train_cli
    run = tmp_path / "run"
    train_cli.main(flags(setup, run, "--method", "seqft", "--preset", "paper", "--epochs", "1"))
    config = json.loads((run / "config.json").read_text())
    assert config["grad_accum"] == 8 and config["importance"] == "paper"       # the preset
    assert config["batch_size"] == 8 and config["lr"] == 1e-3 and config["epochs"] == [1]   # typed
    assert config["ad_norm"] == "mean"                                          # the library default


def test_a_methods_authors_defaults_come_after_the_librarys_and_before_the_preset_and_typed_flags(setup, tmp_path,
                                                                                                  monkeypatch):
    import train as train_cli

    class Resolved(Exception):
        pass

    def trainer(engine, tok, tasks, cfg, *args, **kwargs):   # stops train.py once its settings are resolved
        raise Resolved(cfg)

    monkeypatch.setattr(train_cli, "ContinualTrainer", trainer)

    def resolved(*extra):
        model_dir, data = setup
        with pytest.raises(Resolved) as stop:
            train_cli.main(["--model", str(model_dir), "--data", str(data), "--order", "rev,rot", "--out",
                            str(tmp_path / "run"), "--max-len", "32", "--max-new-tokens", "8", "--threads", "1",
                            "--device", "cpu", *extra])
        return stop.value.args[0]

    library = resolved("--method", "seekr")
    assert (library.lr, library.betas, library.weight_decay, library.prompt_tokens) == (1e-5, (0.9, 0.95), 0.0, 10)
    olora = resolved("--method", "olora")                                   # O-LoRA's scripts, HF's AdamW
    assert (olora.lr, olora.betas, olora.weight_decay) == (1e-3, (0.9, 0.999), 0.0)
    pp = resolved("--method", "pp")                                         # arazd's optimiser, TRACE's 20 vectors
    assert (pp.lr, pp.betas, pp.weight_decay, pp.prompt_tokens, pp.prompt_bottleneck) == \
        (0.3, (0.9, 0.999), 1e-5, 20, 0)
    assert resolved("--method", "sapt").betas == (0.9, 0.999) and resolved("--method", "lfpt5").betas == (0.9, 0.95)
    assert resolved("--method", "olora", "--preset", "official").betas == (0.9, 0.95)   # the preset comes after
    typed = resolved("--method", "pp", "--lr", "0.1,0.2", "--betas", "0.8,0.9", "--prompt-tokens", "4")
    assert (typed.lr, typed.betas, typed.prompt_tokens, typed.weight_decay) == ([0.1, 0.2], (0.8, 0.9), 4, 1e-5)
