"""TAALM's meta-gradient: the functional AdamW step is torch's, and φ's gradient through it is the finite
difference of the episode's loss (float64) and what torch.func composes by hand on a two-parameter toy."""
import math

import pytest
import torch
from torch.func import grad

from minseekr.knowledge.taalm import TrainAttention, adamw_step, meta_loss
from minseekr.knowledge.weights import weighted_loss
from minseekr.network.model import ModelArgs, Transformer


def test_the_functional_step_is_torch_adamw_over_several_steps():
    torch.manual_seed(0)
    params = {"a": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    reference = {n: torch.nn.Parameter(p.clone()) for n, p in params.items()}
    optim = torch.optim.AdamW(reference.values(), lr=0.1, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    state = None
    for step in range(3):
        grads = {n: torch.randn_like(p) for n, p in params.items()}
        grads["b"][1] = 0.0 if step == 0 else grads["b"][1]     # a coordinate without gradient at first
        params, state = adamw_step(params, grads, state, lr=0.1, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
        for n, p in reference.items():
            p.grad = grads[n].clone()
        optim.step()
    for n in params:
        torch.testing.assert_close(params[n], reference[n].detach(), rtol=1e-12, atol=1e-12)


def tiny(seed, vocab=13):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=vocab, hidden_dim=12, max_seq_len=16))
    model.init_weights(0.5)
    return model.double()


def episode():
    g = torch.Generator().manual_seed(1)
    doc = {"input_ids": torch.randint(0, 13, (1, 7), generator=g), "attention_mask": torch.ones(1, 7, dtype=torch.long)}
    ids = torch.randint(0, 13, (1, 5), generator=g)
    probe = {"input_ids": ids, "attention_mask": torch.ones(1, 5, dtype=torch.long),
             "weights": torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)}   # a two-token object
    return doc, probe


@pytest.mark.parametrize("lora_rank", [0, 2], ids=["whole φ", "LoRA φ"])
def test_phis_gradient_through_the_inner_step_is_the_finite_difference(lora_rank, warmup=0):
    """The whole derivative of J in φ, one inner step (with a warm-up step before it, φ's weights there are held
    fixed, as in the authors' code: the toy test below composes exactly that)."""
    learner, phi = tiny(0), TrainAttention(tiny(1), lora_rank=lora_rank).double()
    with torch.no_grad():                     # away from w ≈ 1, where sigmoid flattens every difference
        phi.trunk.lm_head.bias.fill_(0.3)
        for B in (phi.lora.loras[0].B.values() if lora_rank else ()):
            B.normal_(0, 0.3)                 # B = 0 at first: A's gradient would be 0 on both sides
    doc, probe = episode()
    J = meta_loss(learner, phi, doc, probe, lr=0.05, warmup=warmup)
    params = [p for p in phi.parameters() if p.requires_grad]
    assert len(params) == (2 + 2 * 7 if lora_rank else len(list(phi.parameters())))   # head; A, B of 7 projections
    got = torch.autograd.grad(J, params)
    h = 1e-6
    for p, g in zip(params, got):
        flat, gflat = p.data.view(-1), g.view(-1)
        for i in torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(2))[:3].tolist():
            old = flat[i].item()
            flat[i] = old + h
            up = meta_loss(learner, phi, doc, probe, lr=0.05, warmup=warmup).item()
            flat[i] = old - h
            down = meta_loss(learner, phi, doc, probe, lr=0.05, warmup=warmup).item()
            flat[i] = old
            assert gflat[i].item() == pytest.approx((up - down) / (2 * h), rel=1e-4, abs=1e-9)
    assert any(g.abs().max() > 0 for g in got)           # φ does learn something from the episode


class Toy(torch.nn.Module):
    """A learner of two parameters: logits over 3 tokens are (a·x, b·x, 0) for the input token x."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64)), \
            torch.nn.Parameter(torch.tensor(-0.2, dtype=torch.float64))

    def forward(self, ids, mask=None):
        x = ids.double()
        return torch.stack([self.a * x, self.b * x, torch.zeros_like(x)], -1)


class ToyPhi(torch.nn.Module):
    """w_t = sigmoid(c·t): one parameter."""

    def __init__(self):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def weights(self, ids, mask=None):
        return torch.sigmoid(self.c * torch.arange(1, ids.shape[1], dtype=torch.float64))[None]


def test_phis_gradient_equals_torch_func_composed_by_hand_on_a_toy():
    ids, probe_ids = torch.tensor([[1, 0, 2, 1]]), torch.tensor([[2, 1, 0]])
    ones, lr, b1, b2, eps, wd = torch.ones(1, 4, dtype=torch.long), 0.1, 0.9, 0.999, 1e-8, 0.01
    doc, probe = {"input_ids": ids, "attention_mask": ones}, {
        "input_ids": probe_ids, "attention_mask": ones[:, :3], "weights": torch.tensor([[0.0, 1.0]]).double()}
    phi = ToyPhi()
    got = torch.autograd.grad(meta_loss(Toy(), phi, doc, probe, lr=lr, warmup=1), [phi.c])[0]

    def logits(a, b, x):
        return torch.stack([a * x.double(), b * x.double(), torch.zeros(x.shape, dtype=torch.float64)], -1)

    def inner(theta, w):
        return weighted_loss(logits(*theta, ids), ids, w, ones).mean()

    def J(c):
        w = torch.sigmoid(c * torch.arange(1, 4, dtype=torch.float64))[None]
        theta, m, v = (torch.tensor(0.3, dtype=torch.float64), torch.tensor(-0.2, dtype=torch.float64)), [0.0, 0.0], [0.0, 0.0]
        for t, w_t in ((1, w.detach()), (2, w)):          # the warm-up step, then the differentiable one
            g = grad(inner)(theta, w_t)
            if t == 1:
                g = tuple(x.detach() for x in g)
            m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
            v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
            theta = tuple(p * (1 - lr * wd) - lr * (mi / (1 - b1 ** t)) / (torch.sqrt(vi / (1 - b2 ** t)) + eps)
                          for p, mi, vi in zip(theta, m, v))
            if t == 1:
                theta, m, v = tuple(p.detach() for p in theta), [x.detach() for x in m], [x.detach() for x in v]
        return weighted_loss(logits(*theta, probe_ids), probe_ids, probe["weights"], ones[:, :3]).mean()

    expected = grad(J)(torch.tensor(0.7, dtype=torch.float64))
    assert got.item() == pytest.approx(expected.item(), rel=1e-10) and not math.isclose(got.item(), 0.0)


def test_phi_starts_near_plain_fine_tuning_and_weighs_no_padding():
    phi = TrainAttention(tiny(1).float())
    ids, mask = torch.randint(0, 13, (2, 6)), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        phi.trunk.lm_head.weight.zero_()
        w = phi.weights(ids, mask)
    assert w.shape == (2, 5) and torch.allclose(w[0], torch.full((5,), torch.sigmoid(torch.tensor(4.0)).item()))
    assert w[1, 3:].tolist() == [0.0, 0.0]


def test_a_lora_phi_starts_as_the_whole_one_and_trains_only_its_lora_and_head():
    ids = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    whole = TrainAttention(tiny(1).float())
    torch.manual_seed(5)
    lora = TrainAttention(tiny(1).float(), lora_rank=4)
    with torch.no_grad():
        assert torch.equal(whole.weights(ids), lora.weights(ids))        # B = 0: the LoRA changes nothing yet
    trained = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trained == {"trunk.lm_head.weight", "trunk.lm_head.bias"} | {
        f"lora.loras.0.{m}.0_{t}" for m in "AB" for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj")}
