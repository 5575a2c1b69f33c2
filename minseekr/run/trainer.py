"""Algorithm 1: continual learning over a task sequence, with SEEKR and its baselines, on one process or many.

One loop serves every method; a method (its row of `config.METHODS`) only changes the loss and what is kept
between tasks:

    seqft   new-task cross-entropy only (the lower bound)
    replay  + cross-entropy on replayed samples (Eq. 2)
    derpp   replayed samples get λ1·CE + (1−λ1)·KL(teacher logits ‖ student logits) (Eq. 3, mixed as Eq. 13)
    seekr   derpp + λ2 · attention distillation on the selected heads at the sampled rows (Eq. 12, 13)
    lwf     + lwf_weight · KL(θ_{k−1} ‖ θ) on the new task's answer tokens (θ_{k−1} a frozen sharded copy)
    ewc     + online EWC's penalty (minseekr/methods/ewc.py)
    mtl     one stage of joint training on every task (the upper bound; R has one row)
    olora   the model frozen, a new LoRA per task orthogonal to the earlier ones' (minseekr/methods/olora.py)
    pp      the model frozen, a new soft prompt per task read before the earlier ones' (minseekr/methods/pp.py)
    l2p     the model frozen, a pool of prompts with keys, the nearest to each input read before it (l2p.py)
    lfpt5   the model frozen, one prompt that also learns to write the task's samples; it replays samples the
            model writes of earlier tasks, distilling their stored logits with LFPT5's weights (lfpt5.py)
    sapt    the model frozen, a LoRA per task mixed per input by an attention over tasks, which pseudo-inputs
            of earlier tasks keep in place (sapt.py)

Per task k:
  1. R_k is drawn from D_k *before* training (the draw depends on no model) together with its query rows T;
     for SEEKR the θ_{k−1} attention at those rows is recorded then and written to disk, so forgettability
     (Eq. 9) never needs two models in memory, nor RAM for a large R_k.
  2. Train on D_k with the old tasks' buffers interleaved evenly by volume (Appendix B): every batch is one
     micro-step; replayed batches hold samples of one old task, so they share that task's head set.
  3. With θ_k on R_k: sensitivity (Eq. 7), forgettability (Eq. 9), importance (Eq. 10), head selection
     (Eq. 11); then R_k is written to the buffer with θ_k's logits and attention rows.
  4. θ_k is exported in HF format and evaluated on every task seen so far and on the next one (for FWT).

Parallelism. The model lives in an engine (`engine.py`); one process is a world of one. `batch_size` is the
*global* micro-batch: every rank builds the same seeded plan and takes every world-th sample of each batch,
reading only its own samples from the buffer. Each loss term is a sum over the rank's tokens divided by the
micro-batch's global count (known on every rank from the plan) and multiplied by the world size, since the
engine averages gradients over ranks, and divided by the micro-batches of its optimiser step: the step's
gradient is exactly the mean of its micro-batch means, so N ranks train as one process does. Head scores are
sums over each rank's share of R_k, all-reduced; evaluation splits the test batches over ranks.

Resume. Every draw is seeded by (seed, task, epoch), so a position in the plan fixes the data; a resume point
(`resume.py`) holds the sharded weights and AdamW state, EWC's terms, and the run's state (results so far, head
selection, position, bytes of metrics.jsonl), written every `checkpoint_every` optimiser steps and after each task.
"""
import hashlib
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from minseekr.engines.engine import build_engine, export_hf, load_engine
from minseekr.evaluation.scoring import evaluate
from minseekr.methods import pet, pseudo
from minseekr.methods.ewc import EWC
from minseekr.methods.peft import ReplicatedAdamW, freeze
from minseekr.network.checkpoint import HFCheckpoint, load_hf
from minseekr.network.model import Transformer, token_losses
from minseekr.run.batches import device_batch, encode, index_batches, interleave, my_part, n_labels
from minseekr.run.config import METHODS, ContinualConfig
from minseekr.run.fingerprint import across_ranks, changes, fingerprint
from minseekr.run.resume import LATEST, META, Position, latest_point, load_sharded, write_point
from minseekr.run.rundir import RunDir, summarize
from minseekr.runtime import (InputError, NonFiniteError, all_reduce, atomic_write, disk_space, first_error, gather,
                              together)
from minseekr.seekr import heads
from minseekr.seekr.buffer import TaskMemory, write_task
from minseekr.seekr.distill import logit_kl, logit_mse, teacher_signals
from minseekr.seekr.kl import AttentionKL


