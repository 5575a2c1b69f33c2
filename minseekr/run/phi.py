"""TAALM's φ meta-learned as a stage of a knowledge run (`knowledge.py`), resumable step by step.

    phi.safetensors          φ once meta-trained: the run's epochs read it back, frozen
    resume/phi.safetensors   while it trains, every `phi_checkpoint_every` steps: φ, its AdamW moments, the steps

Every rank meta-trains the same φ on the same episodes (facts outside TL and NF, in a seeded order: `episode`),
rank 0 writes the files, and each file carries the log's mark (`RunDir.log_mark`) so that a resumed run drops
what was logged after it. A step's episodes accumulate J/|batch| into φ's gradient, then AdamW; no draw is made
after the episodes' order, so a resumed φ equals the uninterrupted one bit for bit.
"""
import json
import random

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from minseekr.knowledge.lama import probe_ids
from minseekr.knowledge.taalm import TrainAttention, meta_loss
from minseekr.network.checkpoint import load_hf
from minseekr.runtime import InputError, atomic_write


def episode(tok, fact, max_len: int):
    """φ's meta-training episode of one fact: its evidence document, its schematic probe with the object marked."""
    doc = torch.tensor(tok.encode(fact.evidence, bos=True)[:max_len])[None]
    ids, lo, hi = probe_ids(tok, fact, "schematic")
    weights = torch.zeros(1, len(ids) - 1)
    weights[0, lo - 1:hi - 1] = 1.0                                   # predicting the object's tokens
    return {"input_ids": doc, "attention_mask": torch.ones_like(doc)}, {
        "input_ids": torch.tensor(ids)[None], "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "weights": weights}


def phi_model(cfg, device) -> TrainAttention:
    """φ before meta-training: θ_0's trunk, the new head initialised from the seed alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return TrainAttention(load_hf(cfg.model, device=device), lora_rank=cfg.phi_lora)


def inner_learner(cfg, device):
    """θ_0 as the inner step sees it: the parameters it updates require grad (the last `inner_layers` blocks, or
    all); the rest is θ_0's, fixed."""
    learner = load_hf(cfg.model, device=device)
    first = learner.args.n_layers - cfg.inner_layers if cfg.inner_layers else 0
    for name, p in learner.named_parameters():
        p.requires_grad_(name.startswith("model.layers.") and int(name.split(".")[2]) >= first
                         if cfg.inner_layers else True)
    return learner


def trained(phi) -> dict:
    """φ's parameters that meta-training updates, by name, in the optimiser's order."""
    return {name: p for name, p in phi.named_parameters() if p.requires_grad}


def read_phi(file, phi, optimiser=None) -> dict:
    """Load φ (and, from a resume point, its AdamW state) from `file`; returns the file's metadata. Refused with
    the file's name: unreadable, or not φ of this model."""
    expected = {f"phi.{k}": v for k, v in phi.state_dict().items()}
    try:
        with safe_open(str(file), "pt") as f:
            meta, names = f.metadata() or {}, set(f.keys())
            if missing := sorted(set(expected) - names):
                raise InputError(f"{file}: not φ of this model ({missing[0]} missing)")
            tensors = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError) as e:
        raise InputError(f"{file}: unreadable ({e}); delete it to meta-train φ again") from None
    if bad := next((k for k, v in expected.items() if tensors[k].shape != v.shape), None):
        raise InputError(f"{file}: {bad} is {tuple(tensors[bad].shape)}, φ of this model has "
                         f"{tuple(expected[bad].shape)}")
    if not {"log", "fingerprint"} <= set(meta) or (optimiser is not None and "step" not in meta):
        raise InputError(f"{file}: its metadata lacks the log mark, the fingerprint or the step; delete it to "
                         f"meta-train φ again")
    if bad := next((k for k in tensors if not torch.isfinite(tensors[k]).all()), None):
        raise InputError(f"{file}: {bad} holds NaN or infinite values; delete it to meta-train φ again")
    phi.load_state_dict({k[4:]: tensors[k] for k in expected})
    if optimiser is not None:
        state = optimiser.state_dict()
        for i, name in enumerate(trained(phi)):
            state["state"][i] = {"step": torch.tensor(float(meta["step"])), "exp_avg": tensors[f"exp_avg.{name}"],
                                 "exp_avg_sq": tensors[f"exp_avg_sq.{name}"]}
        optimiser.load_state_dict(state)
    return {"step": int(meta.get("step", 0)), "log": json.loads(meta["log"]),
            "fingerprint": json.loads(meta["fingerprint"])}


