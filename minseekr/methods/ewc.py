"""EWC, the regularisation baseline, on an engine's local shards (LwF and MTL are a loss term and a data mix
in continual.py).

Online EWC (Kirkpatrick et al. 2017; Schwarz et al. 2018's running form). After task k the diagonal empirical
Fisher F_k = E_(x,y)[(∂L(x,y)/∂θ)²] is estimated on samples of D_k and accumulated, F ← F + F_k, with the anchor
θ* ← θ_k; training later tasks adds

    (λ/2) Σ_i F_i (θ_i − θ*_i)²      whose gradient is      λ F (θ − θ*).

The penalty is separable per element, so it never enters autograd: its gradient is added straight onto each
rank's gradient shard before clipping, and F and θ* live in the shard layout (1/N of the parameters per rank,
padding included: its F is zero). Per-sample squared gradients cannot be recovered from gradients that are
averaged over ranks, so every rank runs the same Fisher samples (a pass over `ewc_samples` samples, not over D_k).
"""
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minseekr.network.model import sequence_loss
from minseekr.runtime import InputError, all_reduce, atomic_write


class EWC:
    def __init__(self, weight: float):
        self.weight = weight
        self.fisher, self.anchor = None, None     # lists of shard-shaped fp32 tensors, None before the first task

    def consolidate(self, engine, batches):
        """F += the mean over one-sample `batches` of the squared gradient of L(x, y); θ* = the current shards."""
        shards = engine.local_shards()
        fisher = [torch.zeros_like(p) for p, _ in shards]
        engine.zero_grad()
        for batch in batches:
            if batch["input_ids"].shape[0] != 1:
                raise ValueError("EWC.consolidate needs one-sample batches (per-sample squared gradients)")
            sequence_loss(engine.model(batch["input_ids"], batch["attention_mask"]), batch["labels"]).sum().backward()
            for f, (_, g) in zip(fisher, engine.local_shards()):
                f.addcmul_(g, g, value=1 / len(batches))
            engine.zero_grad()
        self.fisher = fisher if self.fisher is None else [a + b for a, b in zip(self.fisher, fisher)]
        self.anchor = [p.detach().clone() for p, _ in engine.local_shards()]

    @torch.no_grad()
    def add_penalty_grad(self, engine):
        """grad += λ F (θ − θ*) on every local shard; returns the penalty (λ/2) Σ F (θ − θ*)² over all ranks."""
        if self.fisher is None:
            return 0.0
        penalty = torch.zeros((), device=self.fisher[0].device)
        for (p, g), f, a in zip(engine.local_shards(), self.fisher, self.anchor):
            diff = p - a
            g.add_(f * diff, alpha=self.weight)
            penalty += (f * diff.square()).sum()
        return self.weight / 2 * all_reduce(penalty).item()

    def save(self, path):
        """This rank's F and θ* as one safetensors file (written atomically)."""
        if self.fisher is None:
            return
        tensors = {f"fisher.{i}": f.cpu() for i, f in enumerate(self.fisher)}
        tensors |= {f"anchor.{i}": a.cpu() for i, a in enumerate(self.anchor)}
        atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp)))

    def load(self, path, device):
        """Read what `save` wrote (a missing file means no task was consolidated yet)."""
        if not Path(path).exists():
            self.fisher = self.anchor = None
            return
        try:
            tensors = load_file(str(path), device=str(device))
        except SafetensorError as e:
            raise InputError(f"{path}: EWC's Fisher and anchor cannot be read ({e})") from None
        n = sum(key.startswith("fisher.") for key in tensors)
        self.fisher = [tensors[f"fisher.{i}"] for i in range(n)]
        self.anchor = [tensors[f"anchor.{i}"] for i in range(n)]