class ContinualTrainer:
    """Runs Algorithm 1 for one method over a task sequence and writes a run directory.

    `engine` comes from `engine.build_engine` or `load_engine`; a plain Transformer is wrapped in the
    hand-written engine. `eval_fn(model, task) -> score` replaces `evaluate` (tests use it to skip generation).
    `spec`, the entry point's own settings, is written beside the config as run.json when the run starts.
    """

    def __init__(self, engine, tokenizer, tasks, cfg: ContinualConfig, run_dir, eval_fn=None, spec=None):
        self.method = METHODS[cfg.method]
        if isinstance(engine, Transformer):
            model = freeze(engine) if self.method.adapts else engine
            engine = build_engine(model, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.engine, self.model, self.tok, self.tasks, self.cfg = engine, engine.model, tokenizer, tasks, cfg
        # What an optimiser step updates: the engine's shards, or a PET method's own parameters (the engine frozen).
        self.optim, self.pet, self.pending_optim = engine, None, None
        if self.method.adapts:
            self.pet = pet.build(cfg, engine.model.args).to(engine.device).attach(engine.model)
        self.rank, self.world, self.device = engine.rank, engine.world, engine.device
        self.run = RunDir(run_dir)
        args = self.model.args
        if self.method.distils_attention:   # fail before training, not after the first task
            heads.select_heads(torch.ones(args.n_layers, args.n_heads), cfg.layer_budget, cfg.head_budget)
        self.stages = [list(range(len(tasks)))] if self.method.joint else [[k] for k in range(len(tasks))]
        if len(cfg.epochs) not in (1, len(tasks)):
            raise InputError(f"--epochs needs one value or one per task ({len(tasks)}), got {len(cfg.epochs)}: "
                             f"{','.join(map(str, cfg.epochs))}")
        if isinstance(cfg.lr, list) and (self.method.joint or len(cfg.lr) != len(tasks)):
            wanted = "one value (it trains every task at once)" if self.method.joint else \
                f"one value or one per task ({len(tasks)})"
            raise InputError(f"--lr needs {wanted}, got {len(cfg.lr)}: {','.join(map(str, cfg.lr))}")
        if self.method.replays:
            for s, task in enumerate(tasks[:-1]):   # the last task's R_k is never replayed
                if self.replay_size(s) == 0:
                    rounding = "round" if cfg.replay_rounding == "round" else "int"
                    raise InputError(f"--replay-ratio {cfg.replay_ratio} keeps {rounding}({cfg.replay_ratio} × "
                                     f"{len(task.train)}) = 0 samples of task {task.name} ({len(task.train)} training "
                                     f"samples), so --method {cfg.method} would replay nothing of it: use "
                                     f"--replay-ratio ≥ {1 / len(task.train):.3g}, or more training samples")
        for task in tasks:   # what the pseudo-samples need, checked before training
            prompts = [r["prompt"] for r in task.train]
            if self.method.pseudo_replay and not pseudo.frame(prompts)[1]:
                raise InputError(f"task {task.name}: its prompts share no ending, so --method {cfg.method} cannot "
                                 f"tell a written input from its answer")
            if self.method.reflects and cfg.pseudo_inputs != "self":
                pseudo.released(cfg.pseudo_inputs, task.name, prompts)
        self.scores = heads.HeadScores(args.n_layers, args.n_heads)
        self.selected = []                  # the current selection H (Algorithm 1, line 10)
        self.memories = []                  # TaskMemory per finished task
        self.memory_tokens, self.memory_rows = [], []   # per finished task and sample: labelled tokens, query rows
        self.R, self.base = [], None
        self.ewc = EWC(cfg.ewc_weight) if self.method.penalises_drift else None
        self.teacher = None                 # LwF's frozen θ_{k−1}
        self.dtype, self.attn_dtype = getattr(torch, cfg.signal_dtype), getattr(torch, cfg.attn_dtype or cfg.signal_dtype)
        self.spec = spec
        # What the run depends on, before any training: resume points and buffers are held to it (fingerprint.py).
        self.fingerprint = fingerprint(engine, tokenizer, tasks, asdict(cfg), spec)
        if differing := across_ranks(self.fingerprint):
            raise InputError(f"the ranks of this job were started with different inputs ({'; '.join(differing)}): "
                             f"start every rank with the same flags and data")
        if self.rank == 0:
            self.run.root.mkdir(parents=True, exist_ok=True)
        self.eval_fn = eval_fn or (lambda model, task: evaluate(
            model, tokenizer, task, cfg.eval_samples, cfg.max_prompt_len, cfg.max_new_tokens, progress=self.rank == 0))

    # ---- one micro-step -------------------------------------------------------------------------------
    def micro_step(self, samples, weight, counts, memory=None, n_micro=1):
        """Backward of this rank's share of one global micro-batch; the batch's loss terms (global means).

        `samples` and `weight` are this rank's share (`my_part`); `counts` holds the global batch's labelled
        tokens, samples and query rows; `memory` is the old task a replayed batch comes from; the optimiser
        step's gradient is the mean over its `n_micro` micro-batches.
        """
        cfg, n_tokens = self.cfg, counts["tokens"]
        batch = device_batch(samples, self.tok.pad_id, self.device)
        probe = None
        if memory is not None and self.method.distils_attention and self.distilled_heads(memory):
            probe = self.kl_probe(batch, memory)
        logits = self.forward(batch["input_ids"], batch["attention_mask"], probe, batch["labels"])
        predicting = batch["labels"][:, 1:] != -100
        ce = token_losses(logits, batch["labels"])[predicting].sum()
        sums, loss = {}, ce / n_tokens
        for name, term in (self.pet.batch_loss() if self.pet else {}).items():   # L2P's pull of the chosen keys
            loss = loss + term / counts["samples"]
            sums[name] = (term, counts["samples"])
        if self.method.learns_inputs:   # LFPT5 (lfpt5.py): (1 − kd)·(CE + λ_gen·LM) on new and replayed batches
            written = batch["attention_mask"].bool()   # the LM: every token after the first, prompt and answer
            lm = token_losses(logits, batch["input_ids"].masked_fill(~written, -100)).sum()
            loss = (1 - cfg.lfpt5_kd) * (loss + cfg.lfpt5_gen_weight * lm / counts["lm"])
            sums["lm"] = (lm, counts["lm"])
        if memory is None:
            sums["task_ce"] = (ce, n_tokens)
            if self.teacher is not None:
                with torch.no_grad():
                    old = self.teacher.model(batch["input_ids"], batch["attention_mask"])[:, :-1][predicting]
                lwf = logit_kl(logits[:, :-1][predicting], {"teacher_logits": old.float()}).sum()
                loss = loss + cfg.lwf_weight * lwf / n_tokens
                sums["lwf_kl"] = (lwf, n_tokens)
        else:
            sums["replay_ce"] = (ce, n_tokens)
            if self.method.distils_logits:
                distil = logit_kl if cfg.logit_loss == "kl" else logit_mse
                ld = distil(logits[:, :-1][predicting], batch).sum()
                if self.method.learns_inputs:   # LFPT5's + kd·KD: the KL summed over the vocabulary, per answer token
                    loss = loss + cfg.lfpt5_kd * ld / n_tokens
                else:
                    loss = cfg.lambda1 * loss + (1 - cfg.lambda1) * ld / n_tokens
                sums[f"logit_{cfg.logit_loss}"] = (ld, n_tokens)
            if probe is not None:
                ad, n_ad = self.attention_loss(probe, counts, len(self.distilled_heads(memory)))
                loss = loss + cfg.lambda2 * ad / n_ad
                sums["attn_kl"] = (ad, n_ad)
        (loss * (weight * self.world / n_micro)).backward()
        values = all_reduce(torch.tensor([float(s.detach()) * weight for s, _ in sums.values()], device=self.device))
        terms = {name: v.item() / float(n) for (name, (_, n)), v in zip(sums.items(), values)}
        for name, value in terms.items():   # every rank sees the same all-reduced values: all stop together
            if not math.isfinite(value):
                raise NonFiniteError(f"optimiser step {self.optim.step + 1}: the loss term {name} is {value}; "
                                     f"nothing of this step was applied or saved (a lower --lr, or the data?)")
        return terms

    def forward(self, input_ids, attention_mask, probe=None, labels=None):
        """The model's logits with a PET method's full forward: its soft prompts (or SAPT's weights), chosen from
        the prompt tokens as at generation (every real token without `labels`), read first; their rows dropped."""
        if not self.pet:
            return self.model(input_ids, attention_mask, probe=probe)
        prompt = attention_mask.bool() if labels is None else attention_mask.bool() & (labels == -100)
        n = self.pet.n_prefix   # the prompts are read like tokens; their own outputs predict nothing
        mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], n), attention_mask], 1)
        choose = lambda embeddings, _: self.pet.choose(embeddings, prompt)   # noqa: E731
        return self.model(input_ids, mask, probe=probe, prefix=choose)[:, n:]

    def embedding_rows(self, ids):
        """Rows `ids` of the model's token embeddings, read from the engine (every rank iterates alike)."""
        for name, t in self.engine.full_tensors():
            if name == "model.embed_tokens.weight":
                return t[ids.to(t.device)].detach().clone()
        raise KeyError("model.embed_tokens.weight")

    def attention_loss(self, probe, counts, n_heads):
        """L_ad of this rank's samples as (sum, global divisor): the mean over the global batch's (sample, head,
        row) terms (`mean`), or the official per-layer batchmean (over each sample's heads × rows) divided by the
        micro-batch and averaged over the distilled layers (`official`). Eq. 12's plain sum would tie λ2 to B_H·B_T."""
        if self.cfg.ad_norm == "mean":
            return probe.total(), n_heads * counts["rows"]
        return probe.layer_means().sum(), counts["samples"] * len(probe.kl)

    def distilled_heads(self, memory):
        return memory.heads if self.cfg.teacher_heads == "selected" else self.selected

    def kl_probe(self, batch, memory):
        """AttentionKL over the heads this memory is distilled on, with their stored teacher rows."""
        pairs = self.distilled_heads(memory)
        stored = {pair: i for i, pair in enumerate(memory.heads)}
        order = [stored[pair] for pair in pairs]
        teacher = batch["teacher_attn"]                                          # (B, |H|, T, S)
        if order != list(range(teacher.shape[1])):   # a subset or another order; the memory's own heads need no copy
            teacher = teacher[:, order]
        return AttentionKL(pairs, batch["rows"], teacher, batch["attention_mask"])

    def optimizer_step(self, s):
        """EWC's or a PET method's penalty gradient (if any), global-norm clip, AdamW; returns the step's logged
        terms: the gradient norm before clipping (penalty included) and the penalties."""
        terms = {"ewc": self.ewc.add_penalty_grad(self.engine)} if self.ewc else {}
        if self.pet:
            terms.update(self.pet.add_penalty_grad(s))
        terms["grad_norm"] = float(self.optim.clip_grad_norm_(self.cfg.clip))
        if bad := {key: v for key, v in terms.items() if not math.isfinite(v)}:
            raise NonFiniteError(f"optimiser step {self.optim.step + 1}: {', '.join(f'{k} is {v}' for k, v in bad.items())}"
                                 f"; the step was not applied and nothing was saved (a lower --lr?)")
        self.optim.optimizer_step(self.cfg.lr_for(self.stages[s][0]))   # the stage's own rate
        self.optim.zero_grad()
        return terms

    # ---- one task (a stage: every task at once for MTL) ----------------------------------------------------
    def epoch_plan(self, s, epoch, n_train):
        """The epoch's micro-batches: ("new" | old task j, global sample indices), interleaved by volume."""
        cfg = self.cfg
        new = index_batches(n_train, cfg.batch_size, random.Random(f"{cfg.seed}-{s}-{epoch}"))
        old = {j: index_batches(len(m), cfg.batch_size, random.Random(f"{cfg.seed}-{s}-{epoch}-{j}"))
               for j, m in enumerate(self.memories)} if self.method.replays else {}
        plan = interleave({"new": len(new), **{j: len(b) for j, b in old.items()}})
        return [(name, new[j] if name == "new" else old[name][j]) for name, j in plan]

    def train_task(self, s, at: Position | None = None):
        """Train stage s (task s; all tasks for MTL), from resume position `at` if given, then finish it."""
        cfg, ks = self.cfg, self.stages[s]
        train = [x for k in ks for x in encode(self.tok, self.tasks[k].train, cfg.max_len)]
        tokens = [n_labels(x["labels"]) for x in train]
        lengths = [x["input_ids"].numel() for x in train]
        replay = self.draw_replay(s, train)
        scoring = self.score_batches(replay)       # R_k's batches, for θ_{k−1}'s snapshot and θ_k's scores
        if self.pet:                               # task k's own parameters and a fresh AdamW for them
            self.pet.begin_task(s, self.embedding_rows)
            self.optim = ReplicatedAdamW(self.pet.trainable(), cfg.betas, weight_decay=cfg.weight_decay,
                                         step=self.optim.step)
            if self.pending_optim is not None:     # resumed: inside the task its moments too, else the step count
                if at is not None and at.step > 0:
                    self.optim.load_state_tensors(self.pending_optim)
                else:
                    self.optim.step = int(self.pending_optim["step"])
                self.pending_optim = None
        before = self.attention_snapshot(s, scoring, fresh=at is None or at.step == 0)
        self.load_teacher(s)
        name = "+".join(self.tasks[k].name for k in ks)
        epochs = max(cfg.epochs[k] if k < len(cfg.epochs) else cfg.epochs[-1] for k in ks)
        plans = [self.epoch_plan(s, epoch, len(train)) for epoch in range(epochs)]
        total = sum(len(plan) for plan in plans)   # micro-steps in the task; the last optimiser step may take fewer
        at = at or Position(s)
        step, logged = at.step, {}                  # logged: the open optimiser step's loss terms, name -> [sum, n]
        self.model.train()
        for epoch in range(at.epoch, epochs):
            plan, start = plans[epoch], at.micro if epoch == at.epoch else 0
            bar = tqdm(plan, desc=f"{cfg.method} task {s + 1}/{len(self.stages)} {name} ep {epoch + 1}", leave=False,
                       initial=start, disable=self.rank != 0)
            for i, (source, idx) in enumerate(plan[start:], start):
                memory = None if source == "new" else self.memories[source]
                part, weight = my_part(idx, self.rank, self.world)   # this rank reads only its samples
                samples = [train[x] if memory is None else memory[x] for x in part]
                counts = {"tokens": sum((tokens if memory is None else self.memory_tokens[source])[x] for x in idx),
                          "samples": len(idx),
                          # LFPT5's LM terms: every token after a sample's first
                          "lm": sum((lengths if memory is None else memory.manifest["lengths"])[x] - 1 for x in idx),
                          "rows": 0 if memory is None else sum(self.memory_rows[source][x] for x in idx)}
                first = step - step % cfg.grad_accum
                terms = self.micro_step(samples, weight, counts, memory, n_micro=min(cfg.grad_accum, total - first))
                for key, value in terms.items():
                    logged.setdefault(key, [0.0, 0])
                    logged[key][0] += value
                    logged[key][1] += 1
                step += 1
                bar.update()
                bar.set_postfix({key: f"{v:.3f}" for key, v in terms.items()})
                if step % cfg.grad_accum == 0 or step == total:
                    self.log_step(s, epoch, logged)
                    logged = {}
                    if cfg.checkpoint_every and self.optim.step % cfg.checkpoint_every == 0:
                        self.save_resume(Position(s, epoch, i + 1, step))
            bar.close()
        self.model.eval()
        self.finish_task(s, train, scoring, before)

    def log_step(self, s, epoch, logged):
        """One optimiser step: clip, update, and a metrics.jsonl line (its terms averaged over its micro-steps)."""
        record = {"task": s, "epoch": epoch, **{key: total / n for key, (total, n) in logged.items()}}
        record.update(self.optimizer_step(s))
        if self.rank == 0:
            self.log({**record, "step": self.optim.step})

    def log(self, record: dict):
        """Append one line to metrics.jsonl (rank 0)."""
        with disk_space(self.run.metrics), self.run.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def replay_size(self, s) -> int:
        """|R_k| of stage s: 0 unless the method replays."""
        n = sum(len(self.tasks[k].train) for k in self.stages[s])
        count = self.cfg.replay_ratio * n
        return (round(count) if self.cfg.replay_rounding == "round" else int(count)) if self.method.replays else 0

    def draw_replay(self, s, train):
        """R_k with its query rows: seeded per task, independent of any model (empty unless the method replays)."""
        cfg, m = self.cfg, self.replay_size(s)
        if m == 0 or self.method.pseudo_replay:   # LFPT5's R_k is written by θ_k after the task (`remember`)
            return []
        idx = list(range(m)) if cfg.replay_select == "first" else \
            sorted(random.Random(f"{cfg.seed}-replay-{s}").sample(range(len(train)), m))
        return self.with_rows(s, [dict(train[i]) for i in idx])   # copies: rows are added to these only

    def with_rows(self, s, replay):
        """R_k's samples with their query rows T, drawn seeded per task."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + s)
        for sample in replay:   # min(n, B_T) distinct rows per sample (every row when B_T = 0)
            mask = torch.ones(1, sample["input_ids"].numel(), dtype=torch.long)
            sample["rows"] = heads.sample_query_rows(mask, cfg.query_budget, gen)[0]
        return replay

    def score_batches(self, replay):
        """R_k in global batches: (this rank's share on the device, its weight, its number of real samples)."""
        out = []
        for start in range(0, len(replay), self.cfg.batch_size):
            mine, weight = my_part(replay[start:start + self.cfg.batch_size], self.rank, self.world)
            out.append((device_batch(mine, self.tok.pad_id, self.device), weight, int(weight) * len(mine)))
        return out

    def mean_over_ranks(self, values):
        """Σ value·n / Σ n over every rank's (per-batch mean, n samples) pairs: a mean over all of R_k."""
        total = sum(v * n for v, n in values)
        count = torch.tensor(float(sum(n for _, n in values)), device=total.device)
        return all_reduce(total) / all_reduce(count)

    def needs_forgettability(self):
        return self.method.distils_attention and self.cfg.head_score in ("both", "forgettability")

    def attention_snapshot(self, s, batches, fresh):
        """θ_{k−1}'s attention at R_k's rows, every head, in bf16 on disk (this rank's share), one file per batch
        written as it is computed, so R_k is never held whole; returns `before(i)`, batch i's maps."""
        if not batches or not self.needs_forgettability():
            return None
        folder = self.run.snapshot(s, self.rank)
        with together():   # each rank has its own snapshot: every rank stops if one cannot write or find it
            if not fresh and not folder.is_dir():
                raise FileNotFoundError(
                    f"{folder}: θ_{{k−1}}'s attention on R_k for task {s} ({self.tasks[s].name}) is missing, and this "
                    f"resume point is inside the task: forgettability (Eq. 9) cannot be rebuilt from partly trained "
                    f"weights. Restore it, or start the run again")
            if fresh:
                folder.mkdir(parents=True, exist_ok=True)
                for b, (batch, _, _) in enumerate(batches):
                    maps = {"attn": heads.attention_at_rows(self.model, [batch], [batch["rows"]])[0].to("cpu", torch.bfloat16)}
                    atomic_write(folder / f"batch{b:05d}.safetensors", lambda tmp, maps=maps: save_file(maps, str(tmp)))

        def before(i):
            file = folder / f"batch{i:05d}.safetensors"
            try:
                with safe_open(str(file), "pt") as f:
                    return f.get_tensor("attn")
            except (SafetensorError, OSError) as e:
                raise InputError(f"{file}: θ_{{k−1}}'s attention snapshot cannot be read ({e}); restore it, or start "
                                 f"the run again") from None
        return before

    def load_teacher(self, s):
        """LwF's θ_{k−1}: a frozen hand-sharded copy of the previous task's export (none before task 2)."""
        self.teacher = None
        if self.method.distils_previous and s > 0:
            self.teacher = load_engine(self.run.checkpoint(s), frozen=True, device=self.device,
                                       compute_dtype=self.engine.compute_dtype)

    def finish_task(self, s, train, batches, before):
        """Algorithm 1, lines 8-11 with θ_k: head scores and selection, R_k's buffer, EWC's consolidation."""
        cfg = self.cfg
        self.teacher = None
        if self.method.distils_attention and batches:
            self.score_heads(s, batches, before)
        if batches:
            self.write_buffer(s, batches)
        if self.ewc:
            picked = random.Random(f"{cfg.seed}-ewc-{s}").sample(range(len(train)), min(cfg.ewc_samples, len(train)))
            self.ewc.consolidate(self.engine, [device_batch([train[i]], self.tok.pad_id, self.device) for i in picked])

    def score_heads(self, s, batches, before):
        """Eq. 7-11 on R_k with θ_k: S^k and F^k (or Table 4's ablations), then the new selection H."""
        cfg, args = self.cfg, self.model.args
        ones = torch.ones(args.n_layers, args.n_heads)     # the ablations of Table 4 drop one factor
        S = F = ones
        if cfg.head_score in ("both", "sensitivity"):
            S = self.mean_over_ranks([(heads.task_sensitivity(self.model, [b], entries=cfg.sensitivity_entries,
                                                              norm=cfg.sensitivity_norm), n)
                                      for b, _, n in batches]).cpu()
        if before is not None:
            F = self.mean_over_ranks([(heads.attention_change([before(i)], self.model, [b], [b["rows"]],
                                                              norm=cfg.forgettability_norm), n)
                                      for i, (b, _, n) in enumerate(batches)]).cpu()
        self.scores.add_task(self.tasks[s].name, S, F)
        if cfg.head_score == "random":
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + s)
            self.selected = heads.random_heads(args.n_layers, args.n_heads, cfg.head_budget, gen)
        else:
            self.selected = self.scores.select(cfg.layer_budget, cfg.head_budget, cfg.importance)
        if self.rank == 0:
            self.scores.save(self.run.head_scores)

    def write_buffer(self, s, batches):
        """θ_k's signals on R_k: each rank computes its share, rank 0 writes the task's buffer files."""
        args = self.model.args
        stored = []
        if self.method.distils_attention:
            stored = self.selected if self.cfg.teacher_heads == "selected" else \
                [(l, h) for l in range(args.n_layers) for h in range(args.n_heads)]
        mine = []
        for b, (batch, weight, _) in enumerate(batches):
            # Every rank runs every batch's forward (an empty share runs a stand-in), keeping only real samples.
            forward = partial(self.forward, labels=batch["labels"])   # a PET method's full forward (LFPT5)
            signals = teacher_signals(forward, batch, stored, self.dtype, self.cfg.logit_topk, self.attn_dtype)
            if weight:
                first = b * self.cfg.batch_size + self.rank
                mine += [(first + j * self.world, sig) for j, sig in enumerate(signals)]
        bad = next((f"{key} of replay sample {i}" for i, sig in mine for key, t in sig.items()
                    if t.is_floating_point() and not torch.isfinite(t.float()).all()), None)
        if bad := first_error(bad):
            raise NonFiniteError(f"task {s} ({self.tasks[s].name}): θ_k's {bad} holds NaN or infinite values; "
                                 f"its buffer was not written")
        everyone = gather(mine, dst=0)   # rank 0 alone receives the signals it writes
        with together():
            if self.rank == 0:
                ordered = sorted((pair for part in everyone for pair in part), key=lambda pair: pair[0])
                write_task(self.run.buffer, s, self.tasks[s].name, [sig for _, sig in ordered], stored,
                           self.fingerprint)
        self.open_memory(s)

    def open_memory(self, s):
        """Task s's buffer, checked to be this run's own of that task (rank 0 also checks the file's checksum)."""
        with together():
            memory = TaskMemory(self.run.buffer, s, self.model.args, checksum=self.rank == 0)
            if memory.name != self.tasks[s].name:
                raise InputError(f"{memory.path} holds task {memory.name!r}'s samples, but task {s} of this run is "
                                 f"{self.tasks[s].name!r}: restore the run's own buffer/")
            if changed := changes(memory.manifest["fingerprint"] or {}, self.fingerprint):
                raise InputError(f"{memory.path} was written by a run with other inputs ({'; '.join(changed)}): "
                                 f"restore the run's own buffer/")
        self.memories.append(memory)
        self.memory_tokens.append([n_labels(memory.labels(i)) for i in range(len(memory))])
        self.memory_rows.append([memory.rows(i).numel() for i in range(len(memory))])

    # ---- checkpoints, evaluation, resume ----------------------------------------------------------------------
    def export(self, n: int):
        """θ after n stages as an HF directory that carries its tokenizer's files and its method (file and record),
        so eval.py and the tools load it alone; the record goes last, once everything it vouches for is there."""
        path = self.run.checkpoint(n)
        with together():
            export_hf(self.engine, path, dtype=self.engine.compute_dtype)
            if self.rank == 0:
                if self.pet and self.pet.tasks:   # θ_0 is the bare model
                    self.pet.save(path / pet.FILE)
                for file in self.tok.files:
                    atomic_write(path / file.name, lambda tmp, file=file: shutil.copyfile(file, tmp))
                pet.write_record(path, self.cfg.method, n)

    def check_export(self, n: int):
        """That the checkpoint of n finished stages is whole: its weights' headers, tokenizer, method and record."""
        path = self.run.checkpoint(n)
        try:
            HFCheckpoint(path)
            for file in [*(path / f.name for f in self.tok.files), path / pet.RECORD]:
                if not file.is_file():
                    raise FileNotFoundError(f"{file} is missing")
            pet.saved_method(path, expected=self.cfg.method)
        except (InputError, OSError) as e:
            raise InputError(f"{path} is not whole ({e}): a finished task's model cannot be rebuilt from a later "
                             f"resume point; restore the folder, or start the run again") from None

    def evaluate_checkpoint(self, path, tasks):
        """Scores of the HF checkpoint at `path` on `tasks` (every rank loads it and runs its share)."""
        model = self.exported_model(path)
        return [self.eval_fn(model, self.tasks[j]) for j in tasks]

    def exported_model(self, path):
        """The HF checkpoint at `path` in the compute dtype on this rank's device, its method (if any) attached."""
        return pet.attach_saved(load_hf(path, dtype=self.engine.compute_dtype, device=self.device), path,
                                expected=self.cfg.method)

    def remember(self, s, path):
        """What a method keeps of task s from the model just trained on it (θ_k, exported at `path`) rather than
        from the task's data: LFPT5's R_k, samples θ_k writes, stored with θ_k's logits; SAPT's w̄_k on held-out
        inputs and its pseudo-inputs (SAPT's released ones where `--pseudo-inputs` finds them, else written by θ_k),
        each pooled with EOS after it as SAPT's ARM reads them. Every rank writes the same samples (seeded)."""
        cfg, task = self.cfg, self.tasks[s]
        if not (self.method.pseudo_replay or self.method.reflects):
            return
        prompts = [r["prompt"] for r in task.train]
        inputs = None if self.method.pseudo_replay else \
            pseudo.released(cfg.pseudo_inputs, task.name, prompts, (self.spec or {}).get("data"))
        if inputs is None:
            if cfg.pseudo_inputs == "auto" and not self.method.pseudo_replay and self.rank == 0:
                tqdm.write(f"note: task {s} ({task.name}): no released pseudo-inputs for it in {pseudo.RELEASED}/ "
                           f"beside --data, so θ_{s + 1} writes them (as --pseudo-inputs self)", file=sys.stderr)
            model = self.exported_model(path)
            longest = max(len(self.tok.encode(r["prompt"] + r["answer"])) for r in task.train)
            wanted = max(1, round(cfg.replay_ratio * len(prompts)))
            samples = pseudo.generate_samples(model, self.tok, prompts, wanted, min(longest, cfg.max_len),
                                              cfg.seed * 1000 + s, answers=self.method.pseudo_replay)
            del model
            if len(samples) < wanted and self.rank == 0:   # what θ_k could not write is not kept: say so
                frame = "an input, their shared ending, an answer" if self.method.pseudo_replay else "an input"
                tqdm.write(f"warning: task {s} ({task.name}): θ_{s + 1} wrote {len(samples)} of {wanted} pseudo-"
                           f"samples in the frame of its prompts ({frame}); only those are kept", file=sys.stderr)
            if self.method.pseudo_replay:
                self.write_buffer(s, self.score_batches(self.with_rows(s, encode(self.tok, samples, cfg.max_len))))
                return
            inputs = [r["prompt"] for r in samples]
        held_out = [r["prompt"] for r in task.eval or task.train]   # never the test split
        eos = self.embedding_rows(torch.tensor([self.tok.eos_id]))   # SAPT's ARM pools input + EOS (sapt.py)
        pseudo_rows = (torch.cat([x, eos.to(x)]) for x in self.prompt_embeddings(inputs))
        self.pet.end_task(s, self.prompt_embeddings(held_out), pseudo_rows)
        if self.rank == 0:   # the checkpoint's method file, with what it now keeps of task s
            self.pet.save(Path(path) / pet.FILE)

    def prompt_embeddings(self, prompts):
        """Each prompt's frozen token embeddings (tokens, dim), as generation reads the prompt, one at a time."""
        if not prompts:   # the model wrote none (every rank alike)
            return iter(())
        ids = [torch.tensor(self.tok.prompt(p, self.cfg.max_prompt_len)) for p in prompts]
        unique, inverse = torch.cat(ids).unique(return_inverse=True)
        rows = self.embedding_rows(unique)
        return (rows[i] for i in inverse.split([len(x) for x in ids]))

    def save_resume(self, position: Position):
        """A resume point: sharded weights + AdamW (+ EWC) and the run's state; then `resume/latest.json`."""
        logged = self.run.metrics.read_bytes() if self.run.metrics.exists() else b""
        state = {"R": self.R, "base": self.base, "heads": self.selected, "fingerprint": self.fingerprint,
                 "metrics_bytes": len(logged), "metrics_sha256": hashlib.sha256(logged).hexdigest()}
        write_point(self.run.resume, position, self.engine, state, self.save_extra)

    def save_extra(self, path):
        """A resume point's files beyond the engine's: EWC's per-rank terms, a PET method and its AdamW (rank 0)."""
        if self.ewc:
            self.ewc.save(path / f"ewc-rank{self.rank:05d}.safetensors")
        if self.pet:
            pet.save_state(path, self.pet, self.optim, self.rank, self.device)

    def restore(self) -> Position | None:
        """Load the latest resume point and return its position; None if the run stopped before writing one (its
        log is emptied and it starts over from θ_0 with its own settings)."""
        if not self.run.config.is_file():
            raise InputError(f"{self.run.root} holds no run to resume ({self.run.config.name} not found)")
        if not (self.run.resume / LATEST).is_file():
            if self.rank == 0 and self.run.metrics.exists():
                self.run.metrics.unlink()
            return None
        path = latest_point(self.run.resume)
        with together():   # each rank reads its own files: every rank stops if one cannot
            state = load_sharded(self.engine, path)
            if self.ewc:
                self.ewc.load(path / f"ewc-rank{self.rank:05d}.safetensors", self.device)
            if self.pet:
                self.pending_optim = pet.load_state(path, self.pet, self.rank, self.device)
        if missing := [key for key in META if key not in state]:
            raise InputError(f"{path / 'manifest.json'}: the trainer's state lacks {', '.join(missing)}")
        if changed := changes(state["fingerprint"], self.fingerprint):
            raise InputError(f"{self.run.root} was started with other inputs than this resume has: "
                             f"{'; '.join(changed)}; restore them, or start a new run")
        at = Position(state["task"], state["epoch"], state["micro"], state["step"])
        with together():   # θ_0 .. θ_k of the finished tasks cannot be rebuilt from this point's weights
            for n in range(at.task + 1):
                self.check_export(n)
        self.R, self.base, self.selected = state["R"], state["base"], [tuple(h) for h in state["heads"]]
        if self.run.head_scores.exists():   # may hold the unfinished task's scores too: keep the finished tasks'
            loaded = heads.HeadScores.load(self.run.head_scores)
            for name, S, F in list(zip(loaded.tasks, loaded.task_sensitivity, loaded.task_forgettability))[:at.task]:
                self.scores.add_task(name, S, F)
        for j in range(at.task):   # every finished task with a non-empty R_k has a buffer: a missing one is an error
            if self.replay_size(j):
                self.open_memory(j)
        if self.rank == 0:   # drop what was logged after the resume point, keeping what was logged before it
            logged = self.run.metrics.read_bytes()[:state["metrics_bytes"]] if self.run.metrics.exists() else b""
            if hashlib.sha256(logged).hexdigest() != state["metrics_sha256"]:
                raise InputError(f"{self.run.metrics} no longer starts with the {state['metrics_bytes']} bytes logged "
                                 f"before the resume point (edited or emptied?): restore it, or start the run again")
            atomic_write(self.run.metrics, lambda tmp: tmp.write_bytes(logged))
        return at

    def run_all(self, resume=False):
        """Algorithm 1 over every task (or from the run's latest resume point); writes and returns results.json."""
        settings = {} if resume else {self.run.config: asdict(self.cfg), self.run.spec: self.spec}
        with self.run.claimed(self.rank, resume, settings):
            return self._run_all(resume)

    def _run_all(self, resume):
        n_tasks = len(self.tasks)
        if self.pet:   # LoRA dropout's masks: a function of the seed and the rank (a resume restores the state)
            torch.manual_seed(self.cfg.seed * 1000 + self.rank)
        at = self.restore() if resume else None   # None: a run stopped before its first resume point starts over
        if self.base is None:   # θ_0's zero-shot scores, for FWT
            self.export(0)
            self.base = self.evaluate_checkpoint(self.run.checkpoint(0), range(n_tasks))
        for s in range(at.task if at else 0, len(self.stages)):
            start = time.time()
            self.train_task(s, at if at and at.task == s else None)
            path = self.run.checkpoint(s + 1)
            self.export(s + 1)
            self.remember(s, path)
            seen = n_tasks if self.method.joint else min(s + 2, n_tasks)
            self.R.append(self.evaluate_checkpoint(path, range(seen)) + [None] * (n_tasks - seen))
            if self.rank == 0:
                self.log({"task": s, "name": "mtl" if self.method.joint else self.tasks[s].name,
                          "scores": self.R[s][:seen], "heads": self.selected, "seconds": round(time.time() - start, 1)})
            self.save_resume(Position(s + 1))
            shutil.rmtree(self.run.snapshot(s, self.rank), ignore_errors=True)   # needed until this point exists
        summary = summarize(self.R, self.base, [t.name for t in self.tasks], self.cfg.method, self.method.joint,
                            self.selected, self.run.root)
        if self.rank == 0:
            atomic_write(self.run.results, lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
        return summary
