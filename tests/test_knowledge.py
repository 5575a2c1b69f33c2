"""Continual knowledge learning (TAALM's LAMA-ckl): the metric, the split, the weighted loss, the token weights,
and the Mix-Review and RecAdam baselines."""
import json
import math
import random
from dataclasses import replace

import pytest
import torch

from conftest import shared_path
from minseekr.knowledge.baselines import RecAdam, anneal, review_indices
from minseekr.knowledge.lama import Fact, held_out, load_facts, probe_ids, score_facts, split, summary
from minseekr.knowledge.weights import object_mask, oracle_weights, rho1_weights, token_nll, weighted_loss
from minseekr.runtime import InputError


class WordTokenizer:
    """One id per word (BOS = 1, pad = 0): spans and argmaxes are easy to build by hand."""
    pad_id = 0

    def __init__(self):
        self.vocab = {}

    def encode(self, text, bos=True):
        return [1] * bos + [self.vocab.setdefault(w, len(self.vocab) + 2) for w in text.split()]


class Predicts(torch.nn.Module):
    """A model whose arg-max after each prefix is given by hand: `table[prefix tuple] = next id`."""
    device = torch.device("cpu")

    def __init__(self, table, vocab=64):
        super().__init__()
        self.table, self.vocab = table, vocab

    def forward(self, tokens, mask):
        logits = torch.zeros(*tokens.shape, self.vocab)
        for b in range(tokens.shape[0]):
            for t in range(tokens.shape[1]):
                logits[b, t, self.table.get(tuple(tokens[b, :t + 1].tolist()), 0)] = 1.0
        return logits


def fact(descriptive, obj, uuid="u"):
    return Fact(uuid, "s", "r", obj, descriptive, f"Guess the object. subject is s , object is {obj}", "doc")


def test_a_fact_scores_the_fraction_of_its_object_tokens_predicted_teacher_forced():
    tok = WordTokenizer()
    three = fact("The capital is New York City .", "New York City", "a")   # three object tokens
    one = fact("Libya relates to Brazil .", "Brazil", "b")
    ids3, lo3, hi3 = probe_ids(tok, three)
    ids1, lo1, hi1 = probe_ids(tok, one)
    assert (hi3 - lo3, hi1 - lo1) == (3, 1) and ids3[lo3:hi3] == tok.encode("New York City", bos=False)
    table = {tuple(ids3[:lo3]): ids3[lo3], tuple(ids3[:lo3 + 1]): 99 % 64,   # New right, York wrong
             tuple(ids3[:lo3 + 2]): ids3[lo3 + 2], tuple(ids1[:lo1]): ids1[lo1]}   # City right (teacher-forced)
    assert score_facts(Predicts(table), tok, [three, one], batch_size=1) == pytest.approx([2 / 3, 1.0])
    assert score_facts(Predicts({}), tok, [three, one]) == [0.0, 0.0]


def test_an_object_missing_from_its_probe_is_named():
    with pytest.raises(InputError, match="fact x: its object 'Paris' is not in its descriptive probe"):
        probe_ids(WordTokenizer(), fact("Rome is in Italy .", "Paris", "x"))


def test_split_and_the_authors_summary():
    facts = [fact(f"a b c{i} .", f"c{i}", str(i)) for i in range(4)]
    learn, keep = split(facts, [0.0, 1.0, 0.5, 0.0])
    assert [f.uuid for f in learn] == ["0", "3"] and [f.uuid for f in keep] == ["1"]
    got = summary(tl=[0.1, 0.4, 0.4, 0.2], nf=[0.9, 0.7, 0.6, 0.5])   # epoch 0 is θ_0
    assert got == {"top_acc": 0.4, "epoch": 1, "nf_acc": 0.7, "total_knowledge": pytest.approx(1.1)}
    assert summary(tl=[0.0, 0.5], nf=[None, None])["total_knowledge"] == 0.5
    nothing_learnt = summary(tl=[0.0, 0.0, 0.0], nf=[1.0, 0.8, 0.6])     # θ_0's NF is never the credit
    assert nothing_learnt == {"top_acc": 0.0, "epoch": 1, "nf_acc": 0.8, "total_knowledge": 0.8}


@pytest.mark.parametrize("rows, message", [
    ([], "holds no fact"),
    ([{"object": " "}], "v.jsonl:1: field 'object' must be a string with text in it"),
    ([{}, {"subject": "Other"}], "v.jsonl:2: uuid 'u' is already line 1's"),
    ([{"task_schematic": "s S r"}], "v.jsonl:1: the object 'O' is not in field 'task_schematic'"),
])
def test_a_file_the_run_cannot_name_facts_in_is_refused(tmp_path, rows, message):
    good = {"uuid": "u", "subject": "S", "relation_label": "r", "object": "O", "task_descriptive": "S r O .",
            "task_schematic": "s S r O", "evidence": "S r O."}
    (tmp_path / "v.jsonl").write_text("".join(json.dumps({**good, **row}) + "\n" for row in rows))
    with pytest.raises(InputError, match=message):
        load_facts(tmp_path / "v.jsonl")


