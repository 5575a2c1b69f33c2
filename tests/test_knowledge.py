"""Continual knowledge learning (TAALM's LAMA-ckl): the metric, the split, the weighted loss and the token weights."""
import json

import pytest
import torch

from conftest import shared_path
from minseekr.knowledge.lama import Fact, load_facts, probe_ids, score_facts, split, summary
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


def test_loading_names_the_bad_line(tmp_path):
    good = {"uuid": "u", "subject": "s", "relation_label": "r", "object": "o", "task_descriptive": "s r o .",
            "task_schematic": "x o", "evidence": "doc"}
    (tmp_path / "v.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "object": ""}) + "\n")
    with pytest.raises(InputError, match=r"v.jsonl:2: field 'object' must be a non-empty string"):
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
