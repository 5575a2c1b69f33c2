"""`--fsdp torch`: PyTorch's FSDP2 (`fully_shard`) over the same units as minseekr's FSDP, behind its engine interface.

It is the trusted peer the hand-written engine is tested and benchmarked against (tests/test_fsdp.py,
tools/bench_fsdp.py), and a fallback. Two additions make probe-only losses (attention distillation) work: the
block's pre-backward hook on the probe tensors, and an unshard before a checkpointed block's recompute.
"""
from functools import partial

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from minseekr.runtime import default_compute_dtype


def apply_torch_fsdp(model, device, compute_dtype=torch.float32, activation_checkpointing=False):
    """PyTorch's own FSDP2 (`fully_shard`) on the same units, one per block then the root, for comparison."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        if activation_checkpointing:
            block.forward = partial(checkpoint, partial(_unshard_and_run, block, block.forward), use_reentrant=False)
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _unshard_and_run(block, forward, *args, **kwargs):
    # A no-op in forward (pre-forward has unsharded). A probe loss (distillation) can start the recompute before
    # any gradient reached the block's output, i.e. before FSDP2's pre-backward: the recompute needs the weights.
    block.unshard()
    return forward(*args, **kwargs)


def decay_groups(model, weight_decay):
    """torch.optim param groups with nanoGPT's rule: decay matrices and embeddings (dim >= 2), not norms."""
    return [{"params": [p for p in model.parameters() if (p.dim() >= 2) == decay], "weight_decay": wd}
            for decay, wd in ((True, weight_decay), (False, 0.0))]


class TorchFSDP:
    """PyTorch's FSDP2 and torch.optim.AdamW behind FSDP's engine interface; `engine.model` runs it."""

    def __init__(self, model, device="cpu", compute_dtype=None, activation_checkpointing=False,
                 betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.rank, self.world, self.device = dist.get_rank(), dist.get_world_size(), torch.device(device)
        self.compute_dtype = compute_dtype or default_compute_dtype(self.device)
        self.model = apply_torch_fsdp(model, self.device, self.compute_dtype, activation_checkpointing)
        self.params = dict(model.named_parameters())  # DTensors sharded on dim 0; a tied lm_head is listed once
        self.optimizer = torch.optim.AdamW(decay_groups(model, weight_decay), lr=0.0, betas=betas, eps=eps)
        self.betas, self.eps, self.weight_decay, self.step = betas, eps, weight_decay, 0
        model.register_forward_pre_hook(self._wrap_probe, with_kwargs=True)

    def _wrap_probe(self, module, args, kwargs):
        if kwargs.get("probe") is not None:
            kwargs["probe"] = partial(self._probe, kwargs["probe"])
        return args, kwargs

    def _probe(self, probe, layer, q, k, v, out):
        # FSDP2 unshards a block for backward when the gradient reaches the block's output. A loss built from
        # probe tensors alone (attention distillation) reaches its weights without passing there, so these
        # tensors get the block's own pre-backward hook too (FSDP2's private one; torch 2.13).
        pre_backward = self.model.model.layers[layer]._get_fsdp_state()._pre_backward
        for t in (q, k, v, out):
            if t.requires_grad:
                t.register_hook(pre_backward)
        probe(layer, q, k, v, out)

    def trainable(self):
        """Every trainable parameter with a gradient: zeros where backward gave none, so AdamW still steps it."""
        for p in self.params.values():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p for p in self.params.values() if p.requires_grad]

    def zero_grad(self):
        for p in self.trainable():
            p.grad.zero_()

    @torch.no_grad()
    def local_shards(self):
        """(fp32 local shard, its gradient) of each trainable parameter on this rank, live (no padding)."""
        return [(p.to_local(), p.grad.to_local()) for p in self.trainable()]

    def clip_grad_norm_(self, max_norm):
        """torch.nn.utils.clip_grad_norm_ over the sharded grads; return the global norm."""
        return torch.nn.utils.clip_grad_norm_(self.trainable(), max_norm).full_tensor()

    def optimizer_step(self, lr):
        """One torch.optim.AdamW step at learning rate lr."""
        self.trainable()  # zero gradients where backward gave none: torch.optim skips such parameters
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.step += 1

    def layout(self):
        """What a sharded checkpoint must agree on: engine, world size, every parameter's name and shape."""
        return {"engine": "TorchFSDP", "world": self.world,
                "params": {n: list(p.shape) for n, p in self.params.items()}}

    @torch.no_grad()
    def state_tensors(self):
        """This rank's live training state by name: local parameters and AdamW moments (`resume.py` stores it)."""
        tensors = {}
        for name, p in self.params.items():
            tensors[f"{name}.shard"] = p.to_local()
            if p.requires_grad:  # AdamW's own layout: moments shaped as p, created zero where it has none yet
                state = self.optimizer.state.setdefault(p, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    state.setdefault(key, torch.zeros_like(p))
                    tensors[f"{name}.{key}"] = state[key].to_local()
                state.setdefault("step", torch.tensor(float(self.step)))
        return tensors

    @torch.no_grad()
    def load_state_tensors(self, get, step):
        """Copy `get(name)` into every tensor `state_tensors` names, and resume AdamW's count at `step`."""
        for name, t in self.state_tensors().items():
            t.copy_(get(name))
        for p in self.params.values():
            if p.requires_grad:
                self.optimizer.state[p]["step"] = torch.tensor(float(step))
        self.step = step

    @torch.no_grad()
    def full_tensors(self):
        """Yield (HF name, full fp32 tensor) one parameter at a time; every rank must iterate (all-gathers)."""
        for name, p in self.params.items():
            yield name, p.full_tensor()
