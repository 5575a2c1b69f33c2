"""Algorithm 1: continual learning over a task sequence, with SEEKR and its replay baselines.

One loop serves every method; a method only changes the loss of replayed batches and what the buffer keeps:

    seqft   new-task cross-entropy only (the lower bound)
    replay  + cross-entropy on replayed samples (Eq. 2)
    derpp   replayed samples get λ1·CE + (1−λ1)·KL(teacher logits ‖ student logits) (Eq. 3, mixed as Eq. 13)
    seekr   derpp + λ2 · attention distillation on the selected heads at the sampled rows (Eq. 12, 13)

Per task k:
  1. R_k is drawn from D_k *before* training (the draw depends on no model) together with its query rows T;
     for SEEKR the θ_{k−1} attention at those rows is recorded then, so forgettability (Eq. 9) never needs
     two models in memory.
  2. Train on D_k with the old tasks' buffers interleaved evenly by volume (Appendix B): every batch is one
     micro-step; replayed batches hold samples of one old task, so they share that task's head set.
  3. With θ_k on R_k: sensitivity (Eq. 7), forgettability (Eq. 9), importance (Eq. 10), head selection
     (Eq. 11); then R_k is written to the buffer with θ_k's logits and attention rows.
  4. θ_k is saved in HF format and evaluated on every task seen so far and on the next one (for FWT).

L_ad is averaged over samples, selected heads and rows (the official normalisation up to its per-layer
grouping): with Eq. 12's plain sum the paper's λ2 = 1e3 would scale with B_H·B_T.
"""
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minseekr import heads as H
from minseekr.buffer import TaskMemory, collate, teacher_signals, write_task
from minseekr.checkpoint import save_hf
from minseekr.data import extract_answer
from minseekr.generate import generate
from minseekr.kl import AttentionKL
from minseekr.metrics import backward_transfer, forward_transfer, overall_performance, score

METHODS = ("seqft", "replay", "derpp", "seekr")


@dataclass
class ContinualConfig:
    method: str = "seekr"             # seqft | replay | derpp | seekr
    lr: float = 1e-5                  # AdamW, constant (the paper's 7B setting)
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    clip: float = 1.0                 # global gradient-norm clip
    batch_size: int = 16              # sequences per micro-step
    grad_accum: int = 1               # micro-steps per optimiser step
    epochs: list = field(default_factory=lambda: [1])  # per task (one value repeats)
    max_len: int = 1536               # left truncation of prompt+answer
    replay_ratio: float = 0.01        # |R_k| / |D_k|
    replay_select: str = "random"     # random (paper) | first (official code: the first items of train.json)
    lambda1: float = 0.5              # CE vs logit-KL mix on replayed samples (Eq. 13)
    lambda2: float = 1e3              # attention-distillation weight (Eq. 13)
    layer_budget: int = 24            # B_L
    head_budget: int = 128            # B_H
    query_budget: int = 100           # B_T
    head_score: str = "both"          # both (I = S·F) | sensitivity | forgettability | random (Table 4)
    teacher_heads: str = "selected"   # selected: each task keeps its own heads | all: current selection for every task
    signal_dtype: str = "bfloat16"    # buffer logits/attention dtype
    eval_samples: int = 200           # test records per task (0 = all)
    max_new_tokens: int = 64
    seed: int = 1234
    log_every: int = 10

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.head_score not in ("both", "sensitivity", "forgettability", "random"):
            raise ValueError(f"--head-score must be both|sensitivity|forgettability|random, got {self.head_score!r}")
        if self.teacher_heads not in ("selected", "all"):
            raise ValueError(f"--teacher-heads must be selected|all, got {self.teacher_heads!r}")
        if self.replay_select not in ("random", "first"):
            raise ValueError(f"--replay-select must be random|first, got {self.replay_select!r}")
        if not 0.0 <= self.replay_ratio <= 1.0:
            raise ValueError(f"--replay-ratio must be in [0, 1], got {self.replay_ratio}")


def encode(tokenizer, records, max_len) -> list[dict]:
    """TRACE training encoding of {"prompt", "answer"} records as tensors."""
    out = []
    for r in records:
        ids, labels = tokenizer.encode_example(r["prompt"], r["answer"], max_len)
        out.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    return out


def interleave(streams: dict) -> list:
    """Merge {name: n_batches} evenly by volume: batch j of a stream of n sits at (j + 0.5) / n."""
    slots = [((j + 0.5) / n, name, j) for name, n in streams.items() for j in range(n)]
    return [(name, j) for _, name, j in sorted(slots, key=lambda s: (s[0], str(s[1])))]


def batches_of(samples, batch_size, pad_id, rng=None):
    order = list(range(len(samples)))
    if rng is not None:
        rng.shuffle(order)
    return [collate([samples[i] for i in order[s:s + batch_size]], pad_id) for s in range(0, len(order), batch_size)]


