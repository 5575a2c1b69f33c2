"""TAALM's Train-Attention model φ and its meta-learning (Seo, Lee and Yeo, NeurIPS 2024, arXiv 2407.16920).

φ is a language model whose head is replaced by one output per token (bias initialised to 4, so every weight
starts near sigmoid(4) = 0.98: plain fine-tuning); w_t = sigmoid(φ(x)_t) weighs the prediction of token t, read at
token t itself (φ is causal and has seen it), in the learner's loss (`weights.weighted_loss`).

φ is meta-learned on episodes (a document D stating a fact, and the fact's probe P): from θ_0,

    θ_1 = AdamW(θ_0; ∇_θ L_w(θ_0; D))                     a warm-up step, not differentiated (the authors' code)
    θ_2 = AdamW(θ_1; ∇_θ L_w(θ_1; D)),  state carried      differentiable in w, hence in φ
    J(φ) = NLL of θ_2 on P's object tokens                 back-propagated to φ through the step (second order)

averaged over episodes. With a fresh optimiser state the first AdamW step is lr·g/(|g| + ε), whose derivative in
g vanishes wherever |g| ≫ ε, so a step with no state before it would give φ almost no gradient: the warm-up step
gives the differentiable one a second moment to divide by (`warmup=0` is the bare reading, one step).
The inner steps are written functionally (`torch.func.functional_call`, `torch.autograd.grad(...,
create_graph=True)`), never by patching modules, and attention runs on SDPA's math kernel there: the fused kernels
have no second derivative.
"""
import torch
import torch.nn as nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from minseekr.knowledge.weights import weighted_loss
from minseekr.methods.peft import PROJECTIONS, LoRA, LoRABank, freeze


class TrainAttention(nn.Module):
    """φ: a Transformer trunk with a one-output head per token; `weights` gives w for tokens 1..S−1.

    `lora_rank` 0: every parameter trains. Otherwise the authors' form of φ: the trunk frozen, a LoRA of that rank
    (α = 2·rank) on every projection of every block (`methods.peft`), and the new head, train."""

    def __init__(self, trunk, bias: float = 4.0, lora_rank: int = 0):
        super().__init__()
        self.trunk = freeze(trunk) if lora_rank else trunk
        self.trunk.lm_head = nn.Linear(trunk.args.dim, 1)   # replaces (and unties) the vocabulary head
        with torch.no_grad():
            self.trunk.lm_head.bias.fill_(bias)
        if lora_rank:
            self.lora = LoRABank()
            self.lora.add(LoRA(trunk.args, targets=tuple(PROJECTIONS), rank=lora_rank, alpha=2.0 * lora_rank))
            self.lora.attach(self.trunk)

    def weights(self, ids, mask=None) -> torch.Tensor:
        """(B, S−1): w_t = sigmoid(φ(x)_t) for t ≥ 1, zero on padding."""
        logit = self.trunk(ids, mask)[..., 0]
        w = torch.sigmoid(logit.to(torch.promote_types(logit.dtype, torch.float32)))[:, 1:]   # fp32, or fp64
        return w if mask is None else w * mask[:, 1:].to(w.dtype)


def adamw_step(params: dict, grads: dict, state: dict | None, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.01) -> tuple[dict, dict]:
    """One step of torch.optim.AdamW, out of place and differentiable: (new params, new state).

    p ← p·(1 − lr·λ) − lr·m̂/(√v̂ + ε), m̂ = m/(1 − β1ᵗ), v̂ = v/(1 − β2ᵗ); √v̂ is taken as 0 where v = 0 (a parameter
    no gradient has reached yet), whose derivative would otherwise be ∞·0 = NaN."""
    b1, b2 = betas
    step = 1 if state is None else state["step"] + 1
    new, m_new, v_new = {}, {}, {}
    for name, p in params.items():
        g = grads[name]
        m = (1 - b1) * g if state is None else b1 * state["m"][name] + (1 - b1) * g
        v = (1 - b2) * g * g if state is None else b2 * state["v"][name] + (1 - b2) * g * g
        v_hat = v / (1 - b2 ** step)
        root = torch.where(v_hat > 0, torch.where(v_hat > 0, v_hat, 1.0).sqrt(), 0.0)
        new[name] = p * (1 - lr * weight_decay) - lr * (m / (1 - b1 ** step)) / (root + eps)
        m_new[name], v_new[name] = m, v
    return new, {"step": step, "m": m_new, "v": v_new}


def meta_loss(learner, phi: TrainAttention, doc: dict, probe: dict, *, lr: float, warmup: int = 1,
              betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01) -> torch.Tensor:
    """J(φ) of one episode: `doc` {"input_ids", "attention_mask"}, `probe` the same plus "weights" (B, S−1), 1 on
    the object's tokens. The learner's parameters are θ_0 and are not changed; J is in φ's graph."""
    with sdpa_kernel(SDPBackend.MATH):
        return _meta_loss(learner, phi, doc, probe, lr, warmup, betas, eps, weight_decay)


def _meta_loss(learner, phi, doc, probe, lr, warmup, betas, eps, weight_decay):
    w = phi.weights(doc["input_ids"], doc["attention_mask"])
    theta = {n: p.detach() for n, p in learner.named_parameters() if p.requires_grad}
    state = None
    for step in range(warmup + 1):
        differentiable = step == warmup
        theta = {n: t.detach().requires_grad_() for n, t in theta.items()}   # θ_0, then θ_1, as leaves
        logits = functional_call(learner, theta, (doc["input_ids"], doc["attention_mask"]))
        loss = weighted_loss(logits, doc["input_ids"], w if differentiable else w.detach(),
                             doc["attention_mask"]).mean()
        grads = dict(zip(theta, torch.autograd.grad(loss, list(theta.values()), create_graph=differentiable)))
        if not differentiable:
            grads = {n: g.detach() for n, g in grads.items()}
        theta, state = adamw_step(theta, grads, state, lr, betas, eps, weight_decay)
        if not differentiable:   # the warm-up step leaves only its moments
            state = {"step": state["step"], "m": {n: m.detach() for n, m in state["m"].items()},
                     "v": {n: v.detach() for n, v in state["v"].items()}}
    logits = functional_call(learner, theta, (probe["input_ids"], probe["attention_mask"]))
    return weighted_loss(logits, probe["input_ids"], probe["weights"], probe["attention_mask"]).mean()
