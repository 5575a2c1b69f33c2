"""tools/memory_model.py: parameter counts, shard bytes, activation bytes against autograd, the printed table."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import memory_model as mm  # noqa: E402
from minseekr.network.model import Block, ModelArgs, rope_cos_sin  # noqa: E402


def llama2(name):
    return ModelArgs(**mm.LLAMA2[name])


@pytest.mark.parametrize("name, published", [("7b", 6_738_415_616), ("13b", 13_015_864_320)])
def test_parameter_counts_from_the_meta_model_equal_the_published_llama2_sizes(name, published):
    args = llama2(name)
    units = mm.unit_sizes(args)
    assert sum(units) == published
    assert units[0] == 2 * args.vocab_size * args.dim + args.dim      # embeddings, lm_head, final norm
    assert len(units) == 1 + args.n_layers and len(set(units[1:])) == 1


@pytest.mark.parametrize("name", ["7b", "13b"])
def test_sharded_state_is_16P_over_N_bytes_on_8_ranks(name):
    P = mm.unit_sizes(llama2(name))
    terms = {t.name: t.bytes for t in mm.memory_terms(llama2(name), mm.Setting(gpus=8))}
    state = terms["parameters, fp32 shard"] + terms["gradients, fp32 shard"] + terms["AdamW moments, fp32 shards"]
    assert state == 16 * sum(P) // 8
    assert terms["parameters, fp32 shard"] == terms["gradients, fp32 shard"] == 4 * sum(P) // 8


def test_shards_round_each_unit_up_to_a_multiple_of_the_world_size():
    units = mm.unit_sizes(llama2("7b"))                                 # 3 does not divide every unit
    terms = {t.name: t.bytes for t in mm.memory_terms(llama2("7b"), mm.Setting(gpus=3))}
    padded = sum(-(-n // 3) * 3 for n in units)
    assert padded > sum(units)
    assert terms["parameters, fp32 shard"] == 4 * padded // 3


def _saved_bytes(args, B, S, padding_mask):
    """Bytes of the distinct storages a bf16 Block's forward saves for backward, parameters and RoPE tables aside."""
    block = Block(args, 0).to(torch.bfloat16)
    x = torch.randn(B, S, args.dim, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(S).expand(B, S), args.head_dim, args.rope_theta, torch.bfloat16)
    mask = None
    if padding_mask:  # causal, with the first two keys of sample 0 padded (a padded row sees itself)
        real = torch.ones(B, S, dtype=torch.bool)
        real[0, :2] = False
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        mask = (causal & real[:, None, None, :]) | torch.eye(S, dtype=torch.bool)      # (B, 1, S, S)
    shared = {t.untyped_storage().data_ptr() for t in [*block.parameters(), cos, sin]}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in shared:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = block(x, cos, sin, mask)
    out.float().sum().backward()  # the graph is whole: what was saved is what backward used
    return sum(saved.values())


@pytest.mark.parametrize("n_kv_heads, head_dim", [(4, 16), (2, 16), (4, 8)])
@pytest.mark.parametrize("padding_mask", [False, True])
def test_block_activation_formula_equals_the_tensors_autograd_saves(n_kv_heads, head_dim, padding_mask):
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=n_kv_heads, head_dim=head_dim, hidden_dim=96,
                     vocab_size=50)
    B, S = 2, 16
    assert mm.block_activations(args, B, S, padding_mask) == _saved_bytes(args, B, S, padding_mask)


def test_block_activations_by_hand_for_llama2_7b():
    # Per token: 2 norms × (4d + 4 + 2·2d) + 2·(q, k, v, O) + 4·H (lse) + 4·2·F (MLP), plus the 2·S mask bias.
    d, F, H, S = 4096, 11008, 32, 1536
    assert mm.block_activations(llama2("7b"), 1, S) == S * (2 * (8 * d + 4) + 8 * d + 4 * H + 8 * F + 2 * S)


@pytest.mark.parametrize("name", ["7b", "13b"])
def test_checkpointing_keeps_less_and_activations_scale_linearly_in_micro_batch(name):
    def activations(B, checkpointing):
        terms = mm.memory_terms(llama2(name), mm.Setting(micro_batch=B, checkpointing=checkpointing))
        return sum(t.bytes for t in terms if t.name.startswith("block activations"))

    for B in (1, 2, 3):
        assert activations(B, True) < activations(B, False)
        for checkpointing in (True, False):
            assert activations(2 * B, checkpointing) == 2 * activations(B, checkpointing)
            assert activations(3 * B, checkpointing) == 3 * activations(B, checkpointing)


def test_peaks_add_the_rows_of_their_phase():
    terms = mm.memory_terms(llama2("7b"), mm.Setting())
    total = sum(t.bytes for t in terms)
    only = {phase: sum(t.bytes for t in terms if t.phase == phase) for phase in ("train", "score")}
    assert mm.peak(terms, "train") == total - only["score"]
    assert mm.peak(terms, "score") == total - only["train"]
    assert only["train"] > 0 and only["score"] > 0


def test_micro_batch_and_accumulation_make_the_global_batch_of_128_on_8_gpus():
    assert mm.accumulation(128, 8) == [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)]


def test_multi_node_command_uses_c10d_rendezvous_and_the_global_micro_batch():
    cmd = mm.torchrun_command(mm.Setting(gpus=16, micro_batch=2), 4, 8, "run")
    assert cmd.startswith("torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HOST:29500")
    assert "--batch-size 32 --grad-accum 4" in cmd


def test_main_prints_the_table_and_the_paper_launch_for_both_models(capsys):
    mm.main(["--model", "all"])
    out = capsys.readouterr().out
    assert "LLaMA-2-7B: P = 6,738,415,616" in out and "LLaMA-2-13B: P = 13,015,864,320" in out
    assert out.count("peak, SEEKR replay micro-step") == 2 and out.count("fits in 80 GiB") == 4
    assert ("torchrun --standalone --nproc-per-node 8 train.py" in out
            and "--batch-size 16 --grad-accum 8 --max-len 1536 --lr 1e-5 --dtype bfloat16 "
                "--activation-checkpointing true" in out)


def test_a_global_batch_the_ranks_cannot_split_is_refused_by_flag(capsys):
    with pytest.raises(SystemExit):
        mm.main(["--micro-batch", "3"])
    assert "--global-batch 128 is not a multiple of --micro-batch 3 × --gpus 8" in capsys.readouterr().err