def kl_logits(student, teacher):
    """Mean over tokens of KL(teacher ‖ student), rows of logits (N, V) (Eq. 3)."""
    t = teacher.float().log_softmax(-1)
    return F.kl_div(student.float().log_softmax(-1), t, log_target=True, reduction="batchmean")


@torch.no_grad()
def evaluate(model, tokenizer, task, samples=0, max_len=1536, max_new_tokens=512, batch_size=32) -> float:
    """Greedy KV-cache generation on the first `samples` test records (0 = all), scored by the task's metric (0-100)."""
    records = task.test[: samples or None]
    # Keep BOS and the newest prompt tokens, the training encoding's truncation rule.
    prompts = [[tokenizer.bos_id] + tokenizer.encode(r["prompt"], bos=False)[-(max_len - 1):] for r in records]
    preds = []
    for s in range(0, len(prompts), batch_size):
        out = generate(model, prompts[s:s + batch_size], max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        preds += [extract_answer(tokenizer.decode(o), task.name) for o in out]
    return score(task.name, preds, [r["answer"] for r in records], sources=[r["prompt"] for r in records])


class ContinualTrainer:
    """Runs Algorithm 1 for one method over a task sequence and writes a run directory."""

    def __init__(self, model, tokenizer, tasks, cfg: ContinualConfig, run_dir, eval_fn=None):
        self.model, self.tok, self.tasks, self.cfg = model, tokenizer, tasks, cfg
        self.run = Path(run_dir)
        self.run.mkdir(parents=True, exist_ok=True)
        (self.run / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        args = model.args
        self.scores = H.HeadScores(args.n_layers, args.n_heads)
        self.heads = []                     # the current selection H (Algorithm 1, line 10)
        self.memories = []                  # TaskMemory per finished task
        self.R = [[None] * len(tasks) for _ in tasks]
        self.dtype = getattr(torch, cfg.signal_dtype)
        self.eval_fn = eval_fn or (lambda task: evaluate(model, tokenizer, task, cfg.eval_samples, cfg.max_len,
                                                          cfg.max_new_tokens))

    # ---- one micro-step -------------------------------------------------------------------------------
    def loss(self, batch, memory=None):
        """Loss of a batch and its named terms; `memory` is the old task a replayed batch comes from."""
        cfg, terms = self.cfg, {}
        probe = None
        if memory is not None and cfg.method == "seekr" and self.distilled_heads(memory):
            probe = self.kl_probe(batch, memory)
        logits = self.model(batch["input_ids"], batch["attention_mask"], probe=probe)
        labels = batch["labels"]
        predicting = labels[:, 1:] != -100
        ce = F.cross_entropy(logits[:, :-1][predicting].float(), labels[:, 1:][predicting])
        if memory is None:
            return ce, {"task": ce.item()}
        terms["replay"] = ce.item()
        if cfg.method == "replay":
            return ce, terms
        ld = kl_logits(logits[:, :-1][predicting], batch["teacher_logits"])
        loss = cfg.lambda1 * ce + (1 - cfg.lambda1) * ld
        terms["logit_kl"] = ld.item()
        if probe is not None:
            ad = torch.cat([kl.flatten() for kl in probe.kl.values()]).mean()
            loss = loss + cfg.lambda2 * ad
            terms["attn_kl"] = ad.item()
        return loss, terms

    def distilled_heads(self, memory):
        return memory.heads if self.cfg.teacher_heads == "selected" else self.heads

    def kl_probe(self, batch, memory):
        """AttentionKL over the heads this memory is distilled on, with its teacher rows."""
        heads = self.distilled_heads(memory)
        index = {h: i for i, h in enumerate(memory.heads)}
        teacher_all = batch["teacher_attn"]                            # (B, |H_stored|, T, S)
        by_layer, teacher = {}, {}
        for l, h in heads:
            by_layer.setdefault(l, []).append(h)
        for l, hs in by_layer.items():
            teacher[l] = teacher_all[:, [index[(l, h)] for h in hs]]
        return AttentionKL(by_layer, batch["rows"], teacher, batch["attention_mask"])

    # ---- one task ---------------------------------------------------------------------------------------
    def train_task(self, k):
        cfg, task = self.cfg, self.tasks[k]
        train = encode(self.tok, task.train, cfg.max_len)
        replay_idx = self.draw_replay(k, len(train))
        replay = [dict(train[i]) for i in replay_idx]     # copies: rows are added to these only
        rows = self.sample_rows(replay)
        for s, r in zip(replay, rows):
            s["rows"] = r
        before = self.attention_snapshot(replay) if self.needs_scores() else None

        epochs = cfg.epochs[k] if k < len(cfg.epochs) else cfg.epochs[-1]
        pad = self.tok.pad_id
        self.model.train()
        step, log = 0, self.run / "metrics.jsonl"
        for epoch in range(epochs):
            new = batches_of(train, cfg.batch_size, pad, self.rng)
            old = {j: self.replay_batches(m) for j, m in enumerate(self.memories)} if cfg.method != "seqft" else {}
            plan = interleave({"new": len(new), **{j: len(b) for j, b in old.items()}})
            bar = tqdm(plan, desc=f"{cfg.method} task {k + 1}/{len(self.tasks)} {task.name} ep {epoch + 1}", leave=False)
            for name, j in bar:
                batch, memory = (new[j], None) if name == "new" else (old[name][j], self.memories[name])
                loss, terms = self.loss(batch, memory)
                (loss / cfg.grad_accum).backward()
                step += 1
                if step % cfg.grad_accum == 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
                    self.opt.step()
                    self.opt.zero_grad(set_to_none=True)
                bar.set_postfix({key: f"{v:.3f}" for key, v in terms.items()})
                if step % cfg.log_every == 0:
                    with log.open("a") as f:
                        f.write(json.dumps({"task": k, "epoch": epoch, "step": step, **terms}) + "\n")
        if step % cfg.grad_accum:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.model.eval()
        self.finish_task(k, replay, before)

    def draw_replay(self, k, n):
        """Indices of R_k among task k's n training samples (seeded per task; none for SeqFT)."""
        m = round(self.cfg.replay_ratio * n) if self.cfg.method != "seqft" else 0
        if self.cfg.replay_select == "first":
            return list(range(m))
        return sorted(random.Random(f"{self.cfg.seed}-replay-{k}").sample(range(n), m))

    def sample_rows(self, replay):
        if not replay:
            return []
        rows = []
        for s in replay:
            mask = torch.ones(1, s["input_ids"].numel(), dtype=torch.long)
            rows.append(H.sample_query_rows(mask, self.cfg.query_budget, self.gen)[0])
        return rows

    def needs_scores(self):
        return self.cfg.method == "seekr" and self.cfg.head_score in ("both", "forgettability")

    def score_batches(self, replay):
        return batches_of(replay, self.cfg.batch_size, self.tok.pad_id)

    def attention_snapshot(self, replay):
        if not replay:
            return None
        batches = self.score_batches(replay)
        # Kept in bf16 on the CPU: every head at B_T rows of |R_k| samples, until θ_k is compared with it.
        return [m.to("cpu", torch.bfloat16) for m in H.attention_at_rows(self.model, batches, [b["rows"] for b in batches])]

    def replay_batches(self, memory):
        samples = [memory[i] for i in range(len(memory))]
        return batches_of(samples, self.cfg.batch_size, self.tok.pad_id, self.rng)

    def finish_task(self, k, replay, before):
        cfg, args = self.cfg, self.model.args
        if cfg.method == "seekr" and replay:
            batches = self.score_batches(replay)
            S = H.task_sensitivity(self.model, batches) if cfg.head_score in ("both", "sensitivity") else None
            Fk = None
            if before is not None:
                Fk = H.attention_change(before, self.model, batches, [b["rows"] for b in batches])
            ones = torch.ones(args.n_layers, args.n_heads)   # the ablations of Table 4 drop one factor
            self.scores.add_task(self.tasks[k].name, S if S is not None else ones, Fk if Fk is not None else ones)
            if cfg.head_score == "random":
                flat = torch.randperm(args.n_layers * args.n_heads, generator=self.gen)[:cfg.head_budget]
                self.heads = sorted((int(i) // args.n_heads, int(i) % args.n_heads) for i in flat)
            else:
                self.heads = self.scores.select(cfg.layer_budget, cfg.head_budget)
            self.scores.save(self.run / "head_scores.safetensors")
        if replay:
            stored = self.heads if cfg.teacher_heads == "selected" else \
                [(l, h) for l in range(args.n_layers) for h in range(args.n_heads)]
            stored = stored if cfg.method == "seekr" else []
            signals = []
            for batch in self.score_batches(replay):
                signals += teacher_signals(self.model, batch, stored, self.dtype)
            write_task(self.run / "buffer", k, self.tasks[k].name, signals, stored)
            self.memories.append(TaskMemory(self.run / "buffer", k))
        save_hf(self.model, self.run / "checkpoints" / f"task{k + 1:02d}")

    def run_all(self):
        results = self.run / "results.json"
        base = [self.eval_fn(t) for t in self.tasks]     # θ_0's zero-shot scores, for FWT
        for k, task in enumerate(self.tasks):
            start = time.time()
            self.train_task(k)
            for j in range(min(k + 2, len(self.tasks))):
                self.R[k][j] = self.eval_fn(self.tasks[j])
            with (self.run / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"task": k, "name": task.name, "scores": self.R[k][:k + 2],
                                    "heads": self.heads, "seconds": round(time.time() - start, 1)}) + "\n")
        summary = {"method": self.cfg.method, "tasks": [t.name for t in self.tasks], "R": self.R, "base": base,
                   "OP": overall_performance(self.R), "BWT": backward_transfer(self.R),
                   "FWT": forward_transfer(self.R, base), "heads": self.heads}
        results.write_text(json.dumps(summary, indent=1))
        return summary
