"""Sharded checkpoints of an engine (FSDP or TorchFSDP): per-rank files, the manifest, HF export, re-sharding.

A checkpoint directory holds `rank{r:05d}.safetensors` (that rank's parameter shards and AdamW moments) and
`manifest.json` (engine, world size, layout, step, AdamW settings, model args and the trainer's meta), each written
atomically; nothing is pickled. It loads at the world size that wrote it; `reshard_checkpoint` rewrites an FSDP
one for another world size offline.
"""
import contextlib
import json
import math
import os
import shutil
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from minseekr.checkpoint import atomic_write


def save_rank(engine, path, tensors, meta):
    """rank{r}.safetensors (this rank's tensors) from every rank, manifest.json from rank 0, each atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path / f"rank{engine.rank:05d}.safetensors", partial(save_file, tensors))
    if engine.rank == 0:
        manifest = {**engine.layout(), "step": engine.step, "betas": list(engine.betas), "eps": engine.eps,
                    "weight_decay": engine.weight_decay, "model": asdict(engine.model.args), "meta": meta}
        atomic_write(path / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    dist.barrier()


def read_manifest(path, layout):
    """A sharded checkpoint's manifest, checked against the engine's layout (engine, world size, tensors)."""
    file = Path(path) / "manifest.json"
    manifest = json.loads(file.read_text())
    if manifest.get("engine") != layout["engine"]:
        raise ValueError(f"{file}: written by engine {manifest.get('engine')!r}, this run uses {layout['engine']!r}")
    if manifest["world"] != layout["world"]:
        raise ValueError(f"{file}: saved at world size {manifest['world']}, this run has {layout['world']}; "
                         f"resume on the same world size (FSDP checkpoints: reshard_checkpoint)")
    if any(manifest.get(k) != v for k, v in layout.items()):
        raise ValueError(f"{file}: tensor layout differs from this model's (another architecture?)")
    return manifest


def save_hf_sharded(engine, path, dtype=torch.bfloat16, max_shard_bytes=5 * 2**30):
    """engine.full_tensors() as an HF LLaMA directory (config.json, model*.safetensors, index if several)."""
    path, parts, current, total = Path(path), [], {}, 0
    if engine.rank == 0:
        path.mkdir(parents=True, exist_ok=True)

    def flush():
        parts.append(list(current))
        save_file(current, str(path / f"part{len(parts)}.tmp"))
        current.clear()

    for name, t in engine.full_tensors():  # every rank iterates (collectives); rank 0 holds one file's worth
        if engine.rank == 0:
            current[name] = t.to("cpu", dtype, copy=True)
            total += current[name].nbytes
            if sum(v.nbytes for v in current.values()) >= max_shard_bytes:
                flush()
    if engine.rank == 0:  # final names once the number of files is known
        if current:
            flush()
        n = len(parts)
        files = [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)] if n > 1 else ["model.safetensors"]
        for k, file in enumerate(files, 1):
            os.replace(path / f"part{k}.tmp", path / file)
        if n > 1:
            weight_map = {t: f for f, ts in zip(files, parts) for t in ts}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            atomic_write(path / "model.safetensors.index.json", lambda tmp: tmp.write_text(json.dumps(index, indent=1)))
        config = json.dumps(engine.model.args.to_hf_config(dtype), indent=1)
        atomic_write(path / "config.json", lambda tmp: tmp.write_text(config))
    dist.barrier()


@torch.no_grad()
def reshard_checkpoint(src, dst, world):
    """Rewrite an FSDP sharded checkpoint (save_sharded) for `world` ranks into the new directory dst, offline.

    Per unit and tensor (shard, exp_avg, exp_avg_sq) the old shards are concatenated, their padding dropped,
    the result re-padded to a multiple of `world` and split again; each new rank file is built from slices of
    the old files, so memory holds one new rank's file. dst appears whole or not at all (a renamed directory).
    """
    src, dst = Path(src), Path(dst)
    if world < 1:
        raise ValueError(f"reshard_checkpoint: world must be at least 1, got {world}")
    manifest = json.loads((src / "manifest.json").read_text())
    if manifest.get("engine") != "FSDP":
        raise ValueError(f"{src}/manifest.json: not an FSDP sharded checkpoint (engine {manifest.get('engine')!r})")
    if dst.exists():
        raise FileExistsError(f"{dst} exists; reshard_checkpoint writes a new directory")
    old_world, units = manifest["world"], manifest["units"]
    numels = [sum(math.prod(s) for s in u["shapes"]) for u in units]
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
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