def write_phi(file, phi, meta: dict, optimiser=None, step: int = 0):
    """φ (with its AdamW moments and `step` from a resume point), atomically; `meta` {"log": the log's mark,
    "fingerprint": the run's} kept in the file's metadata."""
    tensors = {f"phi.{k}": v for k, v in phi.state_dict().items()}
    meta = {k: json.dumps(v) for k, v in meta.items()}
    if optimiser is not None:
        for name, p in trained(phi).items():
            tensors[f"exp_avg.{name}"] = optimiser.state[p]["exp_avg"]
            tensors[f"exp_avg_sq.{name}"] = optimiser.state[p]["exp_avg_sq"]
        meta["step"] = str(step)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(file, lambda tmp: save_file(tensors, str(tmp), metadata=meta),
                 needed=sum(t.nbytes for t in tensors.values()))


def train_phi(cfg, run, tok, pool, device, rank: int, log, rewind: bool, held) -> TrainAttention:
    """φ meta-learned on the first `cfg.episodes` facts of `pool` in the seed's order, resumed from
    `resume/phi.safetensors` if a crash left one; kept as `phi.safetensors` (read back, frozen, if it exists).
    `rewind`: a resumed run's log goes back to the file resumed from (emptied if none). `held`: (the run's
    fingerprint, the check that refuses a file written for other inputs), kept in and held against φ's files."""
    fingerprint, held_to = held
    phi, final, point = phi_model(cfg, device), run.root / "phi.safetensors", run.resume / "phi.safetensors"
    if final.is_file():
        meta = read_phi(final, phi)
        held_to(meta["fingerprint"], final)
        if rewind and rank == 0:
            run.rewind_log(meta["log"])
            point.unlink(missing_ok=True)   # a kill between writing φ and removing its last point left it
        return phi.eval()
    pool = list(pool)
    random.Random(f"{cfg.seed}-phi").shuffle(pool)
    if len(pool) < cfg.episodes:
        raise InputError(f"--episodes {cfg.episodes}: only {len(pool)} facts are held out from TL and NF")
    episodes = [episode(tok, f, cfg.max_len) for f in pool[:cfg.episodes]]
    learner = inner_learner(cfg, device)
    optimiser = torch.optim.AdamW(trained(phi).values(), lr=cfg.phi_lr, betas=(0.9, 0.999), weight_decay=0.01)
    resumed = read_phi(point, phi, optimiser) if point.is_file() else {"step": 0, "log": None}
    if point.is_file():
        held_to(resumed["fingerprint"], point)
    if rewind and rank == 0:
        run.rewind_log(resumed["log"])
    done = resumed["step"]
    move = lambda d: {k: v.to(device) for k, v in d.items()}   # noqa: E731
    steps = [episodes[i:i + cfg.phi_batch] for _ in range(cfg.phi_epochs)
             for i in range(0, len(episodes), cfg.phi_batch)]
    for n, batch in enumerate(tqdm(steps[done:], desc="φ meta-training", initial=done, total=len(steps),
                                   disable=rank != 0), done + 1):
        total = 0.0
        for doc, probe in batch:
            J = meta_loss(learner, phi, move(doc), move(probe), lr=cfg.phi_lr, warmup=cfg.warmup_steps)
            (J / len(batch)).backward()
            total += J.item() / len(batch)
        optimiser.step()
        optimiser.zero_grad()
        log({"phi_step": n, "probe_nll": total})
        if rank == 0 and cfg.phi_checkpoint_every and n % cfg.phi_checkpoint_every == 0 and n < len(steps):
            run.resume.mkdir(exist_ok=True)
            write_phi(point, phi, {"log": run.log_mark(), "fingerprint": fingerprint}, optimiser, n)
    if rank == 0:
        write_phi(final, phi, {"log": run.log_mark(), "fingerprint": fingerprint})
        point.unlink(missing_ok=True)
    return phi.eval()
