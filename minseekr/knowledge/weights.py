"""Token weights for learning a document: which of its tokens the update should attend to.

Every method of continual knowledge learning here trains θ on a document x with one weighted loss,

    L = Σ_t w_t · nll_t / (Σ_t w_t + 1e-6),     nll_t = −log p_θ(x_t | x_<t),

where w_t weighs the prediction of token t (t ≥ 1; the first token is predicted by nothing). The methods differ
only in w:

    finetune  w = 1 everywhere (plain fine-tuning, up to the normalisation)
    oracle    w = 1 on the tokens of the object of the fact the document states, 0 elsewhere: the upper bound of
              token weighting
    rho1      w = 1 on the fraction of tokens with the largest excess loss nll_θ − nll_ref against a reference
              model (RHO-1, Lin et al. 2024), 0 elsewhere
    taalm     w = sigmoid(φ(x)), φ the meta-learned Train-Attention model (`taalm.py`)
"""
import torch
import torch.nn.functional as F

EPS = 1e-6


def token_nll(logits, ids) -> torch.Tensor:
    """nll_t (B, S−1) of each next token in fp32 (fp64 for fp64 logits): position t − 1 predicts token t."""
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


def weighted_loss(logits, ids, weights, mask=None) -> torch.Tensor:
    """(B,) each document's Σ_t w_t·nll_t / (Σ_t w_t + 1e-6); `weights` (B, S−1) for tokens 1..S−1, `mask` (B, S)
    1 on real tokens (padding weighs nothing)."""
    if weights.shape != (ids.shape[0], ids.shape[1] - 1):
        raise ValueError(f"weights must be (B, S−1) = {(ids.shape[0], ids.shape[1] - 1)}, one per predicted token, "
                         f"got {tuple(weights.shape)}")
    if mask is not None:
        weights = weights * mask[:, 1:].to(weights.dtype)
    return (weights * token_nll(logits, ids)).sum(-1) / (weights.sum(-1) + EPS)


def object_mask(ids: list[int], object_ids: list[int]) -> list[float]:
    """1.0 on every token of each occurrence of `object_ids` in `ids` (the oracle's weights before the shift)."""
    n, w = len(object_ids), [0.0] * len(ids)
    for start in range(len(ids) - n + 1):
        if n and ids[start:start + n] == object_ids:
            w[start:start + n] = [1.0] * n
    return w


def oracle_weights(tok, text: str, obj: str) -> tuple[list[int], list[float]]:
    """A document's tokens and the oracle's weights for tokens 1..S−1: 1 on each occurrence of the object's tokens,
    in either of the forms the tokenizer gives it (after a space or at a word's start)."""
    ids = tok.encode(text, bos=True)
    w = [0.0] * len(ids)
    for form in {tuple(tok.encode(obj, bos=False)), tuple(tok.encode(" " + obj, bos=False))}:
        w = [max(a, b) for a, b in zip(w, object_mask(ids, list(form)))]
    return ids, w[1:]


def rho1_weights(nll, reference_nll, fraction: float, mask=None) -> torch.Tensor:
    """1 on the ⌈fraction·n⌉ tokens of each document with the largest excess loss nll − reference_nll (n its real
    predicted tokens), 0 elsewhere; (B, S−1)."""
    excess = nll - reference_nll
    real = torch.ones_like(excess, dtype=torch.bool) if mask is None else mask[:, 1:].bool()
    excess = excess.masked_fill(~real, float("-inf"))
    keep = torch.ceil(fraction * real.sum(-1).float()).long()                         # (B,)
    rank = excess.argsort(-1, descending=True).argsort(-1)                             # 0 = largest
    return ((rank < keep[:, None]) & real).to(nll.dtype)
