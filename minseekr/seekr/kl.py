"""SEEKR's attention loss fused over sampled query rows (Eq. 5/12), and the probes that apply it during a forward.

SEEKR distils, for the selected heads H and sampled query rows T, the teacher's attention row
A^k_{l,h,t} into the student's A_{l,h,t} with KL(A^k ‖ A). The obvious implementation builds the
whole (B, H, S, S) post-softmax map with autograd and keeps it, its log and the softmax's output
for backward: O(H·S²) per layer, most of it for rows nobody asked for (the official code even
builds it for every head of the layer, in bf16, and takes log(A + 1e-8)).

Here the model keeps SDPA for its own attention, and the probe hands over the post-RoPE q and k
(see `minseekr.network.model`). `attention_kl` computes the masked logits q_t·Kᵀ/√d of the sampled rows
only, their log-sum-exp and the KL, head chunk by head chunk, in fp32 (fp64 for fp64 inputs):

    KL_t = Σ_j a_j (log a_j − log p_j),   log p_j = z_j − lse(z),   z_j = q_t·k_j/√d,

over the valid keys j (j <= rows[t] and key_mask[j]); a is the teacher row, 0·log 0 = 0, and
teacher mass outside the valid keys is ignored. Backward recomputes p from the saved log-sum-exp
and uses the closed-form gradient (derivation at `_AttentionKL.backward`). Saved for backward:
q rows (B, |H|, T, d), K (B, H_kv, S, d) (the layer's own tensor, kept by SDPA anyway), the teacher
(B, |H|, T, S) in its own dtype, the (B, 1, T, S) mask of hidden keys (a byte per entry, one tensor for
every layer of a probe) and two (B, |H|, T) vectors, the log-sum-exp and the teacher's mass:
O(|H|·T·d + H_kv·S·d + |H|·T·S teacher), never a softmax or log-softmax.
Peak memory beyond that is a few (B, h, T, S) blocks of at most `chunk_elements` entries: usually all of a
layer's selected heads at once, so each operation is one kernel per layer, however many heads it holds. The rows and the mask of hidden keys are
checked and built once per batch (`AttentionKL`), so that no layer reads a value back from a GPU.

Grouped-query attention: query head h reads key head kv_heads[h] (by default h // (H / H_kv));
dK sums the contributions of every query head of a group and of duplicated rows.

`AttentionKL` is the probe that applies this to chosen (layer, head) pairs during a forward; `RowRecorder`
records the same rows without a loss (the teacher's side, `distill.teacher_signals`).
"""
import math

import torch


