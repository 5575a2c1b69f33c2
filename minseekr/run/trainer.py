"""Algorithm 1: continual learning over a task sequence, with SEEKR and its baselines, on one process or many.

One loop serves every method. What a method does is its row of `methods.table.METHODS`; the trainer calls it as
an object (`methods.training`) at the points of the loop, and keeps what is remembered between tasks in the run's
memory (`memory.Memory`):

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

Per task k (`_run_all`, `train_task`):
  1. R_k is drawn from D_k before training, with its query rows; SEEKR records θ_{k−1}'s attention on it.
  2. Train on D_k with the old tasks' buffers interleaved evenly by volume (Appendix B): every batch is one
     micro-step (`micro_step`); replayed batches hold samples of one old task, so they share that task's head set.
  3. Remember: with θ_k on R_k, head scores and selection (Eq. 7-11) and R_k's buffer (`memory.py`); the method's
     own end of task (EWC's Fisher); θ_k exported in HF format; what the method keeps from θ_k itself (LFPT5's
     and SAPT's pseudo-samples).
  4. θ_k is evaluated on every task seen so far and on the next one (for FWT).

Parallelism. The model lives in an engine (`minseekr.engines`); one process is a world of one. `batch_size` is the
*global* micro-batch: every rank builds the same seeded plan and takes every world-th sample of each batch,
reading only its own samples from the buffer. Each loss term is a sum over the rank's tokens divided by the
micro-batch's global count (known on every rank from the plan) and multiplied by the world size, since the
engine averages gradients over ranks, and divided by the micro-batches of its optimiser step: the step's
gradient is exactly the mean of its micro-batch means, so N ranks train as one process does. Head scores are
sums over each rank's share of R_k, all-reduced; evaluation splits the test batches over ranks.

Resume. Every draw is seeded by (seed, task, epoch), so a position in the plan fixes the data; a resume point
(`resume.py`) holds the sharded weights and AdamW state, the method's own state, and the run's state (results so
far, head selection, position, bytes of metrics.jsonl), written every `checkpoint_every` optimiser steps and
after each task.
"""
import json
import math
import random
import shutil
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from minseekr.engines.engine import build_engine, export_hf
from minseekr.evaluation.scoring import evaluate
from minseekr.methods import pet, training
from minseekr.network.checkpoint import HFCheckpoint, load_hf
from minseekr.network.model import Transformer
from minseekr.run.batches import encode, index_batches, interleave, my_part, n_labels
from minseekr.run.config import METHODS, ContinualConfig
from minseekr.run.fingerprint import across_ranks, changes, fingerprint
from minseekr.run.memory import Memory
from minseekr.run.resume import LATEST, META, Position, latest_point, load_sharded, write_point
from minseekr.run.rundir import RunDir, summarize
from minseekr.runtime import InputError, NonFiniteError, all_reduce, atomic_write, disk_space, together
from minseekr.seekr.buffer import device_batch


