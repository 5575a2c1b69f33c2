"""What runs on LLaMA runs on every family: each method, resume, and both engines over two ranks, on tiny Gemma-3,
Qwen2 (a sliding layer, biases), Llama-3 (RoPE scaling) and Mistral (every layer sliding) models (their exactness:
tests/test_families.py)."""
import json
import os
import sys

import pytest
import torch

from conftest import crash_at, logged, tiny_run_inputs, train_process
from minseekr.evaluation.data import Task
from minseekr.engines.engine import build_engine
from minseekr.evaluation.synthetic import make_records, train_tokenizer
from minseekr.methods.table import METHODS
from minseekr.methods.training import prepare
from minseekr.network.checkpoint import load_hf
from minseekr.network.model import ModelArgs, Transformer
from minseekr.network.tokenizer import Tokenizer
from minseekr.run.config import ContinualConfig
from minseekr.run.trainer import ContinualTrainer

FAMILIES = {
    "gemma3": dict(family="gemma3_text", head_dim=16, n_kv_heads=1, activation="gelu_tanh", norm_offset=True,
                   embed_scale=True, sandwich_norms=True, qk_norm=True, query_pre_attn_scalar=24, sliding_window=6,
                   layer_types=["sliding_attention", "full_attention"], rope_theta=1e6, rope_local_theta=1e4,
                   tie_embeddings=True),
    "qwen2": dict(family="qwen2", qkv_bias=True, sliding_window=6, layer_types=["full_attention",
                                                                                 "sliding_attention"]),
    "llama3": dict(rope_theta=5e5, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "mistral": dict(family="mistral", sliding_window=5, head_dim=16),
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "demo.model"
    train_tokenizer(path)
    tok = Tokenizer(str(path))
    tasks = [Task(t, make_records(t, 32, 0), [], make_records(t, 4, 1)) for t in ("rev", "rot")]
    return tok, tasks


def tiny(family: str, vocab: int) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**{**dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab,
                                            hidden_dim=64, max_seq_len=64), **FAMILIES[family]}))
    model.init_weights()
    return model


def cfg(method, **kw):
    return ContinualConfig(**{**dict(method=method, lr=1e-3, batch_size=16, epochs=[1], max_len=32,
                                     replay_ratio=0.25, layer_budget=1, head_budget=2, query_budget=4, lambda2=1.0,
                                     eval_samples=4, max_new_tokens=6, ewc_samples=4, prompt_tokens=2,
                                     l2p_pool=4, l2p_length=2, l2p_top_k=2, lora_rank=2, sapt_rank=2,
                                     pseudo_inputs="self"), **kw})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_every_family(toy, tmp_path, family, method):
    tok, tasks = toy
    summary = ContinualTrainer(tiny(family, tok.vocab_size), tok, tasks, cfg(method), tmp_path).run_all()
    assert len(summary["R"]) == (1 if METHODS[method].joint else 2)
    last = load_hf(tmp_path / "checkpoints" / ("task01" if METHODS[method].joint else "task02"))
    assert last.args == tiny(family, tok.vocab_size).args   # the family survives the HF round trip
    if METHODS[method].distils_attention:
        assert len(summary["heads"]) == 2


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_gemma3_in_pytorchs_fsdp2(toy, tmp_path, method):
    tok, tasks = toy
    settings = cfg(method)
    engine = build_engine(prepare(tiny("gemma3", tok.vocab_size), method), "torch", betas=settings.betas,
                          weight_decay=settings.weight_decay)
    summary = ContinualTrainer(engine, tok, tasks, settings, tmp_path).run_all()
    assert len(summary["R"]) == (1 if METHODS[method].joint else 2)


@pytest.mark.parametrize("method", ["seekr", "olora"])
def test_a_crashed_gemma3_run_resumes_to_the_uninterrupted_result(toy, tmp_path, method):
    tok, tasks = toy
    settings = cfg(method, epochs=[2], grad_accum=2, checkpoint_every=2)
    whole = ContinualTrainer(tiny("gemma3", tok.vocab_size), tok, tasks, settings, tmp_path / "whole").run_all()
    with crash_at(ContinualTrainer, "optimizer_step", 4), pytest.raises(RuntimeError, match="simulated crash"):
        ContinualTrainer(tiny("gemma3", tok.vocab_size), tok, tasks, settings, tmp_path / "cut").run_all()
    resumed = ContinualTrainer(tiny("gemma3", tok.vocab_size), tok, tasks, settings, tmp_path / "cut").run_all(
        resume=True)
    assert resumed.pop("run_dir").endswith("cut") and whole.pop("run_dir").endswith("whole")
    assert resumed == whole and logged(tmp_path / "cut") == logged(tmp_path / "whole")


@pytest.mark.parametrize("family, fsdp", [("gemma3", "minseekr"), ("gemma3", "torch"), ("qwen2", "minseekr")])
def test_two_rank_seekr_equals_the_single_process(tmp_path_factory, tmp_path, family, fsdp):
    """Both engines shard Gemma-3's extra norms, q/k norms and MQA projections, and Qwen2's biases beside a sliding
    layer; two ranks train as one process."""
    model_dir, data = tiny_run_inputs(tmp_path_factory.mktemp(family), 24, 6, **FAMILIES[family])
    flags = ["--model", str(model_dir), "--data", str(data), "--order", "rev,rot", "--method", "seekr",
             "--lr", "1e-3", "--batch-size", "6", "--max-len", "32", "--replay-ratio", "0.25", "--layer-budget", "1",
             "--head-budget", "2", "--query-budget", "4", "--eval-samples", "6", "--max-new-tokens", "6",
             "--threads", "1", "--device", "cpu", "--fsdp", fsdp]
    single = train_process(flags, tmp_path / "one")
    sharded = train_process(flags, tmp_path / "two", [sys.executable, "-m", "torch.distributed.run",
                                                      "--nproc_per_node", "2", "--master_port",
                                                      str(29700 + os.getpid() % 1000)])
    assert sharded["R"] == single["R"] and sharded["heads"] == single["heads"]
    for a, b in zip(logged(tmp_path / "one"), logged(tmp_path / "two")):
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    config = json.loads((tmp_path / "two" / "checkpoints" / "task02" / "config.json").read_text())
    assert config["model_type"] == FAMILIES[family]["family"] and "sliding_attention" in config["layer_types"]
