"""SEEKR's memory between tasks: what Algorithm 1 keeps of each finished task, and how it is chosen.

For task k, with the model around it:
  1. before training, R_k is drawn from D_k (the draw depends on no model) with its query rows T (`draw`);
     for SEEKR, θ_{k−1}'s attention at those rows is recorded then and written to disk (`snapshot`), so
     forgettability (Eq. 9) never needs two models in memory, nor RAM for a large R_k;
  2. while training, a replayed batch of task j reads its stored teacher rows for the heads it is distilled on
     (`probe`), and counts its labelled tokens and rows (`counts`);
  3. after training, with θ_k on R_k: sensitivity (Eq. 7), forgettability (Eq. 9), importance (Eq. 10) and the new
     head selection H (Eq. 11, `score_heads`); then R_k is written to the buffer with θ_k's logits and the
     attention rows of the stored heads (`write`), and opened for replay (`open`).

Every rank draws the same R_k and takes every world-th sample of each of its batches; head scores are sums over
each rank's share, all-reduced; rank 0 writes the buffer. Which method replays, distils logits or attention is
its row of `methods.table.METHODS`.
"""
import random
from functools import partial

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minseekr.methods.table import METHODS
from minseekr.run.batches import encode, my_part, n_labels
from minseekr.run.fingerprint import changes
from minseekr.runtime import InputError, NonFiniteError, all_reduce, atomic_write, first_error, gather, together
from minseekr.seekr import heads
from minseekr.seekr.buffer import TaskMemory, device_batch, write_task
from minseekr.seekr.distill import teacher_signals
from minseekr.seekr.kl import AttentionKL


