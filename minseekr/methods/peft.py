"""Parameter-efficient pieces that act on a frozen model: LoRA on chosen projections, and soft prompts.

LoRA (Hu et al., 2021): a projection y = W x becomes y = W x + (α/r)·B A x with A (r × in) and B (out × r); B
starts at zero, so a new LoRA changes nothing until it trains. The LoRAs live outside the model, in their own
module and their own file, and act through forward hooks on the projections: the model's state dict, its HF files
and an engine's shards stay the base model's, which is never touched. Several LoRAs can act at once (O-LoRA keeps
every earlier task's, SAPT mixes one per task): a sample's update is Σ_t w_t·(α/r)·B_t A_t x, with the weights w
(batch × LoRAs) set per batch (`LoRABank.weights`) or all ones. With weights shared by every sample the update
is exactly a change of W, which `merged` writes out. LoRA dropout, while the model trains, drops the projection's
input once per forward, and every LoRA of the bank (at that rate) reads the same dropped input, as O-LoRA's
`src/peft/tuners/lora.py` `Linear.forward` does for its stacked earlier LoRAs and the new one.

Soft prompts (Lester et al., 2021) are vectors placed before the token embeddings: `model(..., prefix=P)` and
`generate(..., prefix=P)` take them, with positions, padding masks and the KV cache right for the prefixed
sequence (`model.py`, `generate.py`). `SoftPrompt` holds one set.
"""
import json
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from minseekr.runtime import InputError, all_reduce, atomic_write, rank_world

# Where each projection a LoRA may target sits in a block, and its (out, in) features for ModelArgs `a`.
PROJECTIONS = {
    "q_proj": ("self_attn", lambda a: (a.n_heads * a.head_dim, a.dim)),
    "k_proj": ("self_attn", lambda a: (a.n_kv_heads * a.head_dim, a.dim)),
    "v_proj": ("self_attn", lambda a: (a.n_kv_heads * a.head_dim, a.dim)),
    "o_proj": ("self_attn", lambda a: (a.dim, a.n_heads * a.head_dim)),
    "gate_proj": ("mlp", lambda a: (a.hidden_dim, a.dim)),
    "up_proj": ("mlp", lambda a: (a.hidden_dim, a.dim)),
    "down_proj": ("mlp", lambda a: (a.dim, a.hidden_dim)),
}


class LoRA(nn.Module):
    """One low-rank update per (layer, target projection): A (r × in), B (out × r), scale α/r."""

    def __init__(self, args, targets=("q_proj", "v_proj"), rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if unknown := [t for t in targets if t not in PROJECTIONS]:
            raise InputError(f"LoRA targets (--lora-targets): unknown {', '.join(unknown)}; expected some of "
                             f"{', '.join(PROJECTIONS)}")
        if rank < 1:
            raise InputError(f"LoRA rank must be ≥ 1, got {rank}")
        self.targets, self.rank, self.alpha, self.scale = tuple(targets), rank, alpha, alpha / rank
        self.dropout = dropout
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for layer in range(args.n_layers):
            for target in self.targets:
                out_features, in_features = PROJECTIONS[target][1](args)
                key = f"{layer}_{target}"
                self.A[key] = nn.Parameter(torch.empty(rank, in_features))
                self.B[key] = nn.Parameter(torch.zeros(out_features, rank))
                nn.init.kaiming_uniform_(self.A[key], a=math.sqrt(5))   # as nn.Linear (and PEFT) initialise A

    def delta(self, key: str, x):
        """(α/r)·B A x for the projection `key` ("{layer}_{target}"); x already dropped out (`LoRABank`)."""
        return (x @ self.A[key].t().to(x.dtype)) @ self.B[key].t().to(x.dtype) * self.scale


class LoRABank(nn.Module):
    """LoRAs acting together on a model through forward hooks; `weights` (batch, LoRAs) mixes them per sample
    (None: every LoRA with weight 1)."""

    def __init__(self):
        super().__init__()
        self.loras = nn.ModuleList()
        self.weights = None
        self.handles = []

    def add(self, lora: LoRA) -> LoRA:
        self.loras.append(lora)
        return lora

    def attach(self, model, targets=None):
        """Hook the projections `targets` (default: those the bank's LoRAs target) of every layer of `model` (a
        Transformer), so that LoRAs added later act too; `detach` removes the hooks."""
        self.detach()
        targets = sorted(targets or {t for lora in self.loras for t in lora.targets})
        for layer, block in enumerate(model.model.layers):
            for target in targets:
                module = getattr(getattr(block, PROJECTIONS[target][0]), target)
                self.handles.append(module.register_forward_hook(partial(self._update, f"{layer}_{target}")))
        return self

    def detach(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _update(self, key, module, inputs, out):
        """The projection's output plus every LoRA's update; while the model trains (never at evaluation) one
        dropout mask per rate on its input, shared by the LoRAs at that rate."""
        x, dropped = inputs[0], {}
        for t, lora in enumerate(self.loras):
            if key in lora.A:
                if lora.dropout and module.training and lora.dropout not in dropped:
                    dropped[lora.dropout] = F.dropout(x, lora.dropout, True)
                delta = lora.delta(key, dropped.get(lora.dropout, x))
                if self.weights is not None:
                    delta = delta * self.weights[:, t, None, None].to(delta.dtype)
                out = out + delta
        return out

    @torch.no_grad()
    def merged(self, model) -> dict:
        """The base model's state dict with every LoRA folded into W (W + Σ_t (α/r)·B_t A_t): exact only when all
        samples share the weights, so `weights` must be None."""
        if self.weights is not None:
            raise ValueError("per-sample LoRA weights (SAPT) cannot be merged into one set of weights")
        state = {name: p.detach().clone() for name, p in model.state_dict().items()}
        for lora in self.loras:
            for key in lora.A:
                layer, target = key.split("_", 1)
                name = f"model.layers.{layer}.{PROJECTIONS[target][0]}.{target}.weight"
                update = (lora.B[key].float() @ lora.A[key].float()) * lora.scale
                state[name] = (state[name].float() + update).to(state[name].dtype)
        return state


class SoftPrompt(nn.Module):
    """n learned vectors of the model's width, placed before every sequence: `prefix(batch)` gives (B, n, dim)."""

    def __init__(self, n_tokens: int, dim: int, init=None):
        super().__init__()
        self.vectors = nn.Parameter(init.detach().clone() if init is not None else torch.randn(n_tokens, dim) * 0.02)

    def prefix(self, batch_size: int):
        return self.vectors.unsqueeze(0).expand(batch_size, -1, -1)


def freeze(model):
    """The base model without gradients: only a method's own parameters train."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_method(module: nn.Module, path, info: dict):
    """A method's parameters as one safetensors file (atomic), `info` (its settings) in the metadata."""
    tensors = {name: p.detach().contiguous().cpu() for name, p in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"method": json.dumps(info)}))


