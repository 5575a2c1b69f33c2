"""Parameter-efficient pieces (#13, part 1): soft prompts through the model and generation, LoRA through hooks.

References are independent of the code under test: soft prompts equal to token embeddings must give the logits
and the greedy answers of those tokens typed before the prompt; LoRA's hooks must give the logits of a model
whose weights were changed by W + (α/r)·B A directly; training a LoRA must leave the base bit-identical.
"""
import copy

import pytest
import torch

from minseekr.methods.peft import LoRA, LoRABank, SoftPrompt, freeze, load_method, save_method
from minseekr.network.generate import generate
from minseekr.network.model import ModelArgs, Transformer, token_losses
from minseekr.runtime import InputError

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, hidden_dim=48, max_seq_len=64)


def tiny():
    torch.manual_seed(0)
    model = Transformer(ARGS)
    model.init_weights(std=0.3)      # far from greedy ties
    return model.eval()


def trained_lora(targets=("q_proj", "v_proj"), seed=1):
    """A LoRA whose B is not zero (a fresh one changes nothing)."""
    torch.manual_seed(seed)
    lora = LoRA(ARGS, targets, rank=4, alpha=8)
    for p in lora.B.values():
        p.data.normal_(0, 0.3)
    return lora


PREFIX_IDS = [7, 19, 4]
PROMPTS = [[5, 17, 33, 9, 41, 40, 12], [60, 3], [38, 24, 51, 7]]


def test_soft_prompts_equal_to_token_embeddings_give_those_tokens_logits():
    model = tiny()
    prefix = model.model.embed_tokens(torch.tensor([PREFIX_IDS] * 2)).detach()
    tokens = torch.tensor([[0, 0, 5, 17, 33], [8, 2, 9, 11, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        got = model(tokens, torch.cat([torch.ones(2, 3, dtype=torch.long), mask], 1), prefix=prefix)
        for i in range(2):
            real = tokens[i][mask[i].bool()]
            want = model(torch.tensor([PREFIX_IDS + real.tolist()]))[0]
            torch.testing.assert_close(got[i, -len(real):], want[-len(real):], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_with_soft_prompts_equals_the_prompts_typed_as_tokens(use_cache):
    model = tiny()
    prefix = model.model.embed_tokens(torch.tensor([PREFIX_IDS] * len(PROMPTS))).detach()
    got = generate(model, PROMPTS, 8, prefix=prefix, use_cache=use_cache)
    assert got == generate(model, [PREFIX_IDS + p for p in PROMPTS], 8)
    assert got != generate(model, PROMPTS, 8)


def merged_model(model, bank):
    """A copy of `model` whose weights are W + (α/r)·B A for every LoRA of `bank`, written out from the formula with
    the LoRAs' tensors (not with LoRABank.merged, which is code under test)."""
    other = copy.deepcopy(model)
    blocks = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    with torch.no_grad():
        for lora in bank.loras:
            for key, A in lora.A.items():
                layer, target = key.split("_", 1)
                weight = getattr(getattr(other.model.layers[int(layer)], blocks[target]), target).weight
                weight += (lora.alpha / lora.rank) * (lora.B[key] @ A)
    return other


def test_lora_hooks_equal_the_weights_changed_by_BA():
    model, tokens = tiny(), torch.randint(0, ARGS.vocab_size, (2, 9))
    bank = LoRABank()
    bank.add(trained_lora(("q_proj", "v_proj")))
    bank.add(trained_lora(("k_proj", "o_proj", "down_proj"), seed=2))   # GQA-sized k, and an MLP projection
    with torch.no_grad():
        plain = model(tokens)
        bank.attach(model)
        hooked = model(tokens)
        bank.detach()
        assert torch.equal(model(tokens), plain)                         # detached: the base model again
        torch.testing.assert_close(hooked, merged_model(model, bank)(tokens), atol=1e-4, rtol=1e-4)
    assert (hooked - plain).abs().max() > 1e-2


def test_per_sample_weights_pick_each_samples_lora():
    model, tokens = tiny(), torch.randint(0, ARGS.vocab_size, (2, 9))
    first, second = trained_lora(seed=1), trained_lora(seed=2)
    bank = LoRABank()
    bank.add(first), bank.add(second)
    bank.weights = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    with torch.no_grad():
        bank.attach(model)
        got = model(tokens)
        bank.detach()
        for i, lora in enumerate((first, second)):
            alone = LoRABank()
            alone.add(lora)
            torch.testing.assert_close(got[i], merged_model(model, alone)(tokens)[i], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="cannot be merged"):
        bank.merged(model)


def test_a_new_lora_changes_nothing_and_training_it_leaves_the_base_bit_identical():
    model = freeze(tiny())
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, ARGS.vocab_size, (4, 10))
    with torch.no_grad():
        plain = model(tokens)
    bank = LoRABank()
    lora = bank.add(LoRA(ARGS, rank=4, alpha=8))
    bank.attach(model)
    with torch.no_grad():
        assert torch.equal(model(tokens), plain)                          # B = 0: the update is exactly zero
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    opt = torch.optim.AdamW(bank.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        token_losses(model(tokens), tokens).mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(v, before[k]) for k, v in lora.state_dict().items())


def test_a_soft_prompt_trains_while_the_base_stays(tmp_path):
    model = freeze(tiny())
    base = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = SoftPrompt(3, ARGS.dim)
    start = prompt.vectors.detach().clone()
    tokens = torch.randint(0, ARGS.vocab_size, (4, 10))
    opt = torch.optim.AdamW(prompt.parameters(), lr=1e-2)
    logits = model(tokens, prefix=prompt.prefix(4))[:, 3:]
    token_losses(logits, tokens).mean().backward()
    opt.step()
    assert not torch.equal(prompt.vectors, start)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_method_files_round_trip_and_refuse_what_does_not_fit(tmp_path):
    lora = trained_lora()
    save_method(lora, tmp_path / "lora.safetensors", {"method": "olora", "rank": 4})
    again = LoRA(ARGS, rank=4, alpha=8)
    assert load_method(again, tmp_path / "lora.safetensors") == {"method": "olora", "rank": 4}
    assert all(torch.equal(v, lora.state_dict()[k]) for k, v in again.state_dict().items())
    with pytest.raises(InputError, match="does not fit"):
        load_method(LoRA(ARGS, rank=2), tmp_path / "lora.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(InputError, match="not a method file"):
        load_method(again, tmp_path / "junk.safetensors")


def test_unknown_targets_are_refused():
    with pytest.raises(InputError, match="unknown qq_proj"):
        LoRA(ARGS, ("q_proj", "qq_proj"))