CHUNK_ELEMENTS = 1 << 24   # entries of one block held at once (64 MiB in fp32): (B, h, T, S) here, ∂L/∂A in heads.py


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision and fp32 inputs, fp64 for fp64 ones (gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def _hidden_keys(rows: torch.Tensor, key_mask: torch.Tensor | None, S: int, window: int | None = None) -> torch.Tensor:
    """(B, 1, T, S) bool: key j is hidden from the query at position rows[t] (a future key, padding, no row, or
    in a sliding layer a key `window` or more positions back)."""
    keys = torch.arange(S, device=rows.device)
    hidden = keys > rows[..., None]                                           # (B, T, S)
    if window is not None:
        hidden |= keys <= rows[..., None] - window
    if key_mask is not None:
        hidden |= ~key_mask.bool()[:, None, :]
    return hidden[:, None]


def _head_chunks(H: int, block: int, chunk_elements: int) -> list[slice]:
    """Slices of the H query heads, as many per chunk as keep a (B, h, T, S) block, `block` entries per head,
    within chunk_elements (at least one): usually one chunk, so one kernel per operation."""
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    per = max(1, chunk_elements // max(1, block))
    return [slice(h, h + per) for h in range(0, H, per)]


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The chunks' (B, h, ...) results along the head dimension (no copy for a single chunk)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _logits(q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q·kᵀ/√d (B, h, T, S) in `dtype`, k already matched to q's heads."""
    return (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) / math.sqrt(q.shape[-1])


def _log_sum_exp(z: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """log Σ_visible exp z (B, h, T); 0 for a row that sees no key, so its p is 0, not NaN."""
    lse = torch.logsumexp(torch.where(hidden, float("-inf"), z), -1)
    return lse.masked_fill_(torch.isneginf(lse), 0.0)


def _default_kv_heads(H: int, H_kv: int, device) -> torch.Tensor:
    if H % H_kv:
        raise ValueError(f"q_rows has {H} heads, not a multiple of k's {H_kv} heads; pass kv_heads")
    return torch.arange(H, device=device) // (H // H_kv)


def _outside(x: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """0-dim bool, computed where x lives and not yet read: some entry of x lies outside [low, high)."""
    return ((x < low) | (x >= high)).any()


def _check_rows(rows, key_mask, S: int, kv_heads=None, H_kv: int = 0):
    """rows (B, T) long in [−1, S), key_mask (B, S), and kv_heads, when given, in [0, H_kv). The values are read
    back in one transfer, a sync on an accelerator: the probes check once per batch, not once per layer."""
    if rows.dim() != 2 or rows.dtype != torch.long:
        raise ValueError(f"rows must be a long tensor of shape (B, T), got {rows.dtype} {tuple(rows.shape)}")
    if key_mask is not None and key_mask.shape != (rows.shape[0], S):
        raise ValueError(f"key_mask has shape {tuple(key_mask.shape)}, expected {(rows.shape[0], S)}")
    bad = _outside(rows, -1, S)
    if kv_heads is not None:
        bad = bad | _outside(kv_heads.to(rows.device), 0, H_kv)
    if bad:                                     # the one read-back; which input is wrong is read only then
        if _outside(rows, -1, S):
            raise ValueError(f"rows must index positions in [0, {S}) or be −1 (no row), "
                             f"got [{rows.min()}, {rows.max()}]")
        raise ValueError(f"kv_heads must be indices into k's {H_kv} heads, got {kv_heads.tolist()}")


def _check_shapes(q_rows, k, rows, kv_heads, teacher=None):
    """Validate shapes (no value is read); return kv_heads (H,) long."""
    if q_rows.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q_rows and k must be (B, H, T, d) and (B, H_kv, S, d), got "
                         f"{tuple(q_rows.shape)} and {tuple(k.shape)}")
    B, H, T, D = q_rows.shape
    S = k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k has shape {tuple(k.shape)}, expected ({B}, H_kv, S, {D}) to match q_rows")
    if rows.shape != (B, T):
        raise ValueError(f"rows must be a long tensor of shape {(B, T)}, got {rows.dtype} {tuple(rows.shape)}")
    if teacher is not None:
        if teacher.shape != (B, H, T, S):
            raise ValueError(f"teacher has shape {tuple(teacher.shape)}, expected {(B, H, T, S)}")
        if teacher.requires_grad:
            raise ValueError("teacher requires grad; attention_kl treats it as a constant, pass teacher.detach()")
    if kv_heads is None:
        return _default_kv_heads(H, k.shape[1], q_rows.device)
    if kv_heads.shape != (H,):
        raise ValueError(f"kv_heads must be ({H},) indices into k's {k.shape[1]} heads, got {tuple(kv_heads.shape)}")
    return kv_heads.to(device=q_rows.device, dtype=torch.long)


def _checked(q_rows, k, rows, key_mask, kv_heads, teacher=None):
    """Every check of the public functions: shapes, then the values of rows and kv_heads; kv_heads (H,) long."""
    given = kv_heads is not None
    kv_heads = _check_shapes(q_rows, k, rows, kv_heads, teacher)
    _check_rows(rows, key_mask, k.shape[2], kv_heads if given else None, k.shape[1])
    return kv_heads


@torch.no_grad()
def _rows(q_rows, k, hidden, kv_heads, chunks) -> torch.Tensor:
    """softmax of the masked logits, exactly 0 at hidden keys (B, H, T, S); see `attention_rows`."""
    dtype, parts = _compute_dtype(q_rows), []
    for hs in chunks:
        z = _logits(q_rows[:, hs], k.index_select(1, kv_heads[hs]), dtype)    # (B, h, T, S)
        parts.append(z.sub_(_log_sum_exp(z, hidden)[..., None]).exp_().masked_fill_(hidden, 0.0))
    return _joined(parts)


def attention_rows(q_rows, k, rows, key_mask=None, *, kv_heads=None, window: int | None = None,
                   chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Eq. 4 at the sampled rows: softmax(q_t·Kᵀ/√d + causal and padding mask) (B, H, T, S), fp32.

    q_rows (B, H, T, d) are the queries at positions rows (B, T), −1 marking a padding row; k (B, H_kv, S, d);
    key_mask (B, S) with 1 = real token; `window` a sliding layer's W (the row at t sees keys t − W < j ≤ t).
    Entries at invalid keys are exactly 0 (a row with no valid key, such as a padding row, is all 0).
    """
    kv_heads = _checked(q_rows, k, rows, key_mask, kv_heads)
    B, H, T, _ = q_rows.shape
    S = k.shape[2]
    return _rows(q_rows, k, _hidden_keys(rows, key_mask, S, window), kv_heads,
                 _head_chunks(H, B * T * S, chunk_elements))


class _AttentionKL(torch.autograd.Function):
    """KL(teacher ‖ softmax(masked q·Kᵀ/√d)) per (b, h, t); closed-form backward, see module docstring."""

    @staticmethod
    def forward(ctx, q_rows, k, hidden, teacher, kv_heads, chunks):
        dtype = _compute_dtype(q_rows)
        kl, lse, mass = [], [], []
        for hs in chunks:
            z = _logits(q_rows[:, hs], k.index_select(1, kv_heads[hs]), dtype)    # (B, h, T, S)
            lse.append(_log_sum_exp(z, hidden))
            a = torch.where(hidden, 0.0, teacher[:, hs].to(dtype))
            # a·(log a − log p) with log p = z − lse: finite everywhere because a = 0 where z is masked; less
            # m·log m, the mass term, so the value is m·KL(a/m ‖ p) ≥ 0 (see backward).
            m = a.sum(-1)
            kl.append((torch.xlogy(a, a) - a * (z - lse[-1][..., None])).sum(-1) - torch.xlogy(m, m))
            mass.append(m)
        lse, mass = _joined(lse), _joined(mass)
        ctx.save_for_backward(q_rows, k, hidden, teacher, kv_heads, lse, mass)
        ctx.chunks = chunks
        return _joined(kl)

    @staticmethod
    def backward(ctx, grad_kl):
        # With z_j = q·k_j/√d, p = softmax over the valid keys and m = Σ_valid a_j,
        #   KL = Σ_j a_j log a_j − Σ_j a_j z_j + m·lse(z),   ∂lse/∂z_j = p_j,
        # so ∂KL/∂z_j = m·p_j − a_j on valid keys and 0 elsewhere. When the teacher row is a
        # distribution on the valid prefix (m = 1) this is the familiar p_j − a_j. A stored row rounded
        # to bf16 or fp8 is not (m ≠ 1): the value less m·log m is m·KL(a/m ‖ p), never negative and
        # with the same gradient, m·(p − a/m), so the student is distilled towards the distribution
        # a/m, the renormalised row, and the logged value is 0 where the student matches it. What
        # rounding moved inside the row stays: fp8's ~6% per entry is what the target then differs
        # by. Chain rule through z = q·Kᵀ/√d:
        #   dq_t = Σ_j δ_tj k_j /√d,   dk_j = Σ_{h in group, t} δ_tj q_t /√d,   δ = g_t·(m·p − a).
        q_rows, k, hidden, teacher, kv_heads, lse, mass = ctx.saved_tensors
        dtype = lse.dtype
        need_q, need_k = ctx.needs_input_grad[:2]
        dq = []
        dk = torch.zeros(k.shape, dtype=dtype, device=k.device) if need_k else None
        scale = 1.0 / math.sqrt(q_rows.shape[-1])
        for hs in ctx.chunks:
            qc, kc = q_rows[:, hs].to(dtype), k.index_select(1, kv_heads[hs]).to(dtype)   # (B, h, T|S, d)
            z = _logits(qc, kc, dtype)                                                    # (B, h, T, S)
            p = z.sub_(lse[:, hs, :, None]).exp_().masked_fill_(hidden, 0.0)             # in place: z's block
            a = torch.where(hidden, 0.0, teacher[:, hs].to(dtype))
            delta = p.mul_(mass[:, hs, :, None]).sub_(a).mul_(grad_kl[:, hs, :, None].to(dtype) * scale)
            if need_q:
                dq.append(delta @ kc)
            if need_k:
                dk.index_add_(1, kv_heads[hs], delta.transpose(-2, -1) @ qc)   # (B, h, S, d) into groups
        dq = _joined(dq).to(q_rows.dtype) if need_q else None
        dk = dk.to(k.dtype) if need_k else None
        return dq, dk, None, None, None, None


def attention_kl(q_rows, k, rows, teacher, key_mask=None, *, kv_heads=None, window: int | None = None,
                 chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Eq. 5/12 per term: KL(A^k_{l,h,t} ‖ A_{l,h,t}) (B, H, T) for the sampled rows, fused.

    Same inputs as `attention_rows`, plus teacher (B, H, T, S) probabilities (zeros outside the
    valid prefix); a padding row (−1) has no valid key, so its term and its gradient are exactly 0. A teacher
    row of mass m ≠ 1 on the valid prefix (rounded to bf16 or fp8) gives m·KL(a/m ‖ A): the student is
    distilled towards the renormalised row, and the value is never negative.
    Differentiable in q_rows and k; returns fp32 (fp64 for fp64 inputs) and leaves
    the reduction over heads, rows and samples to the caller. Query heads are processed in chunks whose
    (B, h, T, S) blocks hold at most `chunk_elements` entries (at least one head per chunk); the transient
    memory is a few such blocks.
    """
    kv_heads = _checked(q_rows, k, rows, key_mask, kv_heads, teacher)
    B, H, T, _ = q_rows.shape
    S = k.shape[2]
    return _AttentionKL.apply(q_rows, k, _hidden_keys(rows, key_mask, S, window), teacher, kv_heads,
                              _head_chunks(H, B * T * S, chunk_elements))


def query_rows(q, heads, rows, n_kv_heads):
    """The probe's q (B, H, S, d) at query heads `heads` (h,) and positions `rows` (B, T): (B, h, T, d), plus
    each selected head's KV head (h,) for `kv_heads=` (GQA without copying k). A padding row (−1) reads
    position 0; every consumer masks it out."""
    batch = torch.arange(q.shape[0], device=q.device)[:, None, None]
    return q[batch, heads[None, :, None], rows.clamp(min=0)[:, None, :]], heads // (q.shape[1] // n_kv_heads)


class _HeadProbe:
    """A probe over chosen (layer, head) pairs: per layer, its heads' positions in the pair list and indices.

    The rows and the masks of hidden keys (one per distinct sliding window of `windows`, the model's per-layer
    `args.windows`; None: no layer slides) are checked and built once per batch, for every layer: no layer's call
    reads a value back from an accelerator."""

    def __init__(self, heads: list[tuple[int, int]], rows, key_mask, S: int, chunk_elements: int, windows=None):
        _check_rows(rows, key_mask, S)
        self.pairs, self.rows, self.slots, self.heads = list(heads), rows, {}, {}
        self.window = {layer: windows[layer] if windows else None for layer, _ in heads}
        self.hidden = {w: _hidden_keys(rows, key_mask, S, w) for w in set(self.window.values())}  # (B, 1, T, S)
        self.block, self.chunk_elements = rows.shape[0] * rows.shape[1] * S, chunk_elements
        for i, (layer, head) in enumerate(heads):
            self.slots.setdefault(layer, []).append(i)
            self.heads.setdefault(layer, []).append(head)
        self.heads = {layer: torch.tensor(h, dtype=torch.long, device=rows.device) for layer, h in self.heads.items()}

    def _inputs(self, layer, q, k, teacher=None):
        """This layer's heads' q rows (B, h_l, T, d), their KV heads and head chunks, shapes checked."""
        q_rows, kv_heads = query_rows(q, self.heads[layer], self.rows, k.shape[1])
        _check_shapes(q_rows, k, self.rows, kv_heads, teacher)
        return q_rows, kv_heads, _head_chunks(q_rows.shape[1], self.block, self.chunk_elements)


class AttentionKL(_HeadProbe):
    """Probe for `model(tokens, attention_mask, probe=...)`: the fused KL of chosen heads at chosen rows.

    heads is a list of (layer, head) pairs; teacher (B, len(heads), T, S) holds their rows in that order;
    rows (B, T) are the sampled query positions (−1: padding), key_mask (B, S) the attention mask.
    After the forward, `kl[layer]` holds the (B, h_l, T) terms of that layer's heads, still in the autograd graph.
    """

    def __init__(self, heads: list[tuple[int, int]], rows, teacher, key_mask=None, *, windows=None,
                 chunk_elements: int = CHUNK_ELEMENTS):
        if teacher.dim() != 4 or teacher.shape[1] != len(heads):
            raise ValueError(f"teacher has shape {tuple(teacher.shape)}, expected (B, {len(heads)}, T, S): "
                             f"one row set per (layer, head) pair")
        super().__init__(heads, rows, key_mask, teacher.shape[-1], chunk_elements, windows)
        self.teacher = teacher
        self.kl: dict[int, torch.Tensor] = {}

    def __call__(self, layer, q, k, v, out):
        if layer not in self.heads:
            return
        teacher = self.teacher[:, self.slots[layer]]
        q_rows, kv_heads, chunks = self._inputs(layer, q, k, teacher)
        self.kl[layer] = _AttentionKL.apply(q_rows, k, self.hidden[self.window[layer]], teacher, kv_heads, chunks)

    def total(self) -> torch.Tensor:
        """Σ over layers, heads, rows and samples of the KL terms: L_ad of Eq. 12 summed over the batch."""
        return sum(kl.sum() for kl in self.kl.values())

    def layer_means(self) -> torch.Tensor:
        """(B,) Σ over layers of each sample's mean KL over that layer's heads and the sample's rows: the
        official code's per-layer `batchmean`, before its division by the micro-batch and the layer count."""
        n_rows = (self.rows >= 0).sum(-1).clamp(min=1)                                  # (B,)
        return sum(kl.sum((1, 2)) / (kl.shape[1] * n_rows) for kl in self.kl.values())


class RowRecorder(_HeadProbe):
    """Probe that keeps the attention rows of chosen (layer, head) pairs at chosen query rows, without S×S maps."""

    def __init__(self, heads: list[tuple[int, int]], rows, key_mask, *, windows=None,
                 chunk_elements: int = CHUNK_ELEMENTS):
        super().__init__(heads, rows, key_mask, key_mask.shape[-1], chunk_elements, windows)
        self.n_heads, self.out = len(heads), {}

    def __call__(self, layer, q, k, v, out):
        if layer in self.heads:
            q_rows, kv_heads, chunks = self._inputs(layer, q, k)                         # (B, h_l, T, d)
            self.out[layer] = _rows(q_rows, k, self.hidden[self.window[layer]], kv_heads, chunks)

    def stacked(self) -> torch.Tensor:
        """(B, |H|, T, S) in the order of the pairs."""
        first = next(iter(self.out.values()))
        rows = first.new_empty(first.shape[0], self.n_heads, *first.shape[2:])
        for layer, slots in self.slots.items():
            rows[:, slots] = self.out[layer]
        return rows
