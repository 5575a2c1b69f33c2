"""The parameter-efficient methods by name, and the one way a checkpoint's method file goes back onto a model.

A PET method trains only its own parameters beside the frozen model (`table.Method.adapts`). A task checkpoint
holds the base model's HF files and, beside them, the method's parameters (`FILE`); whoever evaluates or
generates from the checkpoint puts the method back with `attach_saved`, so its full forward always runs.

What the trainer asks of a method (`olora.OLoRA`, `pp.ProgressivePrompts`, `l2p.L2P`, `lfpt5.LFPT5`, `sapt.SAPT`):
`from_config(args, cfg)`; `attach(model)` (hooks, or soft prompts for generation); `begin_task(k, embedding_rows)`
(task k's parameters trainable, the earlier ones frozen); `trainable()`; `n_prefix` and `choose(embeddings, mask)`
(the soft prompts read before a batch, or None, chosen inside the forward from its prompt tokens' embeddings; SAPT
sets its LoRAs' weights there); `batch_loss()` (a term of the last forward, summed over its samples, or None);
`add_penalty_grad(k)` (once per optimiser step; its logged terms); `tasks`; `save(path)` / `load(path, args)`; with
`Method.reflects`, `end_task(k, held_out, pseudo)`. `peft.PETMethod` holds the defaults they share.
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minseekr.methods.l2p import L2P
from minseekr.methods.lfpt5 import LFPT5
from minseekr.methods.olora import OLoRA
from minseekr.methods.peft import load_method, read_method
from minseekr.methods.pp import ProgressivePrompts
from minseekr.methods.sapt import SAPT
from minseekr.methods.table import METHODS
from minseekr.runtime import InputError, atomic_write, read_json

PET = {"olora": OLoRA, "pp": ProgressivePrompts, "l2p": L2P, "lfpt5": LFPT5, "sapt": SAPT}
FILE = "method.safetensors"
RECORD = "method.json"                # in a run's checkpoint: the method it was trained with, after how many tasks
ADAMW = "method-adamw.safetensors"    # in a resume point: the AdamW state of the method's parameters


def build(cfg, args):
    """The method `cfg.method` for a model of shape `args`, from the run's settings."""
    return PET[cfg.method].from_config(args, cfg)


def write_record(folder, method: str, tasks: int):
    """The checkpoint's record of its method and of the tasks trained, which `attach_saved` holds its files to."""
    atomic_write(Path(folder) / RECORD, lambda tmp: tmp.write_text(json.dumps({"method": method, "tasks": tasks})))


def read_record(folder) -> dict | None:
    """A checkpoint's {"method", "tasks"} record (None for an HF directory that a run did not write)."""
    file = Path(folder) / RECORD
    if not file.is_file():
        return None
    record = read_json(file, dict)
    if not (record.get("method") in METHODS and type(record.get("tasks")) is int):
        raise InputError(f"{file}: expected {{\"method\": one of {', '.join(METHODS)}, \"tasks\": an int}}, got "
                         f"{record!r}")
    return record


def saved_method(folder, expected: str | None = None) -> dict | None:
    """The `info` of the method file in `folder` (None if it holds none), checked against the folder's record.

    A checkpoint that a run wrote records its method (`RECORD`), and its method file must agree: present exactly
    when the method is a PET one past θ_0, holding that method after as many tasks. `expected` (a run's --method)
    must be the recorded one. Otherwise an InputError names the file: a checkpoint is never scored without the
    method it was trained with, nor with another's.
    """
    folder, file = Path(folder), Path(folder) / FILE
    info = read_method(file, tensors=False)[0] if file.is_file() else None
    if (record := read_record(folder)) is not None:
        if expected is not None and record["method"] != expected:
            raise InputError(f"{folder / RECORD}: the checkpoint was trained with --method {record['method']}, but "
                             f"this run's method is {expected}")
        wanted = (record["method"], record["tasks"]) if record["method"] in PET and record["tasks"] > 0 else None
        have = None if info is None else (info.get("method"), info.get("tasks"))
        if have != wanted:
            found = "is missing" if have is None else f"holds the {have[0]} method after {have[1]} task(s)"
            raise InputError(f"{file} {found}, but {folder} was trained with --method {record['method']} after "
                             f"{record['tasks']} task(s){' and has no method file' if wanted is None else ''}")
    if info is not None and info.get("method") not in PET:
        raise InputError(f"{file}: unknown method {info.get('method')!r}; expected one of {', '.join(PET)}")
    return info


def attach_saved(model, folder, expected: str | None = None):
    """`model` with the method saved in `folder` attached (frozen, on the model's device); unchanged if none.
    The method file is checked first (`saved_method`)."""
    if (info := saved_method(folder, expected)) is not None:
        PET[info["method"]].load(Path(folder) / FILE, model.args).to(model.device).attach(model)
    return model

def save_state(path, method, optim, rank: int, device):
    """A resume point's share of a PET run: each rank's random generator (LoRA dropout resumes drawing where it
    stopped), and from rank 0 the method and its AdamW state (every rank holds the same)."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    atomic_write(Path(path) / f"rng-rank{rank:05d}.safetensors", lambda tmp: save_file(rng, str(tmp)))
    if method.tasks and rank == 0:
        method.save(Path(path) / FILE)
        tensors = {key: t.contiguous().cpu() for key, t in optim.state_tensors().items()}
        atomic_write(Path(path) / ADAMW, lambda tmp: save_file(tensors, str(tmp)))


def load_state(path, method, rank: int, device) -> dict | None:
    """`save_state`'s files back: the generator and the method's parameters; returns the AdamW state (None before
    the first task's method was saved) for the trainer to give the task's optimiser."""
    with safe_open(str(Path(path) / f"rng-rank{rank:05d}.safetensors"), "pt") as f:
        torch.set_rng_state(f.get_tensor("cpu"))
        if device.type == "cuda":
            torch.cuda.set_rng_state(f.get_tensor("cuda"), device)
    if not (Path(path) / FILE).is_file():
        return None
    info, _ = read_method(Path(path) / FILE, tensors=False)
    method.begin_task(info["tasks"] - 1)
    load_method(method, Path(path) / FILE)
    with safe_open(str(Path(path) / ADAMW), "pt", device=str(device)) as f:
        return {key: f.get_tensor(key) for key in f.keys()}
