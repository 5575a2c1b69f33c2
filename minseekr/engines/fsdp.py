"""Fully sharded data parallel (ZeRO-3) for minseekr's Transformer, written out by hand.

ZeRO-3 in one page. With N ranks, every rank keeps 1/N of each parameter, of its gradient and of its AdamW
moments, all in fp32 (the master copy). A module's full weights exist only while it runs: they are
all-gathered (in the compute dtype, bf16 on GPUs) just before its forward and freed right after, gathered
again for its backward, and its gradient is reduce-scattered (fp32; ÷N then SUM, a mean over ranks like
DDP and FSDP2) straight into the fp32 gradient shard. The optimiser then updates only the local shards.

Units. One unit per transformer block (`model.model.layers[i]`) and one root unit (embeddings, final norm,
lm_head; a tied lm_head is the same tensor, stored once). A unit's parameters are flattened into one
vector padded to a multiple of N (FSDP1's FlatParameter); rank r owns the slice [r·S, (r+1)·S). In forward
the gathered vector becomes one leaf tensor and a single `split()` gives every parameter's view, so
autograd hands back one flat gradient and fires one post-accumulate-grad hook per unit.

Lifecycle (FSDP2's words):
    pre-forward      unshard: all-gather into the unit's buffer; new flat leaf + views; prefetch the next unit
    post-forward     reshard: `untyped_storage().resize_(0)` (autograd's saved views keep the storage object);
                     hook the outputs (and the tensors a `probe` sees) with pre-backward
    pre-backward     unshard again into the same storage; prefetch the unit before; queue end-of-backward once
    post-backward    flat grad -> fp32, ÷N, async reduce-scatter (waited at the next one), += grad shard; reshard
    end-of-backward  reshard every unit: frozen units and `autograd.grad(loss, probe tensors)` never reach
                     post-backward. The root unit stays gathered from its forward to its backward (as in FSDP2).
With activation checkpointing a block's forward (hooks included) runs again inside backward; while
`in_backward` the hooks only unshard, so the recompute reuses the original views.

Memory per rank for P parameters, c bytes per compute element, U the largest unit:
    16·P/N (fp32 shard 4 + grad 4 + AdamW moments 8)  +  c·(2U + root)  (running unit, prefetched unit)
    + (c + 4)·U for a unit's gradient + 4·U per reduce-scatter in flight (two at most)  +  activations.

Gradient accumulation reduce-scatters every micro-batch into the fp32 grad shard (memory stays flat).
Because gradients are averaged over ranks, a rank's loss must be its share of the global loss times N:
`token_losses(...).sum() * world / global_token_count`, which makes uneven per-rank batches exact.

Supported: tied embeddings, frozen units, GQA, `probe` hooks, activation checkpointing, bf16 compute,
sharded checkpoints (resume on the same world size; `reshard_checkpoint` rewrites one offline for another),
HF export of the full tensors and streaming HF load of each rank's rows (`engine.py`).
Not supported: mixed requires_grad inside one unit, KV-cache decoding across units (use an exported
model), torch.compile of the hooks.

The engine interface (`model`, `rank`, `world`, `device`, `compute_dtype`, `step`, `zero_grad`,
`clip_grad_norm_`, `optimizer_step(lr)`, `local_shards`, `full_tensors`, `layout`, `state_tensors`,
`load_state_tensors`) is shared with `fsdp_torch.TorchFSDP` (PyTorch's FSDP2, the peer), so a trainer runs on
either and the two check each other (`engine.py` picks one). An engine knows no file format: `resume.py`
stores its state tensors as per-rank files, `checkpoint.py` writes its full tensors as an HF directory.
"""
import math
from functools import partial

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from minseekr.runtime import all_reduce, default_compute_dtype

