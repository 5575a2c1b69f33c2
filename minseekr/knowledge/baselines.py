"""The continual-knowledge baselines that change what θ trains on, or how it steps, rather than the token weights.

    Mix-Review (He et al. 2021)   each batch of documents to learn also carries `ratio` documents per document of
                                  text the model already knows (`review_indices`), trained alike
    RecAdam (Chen et al. 2020)    the objective λ(t)·L_T + (1 − λ(t))·(γ/2)·Σ(θ − θ_0)², λ(t) = 1/(1 + e^{−k(t − t0)}),
                                  its quadratic penalty decoupled from Adam's moments (`RecAdam`)
"""
import math

import torch

from minseekr.runtime import InputError


def review_indices(n_batches: list[int], pool_size: int, ratio: float, rng) -> list[list[int]]:
    """For batches of the given sizes, the review documents each carries (round(ratio·size), at least one where
    ratio > 0): the pool in `rng`'s order, cycled, so every review document is seen before any is seen again."""
    order, out, at = [], [], 0
    for size in n_batches:
        need = max(1, round(ratio * size)) if ratio > 0 else 0
        while len(order) - at < need:
            order += rng.sample(range(pool_size), pool_size)
        out.append(order[at:at + need])
        at += need
    return out


def anneal(t: int, k: float, t0: float) -> float:
    """λ(t) = 1/(1 + e^{−k(t − t0)}): the target task's share of RecAdam's objective at step t."""
    x = -k * (t - t0)
    return 0.0 if x > 700 else 1.0 / (1.0 + math.exp(x))   # e^x beyond float range: λ is 0 to double precision


def check_recadam(lr: float, gamma: float):
    """Refuse a learning rate at which RecAdam's penalty step diverges: while λ ≈ 0 it scales θ − θ_0 by
    1 − lr·γ, overshooting θ_0 further at every step once lr·γ ≥ 2."""
    if lr * gamma >= 2:
        raise InputError(f"--lr {lr:g} with --recadam-gamma {gamma:g}: the penalty step lr·γ = {lr * gamma:g} "
                         f"overshoots θ_0 and diverges (it must be below 2)")


class RecAdam:
    """RecAdam over an engine's AdamW (either engine, any world size). Step t: the engine's AdamW step at lr·λ(t),
    its moments from ∇L_T alone (the decoupled weight decay is scaled with it); then, decoupled as in RecAdam,
    θ ← θ − lr·(1 − λ(t))·γ·(θ − θ_0) on every rank's shard. θ_0 is the engine's weights when this is built."""

    def __init__(self, engine, k: float = 0.5, t0: float = 250, gamma: float = 5000.0):
        self.engine, self.k, self.t0, self.gamma = engine, k, t0, gamma
        # Early on (λ ≈ 0) the penalty step alone scales θ − θ_0 by 1 − lr·γ: `check_recadam` refuses lr·γ ≥ 2.
        self.anchor = {name: t.detach().clone() for name, t in engine.state_tensors().items()
                       if name.endswith(".shard")}

    @torch.no_grad()
    def step(self, lr: float):
        lam = anneal(self.engine.step + 1, self.k, self.t0)
        self.engine.optimizer_step(lr * lam)
        shards = self.engine.state_tensors()
        for name, theta0 in self.anchor.items():
            shards[name].sub_(shards[name] - theta0, alpha=lr * (1 - lam) * self.gamma)
