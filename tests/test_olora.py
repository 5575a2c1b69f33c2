"""O-LoRA (#13): the penalty is the authors' formula, one dropout mask is shared by the old and new LoRAs, earlier
LoRAs do not move, and a checkpoint's LoRAs fold exactly into its weights (what every PET run owes,
tests/test_pet_runs.py)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import logged

from minseekr.methods.olora import OLoRA
from minseekr.methods.peft import read_method
from minseekr.methods.pet import FILE, attach_saved
from minseekr.network.checkpoint import load_hf
from minseekr.network.model import ModelArgs, Transformer

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, hidden_dim=48, max_seq_len=64)


def test_penalty_and_its_gradient_are_the_authors_formula():
    torch.manual_seed(0)
    method = OLoRA(ARGS, rank=4, alpha=8, lambda1=0.5, lambda2=0.3)
    for k in range(3):
        method.begin_task(k)
    with torch.no_grad():   # trained Bs (a new B is zero, where a norm has no derivative)
        for p in method.bank.loras[2].B.values():
            p.normal_()
    terms = method.penalty(2)
    total = sum(terms.values())
    total.backward()
    # Naively: every entry of every A_t A_2ᵀ, one by one, and each new tensor's Euclidean norm.
    new = method.bank.loras[2]
    A_new = {key: a.detach().clone().requires_grad_(True) for key, a in new.A.items()}
    B_new = {key: b.detach().clone().requires_grad_(True) for key, b in new.B.items()}
    orth = 0.0
    for old in method.bank.loras[:2]:
        for key in A_new:
            for i in range(4):
                for j in range(4):
                    orth = orth + torch.abs(torch.dot(old.A[key][i].detach(), A_new[key][j]))
    norms = sum(torch.sqrt((t ** 2).sum()) for t in [*A_new.values(), *B_new.values()])
    want = 0.5 * orth + 0.3 * norms
    want.backward()
    torch.testing.assert_close(total, want)
    for key in A_new:
        torch.testing.assert_close(new.A[key].grad, A_new[key].grad)
        torch.testing.assert_close(new.B[key].grad, B_new[key].grad)
    assert all(p.grad is None for lora in method.bank.loras[:2] for p in lora.parameters())   # frozen


def test_one_dropout_mask_on_a_projections_input_is_shared_by_the_old_and_new_loras():
    """O-LoRA's `Linear.forward` drops x once and feeds it to the stacked old LoRAs and the new one."""
    torch.manual_seed(0)
    model = Transformer(ARGS)
    method = OLoRA(ARGS, rank=4, alpha=8, dropout=0.5)
    for k in range(2):
        method.begin_task(k)
    with torch.no_grad():
        for lora in method.bank.loras:
            for p in lora.B.values():
                p.normal_()
    method.attach(model)
    q = model.model.layers[0].self_attn.q_proj
    seen = {}
    q.register_forward_pre_hook(lambda m, inputs: seen.update(rng=torch.get_rng_state()))
    q.register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0].detach(), out=out.detach()))
    tokens = torch.randint(0, ARGS.vocab_size, (2, 7))

    def want(x, kept):   # W x + Σ_t (α/r) B_t A_t (x ⊙ kept), the same kept entries for every t
        lora_sum = sum((x * kept) @ lora.A["0_q_proj"].T @ lora.B["0_q_proj"].T * (8 / 4) for lora in method.bank.loras)
        return x @ q.weight.T + lora_sum

    with torch.no_grad():
        model.train()(tokens)
        state = torch.get_rng_state()
        torch.set_rng_state(seen["rng"])
        kept = F.dropout(torch.ones_like(seen["x"]), 0.5, True)          # the one mask (÷ (1 − p) included)
        torch.set_rng_state(state)
        assert 0 < (kept == 0).float().mean() < 1
        torch.testing.assert_close(seen["out"], want(seen["x"], kept))
        model.eval()(tokens)                                                # evaluation never drops
        torch.testing.assert_close(seen["out"], want(seen["x"], torch.ones_like(seen["x"])))


@pytest.fixture
def run(pet_runs):
    return pet_runs("olora")[1]


def test_earlier_loras_do_not_move_and_the_penalty_acts(run):
    first, second = (read_method(run / "checkpoints" / f"task{k:02d}" / FILE) for k in (1, 2))
    assert (first[0]["tasks"], second[0]["tasks"]) == (1, 2)
    for name, t in first[1].items():           # task 1's LoRA did not move while task 2 trained
        assert torch.equal(second[1][name], t), name
    assert any(name.startswith("bank.loras.1.B") and t.abs().sum() > 0 for name, t in second[1].items())
    lines = logged(run)
    steps = [e for e in lines if "grad_norm" in e]
    assert [e["step"] for e in steps] == list(range(1, len(steps) + 1))   # counted across tasks
    assert all(e["olora_orth"] == 0 for e in steps if e["task"] == 0)
    assert all(e["olora_orth"] > 0 for e in steps if e["task"] == 1)


def test_a_checkpoints_loras_fold_into_its_weights(run):
    checkpoint = run / "checkpoints" / "task02"
    adapted = attach_saved(load_hf(checkpoint), checkpoint).eval()
    prompts = [[1, 5, 9, 13, 4], [1, 7, 7, 20]]
    merged = load_hf(checkpoint)
    method = OLoRA.load(checkpoint / FILE, merged.args)
    merged.load_state_dict(method.bank.merged(merged))     # one set of weights: O-LoRA folds into W exactly
    tokens = torch.tensor(prompts[0])[None]
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(tokens), adapted(tokens), atol=1e-5, rtol=1e-5)
