"""What a run depends on, as digests: θ_0's weights, the tokenizer, each task's records and the settings.

A run writes its fingerprint into every resume point and every buffer manifest, and compares it with the one it
computes when it starts or resumes: a resume point, or a buffer, is used only by the run that made it, on the same
model, tokenizer, data and settings. `changes` names what differs ("task rev's records", "setting clip: 1.0 → 2.0"),
so a refusal says what to restore. At the start of a torchrun job every rank compares its own with rank 0's: ranks
started with different `--data`, `--train-samples` or settings stop together, naming what differs.

The model's digest covers θ_0's full weights as loaded into the engine (names and fp32 bytes), taken before any
training: one gather per unit, as an export does, and the same for either engine and any world size, so the buffer
of a two-rank run equals that of one process.
"""
import hashlib
import json

import torch

from minseekr.runtime import gather, rank_world

# run.json's fields that do not change what a run computes: where things are (paths are checked by content),
# the thread count (a resume may change it), the demo's own choices.
_NOT_SETTINGS = ("model", "tokenizer", "data", "general_data", "out", "resume", "threads", "demo_seeds",
                 "demo_methods")


def digest(obj) -> str:
    """sha256 of a JSON value, written canonically."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()


def model_digest(engine) -> str:
    """sha256 of the engine's full weights by name, in the model's order: the same for any engine and world size
    (every rank must call it: each full tensor is gathered in turn, and rank 0 hashes it)."""
    h, rank = hashlib.sha256(), rank_world()[0]
    for name, t in engine.full_tensors():
        if rank == 0:
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return gather(h.hexdigest())[0]


def fingerprint(engine, tokenizer, tasks, cfg: dict, spec: dict | None) -> dict:
    """The run's fingerprint: {"model", "tokenizer", "tasks": {name: digest}, "settings": {field: value}}."""
    tok = hashlib.sha256()
    for file in tokenizer.files:
        tok.update(file.name.encode() + file.read_bytes())
    settings = {**{k: v for k, v in (spec or {}).items() if k not in _NOT_SETTINGS}, **cfg}
    return {"model": model_digest(engine), "tokenizer": tok.hexdigest(),
            "tasks": {t.name: digest([t.train, t.eval, t.test]) for t in tasks},
            "settings": json.loads(json.dumps(settings))}   # tuples as lists, as they read back from JSON


def changes(recorded: dict, current: dict) -> list[str]:
    """What differs between a recorded fingerprint and the current one, in words (empty if nothing)."""
    out = []
    if recorded.get("model") != current.get("model"):
        out.append("the model's weights (θ_0)")
    if recorded.get("tokenizer") != current["tokenizer"]:
        out.append("the tokenizer")
    old, new = recorded.get("tasks", {}), current["tasks"]
    if list(old) != list(new):
        out.append(f"the tasks ({', '.join(old)} → {', '.join(new)})")
    else:
        out += [f"task {name}'s records" for name in new if old[name] != new[name]]
    old, new = recorded.get("settings", {}), current["settings"]
    out += [f"setting {key}: {old.get(key)!r} → {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]
    return out


def across_ranks(current: dict) -> list[str]:
    """How each rank's fingerprint differs from rank 0's, but for the model's (one digest of every rank's shards):
    ["rank 1: task rev's records", ...], the same list on every rank."""
    everyone = gather({k: v for k, v in current.items() if k != "model"})
    return [f"rank {r}: {what}" for r, theirs in enumerate(everyone) for what in changes(everyone[0], theirs)]
