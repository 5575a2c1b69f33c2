"""Which heads to distill: task sensitivity, forgettability, importance and the budgets (Sec. 3.2-3.3).

After task k, SEEKR scores every attention head (l, h) twice on the task's replay samples R_k:
- task sensitivity S^k (Eq. 7), how much the loss of M_k reacts to the head's attention map, the mean over
  samples of ‖∂L/∂A‖_F; normalised within each layer (S̃^k) and summed over tasks (Eq. 8);
- forgettability F^k (Eq. 9), how far the map moved while learning task k, the mean of ‖A^k − A^{k−1}‖_F,
  also summed over tasks.
Their product is the importance I = S·F (Eq. 10); the top-B_L layers by Σ_h I, then the top-B_H heads among
those layers' heads, are distilled (Eq. 11). `HeadScores` keeps the per-task terms and saves them.

No S×S map of every head is ever materialised. Both measures stand on the model's `probe` hook:
- Sensitivity reads ∂L/∂O at each head's output O = A·V (the `out` the probe hands over) with one
  `torch.autograd.grad` call, which leaves the parameters' `.grad` alone, and rebuilds ∂L/∂A from it in row
  chunks. Since O_qd = Σ_s A_qs V_sd and A reaches the loss only through O,
      ∂L/∂A_qs = Σ_d ∂L/∂O_qd · V_sd,  i.e.  ∂L/∂A = ∂L/∂O · Vᵀ  (S × S per head),
  taken with A as a free variable (post-softmax, as the paper's Eq. 6 and the official code's hook on A do).
  The sum of the per-sample losses is differentiated: sample b's ∂/∂O_b is that of its own loss.
- Forgettability recomputes the probabilities at chosen query rows with `kl.attention_rows` from the probe's
  q and k, layer by layer, and can be split in two (`attention_at_rows` before training, `attention_change`
  after it) so a trainer never holds two models.

The paper's measures are Frobenius norms over the valid (causal, non-padded) entries, and I = S·F with S and F
each summed over tasks. The official code differs (reference notes §4, §8): it averages (∂L/∂A)² over every entry
of the padded L×L map, masked future and pad keys included (`entries="all", norm="mean_square"`), uses the mean
squared change for forgettability (`norm="mean_square"`) and accumulates the per-task products,
I = Σ_k S̃^k·F^k (`importance="official"`); each is an option here.

Query rows. `sample_query_rows` draws B_T distinct real rows per sample; a sample with fewer real tokens
contributes each of them once, and B_T = 0 takes every row. Rows are (B, T) with PAD_ROW (−1) after a shorter
sample's rows, and every consumer (here, `kl`, `buffer`) treats a padding row as absent.
"""
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minseekr.network.model import sequence_loss
from minseekr.runtime import InputError, atomic_write
from minseekr.seekr.kl import CHUNK_ELEMENTS, attention_rows, query_rows

NORMS = ("frobenius", "mean_square")
ENTRIES = ("valid", "all")
IMPORTANCES = ("paper", "official")
PAD_ROW = -1   # a query-row slot with no row (a sample shorter than the others' rows)


@contextmanager
def _evaluating(model):
    """Run in eval mode and give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _unpack(batch, device):
    """input_ids, labels and the real-token mask (B, S) bool of a batch dict, on the model's device."""
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise ValueError(f"batch has no {key!r}; expected a dict with input_ids, labels, attention_mask")
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(device=device, dtype=torch.bool)
    return ids, batch["labels"].to(device), real


def _all_rows(real):
    """Every position as a query row: (B, S)."""
    B, S = real.shape
    return torch.arange(S, device=real.device).expand(B, S)


def _real_rows(real, rows):
    """(B, T) bool: rows[b, t] is a query row (not PAD_ROW) at a real token."""
    return (rows >= 0) & real.gather(1, rows.clamp(min=0))


