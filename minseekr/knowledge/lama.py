"""LAMA-ckl (TAALM's benchmark): facts, their probes, the authors' metric, and the filter for the model in use.

A fact is (subject, relation, object) with a descriptive probe ("Libya maintains diplomatic relations with
Brazil ."; the object is not always last: "Laurie Anderson is a poet by profession ."), a schematic one
("Guess the object. \\n  subject is Libya , relation is diplomatic relation , object
is Brazil") and an evidence document that states it. The metric feeds a probe teacher-forced and takes the arg-max
at each of the object's tokens: a fact scores the fraction of its object tokens predicted exactly (partial credit
for a multi-token object), a set the mean over its facts. The sets were filtered for the authors' models; `split`
re-filters for the model in use: to learn (TL) = facts it scores 0 on, not to forget (NF) = facts it scores 1 on.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from minseekr.runtime import InputError, read_json

FILES = {"variant": "variant.jsonl", "descriptive": "invariant_descriptive.jsonl",
         "schematic": "invariant_schematic.jsonl"}
FIELDS = ("uuid", "subject", "relation_label", "object", "task_descriptive", "task_schematic", "evidence")


@dataclass(frozen=True)
class Fact:
    uuid: str
    subject: str
    relation: str
    object: str
    descriptive: str
    schematic: str
    evidence: str

    def probe(self, form: str) -> str:
        return self.descriptive if form == "descriptive" else self.schematic


def load_facts(path) -> list[Fact]:
    """The facts of one LAMA-ckl file (JSON lines); a malformed line is one error naming the file, line and field."""
    path, facts = Path(path), []
    if not path.is_file():
        raise InputError(f"{path} not found (a LAMA-ckl file: {', '.join(FILES.values())})")
    seen = {}
    for n, row in read_json(path, dict, lines=True):   # the project's one JSON reader: each line an object
        if missing := [f for f in FIELDS if not isinstance(row.get(f), str) or not row[f].strip()]:
            raise InputError(f"{path}:{n}: field {missing[0]!r} must be a string with text in it")
        if absent := [f for f in ("task_descriptive", "task_schematic") if row["object"] not in row[f]]:
            raise InputError(f"{path}:{n}: the object {row['object']!r} is not in field {absent[0]!r}, the probe "
                             f"that scores it")
        if row["uuid"] in seen:   # the filter and the run name facts by uuid
            raise InputError(f"{path}:{n}: uuid {row['uuid']!r} is already line {seen[row['uuid']]}'s")
        seen[row["uuid"]] = n
        facts.append(Fact(row["uuid"], row["subject"], row["relation_label"], row["object"],
                          row["task_descriptive"], row["task_schematic"], row["evidence"]))
    if not facts:
        raise InputError(f"{path} holds no fact")
    return facts


def probe_ids(tok, fact: Fact, form: str = "descriptive") -> tuple[list[int], int, int]:
    """The probe's tokens up to the object's end (BOS first) and the object's token span [start, end).

    The object is its last occurrence in the probe; the text before it is encoded alone, so the span starts at a
    token boundary whatever the tokenizer does with the space before the object."""
    text = fact.probe(form)
    at = text.rfind(fact.object)
    if at < 0:
        raise InputError(f"fact {fact.uuid}: its object {fact.object!r} is not in its {form} probe {text!r}")
    before = tok.encode(text[:at].rstrip(), bos=True)
    whole = tok.encode(text[:at + len(fact.object)], bos=True)
    start = 0
    while start < min(len(before), len(whole)) and before[start] == whole[start]:
        start += 1
    if start == len(whole) or start == 0:
        raise InputError(f"fact {fact.uuid}: its object {fact.object!r} encodes to no token of its own, or to the "
                         f"probe's first, which nothing predicts")
    return whole, start, len(whole)


@torch.no_grad()
def score_facts(model, tok, facts: list[Fact], form: str = "descriptive", batch_size: int = 32,
                progress: bool = False) -> list[float]:
    """Each fact's fraction of object tokens that the model's arg-max predicts exactly, teacher-forced."""
    model.eval()
    encoded = [probe_ids(tok, f, form) for f in facts]
    scores = []
    for start in tqdm(range(0, len(encoded), batch_size), desc=f"score {form}", leave=False, disable=not progress):
        chunk = encoded[start:start + batch_size]
        S = max(len(ids) for ids, _, _ in chunk)
        tokens = torch.full((len(chunk), S), tok.pad_id, dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for b, (ids, _, _) in enumerate(chunk):   # right-padded: positions and causality as unpadded
            tokens[b, :len(ids)], mask[b, :len(ids)] = torch.tensor(ids), 1
        predicted = model(tokens.to(model.device), mask.to(model.device)).argmax(-1).cpu()   # predicts t + 1
        for b, (ids, lo, hi) in enumerate(chunk):
            hits = predicted[b, lo - 1:hi - 1] == tokens[b, lo:hi]
            scores.append(hits.float().mean().item())
    return scores


def held_out(facts: list[Fact], evaluated: list[Fact]) -> list[Fact]:
    """The facts that a run may train on besides TL (φ's episodes, Mix-Review's documents): none of `evaluated`
    (TL and NF), none whose evidence document is an evaluated fact's (the benchmark's files share some, variant.jsonl
    among its own rows), each fact once."""
    seen, evidence, out = {f.uuid for f in evaluated}, {f.evidence for f in evaluated}, []
    for fact in facts:
        if fact.uuid not in seen and fact.evidence not in evidence:
            seen.add(fact.uuid)
            out.append(fact)
    return out


def split(facts: list[Fact], scores: list[float]) -> tuple[list[Fact], list[Fact]]:
    """(facts the model scores 0 on: to learn, facts it scores 1 on: not to forget)."""
    return [f for f, s in zip(facts, scores) if s == 0.0], [f for f, s in zip(facts, scores) if s == 1.0]


def summary(tl: list[float], nf: list[float | None]) -> dict:
    """The authors' table from accuracies after 0, 1, …, E epochs (0: θ_0): Top Acc (the best TL accuracy of a
    trained epoch, 1..E), the Epoch it is reached at (the first if tied), NF Acc at that epoch, and Total Knowledge =
    Top Acc + NF Acc (NF None: no known fact was kept, and Total Knowledge is Top Acc's alone). θ_0 is not a
    candidate: it knows no TL fact by construction, and a run that learnt nothing would be credited θ_0's NF."""
    if len(tl) < 2 or len(tl) != len(nf):
        raise ValueError(f"need one TL and one NF accuracy for θ_0 and each of ≥ 1 epochs, got {len(tl)} and "
                         f"{len(nf)}")
    best = max(range(1, len(tl)), key=lambda e: (tl[e], -e))
    return {"top_acc": tl[best], "epoch": best, "nf_acc": nf[best], "total_knowledge": tl[best] + (nf[best] or 0.0)}
