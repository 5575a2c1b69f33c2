"""The resume format: an engine's state (FSDP or TorchFSDP) as per-rank files, the run's resume points, re-sharding.

A sharded checkpoint is a directory holding `rank{r:05d}.safetensors` (that rank's parameter shards and AdamW
moments) and `manifest.json` (engine, world size, layout, step, AdamW settings, model args and the trainer's
meta), each written atomically; nothing is pickled. It loads at the world size that wrote it;
`reshard_checkpoint` rewrites an FSDP one for another world size offline. A run's resume points are such
directories under `resume/`, named by their `Position`, with `resume/latest.json` naming the newest; older
ones are deleted once a newer one is complete. (HF directories, the exchange format, are `checkpoint.py`'s.)
"""
import contextlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minseekr.runtime import InputError, NonFiniteError, atomic_write, first_error, read_json, tmp_name, together

LATEST = "latest.json"


@dataclass
class Position:
    """Where a run stands: task (stage) s, its epoch, the next micro-batch of that epoch's plan, micro-steps done."""
    task: int
    epoch: int = 0
    micro: int = 0
    step: int = 0

    @property
    def tag(self) -> str:
        return f"task{self.task:02d}-ep{self.epoch:03d}-mb{self.micro:07d}"


def write_point(root, position: Position, engine, state: dict, extra=None) -> Path:
    """A resume point of `engine` with the trainer's `state`; `extra(dir)` adds per-rank files (EWC).

    It is written only from finite weights and moments, and only once every rank has read its file back does
    latest.json name it and are older points deleted (rank 0): a crash or a full disk at any moment leaves the
    last good point in place.
    """
    root = Path(root)
    path = root / position.tag
    bad = next((name for name, t in engine.state_tensors().items() if not torch.isfinite(t).all()), None)
    if bad := first_error(bad):
        raise NonFiniteError(f"{path}: not written, {bad} holds NaN or infinite values; the resume point that "
                             f"{root / LATEST} names is kept")
    with together():   # a full disk on any rank stops every rank, the last good point still named
        save_sharded(engine, path, meta={**asdict(position), **state})
        if extra is not None:
            extra(path)
    if error := first_error(_unreadable(path / f"rank{engine.rank:05d}.safetensors", engine.state_tensors())):
        raise InputError(f"{error}; the resume point that {root / LATEST} names is kept")
    with together():
        if engine.rank == 0:
            atomic_write(root / LATEST, lambda tmp: tmp.write_text(json.dumps({"dir": position.tag})))
            for old in root.iterdir():
                if old.is_dir() and old.name != position.tag:
                    shutil.rmtree(old)
    return path


def _unreadable(file: Path, expected: dict) -> str | None:
    """Why `file` does not hold the tensors `expected` names with their shapes, or None."""
    try:
        with safe_open(str(file), "pt") as f:
            for name, t in expected.items():
                if name not in f.keys() or tuple(f.get_slice(name).get_shape()) != tuple(t.shape):
                    return f"{file}: {name} did not read back as written"
    except Exception as e:   # SafetensorError or OSError: a truncated or missing file
        return f"{file}: unreadable after writing ({e})"
    return None


META = ("task", "epoch", "micro", "step", "R", "base", "heads", "fingerprint", "metrics_bytes", "metrics_sha256")


def latest_point(root) -> Path:
    """The directory of the newest resume point under `root`, checked to be one of its own entries."""
    latest = Path(root) / LATEST
    if not latest.is_file():
        raise FileNotFoundError(f"{latest}: no resume point in this run directory (nothing to resume)")
    name = read_json(latest, dict).get("dir")
    if not isinstance(name, str) or Path(name).name != name or name in (".", "..") or not (Path(root) / name).is_dir():
        raise InputError(f"{latest} names {name!r}, which is not a resume point inside {root}")
    return Path(root) / name