class ContinualTrainer:
    """Runs Algorithm 1 for one method over a task sequence and writes a run directory.

    `engine` comes from `engines.engine.build_engine` or `load_engine`; a plain Transformer is wrapped in the
    hand-written engine. `eval_fn(model, task) -> score` replaces `evaluate` (tests use it to skip generation).
    `spec`, the entry point's own settings, is written beside the config as run.json when the run starts.
    """

    def __init__(self, engine, tokenizer, tasks, cfg: ContinualConfig, run_dir, eval_fn=None, spec=None):
        if isinstance(engine, Transformer):
            engine = build_engine(training.prepare(engine, cfg.method), betas=cfg.betas,
                                  weight_decay=cfg.weight_decay)
        self.engine, self.model, self.tok, self.tasks, self.cfg = engine, engine.model, tokenizer, tasks, cfg
        self.joint = METHODS[cfg.method].joint
        self.method = training.build(cfg, engine, tasks)
        self.rank, self.world, self.device = engine.rank, engine.world, engine.device
        self.run = RunDir(run_dir)
        self.stages = self.method.stages(len(tasks))
        if len(cfg.epochs) not in (1, len(tasks)):
            raise InputError(f"--epochs needs one value or one per task ({len(tasks)}), got {len(cfg.epochs)}: "
                             f"{','.join(map(str, cfg.epochs))}")
        if isinstance(cfg.lr, list) and (self.joint or len(cfg.lr) != len(tasks)):
            wanted = "one value (it trains every task at once)" if self.joint else \
                f"one value or one per task ({len(tasks)})"
            raise InputError(f"--lr needs {wanted}, got {len(cfg.lr)}: {','.join(map(str, cfg.lr))}")
        self.R, self.base, self.spec = [], None, spec
        # What the run depends on, before any training: resume points and buffers are held to it (fingerprint.py).
        self.fingerprint = fingerprint(engine, tokenizer, tasks, asdict(cfg), spec)
        if differing := across_ranks(self.fingerprint):
            raise InputError(f"the ranks of this job were started with different inputs ({'; '.join(differing)}): "
                             f"start every rank with the same flags and data")
        self.memory = Memory(cfg, tasks, self.stages, tokenizer, engine, self.run, self.fingerprint)
        if self.rank == 0:
            self.run.root.mkdir(parents=True, exist_ok=True)
        self.eval_fn = eval_fn or (lambda model, task: evaluate(
            model, tokenizer, task, cfg.eval_samples, cfg.max_prompt_len, cfg.max_new_tokens, progress=self.rank == 0))

    # ---- Algorithm 1 ------------------------------------------------------------------------------------------
    def run_all(self, resume=False):
        """Algorithm 1 over every task (or from the run's latest resume point); writes and returns results.json."""
        settings = {} if resume else {self.run.config: asdict(self.cfg), self.run.spec: self.spec}
        with self.run.claimed(self.rank, resume, settings):
            return self._run_all(resume)

    def _run_all(self, resume):
        n_tasks = len(self.tasks)
        self.method.start()
        at = self.restore() if resume else None   # None: a run stopped before its first resume point starts over
        if self.base is None:   # θ_0's zero-shot scores, for FWT
            self.export(0)
            self.base = self.evaluate_checkpoint(self.run.checkpoint(0), range(n_tasks))
        for s in range(at.task if at else 0, len(self.stages)):
            start = time.time()
            self.train_task(s, at if at and at.task == s else None)
            path = self.run.checkpoint(s + 1)
            self.export(s + 1)
            self.method.remember(s, path, self)
            seen = n_tasks if self.joint else min(s + 2, n_tasks)
            self.R.append(self.evaluate_checkpoint(path, range(seen)) + [None] * (n_tasks - seen))
            if self.rank == 0:
                name = self.cfg.method if self.joint else self.tasks[s].name   # MTL's one stage is named by its method
                self.log({"task": s, "name": name, "scores": self.R[s][:seen], "heads": self.memory.selected,
                          "seconds": round(time.time() - start, 1)})
            self.save_resume(Position(s + 1))
            shutil.rmtree(self.run.snapshot(s, self.rank), ignore_errors=True)   # needed until this point exists
        summary = summarize(self.R, self.base, [t.name for t in self.tasks], self.cfg.method, self.joint,
                            self.memory.selected, self.run.root)
        if self.rank == 0:
            atomic_write(self.run.results, lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
        return summary

    def train_task(self, s, at: Position | None = None):
        """Stage s (task s; all tasks for MTL), from resume position `at` if given: R_k drawn, the method's task
        begun, every micro-step and optimiser step of its epochs, then what is remembered of it."""
        cfg, ks = self.cfg, self.stages[s]
        train = [x for k in ks for x in encode(self.tok, self.tasks[k].train, cfg.max_len)]
        tokens = [n_labels(x["labels"]) for x in train]
        lengths = [x["input_ids"].numel() for x in train]
        scoring = self.memory.batches(self.memory.draw(s, train))   # R_k, for θ_{k−1}'s snapshot and θ_k's scores
        self.method.begin_task(s, self.run.checkpoint(s), at)
        before = self.memory.snapshot(s, scoring, fresh=at is None or at.step == 0)
        name = "+".join(self.tasks[k].name for k in ks)
        epochs = max(cfg.epochs[k] if k < len(cfg.epochs) else cfg.epochs[-1] for k in ks)
        plans = [self.epoch_plan(s, epoch, len(train)) for epoch in range(epochs)]
        total = sum(len(plan) for plan in plans)   # micro-steps in the task; the last optimiser step may take fewer
        at = at or Position(s)
        step, logged = at.step, {}                  # logged: the open optimiser step's loss terms, name -> [sum, n]
        self.model.train()
        for epoch in range(at.epoch, epochs):
            plan, start = plans[epoch], at.micro if epoch == at.epoch else 0
            with tqdm(plan, desc=f"{cfg.method} task {s + 1}/{len(self.stages)} {name} ep {epoch + 1}",
                      leave=False, initial=start, disable=self.rank != 0) as bar:   # closed on a crash too
                for i, (source, idx) in enumerate(plan[start:], start):
                    memory = None if source == "new" else self.memory.memories[source]
                    part, weight = my_part(idx, self.rank, self.world)   # this rank reads only its samples
                    samples = [train[x] if memory is None else memory[x] for x in part]
                    counts = self.memory.counts(source, idx) if memory is not None else \
                        {"tokens": sum(tokens[x] for x in idx), "samples": len(idx), "rows": 0,
                         "lm": sum(lengths[x] - 1 for x in idx)}   # LFPT5's LM: every token after a sample's first
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
                        if cfg.checkpoint_every and self.method.optimiser.step % cfg.checkpoint_every == 0:
                            self.save_resume(Position(s, epoch, i + 1, step))
        self.model.eval()
        self.memory.remember(s, scoring, before, self.method.forward)
        self.method.end_task(s, train, self.tok.pad_id)

    def epoch_plan(self, s, epoch, n_train):
        """The epoch's micro-batches: ("new" | old task j, global sample indices), interleaved by volume."""
        cfg = self.cfg
        new = index_batches(n_train, cfg.batch_size, random.Random(f"{cfg.seed}-{s}-{epoch}"))
        old = {j: index_batches(len(m), cfg.batch_size, random.Random(f"{cfg.seed}-{s}-{epoch}-{j}"))
               for j, m in enumerate(self.memory.memories)}
        plan = interleave({"new": len(new), **{j: len(b) for j, b in old.items()}})
        return [(name, new[j] if name == "new" else old[name][j]) for name, j in plan]

    # ---- one micro-step and one optimiser step ----------------------------------------------------------------
    def micro_step(self, samples, weight, counts, memory=None, n_micro=1):
        """Backward of this rank's share of one global micro-batch; the batch's loss terms (global means).

        `samples` and `weight` are this rank's share (`my_part`); `counts` holds the global batch's labelled
        tokens, samples, LM tokens and query rows; `memory` is the old task a replayed batch comes from; the
        optimiser step's gradient is the mean over its `n_micro` micro-batches.
        """
        batch = device_batch(samples, self.tok.pad_id, self.device)
        probe = None if memory is None else self.memory.probe(batch, memory)   # SEEKR's heads at the stored rows
        logits = self.method.forward(batch["input_ids"], batch["attention_mask"], probe, batch["labels"])
        loss, sums = self.method.loss(logits, batch, counts, replayed=memory is not None, probe=probe)
        (loss * (weight * self.world / n_micro)).backward()
        values = all_reduce(torch.tensor([float(s.detach()) * weight for s, _ in sums.values()], device=self.device))
        terms = {name: v.item() / float(n) for (name, (_, n)), v in zip(sums.items(), values)}
        for name, value in terms.items():   # every rank sees the same all-reduced values: all stop together
            if not math.isfinite(value):
                raise NonFiniteError(f"optimiser step {self.method.optimiser.step + 1}: the loss term {name} is "
                                     f"{value}; nothing of this step was applied or saved (a lower --lr, or the data?)")
        return terms

    def optimizer_step(self, s):
        """The method's penalty gradient (EWC's, O-LoRA's …), global-norm clip, AdamW; returns the step's logged
        terms: the gradient norm before clipping (penalty included) and the penalties."""
        optimiser = self.method.optimiser
        terms = self.method.penalty_grad(s)
        terms["grad_norm"] = float(optimiser.clip_grad_norm_(self.cfg.clip))
        if bad := {key: v for key, v in terms.items() if not math.isfinite(v)}:
            raise NonFiniteError(f"optimiser step {optimiser.step + 1}: {', '.join(f'{k} is {v}' for k, v in bad.items())}"
                                 f"; the step was not applied and nothing was saved (a lower --lr?)")
        optimiser.optimizer_step(self.cfg.lr_for(self.stages[s][0]))   # the stage's own rate
        optimiser.zero_grad()
        return terms

    def log_step(self, s, epoch, logged):
        """One optimiser step: clip, update, and a metrics.jsonl line (its terms averaged over its micro-steps)."""
        record = {"task": s, "epoch": epoch, **{key: total / n for key, (total, n) in logged.items()}}
        record.update(self.optimizer_step(s))
        if self.rank == 0:
            self.log({**record, "step": self.method.optimiser.step})

    def log(self, record: dict):
        """Append one line to metrics.jsonl (rank 0)."""
        with disk_space(self.run.metrics), self.run.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    # ---- checkpoints, evaluation, resume ----------------------------------------------------------------------
    def export(self, n: int):
        """θ after n stages as an HF directory that carries its tokenizer's files and its method (file and record),
        so eval.py and the tools load it alone; the record goes last, once everything it vouches for is there."""
        path = self.run.checkpoint(n)
        with together():
            export_hf(self.engine, path, dtype=self.engine.compute_dtype)
            if self.rank == 0:
                self.method.export(path)
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

    def save_resume(self, position: Position):
        """A resume point: sharded weights + AdamW, the method's state and the run's; then `resume/latest.json`."""
        state = {"R": self.R, "base": self.base, "heads": self.memory.selected, "fingerprint": self.fingerprint,
                 **self.run.log_mark()}
        write_point(self.run.resume, position, self.engine, state, self.method.save)

    def restore(self) -> Position | None:
        """Load the latest resume point and return its position; None if the run stopped before writing one (its
        log is emptied and it starts over from θ_0 with its own settings)."""
        if not self.run.config.is_file():
            raise InputError(f"{self.run.root} holds no run to resume ({self.run.config.name} not found)")
        if not (self.run.resume / LATEST).is_file():
            if self.rank == 0:
                self.run.rewind_log(None)
            return None
        path = latest_point(self.run.resume)
        with together():   # each rank reads its own files: every rank stops if one cannot
            state = load_sharded(self.engine, path)
            self.method.load(path)
        if missing := [key for key in META if key not in state]:
            raise InputError(f"{path / 'manifest.json'}: the trainer's state lacks {', '.join(missing)}")
        if changed := changes(state["fingerprint"], self.fingerprint):
            raise InputError(f"{self.run.root} was started with other inputs than this resume has: "
                             f"{'; '.join(changed)}; restore them, or start a new run")
        at = Position(state["task"], state["epoch"], state["micro"], state["step"])
        with together():   # θ_0 .. θ_k of the finished tasks cannot be rebuilt from this point's weights
            for n in range(at.task + 1):
                self.check_export(n)
        self.R, self.base = state["R"], state["base"]
        self.memory.restore(state["heads"], at.task)
        if self.rank == 0:   # drop what was logged after the resume point, keeping what was logged before it
            self.run.rewind_log(state)
        return at
