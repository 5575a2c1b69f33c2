"""tools/head_maps.py: its budgets follow the model (the paper's proportions), budgets that would select every head
are refused by name, and its --help shows every default. tools/bench_model.py: each --family builds one model in
both libraries, and its check refuses logits that differ and sliding masks that are per head or per layer."""
import json
import sys

import pytest
import torch
from conftest import ROOT, shared_path

from minseekr.network.args import ARCHITECTURES
from minseekr.runtime import InputError
from minseekr.seekr.heads import HeadScores

sys.path.insert(0, str(ROOT / "tools"))
import bench_model as bench  # noqa: E402
import head_maps as tool  # noqa: E402
import real_experiment as experiment  # noqa: E402


def test_default_budgets_are_the_papers_proportions_of_the_model():
    assert tool.budgets(32, 32) == (24, 128)                       # LLaMA-2-7B: the paper's own
    assert tool.budgets(30, 9) == (experiment.SETTINGS["layer_budget"], experiment.SETTINGS["head_budget"])
    assert tool.budgets(5, 8) == (3, 5)                            # stories260K: 5 of its 40 heads
    assert tool.budgets(2, 4) == (1, 1)
    assert tool.budgets(5, 8, layer_budget=2) == (2, 5) and tool.budgets(5, 8, head_budget=7) == (3, 7)


@pytest.mark.parametrize("given, named", [
    ((5, 40), "--layer-budget 5 and --head-budget 40 select every head of the model's 5 layers × 8 heads"),
    ((24, None), "--layer-budget 24: expected 1 to the model's 5 layers"),
    ((2, 17), "--head-budget 17: expected 1 to the 16 heads"),
    ((0, None), "--layer-budget 0"),
], ids=["every-head", "layers-beyond-the-model", "heads-beyond-the-layers", "no-layer"])
def test_budgets_out_of_range_or_selecting_every_head_are_refused_by_name(given, named):
    with pytest.raises(InputError, match=named):
        tool.budgets(5, 8, *given)


def test_help_shows_every_default(capsys):
    parser = tool.parser()
    optional = [a for a in parser._actions if a.option_strings and a.dest != "help" and not a.required]
    assert optional
    for action in optional:
        assert "default" in action.help, action.dest
    with pytest.raises(SystemExit):
        tool.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 50)" in text and "3/4 of the model's layers" in text and "1/8 of the model's heads" in text


def test_default_budgets_select_an_eighth_of_a_small_models_heads(tmp_path, monkeypatch, capsys):
    model = shared_path("artifacts", "stories260K-hf")             # 5 layers × 8 heads
    task = tmp_path / "count"
    task.mkdir()
    task.joinpath("train.json").write_text(json.dumps([{"prompt": f"Count to {n}:", "answer": " 1 2 3"[:2 * n]}
                                                       for n in (1, 2, 3)]))
    monkeypatch.setattr(tool, "draw", lambda *args: None)           # the figures need matplotlib, the choice does not
    tool.main(["--checkpoints", str(model), str(model), "--tasks", str(task), "--out", str(tmp_path / "maps"),
               "--samples", "3", "--max-len", "32"])
    out = capsys.readouterr().out
    assert "5 heads selected (B_H = 5 of the model's 5 × 8) in" in out and "(B_L = 3)" in out
    assert HeadScores.load(tmp_path / "maps" / "head_scores.safetensors").tasks == ["count"]
    with pytest.raises(SystemExit):
        tool.main(["--checkpoints", str(model), str(model), "--tasks", str(task), "--out", str(tmp_path / "maps"),
                   "--layer-budget", "5", "--head-budget", "40"])
    assert "select every head" in capsys.readouterr().err


def bench_options(monkeypatch, family):
    monkeypatch.setattr(sys, "argv", ["bench_model.py", "--family", family, "--dim", "32", "--n_layers", "2",
                                      "--n_heads", "4", "--n_kv_heads", "2", "--hidden_dim", "48",
                                      "--vocab_size", "61", "--batch", "2", "--seq", "12"])
    return bench.parse()


@pytest.mark.parametrize("family, masked", [("llama", "0 of 2"), ("qwen2", "0 of 2"), ("mistral", "2 of 2"),
                                            ("gemma3", "1 of 2")])
def test_bench_model_builds_one_model_in_both_libraries_and_one_mask_for_every_sliding_head(monkeypatch, family,
                                                                                             masked):
    opt = bench_options(monkeypatch, family)
    models, tokens = bench.build(opt, opt.family, opt.window)
    assert type(models["hf"]).__name__ == ARCHITECTURES[models["ours"].args.family]
    masks = ", 1 distinct mask(s) (2, 1, 12, 12) bool" if masked != "0 of 2" else ", 0 distinct mask(s)"
    said = f"{masked} calls masked{masks}, kernels flash_attention ×2"   # the CPU's flash kernel takes masks
    assert bench.check(models, tokens, opt) == f"minseekr {said}; transformers {said}"


def test_bench_model_refuses_other_logits_and_masks_per_head_or_per_layer(monkeypatch):
    opt = bench_options(monkeypatch, "mistral")
    models, tokens = bench.build(opt, opt.family, opt.window)
    ours = models["ours"]
    built = ours.attention_mask
    monkeypatch.setattr(ours, "attention_mask", lambda *a: built(*a).expand(-1, 4, -1, -1))
    with pytest.raises(AssertionError, match=r"window 3: SDPA was handed masks .*\(2, 4, 12, 12\)"):
        bench.check(models, tokens, opt)
    monkeypatch.setattr(ours, "attention_mask", lambda *a: built(*a).clone())
    bench.check(models, tokens, opt)                                 # one mask a forward, still shared by layers
    layer = ours.model.layers[1].self_attn
    forward = layer.forward
    monkeypatch.setattr(layer, "forward", lambda x, cos, sin, mask, *a: forward(x, cos, sin, mask.clone(), *a))
    with pytest.raises(AssertionError, match="window 3: the layers build masks of their own"):
        bench.check(models, tokens, opt)
    monkeypatch.undo()
    with torch.no_grad():
        ours.model.norm.weight.add_(1e-3)
    with pytest.raises(AssertionError, match="logits differ"):
        bench.check(models, tokens, opt)