def save_sharded(engine, path, meta=None):
    """rank{r}.safetensors (this rank's `state_tensors`) from every rank, manifest.json from rank 0, atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in engine.state_tensors().items()}
    with together():
        atomic_write(path / f"rank{engine.rank:05d}.safetensors", partial(save_file, tensors),
                     needed=sum(t.nbytes for t in tensors.values()))
        if engine.rank == 0:
            manifest = {**engine.layout(), "step": engine.step, "betas": list(engine.betas), "eps": engine.eps,
                        "weight_decay": engine.weight_decay, "model": asdict(engine.model.args), "meta": meta}
            atomic_write(path / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))


@torch.no_grad()
def load_sharded(engine, path) -> dict:
    """Restore what `save_sharded` wrote at this world size into `engine`; returns the trainer's meta."""
    path, manifest = Path(path), read_manifest(path, engine.layout())
    file = path / f"rank{engine.rank:05d}.safetensors"
    try:
        with safe_open(str(file), "pt") as f:
            engine.load_state_tensors(f.get_tensor, manifest["step"])
    except (SafetensorError, OSError) as e:
        raise InputError(f"{file}: this rank's state cannot be read ({e})") from None
    return manifest["meta"]


def read_manifest(path, layout):
    """A sharded checkpoint's manifest, checked against the engine's layout (engine, world size, tensors)."""
    file = Path(path) / "manifest.json"
    manifest = read_json(file, dict)
    if not {"engine", "world", "step", "meta"} <= set(manifest):
        raise InputError(f"{file} is not a sharded checkpoint's manifest (engine, world, step, meta)")
    if manifest.get("engine") != layout["engine"]:
        raise InputError(f"{file}: written by engine {manifest.get('engine')!r}, this run uses {layout['engine']!r}")
    if manifest["world"] != layout["world"]:
        raise InputError(f"{file}: saved at world size {manifest['world']}, this run has {layout['world']}; "
                         f"resume on the same world size (FSDP checkpoints: reshard_checkpoint)")
    if any(manifest.get(k) != v for k, v in layout.items()):
        raise InputError(f"{file}: tensor layout differs from this model's (another architecture?)")
    return manifest


@torch.no_grad()
def reshard_checkpoint(src, dst, world):
    """Rewrite an FSDP sharded checkpoint (`save_sharded`) for `world` ranks into the new directory dst, offline.

    Per unit and tensor (shard, exp_avg, exp_avg_sq) the old shards are concatenated, their padding dropped,
    the result re-padded to a multiple of `world` and split again; each new rank file is built from slices of
    the old files, so memory holds one new rank's file. dst appears whole or not at all (a renamed directory).
    """
    src, dst = Path(src), Path(dst)
    if world < 1:
        raise InputError(f"reshard_checkpoint: world must be at least 1, got {world}")
    manifest = read_json(src / "manifest.json", dict)
    if manifest.get("engine") != "FSDP":
        raise InputError(f"{src}/manifest.json: not an FSDP sharded checkpoint (engine {manifest.get('engine')!r})")
    if dst.exists():
        raise FileExistsError(f"{dst} exists; reshard_checkpoint writes a new directory")
    old_world, units = manifest["world"], manifest["units"]
    numels = [sum(math.prod(s) for s in u["shapes"]) for u in units]
    tmp = tmp_name(dst)
    tmp.mkdir(parents=True)
    try:
        with contextlib.ExitStack() as stack:
            old = [stack.enter_context(safe_open(str(src / f"rank{r:05d}.safetensors"), "pt"))
                   for r in range(old_world)]
            for rank in range(world):
                tensors = {}
                for i, (unit, numel) in enumerate(zip(units, numels)):
                    S_old, S = unit["padded"] // old_world, -(-numel // world)
                    lo = rank * S
                    hi = max(lo, min(lo + S, numel))  # the new shard's flat range without its padding
                    for name in (f"unit{i}.{key}" for key in ("shard", "exp_avg", "exp_avg_sq")):
                        if name not in old[0].keys():  # frozen units have no AdamW moments
                            continue
                        pieces = [old[r].get_slice(name)[max(lo - r * S_old, 0):min(hi - r * S_old, S_old)]
                                  for r in range(lo // S_old, -(-hi // S_old))]  # the old shards overlapping it
                        tensors[name] = torch.cat(pieces + [torch.zeros(S - (hi - lo))])  # + the new padding
                save_file(tensors, str(tmp / f"rank{rank:05d}.safetensors"))
        for unit, numel in zip(units, numels):
            unit["padded"] = -(-numel // world) * world
        (tmp / "manifest.json").write_text(json.dumps({**manifest, "world": world}, indent=1))
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