def test_loading_names_the_bad_line(tmp_path):
    good = {"uuid": "u", "subject": "s", "relation_label": "r", "object": "o", "task_descriptive": "s r o .",
            "task_schematic": "x o", "evidence": "doc"}
    (tmp_path / "v.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "object": ""}) + "\n")
    with pytest.raises(InputError, match=r"v.jsonl:2: field 'object' must be a string with text in it"):
        load_facts(tmp_path / "v.jsonl")


def test_the_benchmark_files_load():
    root = shared_path("data", "lama-ckl")
    for name in ("variant.jsonl", "invariant_descriptive.jsonl", "invariant_schematic.jsonl"):
        facts = load_facts(root / name)
        assert len(facts) == 500 and all(f.object in f.descriptive and f.object in f.schematic for f in facts)


def test_the_weighted_loss_is_the_weighted_mean_of_token_nll():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    w, mask = torch.rand(2, 5), torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    got = weighted_loss(logits, ids, w, mask)
    for b in range(2):
        num = den = 0.0
        for t in range(1, 6):
            if mask[b, t]:
                nll = -torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]]
                num, den = num + w[b, t - 1] * nll, den + w[b, t - 1]
        assert got[b].item() == pytest.approx((num / (den + 1e-6)).item(), rel=1e-6)
    ones = weighted_loss(logits, ids, torch.ones(2, 5))
    assert ones[0].item() == pytest.approx(token_nll(logits, ids)[0].mean().item(), rel=1e-5)


def test_the_oracle_weighs_exactly_the_object_tokens_wherever_the_object_occurs():
    assert object_mask([5, 7, 8, 3, 7, 8, 7], [7, 8]) == [0, 1, 1, 0, 1, 1, 0]
    tok = WordTokenizer()
    ids, w = oracle_weights(tok, "New York City is big ; New York City again", "New York City")
    words = ["New", "York", "City", "is", "big", ";", "New", "York", "City", "again"]
    assert ids == [1] + tok.encode(" ".join(words), bos=False)
    assert w == [1.0 if word in ("New", "York", "City") else 0.0 for word in words]   # token t, t ≥ 1


def test_rho1_keeps_the_top_fraction_by_excess_loss_per_document():
    nll = torch.tensor([[3.0, 1.0, 2.0, 5.0], [1.0, 1.0, 4.0, 0.0]])
    ref = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 2.0, 0.0, 0.0]])   # excess [2, 0, 2, 4], [1, −1, 4, 0]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])             # the second's last token is padding
    got = rho1_weights(nll, ref, 0.5, mask)
    assert got.tolist() == [[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]]


@pytest.mark.parametrize("engine_kind", ["minseekr", "torch"])
def test_recadam_is_annealed_adamw_then_a_decoupled_pull_to_theta_0(engine_kind):
    """Against torch.optim.AdamW on the whole model at lr·λ(t), then θ ← θ − lr·(1 − λ(t))·γ·(θ − θ_0)."""
    from minseekr.engines.engine import load_engine
    from minseekr.engines.fsdp_torch import decay_groups
    from minseekr.network.checkpoint import load_hf
    from minseekr.runtime import init_distributed
    init_distributed("cpu")
    path, lr, k, t0, gamma = shared_path("artifacts", "stories260K-hf"), 1e-2, 1.0, 2.0, 10.0
    engine = load_engine(path, engine_kind, device="cpu", compute_dtype=torch.float32, weight_decay=0.01)
    recall = RecAdam(engine, k=k, t0=t0, gamma=gamma)
    model = load_hf(path, dtype=torch.float32)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = torch.optim.AdamW(decay_groups(model, 0.01), lr=lr)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    lams = []
    for t in range(1, 4):
        token_nll(engine.model(ids), ids).mean().backward()
        recall.step(lr)
        engine.zero_grad()
        token_nll(model(ids), ids).mean().backward()
        lams.append(anneal(t, k, t0))
        for group in reference.param_groups:
            group["lr"] = lr * lams[-1]
        reference.step()
        reference.zero_grad()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.sub_(p - theta0[n], alpha=lr * (1 - lams[-1]) * gamma)
    assert lams == pytest.approx([1 / (1 + math.e), 0.5, 1 / (1 + 1 / math.e)])
    got = dict(engine.full_tensors())
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(got[n], theta0[n]) for n in theta0)


def test_anneal_is_the_logistic_and_never_overflows():
    assert anneal(250, 0.5, 250) == 0.5 and anneal(0, 0.5, 250) == pytest.approx(1 / (1 + math.exp(125)))
    assert anneal(0, 10.0, 1000) == 0.0 and anneal(10**6, 0.5, 250) == 1.0


def test_held_out_facts_share_neither_a_uuid_nor_evidence_with_tl_and_nf_and_review_cycles_per_batch():
    facts = [replace(fact(f"a b {o} .", o, str(n)), evidence=f"doc {o}") for n, o in enumerate("xyz", 1)]
    tl = Fact("5", "s", "r", "v", "a v .", "s v", "doc v")                      # a TL fact of another file
    same_evidence = [Fact("4", "s", "r", "w", "a w .", "s w", facts[0].evidence),   # the files share some
                     Fact("6", "s", "r", "u", "a u .", "s u", tl.evidence)]
    assert [f.uuid for f in held_out(facts + [facts[2]] + same_evidence, [facts[0], tl])] == ["2", "3"]
    batches = review_indices([4, 4, 2], pool_size=3, ratio=0.5, rng=random.Random(0))
    assert [len(b) for b in batches] == [2, 2, 1]
    flat = [i for b in batches for i in b]
    assert sorted(flat[:3]) == [0, 1, 2]                   # each document once before any is seen again
    assert review_indices([3], pool_size=3, ratio=0.0, rng=random.Random(0)) == [[]]
