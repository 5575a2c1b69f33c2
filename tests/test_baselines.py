"""EWC on an engine's shards equals EWC written naively with autograd on the unsharded model."""
import copy

import pytest
import torch

from minseekr.engines.engine import build_engine
from minseekr.methods.ewc import EWC
from minseekr.network.model import ModelArgs, Transformer, sequence_loss
from minseekr.run.config import ContinualConfig
from minseekr.seekr.buffer import collate


def tiny():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=16, n_layers=2, n_heads=2, vocab_size=11, hidden_dim=24, tie_embeddings=True))
    model.init_weights(0.2)
    return model


def samples(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 9, (1,), generator=g))
        ids = torch.randint(1, 11, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 2] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def flat_by_unit(engine, tensors):
    """Named full tensors in each unit's shard layout (world 1: the unit's parameters flattened, then padding)."""
    return [torch.cat([tensors[n].flatten() for n in u.names] + [torch.zeros(u.pad)]) for u in engine.units]


def test_fisher_is_the_mean_squared_per_sample_gradient_and_the_penalty_gradient_is_autograds():
    naive = tiny()
    engine = build_engine(copy.deepcopy(naive), betas=ContinualConfig().betas)
    data = samples(3, 0)
    ewc = EWC(weight=7.0)
    ewc.consolidate(engine, [collate([s], 0) for s in data])

    params = dict(naive.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for s in data:
        batch = collate([s], 0)
        loss = sequence_loss(naive(batch["input_ids"], batch["attention_mask"]), batch["labels"]).sum()
        for (n, p), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            fisher[n] += g.square() / len(data)
    fisher["lm_head.weight"] = fisher["model.embed_tokens.weight"]   # tied: one tensor, one Fisher
    for got, want in zip(ewc.fisher, flat_by_unit(engine, fisher)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-10)
    assert sum(float(f.sum()) for f in ewc.fisher) > 0

    # Move the shards away from the anchor, then compare λF(θ−θ*) with autograd of (λ/2) Σ F (θ−θ*)².
    torch.manual_seed(1)
    for shard, _ in engine.local_shards():
        shard.add_(torch.randn_like(shard) * 0.01)
    penalty = ewc.add_penalty_grad(engine)
    theta = [shard.clone().requires_grad_(True) for shard, _ in engine.local_shards()]
    naive_penalty = sum((f * (t - a).square()).sum() for t, f, a in zip(theta, ewc.fisher, ewc.anchor)) * 7.0 / 2
    grads = torch.autograd.grad(naive_penalty, theta)
    assert penalty == pytest.approx(naive_penalty.item(), rel=1e-5) and penalty > 0
    for (_, got), want in zip(engine.local_shards(), grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)


def test_a_second_task_adds_its_fisher_and_moves_the_anchor():
    engine = build_engine(tiny(), betas=ContinualConfig().betas)
    ewc = EWC(weight=1.0)
    ewc.consolidate(engine, [collate([s], 0) for s in samples(2, 0)])
    first = [f.clone() for f in ewc.fisher]
    for shard, _ in engine.local_shards():
        shard.mul_(1.1)
    ewc.consolidate(engine, [collate([s], 0) for s in samples(2, 1)])
    assert all((b >= a).all() and (b > a).any() for a, b in zip(first, ewc.fisher))
    assert all(torch.equal(a, shard) for a, (shard, _) in zip(ewc.anchor, engine.local_shards()))
    assert ewc.add_penalty_grad(engine) == 0.0   # at the anchor the penalty and its gradient vanish