def _valid_entries(real, rows, window=None):
    """(B, T, S) bool: key s is real and at or before the real query row rows[b, t] (and in a sliding layer of
    window W, after rows[b, t] − W): the entries of A that are attention."""
    keys = torch.arange(real.shape[1], device=real.device)
    causal = keys <= rows[..., None]                                                  # (B, T, S)
    if window is not None:
        causal &= keys > rows[..., None] - window
    return causal & real[:, None, :] & _real_rows(real, rows)[..., None]


def _reduce(sum_sq, n_entries, norm):
    """Per-sample ‖·‖_F from a sum of squares, or the mean square over the sample's n_entries."""
    if norm == "frobenius":
        return sum_sq.sqrt()
    return sum_sq / n_entries.clamp(min=1)


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {'|'.join(allowed)}, got {value!r}")


def _grad_attention_sum_sq(grad_out, v, valid):
    """Σ (∂L/∂A)² over the `valid` (B, S, S) entries of each head, with ∂L/∂A = ∂L/∂O·Vᵀ: (B, H)."""
    B, H, S, D = grad_out.shape
    n_kv = v.shape[1]
    g = grad_out.float().view(B, n_kv, H // n_kv, S, D)       # query heads grouped by their KV head
    vt = v.float()[:, :, None].transpose(-2, -1)               # (B, Hkv, 1, D, S)
    chunk = max(1, CHUNK_ELEMENTS // (B * H * S))
    total = grad_out.new_zeros(B, n_kv, H // n_kv, dtype=torch.float32)
    for start in range(0, S, chunk):
        d_attn = g[..., start:start + chunk, :] @ vt           # (B, Hkv, H/Hkv, c, S)
        keep = valid[:, None, None, start:start + chunk]       # (B, 1, 1, c, S)
        total += d_attn.square().mul(keep).sum((-2, -1))
    return total.view(B, H)


def task_sensitivity(model, batches, *, entries="valid", norm="frobenius"):
    """Eq. 7: S^k_{l,h} = E_(x,y) ‖∂L(x,y)/∂A_{l,h}‖_F per head, (n_layers, n_heads), not yet normalised.

    L is each sample's own mean answer loss (`sequence_loss`). `entries="valid"` (the paper's A) takes the
    causal entries between real tokens; `"all"` every entry of the batch's S×S map, future and pad keys too,
    as the official code does. `norm="mean_square"` is the official per-sample mean of (∂L/∂A)² over those
    entries instead of the Frobenius norm. The parameters' `.grad` is not touched.
    """
    _check_choice("sensitivity entries", entries, ENTRIES)
    _check_choice("sensitivity norm", norm, NORMS)
    device = model.device
    total, n_samples = 0.0, 0
    with _evaluating(model), torch.enable_grad():
        for batch in batches:
            ids, labels, real = _unpack(batch, device)
            empty = ((labels[:, 1:] != -100).sum(-1) == 0).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"labels: samples {empty} of a batch have no labelled token, so no loss")
            outs, values = [], []

            def probe(layer, q, k, v, out):
                out.requires_grad_(True)   # a no-op unless the parameters are frozen; then O is the leaf
                outs.append(out)
                values.append(v.detach())

            # Every entry's ∂L/∂A reads the pads' values too: those of pad rows that attend to themselves.
            logits = model(ids, real.long(), probe=probe, mask_pads=entries == "all")
            grads = torch.autograd.grad(sequence_loss(logits, labels).sum(), outs)
            per_sample = []
            for g, v, window in zip(grads, values, model.args.windows):
                if entries == "all":
                    valid = torch.ones(ids.shape[0], ids.shape[1], ids.shape[1], dtype=torch.bool, device=device)
                else:
                    valid = _valid_entries(real, _all_rows(real), window)
                n_entries = valid.sum((-2, -1))[:, None]                              # (B, 1)
                per_sample.append(_reduce(_grad_attention_sum_sq(g, v, valid), n_entries, norm))
            per_sample = torch.stack(per_sample)                                      # (L, B, H)
            total = total + per_sample.sum(1)
            n_samples += ids.shape[0]
    if n_samples == 0:
        raise ValueError("batches is empty: task sensitivity needs at least one sample")
    return total / n_samples


def normalize_per_layer(sensitivity):
    """Eq. 8's S̃^k: each layer's scores divided by their sum over heads (the official code's normalisation).

    The paper only says "normalised within each layer"; dividing by the head sum is what the authors' code does.
    A layer whose scores are all zero stays zero.
    """
    layer_sum = sensitivity.sum(1, keepdim=True)
    return sensitivity / torch.where(layer_sum == 0, 1.0, layer_sum)


def _forward_at_rows(model, ids, real, rows, on_layer):
    """Run the model and hand `on_layer(layer, probs)` each layer's probabilities (B, H, T, S) at `rows`."""
    windows = model.args.windows

    def probe(layer, q, k, v, out):
        q_rows, kv_heads = query_rows(q, torch.arange(q.shape[1], device=q.device), rows, k.shape[1])  # (B, H, T, D)
        on_layer(layer, attention_rows(q_rows, k, rows, real, kv_heads=kv_heads, window=windows[layer]).float())

    with torch.no_grad():
        model(ids, real.long(), probe=probe)


def _batch_rows(batches, rows):
    """Pair each batch with its query rows (None: every position)."""
    if rows is None:
        return ((batch, None) for batch in batches)
    return zip(batches, rows, strict=True)


def attention_at_rows(model, batches, rows=None):
    """The attention probabilities of every layer and head at each batch's query rows: (L, B, H, T, S) per batch.

    `rows` is one (B, T) tensor of positions per batch (e.g. from `sample_query_rows`); None takes every
    position (T = S). Entries outside a row's causal, non-padded prefix are zero, and so are PAD_ROW rows;
    rows at pad positions (only with None) mean nothing and `attention_change` ignores them. fp32 on the model's device (a caller may
    store them on CPU or in bf16: `attention_change` casts back).
    """
    device = model.device
    maps = []
    with _evaluating(model):
        for batch, r in _batch_rows(batches, rows):
            ids, _, real = _unpack(batch, device)
            r = _all_rows(real) if r is None else r.to(device)
            layers = []
            _forward_at_rows(model, ids, real, r, lambda layer, probs: layers.append(probs))
            maps.append(torch.stack(layers))
    return maps


def _change_sums(before, model, batch, rows, norm, device):
    """Σ over the batch's samples of each head's change between `before` (L, B, H, T, S) and `model`: (L, H)."""
    ids, _, real = _unpack(batch, device)
    rows = _all_rows(real) if rows is None else rows.to(device)
    valid = {w: _valid_entries(real, rows, w) for w in set(model.args.windows)}      # (B, T, S) per window
    # A sample's squared norm over its T sampled rows, times n/T (n real rows), estimates the full map's without
    # bias (rows are drawn uniformly without replacement); 1 when every row is taken.
    scale = (real.sum(-1) / _real_rows(real, rows).sum(-1).clamp(min=1))[:, None]     # (B, 1)
    sums = []

    def on_layer(layer, probs):
        entries = valid[model.args.windows[layer]]
        diff_sq = (probs - before[layer].to(probs)).square().mul(entries[:, None])   # (B, H, T, S)
        sum_sq = diff_sq.sum((-2, -1))
        if norm == "frobenius":
            sum_sq = sum_sq * scale
        sums.append(_reduce(sum_sq, entries.sum((-2, -1))[:, None], norm).sum(0))

    _forward_at_rows(model, ids, real, rows, on_layer)
    return torch.stack(sums), ids.shape[0]


def attention_change(before, after, batches, rows=None, *, norm="frobenius"):
    """Eq. 9's per-task term E‖A^k − A^{k−1}‖_F per head, (L, H): `before` from `attention_at_rows`, `after` a model.

    The batches and rows must be those `before` was computed on. Only the `after` maps of one layer exist at a time.
    """
    _check_choice("forgettability norm", norm, NORMS)
    device = after.device
    total, n_samples = 0.0, 0
    with _evaluating(after):
        for before_b, (batch, r) in zip(before, _batch_rows(batches, rows), strict=True):
            sums, n = _change_sums(before_b, after, batch, r, norm, device)
            total, n_samples = total + sums, n_samples + n
    if n_samples == 0:
        raise ValueError("batches is empty: forgettability needs at least one sample")
    return total / n_samples


def forgettability(model_after, model_before, batches, *, rows=None, norm="frobenius"):
    """Eq. 9: F^k_{l,h} = E_(x,y) ‖A^k_{l,h} − A^{k−1}_{l,h}‖_F over the valid entries, (n_layers, n_heads).

    With `rows` (one (B, T) tensor per batch, from `sample_query_rows`) only those query rows are computed: each
    sample's sum of squares over its T rows is scaled by n/T (n its real rows) before the square root, so the
    square is an unbiased estimate of the full map's; with every row taken (B_T ≥ n) it is the full norm exactly.
    `norm="mean_square"` is the official code's mean squared difference (here over the valid entries of the
    rows taken). Batch by batch: `attention_at_rows` then `attention_change`.
    """
    _check_choice("forgettability norm", norm, NORMS)
    total, n_samples = 0.0, 0
    for batch, r in _batch_rows(batches, rows):
        r = None if r is None else [r]
        before = attention_at_rows(model_before, [batch], r)
        n = batch["input_ids"].shape[0]
        total = total + n * attention_change(before, model_after, [batch], r, norm=norm)
        n_samples += n
    if n_samples == 0:
        raise ValueError("batches is empty: forgettability needs at least one sample")
    return total / n_samples


def importance(sensitivity, forgettability):
    """Eq. 10: I_{l,h} = S_{l,h} · F_{l,h}."""
    if sensitivity.shape != forgettability.shape:
        raise ValueError(f"sensitivity {tuple(sensitivity.shape)} and forgettability "
                         f"{tuple(forgettability.shape)} must have the same (n_layers, n_heads) shape")
    return sensitivity * forgettability


def random_heads(n_layers, n_heads, head_budget, generator):
    """Table 4's "random" ablation: B_H heads drawn uniformly among all heads, a sorted list of (layer, head)."""
    if not 1 <= head_budget <= n_layers * n_heads:
        raise InputError(f"--head-budget (B_H) must be in 1..{n_layers * n_heads}, got {head_budget}")
    flat = torch.randperm(n_layers * n_heads, generator=generator)[:head_budget]
    return sorted((int(i) // n_heads, int(i) % n_heads) for i in flat)


def _top(scores, k):
    """Indices of the k largest scores; among equal scores the lower index wins."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def select_heads(importance, layer_budget, head_budget):
    """Eq. 11: the top-B_H heads among the top-B_L layers by Σ_h I; a sorted list of (layer, head).

    Ties go to the lower layer index, then the lower head index. Heads may concentrate in fewer than B_L layers.
    """
    if importance.dim() != 2:
        raise ValueError(f"importance must be (n_layers, n_heads), got shape {tuple(importance.shape)}")
    if not torch.isfinite(importance).all():
        raise ValueError("importance has NaN or infinite entries")
    n_layers, n_heads = importance.shape
    if not 1 <= layer_budget <= n_layers:
        raise InputError(f"--layer-budget (B_L) must be in 1..{n_layers} (the model's layers), got {layer_budget}")
    if not 1 <= head_budget <= layer_budget * n_heads:
        raise InputError(f"--head-budget (B_H) must be in 1..{layer_budget * n_heads} "
                         f"(B_L={layer_budget} layers × {n_heads} heads), got {head_budget}")
    layers = _top(importance.double().sum(1), layer_budget).sort().values             # ascending layer index
    heads = _top(importance[layers].flatten(), head_budget)                           # row-major: lower layer first
    return sorted((int(layers[i // n_heads]), int(i % n_heads)) for i in heads)


def sample_query_rows(attention_mask, budget, generator=None):
    """Up to B_T query rows per sample (B, T), distinct, drawn uniformly among its real tokens and sorted.

    A sample with n ≥ B_T real tokens gets B_T of them; a shorter one gets each of its n rows once (the
    official code draws B_T with replacement, repeating rows). B_T = 0 takes every real row. T is the largest
    count in the batch; a sample with fewer rows is padded with PAD_ROW. Seeded by `generator`.
    """
    if budget < 0:
        raise InputError(f"query budget (B_T) must be ≥ 0 (0 = every row), got {budget}")
    rows = []
    for b, real in enumerate(attention_mask.bool().cpu()):
        positions = real.nonzero().flatten()
        n = len(positions)
        if n == 0:
            raise ValueError(f"attention_mask: sample {b} has no real token to draw query rows from")
        picked = positions if budget == 0 or n <= budget else positions[torch.randperm(n, generator=generator)[:budget]]
        rows.append(picked.sort().values)
    T = max(len(r) for r in rows)
    padded = torch.full((len(rows), T), PAD_ROW, dtype=torch.long)
    for b, r in enumerate(rows):
        padded[b, :len(r)] = r
    return padded.to(attention_mask.device)


@dataclass
class HeadScores:
    """The per-task S^k (raw, Eq. 7) and F^k (Eq. 9) so far; S (Eq. 8), F (Eq. 9) and I (Eq. 10) derive from them."""
    n_layers: int
    n_heads: int
    tasks: list[str] = field(default_factory=list)
    task_sensitivity: list[torch.Tensor] = field(default_factory=list)      # S^k, each (n_layers, n_heads)
    task_forgettability: list[torch.Tensor] = field(default_factory=list)   # F^k, each (n_layers, n_heads)

    def add_task(self, name, sensitivity, forgettability):
        """Record task `name`'s S^k and F^k (Algorithm 1, line 9)."""
        for what, t in (("sensitivity", sensitivity), ("forgettability", forgettability)):
            if t.shape != (self.n_layers, self.n_heads):
                raise ValueError(f"{what} of task {name!r} has shape {tuple(t.shape)}, "
                                 f"expected {(self.n_layers, self.n_heads)}")
        self.tasks.append(name)
        self.task_sensitivity.append(sensitivity.detach().float().cpu())
        self.task_forgettability.append(forgettability.detach().float().cpu())

    @property
    def sensitivity(self):
        """Eq. 8: S = Σ_k S̃^k (zeros before the first task)."""
        return sum((normalize_per_layer(s) for s in self.task_sensitivity), torch.zeros(self.n_layers, self.n_heads))

    @property
    def forgettability(self):
        """Eq. 9: F = Σ_k F^k (zeros before the first task)."""
        return sum(self.task_forgettability, torch.zeros(self.n_layers, self.n_heads))

    def importance(self, kind="paper"):
        """Eq. 10 on the accumulated S and F (paper), or Σ_k S̃^k·F^k, the official code's accumulation (official)."""
        _check_choice("importance", kind, IMPORTANCES)
        if kind == "paper":
            return importance(self.sensitivity, self.forgettability)
        return sum((importance(normalize_per_layer(s), f) for s, f in zip(self.task_sensitivity, self.task_forgettability)),
                   torch.zeros(self.n_layers, self.n_heads))

    def select(self, layer_budget, head_budget, importance="paper"):
        """Eq. 11 on the accumulated importance."""
        return select_heads(self.importance(importance), layer_budget, head_budget)

    def save(self, path):
        """Write one safetensors file (per-task terms stacked (K, L, H), task names in its JSON metadata), atomically."""
        empty = torch.zeros(0, self.n_layers, self.n_heads)
        tensors = {
            "task_sensitivity": torch.stack(self.task_sensitivity) if self.tasks else empty,
            "task_forgettability": torch.stack(self.task_forgettability) if self.tasks else empty,
        }
        meta = {"head_scores": json.dumps({"n_layers": self.n_layers, "n_heads": self.n_heads, "tasks": self.tasks})}
        atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path):
        """Read what `save` wrote."""
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if "head_scores" not in meta:
                raise ValueError(f"{path}: no 'head_scores' metadata; not a file written by HeadScores.save")
            info = json.loads(meta["head_scores"])
            s, f_ = f.get_tensor("task_sensitivity"), f.get_tensor("task_forgettability")
        return cls(info["n_layers"], info["n_heads"], list(info["tasks"]), list(s.unbind(0)), list(f_.unbind(0)))
