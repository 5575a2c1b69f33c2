"""The attention-distillation loss of SEEKR (Eq. 5/12), fused over sampled query rows.

SEEKR distils, for the selected heads H and sampled query rows T, the teacher's attention row
A^k_{l,h,t} into the student's A_{l,h,t} with KL(A^k ‖ A). The obvious implementation builds the
whole (B, H, S, S) post-softmax map with autograd and keeps it, its log and the softmax's output
for backward: O(H·S²) per layer, most of it for rows nobody asked for (the official code even
builds it for every head of the layer, in bf16, and takes log(A + 1e-8)).

Here the model keeps SDPA for its own attention, and the probe hands over the post-RoPE q and k
(see `minseekr.model`). `attention_kl` computes the masked logits q_t·Kᵀ/√d of the sampled rows
only, their log-sum-exp and the KL, head chunk by head chunk, in fp32 (fp64 for fp64 inputs):

    KL_t = Σ_j a_j (log a_j − log p_j),   log p_j = z_j − lse(z),   z_j = q_t·k_j/√d,

over the valid keys j (j <= rows[t] and key_mask[j]); a is the teacher row, 0·log 0 = 0, and
teacher mass outside the valid keys is ignored. Backward recomputes p from the saved log-sum-exp
and uses the closed-form gradient (derivation at `_AttentionKL.backward`). Saved for backward:
q rows (B, |H|, T, d), K (B, H_kv, S, d) (the layer's own tensor, kept by SDPA anyway), the teacher
(B, |H|, T, S) in its own dtype, and two (B, |H|, T) vectors, the log-sum-exp and the teacher's
mass: O(|H|·T·d + H_kv·S·d + |H|·T·S teacher), never a softmax or log-softmax.
Peak memory beyond that is a few (B, chunk, T, S) blocks, set by `chunk`.

Grouped-query attention: query head h reads key head kv_heads[h] (by default h // (H / H_kv));
dK sums the contributions of every query head of a group and of duplicated rows.
`AttentionKL` is the probe that applies this to chosen heads of chosen layers during a forward.
"""
import math

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision and fp32 inputs, fp64 for fp64 ones (gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def _valid_keys(rows: torch.Tensor, key_mask: torch.Tensor | None, S: int) -> torch.Tensor:
    """(B, T, S) bool: key j is visible from the query at position rows[t] (causal, not padding)."""
    valid = torch.arange(S, device=rows.device) <= rows[..., None]          # (B, T, S)
    if key_mask is not None:
        valid = valid & key_mask.bool()[:, None, :]
    return valid


def _logits(q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q·kᵀ/√d (B, h, T, S) in `dtype`, k already matched to q's heads."""
    return (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) / math.sqrt(q.shape[-1])


def _log_sum_exp(z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log Σ_valid exp z (B, h, T); 0 for a row that sees no key, so its p is 0, not NaN."""
    lse = torch.logsumexp(z.masked_fill(~valid[:, None], float("-inf")), -1)
    return lse.masked_fill(torch.isneginf(lse), 0.0)


def _default_kv_heads(H: int, H_kv: int, device) -> torch.Tensor:
    if H % H_kv:
        raise ValueError(f"q_rows has {H} heads, not a multiple of k's {H_kv} heads; pass kv_heads")
    return torch.arange(H, device=device) // (H // H_kv)


def _check(q_rows, k, rows, key_mask, kv_heads, teacher=None):
    """Validate shapes; return kv_heads (H,) long."""
    if q_rows.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q_rows and k must be (B, H, T, d) and (B, H_kv, S, d), got "
                         f"{tuple(q_rows.shape)} and {tuple(k.shape)}")
    B, H, T, D = q_rows.shape
    S = k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k has shape {tuple(k.shape)}, expected ({B}, H_kv, S, {D}) to match q_rows")
    if rows.shape != (B, T) or rows.dtype != torch.long:
        raise ValueError(f"rows must be a long tensor of shape {(B, T)}, got {rows.dtype} {tuple(rows.shape)}")
    if rows.numel() and (rows.min() < -1 or rows.max() >= S):
        raise ValueError(f"rows must index positions in [0, {S}) or be −1 (no row), got [{rows.min()}, {rows.max()}]")
    if key_mask is not None and key_mask.shape != (B, S):
        raise ValueError(f"key_mask has shape {tuple(key_mask.shape)}, expected {(B, S)}")
    if teacher is not None:
        if teacher.shape != (B, H, T, S):
            raise ValueError(f"teacher has shape {tuple(teacher.shape)}, expected {(B, H, T, S)}")
        if teacher.requires_grad:
            raise ValueError("teacher requires grad; attention_kl treats it as a constant, pass teacher.detach()")
    if kv_heads is None:
        return _default_kv_heads(H, k.shape[1], q_rows.device)
    if kv_heads.shape != (H,) or kv_heads.min() < 0 or kv_heads.max() >= k.shape[1]:
        raise ValueError(f"kv_heads must be ({H},) indices into k's {k.shape[1]} heads, got {kv_heads.tolist()}")
    return kv_heads.to(device=q_rows.device, dtype=torch.long)


@torch.no_grad()
def attention_rows(q_rows, k, rows, key_mask=None, *, kv_heads=None, chunk: int = 4) -> torch.Tensor:
    """Eq. 4 at the sampled rows: softmax(q_t·Kᵀ/√d + causal and padding mask) (B, H, T, S), fp32.

    q_rows (B, H, T, d) are the queries at positions rows (B, T), −1 marking a padding row; k (B, H_kv, S, d);
    key_mask (B, S) with 1 = real token. Entries at invalid keys are exactly 0 (a row with no valid key, such as
    a padding row, is all 0).
    """
    kv_heads = _check(q_rows, k, rows, key_mask, kv_heads)
    B, H, T, _ = q_rows.shape
    S, dtype = k.shape[2], _compute_dtype(q_rows)
    valid = _valid_keys(rows, key_mask, S)
    out = torch.empty(B, H, T, S, dtype=dtype, device=q_rows.device)
    for h in range(0, H, chunk):
        hs = slice(h, h + chunk)
        z = _logits(q_rows[:, hs], k[:, kv_heads[hs]], dtype)                 # (B, h, T, S)
        lse = _log_sum_exp(z, valid)
        out[:, hs] = (z - lse[..., None]).exp().masked_fill(~valid[:, None], 0.0)
    return out


class _AttentionKL(torch.autograd.Function):
    """KL(teacher ‖ softmax(masked q·Kᵀ/√d)) per (b, h, t); closed-form backward, see module docstring."""

    @staticmethod
    def forward(ctx, q_rows, k, rows, teacher, key_mask, kv_heads, chunk):
        B, H, T, _ = q_rows.shape
        S, dtype = k.shape[2], _compute_dtype(q_rows)
        valid = _valid_keys(rows, key_mask, S)[:, None]                          # (B, 1, T, S)
        kl, lse, mass = (torch.empty(B, H, T, dtype=dtype, device=q_rows.device) for _ in range(3))
        for h in range(0, H, chunk):
            hs = slice(h, h + chunk)
            z = _logits(q_rows[:, hs], k[:, kv_heads[hs]], dtype)             # (B, h, T, S)
            lse[:, hs] = _log_sum_exp(z, valid[:, 0])
            a = teacher[:, hs].to(dtype).masked_fill(~valid, 0.0)
            # a·(log a − log p) with log p = z − lse: finite everywhere because a = 0 where z is masked.
            kl[:, hs] = (torch.xlogy(a, a) - a * (z - lse[:, hs, :, None])).sum(-1)
            mass[:, hs] = a.sum(-1)
        ctx.save_for_backward(q_rows, k, rows, teacher, key_mask, kv_heads, lse, mass)
        ctx.chunk = chunk
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        # With z_j = q·k_j/√d, p = softmax over the valid keys and m = Σ_valid a_j,
        #   KL = Σ_j a_j log a_j − Σ_j a_j z_j + m·lse(z),   ∂lse/∂z_j = p_j,
        # so ∂KL/∂z_j = m·p_j − a_j on valid keys and 0 elsewhere. When the teacher row is a
        # distribution on the valid prefix (m = 1) this is the familiar p_j − a_j. If it is not,
        # the gradient is still exact for the value computed, but that value is minimised at the
        # renormalised teacher p = a/m, where it equals m·log m instead of 0 (a truncated or
        # bf16-rounded teacher gives m ≈ 1 and a tiny shift). Chain rule through z = q·Kᵀ/√d:
        #   dq_t = Σ_j δ_tj k_j /√d,   dk_j = Σ_{h in group, t} δ_tj q_t /√d,   δ = g_t·(m·p − a).
        q_rows, k, rows, teacher, key_mask, kv_heads, lse, mass = ctx.saved_tensors
        B, H, T, _ = q_rows.shape
        S, dtype = k.shape[2], lse.dtype
        valid = _valid_keys(rows, key_mask, S)[:, None]                          # (B, 1, T, S)
        need_q, need_k = ctx.needs_input_grad[:2]
        dq = torch.zeros(q_rows.shape, dtype=dtype, device=q_rows.device) if need_q else None
        dk = torch.zeros(k.shape, dtype=dtype, device=k.device) if need_k else None
        scale = 1.0 / math.sqrt(q_rows.shape[-1])
        for h in range(0, H, ctx.chunk):
            hs = slice(h, h + ctx.chunk)
            qc, kc = q_rows[:, hs].to(dtype), k[:, kv_heads[hs]].to(dtype)      # (B, h, T, d), (B, h, S, d)
            z = _logits(qc, kc, dtype)                                          # (B, h, T, S)
            p = (z - lse[:, hs, :, None]).exp().masked_fill(~valid, 0.0)
            a = teacher[:, hs].to(dtype).masked_fill(~valid, 0.0)
            delta = (mass[:, hs, :, None] * p - a) * (grad_kl[:, hs, :, None].to(dtype) * scale)
            if need_q:
                dq[:, hs] = delta @ kc
            if need_k:
                dk.index_add_(1, kv_heads[hs], delta.transpose(-2, -1) @ qc)   # (B, h, S, d) into groups
        dq = dq.to(q_rows.dtype) if need_q else None
        dk = dk.to(k.dtype) if need_k else None
        return dq, dk, None, None, None, None, None


def attention_kl(q_rows, k, rows, teacher, key_mask=None, *, kv_heads=None, chunk: int = 4) -> torch.Tensor:
    """Eq. 5/12 per term: KL(A^k_{l,h,t} ‖ A_{l,h,t}) (B, H, T) for the sampled rows, fused.

    Same inputs as `attention_rows`, plus teacher (B, H, T, S) probabilities (zeros outside the
    valid prefix); a padding row (−1) has no valid key, so its term and its gradient are exactly 0.
    Differentiable in q_rows and k; returns fp32 (fp64 for fp64 inputs) and leaves
    the reduction over heads, rows and samples to the caller. `chunk` query heads are processed
    at a time, which bounds the transient (B, chunk, T, S) blocks.
    """
    kv_heads = _check(q_rows, k, rows, key_mask, kv_heads, teacher)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 query head, got {chunk}")
    return _AttentionKL.apply(q_rows, k, rows, teacher, key_mask, kv_heads, chunk)


def query_rows(q, heads, rows, n_kv_heads):
    """The probe's q (B, H, S, d) at query heads `heads` (h,) and positions `rows` (B, T): (B, h, T, d), plus
    each selected head's KV head (h,) for `kv_heads=` (GQA without copying k). A padding row (−1) reads
    position 0; every consumer masks it out."""
    batch = torch.arange(q.shape[0], device=q.device)[:, None, None]
    return q[batch, heads[None, :, None], rows.clamp(min=0)[:, None, :]], heads // (q.shape[1] // n_kv_heads)


class AttentionKL:
    """Probe for `model(tokens, attention_mask, probe=...)`: the fused KL of chosen heads at chosen rows.

    heads maps layer -> query-head indices; teacher[layer] is (B, len(heads[layer]), T, S) in that
    head order; rows (B, T) are the sampled query positions, key_mask (B, S) the attention mask.
    After the forward, `kl[layer]` holds the (B, h_l, T) terms, still in the autograd graph.
    """

    def __init__(self, heads: dict[int, list[int]], rows, teacher: dict, key_mask=None, *, chunk: int = 4):
        missing = sorted(set(heads) - set(teacher))
        if missing:
            raise ValueError(f"teacher has no entry for layers {missing} listed in heads")
        self.heads = {layer: torch.as_tensor(h, dtype=torch.long, device=rows.device) for layer, h in heads.items()}
        self.rows, self.teacher, self.key_mask, self.chunk = rows, teacher, key_mask, chunk
        self.kl: dict[int, torch.Tensor] = {}

    def __call__(self, layer, q, k, v, out):
        if layer not in self.heads:
            return
        q_rows, kv_heads = query_rows(q, self.heads[layer], self.rows, k.shape[1])   # (B, h_l, T, d)
        self.kl[layer] = attention_kl(q_rows, k, self.rows, self.teacher[layer], self.key_mask,
                                      kv_heads=kv_heads, chunk=self.chunk)

    def total(self) -> torch.Tensor:
        """Σ over layers, heads, rows and samples of the KL terms: L_ad of Eq. 12 summed over the batch."""
        return sum(kl.sum() for kl in self.kl.values())

    def layer_means(self) -> torch.Tensor:
        """(B,) Σ over layers of each sample's mean KL over that layer's heads and the sample's rows: the
        official code's per-layer `batchmean`, before its division by the micro-batch and the layer count."""
        n_rows = (self.rows >= 0).sum(-1).clamp(min=1)                                  # (B,)
        return sum(kl.sum((1, 2)) / (kl.shape[1] * n_rows) for kl in self.kl.values())