class Memory:
    """The replay buffers of the finished tasks and SEEKR's head selection H, for one run (`run`, a RunDir)."""

    def __init__(self, cfg, tasks, stages, tok, engine, run, fingerprint):
        self.cfg, self.does, self.tasks, self.stages, self.tok = cfg, METHODS[cfg.method], tasks, stages, tok
        self.model, self.run, self.fingerprint = engine.model, run, fingerprint
        self.rank, self.world, self.device = engine.rank, engine.world, engine.device
        self.dtype = getattr(torch, cfg.signal_dtype)
        self.attn_dtype = getattr(torch, cfg.attn_dtype or cfg.signal_dtype)
        args = self.model.args
        if self.does.distils_attention:   # fail before training, not after the first task
            heads.select_heads(torch.ones(args.n_layers, args.n_heads), cfg.layer_budget, cfg.head_budget)
        if self.does.replays:
            for s, task in enumerate(tasks[:-1]):   # the last task's R_k is never replayed
                if self.replay_size(s) == 0:
                    rounding = "round" if cfg.replay_rounding == "round" else "int"
                    raise InputError(f"--replay-ratio {cfg.replay_ratio} keeps {rounding}({cfg.replay_ratio} × "
                                     f"{len(task.train)}) = 0 samples of task {task.name} ({len(task.train)} training "
                                     f"samples), so --method {cfg.method} would replay nothing of it: use "
                                     f"--replay-ratio ≥ {1 / len(task.train):.3g}, or more training samples")
        self.scores = heads.HeadScores(args.n_layers, args.n_heads)
        self.selected = []                  # the current selection H (Algorithm 1, line 10)
        self.memories = []                  # TaskMemory per finished task
        self.tokens, self.rows = [], []     # per finished task and sample: labelled tokens, query rows

    # ---- before training: R_k and θ_{k−1}'s attention on it ---------------------------------------------------
    def replay_size(self, s) -> int:
        """|R_k| of stage s: 0 unless the method replays."""
        n = sum(len(self.tasks[k].train) for k in self.stages[s])
        count = self.cfg.replay_ratio * n
        return (round(count) if self.cfg.replay_rounding == "round" else int(count)) if self.does.replays else 0

    def draw(self, s, train):
        """R_k with its query rows: seeded per task, independent of any model (empty unless the method replays)."""
        cfg, m = self.cfg, self.replay_size(s)
        if m == 0 or self.does.pseudo_replay:   # LFPT5's R_k is written by θ_k after the task (`write_records`)
            return []
        idx = list(range(m)) if cfg.replay_select == "first" else \
            sorted(random.Random(f"{cfg.seed}-replay-{s}").sample(range(len(train)), m))
        return self.with_rows(s, [dict(train[i]) for i in idx])   # copies: rows are added to these only

    def with_rows(self, s, replay):
        """R_k's samples with their query rows T, drawn seeded per task."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + s)
        for sample in replay:   # min(n, B_T) distinct rows per sample (every row when B_T = 0)
            mask = torch.ones(1, sample["input_ids"].numel(), dtype=torch.long)
            sample["rows"] = heads.sample_query_rows(mask, self.cfg.query_budget, gen)[0]
        return replay

    def batches(self, replay):
        """R_k in global batches: (this rank's share on the device, its weight, its number of real samples)."""
        out = []
        for start in range(0, len(replay), self.cfg.batch_size):
            mine, weight = my_part(replay[start:start + self.cfg.batch_size], self.rank, self.world)
            out.append((device_batch(mine, self.tok.pad_id, self.device), weight, int(weight) * len(mine)))
        return out

    def needs_forgettability(self):
        return self.does.distils_attention and self.cfg.head_score in ("both", "forgettability")

    def snapshot(self, s, batches, fresh):
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

    # ---- while training: a replayed batch ---------------------------------------------------------------------
    def counts(self, j, idx) -> dict:
        """A replayed global batch of task j's samples `idx`: its labelled tokens, samples, LM tokens, query rows."""
        memory = self.memories[j]
        return {"tokens": sum(self.tokens[j][x] for x in idx), "samples": len(idx),
                "lm": sum(memory.manifest["lengths"][x] - 1 for x in idx),
                "rows": sum(self.rows[j][x] for x in idx)}

    def distilled_heads(self, memory):
        return memory.heads if self.cfg.teacher_heads == "selected" else self.selected

    def probe(self, batch, memory):
        """AttentionKL over the heads a replayed batch of `memory` is distilled on, with their stored teacher rows;
        None where the method distils no attention or the task has no heads."""
        if not (self.does.distils_attention and self.distilled_heads(memory)):
            return None
        pairs = self.distilled_heads(memory)
        stored = {pair: i for i, pair in enumerate(memory.heads)}
        order = [stored[pair] for pair in pairs]
        teacher = batch["teacher_attn"]                                          # (B, |H|, T, S)
        if order != list(range(teacher.shape[1])):   # a subset or another order; the memory's own heads need no copy
            teacher = teacher[:, order]
        return AttentionKL(pairs, batch["rows"], teacher, batch["attention_mask"], windows=self.model.args.windows)

    # ---- after training: θ_k's scores and R_k's buffer --------------------------------------------------------
    def remember(self, s, batches, before, forward):
        """Algorithm 1, lines 8-11 with θ_k: head scores and selection, then R_k's buffer."""
        if self.does.distils_attention and batches:
            self.score_heads(s, batches, before)
        if batches:
            self.write(s, batches, forward)

    def mean_over_ranks(self, values):
        """Σ value·n / Σ n over every rank's (per-batch mean, n samples) pairs: a mean over all of R_k."""
        total = sum(v * n for v, n in values)
        count = torch.tensor(float(sum(n for _, n in values)), device=total.device)
        return all_reduce(total) / all_reduce(count)

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

    def write(self, s, batches, forward):
        """θ_k's signals on R_k (its logits through the method's full `forward`): each rank computes its share,
        rank 0 writes the task's buffer files."""
        args = self.model.args
        stored = []
        if self.does.distils_attention:
            stored = self.selected if self.cfg.teacher_heads == "selected" else \
                [(l, h) for l in range(args.n_layers) for h in range(args.n_heads)]
        mine = []
        for b, (batch, weight, _) in enumerate(batches):
            # Every rank runs every batch's forward (an empty share runs a stand-in), keeping only real samples.
            signals = teacher_signals(partial(forward, labels=batch["labels"]), batch, stored, self.dtype,
                                      self.cfg.logit_topk, self.attn_dtype, self.model.args.windows)
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
        self.open(s)

    def write_records(self, s, records, forward):
        """Task s's R_k from {"prompt", "answer"} records a model wrote (LFPT5's pseudo-samples), with their rows."""
        self.write(s, self.batches(self.with_rows(s, encode(self.tok, records, self.cfg.max_len))), forward)

    def open(self, s):
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
        self.tokens.append([n_labels(memory.labels(i)) for i in range(len(memory))])
        self.rows.append([memory.rows(i).numel() for i in range(len(memory))])

    def restore(self, selected, finished: int):
        """The memory of a resumed run after `finished` tasks: H as saved, those tasks' head scores (the file may hold
        the unfinished task's too) and their buffers (every finished task with a non-empty R_k has one)."""
        self.selected = [tuple(h) for h in selected]
        if self.run.head_scores.exists():
            loaded = heads.HeadScores.load(self.run.head_scores)
            for name, S, F in list(zip(loaded.tasks, loaded.task_sensitivity, loaded.task_forgettability))[:finished]:
                self.scores.add_task(name, S, F)
        for j in range(finished):
            if self.replay_size(j):
                self.open(j)
