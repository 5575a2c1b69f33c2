"""Logit distillation (Eq. 3) and what the teacher leaves for it: the signals stored with each replayed sample.

`logit_kl` and `logit_mse` compare the student's next-token logits with the stored teacher's (Eq. 3, and DER++'s
regression); `teacher_signals` computes what the buffer stores: θ_k's logits at the positions that predict the
labels and its attention rows of the stored heads (recorded by `kl.RowRecorder`, the rows `kl.AttentionKL`
distils).
"""
import math

import torch

from minseekr.seekr.kl import RowRecorder


def _predicting(student_logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """The student's (N, V) logits at the positions that predict a label, in the batch's row-major label order."""
    if student_logits.dim() == 3:
        predicting = batch["labels"][:, 1:] != -100                          # position p-1 predicts label p
        student_logits = student_logits[:, :-1][predicting.to(student_logits.device)]
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be (B, S, V) or (N, V), got {tuple(student_logits.shape)}")
    return student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))


def logit_kl(student_logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Eq. 3 per labelled token: KL(teacher ‖ student) (N,), over the vocabulary or top-k + rest buckets.

    student_logits is the model's (B, S, V) output, whose positions that predict a label are taken in
    row-major order, or those (N, V) rows already. The teacher comes from `buffer.collate`: full logits,
    or top-k ids and log-probabilities. Computed in fp32 (fp64 for fp64 logits); the caller reduces.
    """
    s = _predicting(student_logits, batch)
    dtype = s.dtype
    if "teacher_logits" in batch:
        teacher = batch["teacher_logits"].to(s.device, dtype)
        if teacher.shape != s.shape:
            raise ValueError(f"teacher_logits is {tuple(teacher.shape)}, expected the student's {tuple(s.shape)}")
        log_p = teacher.log_softmax(-1)
        return (log_p.exp() * (log_p - s.log_softmax(-1))).sum(-1)
    if "teacher_topk_ids" not in batch:
        raise KeyError("batch has neither teacher_logits nor teacher_topk_ids: collate samples read from a TaskMemory")
    ids = batch["teacher_topk_ids"].to(s.device)
    log_p = batch["teacher_topk_logp"].to(s.device, dtype)                   # (N, k)
    if ids.shape[0] != s.shape[0] or ids.shape != log_p.shape:
        raise ValueError(f"teacher_topk_ids {tuple(ids.shape)} and teacher_topk_logp {tuple(log_p.shape)} must "
                         f"both be ({s.shape[0]}, k) to match the student's labelled tokens")
    lse = s.logsumexp(-1, keepdim=True)
    log_q = s.gather(-1, ids) - lse                                           # (N, k)
    # The student's rest mass as a sum over the tokens outside the top k, not 1 − Σq, which cancels to 0 when
    # the student is confident. The floor keeps p_rest·log q_rest finite when the rest is empty (k = V).
    outside = s.scatter(-1, ids, float("-inf"))
    log_q_rest = (outside.logsumexp(-1) - lse[:, 0]).clamp(min=math.log(torch.finfo(dtype).tiny))
    # The teacher's rest is only known as 1 − Σp; rounding of the stored log-probabilities can push it below 0.
    p_rest = (-torch.expm1(log_p.logsumexp(-1))).clamp(min=0)
    top = (log_p.exp() * (log_p - log_q)).sum(-1)
    return top + torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest


def logit_mse(student_logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """DER++'s original logit term per labelled token (N,): the mean over the vocabulary of (student − teacher)².

    Buzzega et al. (2020) regress the stored logits; SEEKR's Eq. 3 uses the KL (`logit_kl`). Same inputs as
    `logit_kl` with full teacher logits (top-k logits cannot be regressed).
    """
    if "teacher_logits" not in batch:
        raise KeyError("logit_mse needs the teacher's full logits (a buffer written with --logit-topk 0)")
    s = _predicting(student_logits, batch)
    teacher = batch["teacher_logits"].to(s.device, s.dtype)
    if teacher.shape != s.shape:
        raise ValueError(f"teacher_logits is {tuple(teacher.shape)}, expected the student's {tuple(s.shape)}")
    return (s - teacher).square().mean(-1)


# ---- the teacher's side ---------------------------------------------------------------------------------------

@torch.no_grad()
def teacher_signals(model, batch: dict, heads: list[tuple[int, int]], dtype=torch.bfloat16,
                    topk: int = 0, attn_dtype=None, windows=None) -> list[dict]:
    """What θ_k leaves for distillation, per sample of a right-padded batch, on the CPU: its logits predicting the
    labels (all V, or the top-k log-probabilities and ids) in `dtype`, and its attention rows of `heads` at the
    batch's query rows (dense (|H|, T, n), padding rows dropped) in `attn_dtype` (default `dtype`; float8_e5m2
    halves them: ≤ 12.5% relative error, down to 1.5e-5). `windows`: the model's `args.windows`, for sliding
    layers."""
    attn_dtype = attn_dtype or dtype
    recorder = RowRecorder(heads, batch["rows"], batch["attention_mask"], windows=windows)
    logits = model(batch["input_ids"], batch["attention_mask"], probe=recorder)
    V = logits.shape[-1]
    if not 0 <= topk <= V:
        raise ValueError(f"topk must be in [0, {V}] (0 keeps all logits), got {topk}")
    # One transfer for the whole batch; each sample's slice is then cloned so it does not pin the batch tensor.
    attn = recorder.stacked().to("cpu", attn_dtype) if heads else None      # (B, |H|, T, S)
    samples = []
    for b in range(batch["rows"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        labels = batch["labels"][b, :n]
        predicting = (labels[1:] != -100).nonzero().squeeze(1)              # position p-1 predicts label p
        rows = batch["rows"][b][batch["rows"][b] >= 0].to("cpu", copy=True)    # without the padding rows
        s = {"input_ids": batch["input_ids"][b, :n].to("cpu", copy=True), "labels": labels.to("cpu", copy=True),
             "rows": rows,
             "attn": attn[b, :, :len(rows), :n].clone() if heads else torch.zeros(0, len(rows), n, dtype=attn_dtype)}
        if topk:
            logp, ids = logits[b, predicting].float().log_softmax(-1).topk(topk, -1)      # (a, k), largest first
            s["topk_logp"] = logp.to("cpu", dtype)
            s["topk_ids"] = ids.to("cpu", torch.int16 if V <= torch.iinfo(torch.int16).max else torch.int32)
        else:
            s["logits"] = logits[b, predicting].to("cpu", dtype)
        samples.append(s)
    return samples