def read_method(path, tensors: bool = True) -> tuple[dict, dict]:
    """The `info` and the tensors (none unless `tensors`: the header alone is read) of a `save_method` file."""
    try:
        with safe_open(str(path), "pt") as f:
            info = json.loads((f.metadata() or {})["method"])
            state = {name: f.get_tensor(name) for name in f.keys()} if tensors else {}
    except Exception as e:   # safetensors raises several types for a damaged or foreign file
        raise InputError(f"{path}: not a method file written by save_method ({e!r})") from None
    if not isinstance(info, dict):
        raise InputError(f"{path}: its metadata 'method' is not a JSON object")
    if bad := [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]:
        raise InputError(f"{path}: tensor {bad[0]!r} holds NaN or infinite values")
    return info, state


def load_method(module: nn.Module, path) -> dict:
    """Load `save_method`'s file into `module` (every tensor, shapes checked); returns its `info`."""
    info, state = read_method(path)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise InputError(f"{path} does not fit this method's parameters: {str(e).splitlines()[0]}") from None
    return info


class PETMethod(nn.Module):
    """What every parameter-efficient method shares (`pet.py` lists what the trainer asks of one): its trainable
    parameters, no soft prompts, no loss term and no penalty unless it says otherwise, and one file of its
    parameters with its settings (`info()`) in the metadata."""

    n_prefix = 0

    def trainable(self):
        return [p for p in self.parameters() if p.requires_grad]

    def choose(self, embeddings, mask):
        return None

    def batch_loss(self) -> dict:
        return {}

    def add_penalty_grad(self, k: int) -> dict:
        return {}

    def save(self, path):
        save_method(self, path, self.info())


class ReplicatedAdamW:
    """AdamW for a method's own parameters, whole on every rank beside a frozen engine: each gradient is averaged
    over the ranks (each rank's loss is its share × world, as the engines expect), then clipped and applied."""

    def __init__(self, params, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0, step: int = 0):
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=0.0, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self.step = step    # optimiser steps of the whole run, counted on across tasks

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        world = rank_world()[1]
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if world > 1:
                p.grad = all_reduce(p.grad) / world
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm)

    def optimizer_step(self, lr: float):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.step += 1

    def state_tensors(self) -> dict:
        """The AdamW moments and step, by parameter index (for a resume point)."""
        out = {"step": torch.tensor(self.step)}
        for i, p in enumerate(self.params):
            state = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    out[f"{i}.{key}"] = state[key]
            if "step" in state:
                out[f"{i}.step"] = torch.as_tensor(state["step"]).float()
        return out

    def load_state_tensors(self, tensors: dict):
        self.step = int(tensors["step"])
        for i, p in enumerate(self.params):
            if f"{i}.exp_avg" in tensors:
                self.optimizer.state[p] = {"exp_avg": tensors[f"{i}.exp_avg"].to(p.device),
                                           "exp_avg_sq": tensors[f"{i}.exp_avg_sq"].to(p.device),
                                           "step": tensors[f"{i}.step"].clone()}