# torch 2.13 deprecates the *_into_tensor / *_tensor names for *_single (same signatures).
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Unit:
    """The parameters of one module as a padded flat fp32 shard, with its grad shard and AdamW moments."""

    def __init__(self, model, named, rank, world, device, compute_dtype):
        params, index, self.names, self.slots = [], {}, [], []
        for name, p in named:  # tied names share one flat range (the first name is the HF key)
            if id(p) not in index:
                index[id(p)] = len(params)
                params.append(p)
                self.names.append(name)
            module_name, _, attr = name.rpartition(".")
            self.slots.append((model.get_submodule(module_name), attr, index[id(p)]))
        if len({p.requires_grad for p in params}) > 1:
            raise ValueError(f"unit of {self.names[0]}: mixed requires_grad inside one unit is not supported")
        self.requires_grad = params[0].requires_grad
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.offsets = [sum(self.numels[:i]) for i in range(len(params))]
        self.world = world
        self.padded = -(-sum(self.numels) // world) * world
        self.pad = self.padded - sum(self.numels)
        S = self.padded // world
        self.lo, self.hi = rank * S, (rank + 1) * S
        self.shard = torch.zeros(S, device=device)
        with torch.no_grad():
            for i, a, b, lo, hi in self.owned():
                if not params[i].is_meta:
                    self.shard[a:b] = params[i].reshape(-1)[lo:hi]
        # Weight decay iff dim >= 2 (nanoGPT's rule), as shard ranges: padding and norms fall outside.
        self.decay = [(a, b) for i, a, b, _, _ in self.owned() if len(self.shapes[i]) >= 2]
        if self.requires_grad:
            self.grad, self.exp_avg, self.exp_avg_sq = (torch.zeros_like(self.shard) for _ in range(3))
        self.gathered, self.work, self.send, self.live, self.reducing = False, None, None, 0, None
        for module, attr, _ in self.slots:
            module._parameters.pop(attr, None)  # the shard is the parameter now; modules get views
        self.buffer = torch.empty(self.padded, dtype=compute_dtype, device=device)  # all-gather target
        self.install_views(None)  # views have the right shapes between forwards (split checks the storage size)
        self.reshard()

    def owned(self):
        """(param index, shard start, shard end, param-flat start, param-flat end) for each piece this rank owns."""
        for i, (o, n) in enumerate(zip(self.offsets, self.numels)):
            lo, hi = max(o, self.lo), min(o + n, self.hi)
            if lo < hi:
                yield i, lo - self.lo, hi - self.lo, lo - o, hi - o

    def unshard(self, async_op=False):
        """All-gather the full flat parameter into the buffer (a no-op when gathered); wait unless async."""
        if not self.gathered:
            self.buffer.untyped_storage().resize_(self.buffer.numel() * self.buffer.element_size())
            self.send = self.shard.to(self.buffer.dtype)  # held until the gather is waited on
            self.work = all_gather(self.buffer, self.send, async_op=True)
            self.gathered = True
        if not async_op:
            self.wait()

    def wait(self):
        if self.work is not None:
            self.work.wait()
            self.work = self.send = None

    def reshard(self):
        """Free the gathered storage; autograd's saved views keep pointing at the (now empty) storage."""
        self.wait()
        self.buffer.untyped_storage().resize_(0)
        self.gathered = False

    def install_views(self, post_backward):
        """A fresh flat leaf over the buffer and one split() into every parameter's view."""
        full = self.buffer.data  # .data, not .detach(): a fresh version counter survives the in-place re-gather
        if post_backward is not None:
            full.requires_grad_(True)
            full.register_post_accumulate_grad_hook(post_backward)
            self.live += 1
        views = full.split(self.numels + [self.pad])
        for module, attr, i in self.slots:
            setattr(module, attr, views[i].view(self.shapes[i]))

    def reduce_grad(self, full):
        """Start the mean over ranks of the flat gradient (fp32, ÷world then SUM); finish_reduce adds it."""
        self.finish_reduce()
        grad = full.grad.float().div_(self.world)
        full.grad = None
        out = torch.empty_like(self.shard)
        self.reducing = (reduce_scatter(out, grad, async_op=True), out, grad)  # tensors held until waited

    def finish_reduce(self):
        if self.reducing is not None:
            work, out, _ = self.reducing
            work.wait()
            self.grad += out
            self.reducing = None


class FSDP:
    """Shards `model` (a minseekr Transformer) over the default process group; `engine.model` runs it."""

    def __init__(self, model, device="cpu", compute_dtype=None, activation_checkpointing=False,
                 prefetch=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.model, self.rank, self.world = model, dist.get_rank(), dist.get_world_size()
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype = compute_dtype or default_compute_dtype(self.device)
        self.betas, self.eps, self.weight_decay, self.step = betas, eps, weight_decay, 0
        self.prefetch, self.in_backward, self._reducing = prefetch, False, None
        named = list(model.named_parameters(remove_duplicate=False))
        blocks = list(model.model.layers)
        groups = [[(n, p) for n, p in named if not n.startswith("model.layers.")]]
        groups += [[(n, p) for n, p in named if n.startswith(f"model.layers.{i}.")] for i in range(len(blocks))]
        self.units = [Unit(model, g, self.rank, self.world, self.device, compute_dtype) for g in groups]
        self.root = self.units[0]
        self.layer_unit = dict(enumerate(self.units[1:]))
        # The root runs first and is done last; prefetch follows forward order, then backward order.
        self._next_forward = dict(zip(self.units, self.units[1:]))
        backward_order = [self.root] + self.units[:0:-1]
        self._next_backward = dict(zip(backward_order, backward_order[1:]))
        for unit, module in zip(self.units, [model] + blocks):
            forward = partial(self._forward, unit, module.forward)
            if activation_checkpointing and unit is not self.root:
                forward = partial(checkpoint, forward, use_reentrant=False)
            module.forward = forward  # an instance attribute: nn.Module.__call__ runs it

    def _forward(self, unit, forward, *args, **kwargs):
        self._pre_forward(unit)
        if kwargs.get("probe") is not None:  # only the root is called with probe= by keyword
            kwargs["probe"] = partial(self._probe, kwargs["probe"])
        out = forward(*args, **kwargs)
        if not self.in_backward:  # post-forward; an activation-checkpoint recompute keeps the unit gathered
            if unit is not self.root or not torch.is_grad_enabled():
                unit.reshard()
            self._hook_pre_backward(unit, out if isinstance(out, tuple) else (out,))
        return out

    def _pre_forward(self, unit):
        unit.unshard()
        if self.in_backward:  # recompute: the original views are what autograd saved; keep them
            return
        if self.prefetch and unit in self._next_forward:
            self._next_forward[unit].unshard(async_op=True)
        grad = unit.requires_grad and torch.is_grad_enabled()
        unit.install_views(partial(self._post_backward, unit) if grad else None)

    def _probe(self, probe, layer, q, k, v, out):
        # A loss built from probe tensors alone (attention distillation) reaches a block's weights without
        # passing its output, so these tensors get the block's pre-backward too.
        if not self.in_backward:
            self._hook_pre_backward(self.layer_unit[layer], (q, k, v, out))
        probe(layer, q, k, v, out)  # also during a recompute: checkpoint needs the same saved tensors

    def _hook_pre_backward(self, unit, tensors):
        for t in tensors:  # blocks return (x, attention map or None); the root logits or (logits, maps)
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda grad, unit=unit: self._pre_backward(unit))

    def _enter_backward(self):
        if not self.in_backward:
            self.in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _pre_backward(self, unit):
        self._enter_backward()
        unit.unshard()
        if self.prefetch and unit in self._next_backward:
            self._next_backward[unit].unshard(async_op=True)

    def _post_backward(self, unit, full):
        self._enter_backward()
        unit.reduce_grad(full)
        if self._reducing not in (None, unit):  # overlap this reduce-scatter with the next unit's backward
            self._reducing.finish_reduce()
        self._reducing = unit
        unit.live -= 1
        if unit.live <= 0:  # another forward's graph (summed losses) may still need the gathered weights
            unit.reshard()

    def _end_of_backward(self):
        for unit in self.units:
            unit.finish_reduce()
            unit.reshard()
            unit.live = 0
        self.in_backward, self._reducing = False, None

    def trainable(self):
        return [u for u in self.units if u.requires_grad]

    def local_shards(self):
        """(fp32 shard, its gradient) of each trainable unit on this rank, live; padding is zero in both."""
        return [(u.shard, u.grad) for u in self.trainable()]

    def zero_grad(self):
        for u in self.trainable():
            u.grad.zero_()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm):
        """Scale grads by min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ the global L2 norm (as torch); return ‖g‖."""
        sq = all_reduce(torch.stack([u.grad.pow(2).sum() for u in self.trainable()]).sum())
        norm = sq.sqrt()  # padding gradients are exact zeros and add nothing
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for u in self.trainable():
            u.grad.mul_(coef)
        return norm

    @torch.no_grad()
    def optimizer_step(self, lr):
        """One AdamW step (Loshchilov & Hutter) on the local shards, in torch.optim.AdamW's arithmetic."""
        self.step += 1
        beta1, beta2 = self.betas
        bias1, bias2 = 1 - beta1 ** self.step, 1 - beta2 ** self.step
        for u in self.trainable():
            for a, b in u.decay:  # decoupled weight decay
                u.shard[a:b].mul_(1 - lr * self.weight_decay)
            u.exp_avg.lerp_(u.grad, 1 - beta1)
            u.exp_avg_sq.mul_(beta2).addcmul_(u.grad, u.grad, value=1 - beta2)
            denom = (u.exp_avg_sq.sqrt() / bias2 ** 0.5).add_(self.eps)
            u.shard.addcdiv_(u.exp_avg, denom, value=-lr / bias1)

    def layout(self):
        """What a sharded checkpoint must agree on: engine, world size, every unit's names, shapes and padding."""
        return {"engine": "FSDP", "world": self.world,
                "units": [{"names": u.names, "shapes": [list(s) for s in u.shapes], "padded": u.padded}
                          for u in self.units]}

    def state_tensors(self):
        """This rank's live training state by name: every unit's fp32 shard and AdamW moments (`resume.py` stores it)."""
        tensors = {}
        for i, u in enumerate(self.units):
            tensors[f"unit{i}.shard"] = u.shard
            if u.requires_grad:
                tensors[f"unit{i}.exp_avg"], tensors[f"unit{i}.exp_avg_sq"] = u.exp_avg, u.exp_avg_sq
        return tensors

    @torch.no_grad()
    def load_state_tensors(self, get, step):
        """Copy `get(name)` into every tensor `state_tensors` names, and resume AdamW's count at `step`."""
        for name, t in self.state_tensors().items():
            t.copy_(get(name))
        self.step = step

    @torch.no_grad()
    def full_tensors(self):
        """Yield (HF name, full fp32 tensor) one unit at a time; every rank must iterate (one all-gather per unit)."""
        for u in self.units:
            flat = torch.empty(u.padded, device=self.device)
            all_gather(flat, u.shard)
            for name, shape, t in zip(u.names, u.shapes, flat.split(u.numels + [u.pad])):
                yield name, t.view(shape)

    @torch.no_grad()
    def load_hf(self, checkpoint):
        """Copy an HF checkpoint's values (a `checkpoint.HFCheckpoint`, whose construction checked every name, shape
        and dtype) into this rank's shards, reading only the rows that cover them."""
        for u in self.units:
            for i, a, b, lo, hi in u.owned():
                name, shape = u.names[i], tuple(u.shapes[i])
                if checkpoint.shapes.get(name) != shape:
                    raise ValueError(f"{checkpoint.path}: tensor {name!r} is {checkpoint.shapes.get(name)} there, "
                                     f"but {shape} in this engine's model")
                row = math.prod(shape[1:])  # read whole rows covering [lo, hi), never the whole tensor
                r0, r1 = lo // row, -(-hi // row)
                u.shard[a:b] = checkpoint.rows(name, r0, r1).reshape(-1)[lo - r0 * row:hi - r0 * row]

