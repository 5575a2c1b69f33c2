"""The method protocol: what the trainer calls on a method at the points of Algorithm 1, and the two kinds of method.

Every method is one object with the same interface, built from its row of `table.METHODS` (`build`); the trainer
(`minseekr.run.trainer`) calls it and holds no method names and no branch on a method's kind:

    optimiser                           what an optimiser step updates: the engine's shards, or a PET method's AdamW
    start()                             once, before the run's first draw
    begin_task(s, previous, at)         task s's own parameters and optimiser; LwF's frozen θ_{k−1} (at `previous`)
    forward(ids, mask, probe, labels)   the model's logits, with a PET method's soft prompts or LoRA weights
    loss(logits, batch, counts, replayed, probe)   a micro-batch's loss and its logged terms
    penalty_grad(s)                     what it adds to the gradient before clipping (EWC; O-LoRA's orthogonality)
    end_task(s, train)                  with θ_k, after training on task s (EWC's consolidation)
    remember(s, path, trainer)          what it keeps of task s from θ_k itself, exported at `path` (LFPT5, SAPT)
    export(path)                        its files beside a task checkpoint's weights
    save(path) / load(path)             its share of a resume point

`FullFineTuning` trains the model's own weights (SeqFT, Replay, DER++, SEEKR, LwF, EWC, MTL); `ParameterEfficient`
trains a PET module (`pet.PET`) beside the frozen model (O-LoRA, PP, L2P, LFPT5, SAPT). Replay itself, R_k and its
buffer, SEEKR's heads and their attention rows, is the run's memory (`minseekr.run.memory`); a method only says
how a replayed batch enters its loss.
"""
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from minseekr.engines.engine import load_engine
from minseekr.methods import pet, pseudo
from minseekr.methods.ewc import EWC
from minseekr.methods.peft import ReplicatedAdamW, freeze
from minseekr.methods.table import METHODS
from minseekr.network.model import token_losses
from minseekr.runtime import InputError
from minseekr.seekr.buffer import device_batch
from minseekr.seekr.distill import logit_kl, logit_mse


def build(cfg, engine, tasks):
    """The method `cfg.method` training in `engine` on `tasks`, as its row of `table.METHODS` says."""
    kind = ParameterEfficient if METHODS[cfg.method].adapts else FullFineTuning
    return kind(cfg, engine, tasks)


def prepare(model, name: str):
    """`model` as method `name` trains it: frozen for a parameter-efficient method, as it is otherwise."""
    return freeze(model) if METHODS[name].adapts else model


class FullFineTuning:
    """A method that trains the model's own weights: the engine's shards and their AdamW (SeqFT, Replay, DER++,
    SEEKR, LwF, EWC, MTL). Its loss (`loss`) is also every other method's, its terms chosen by its row."""

    def __init__(self, cfg, engine, tasks):
        self.cfg, self.does, self.engine, self.model = cfg, METHODS[cfg.method], engine, engine.model
        self.optimiser = engine
        self.ewc = EWC(cfg.ewc_weight) if self.does.penalises_drift else None
        self.teacher = None                 # LwF's frozen θ_{k−1}

    def stages(self, n_tasks: int) -> list[list[int]]:
        """The tasks each stage trains on: one task a stage, or every task at once (MTL: R has one row)."""
        return [list(range(n_tasks))] if self.does.joint else [[k] for k in range(n_tasks)]

    def start(self):
        pass

    def begin_task(self, s: int, previous, at=None):
        """LwF's θ_{k−1}: a frozen hand-sharded copy of the previous task's export at `previous` (none before task 2)."""
        self.teacher = None
        if self.does.distils_previous and s > 0:
            self.teacher = load_engine(previous, frozen=True, device=self.engine.device,
                                       compute_dtype=self.engine.compute_dtype)

    def forward(self, input_ids, attention_mask, probe=None, labels=None):
        """The model's logits (`labels` matter only to a parameter-efficient method's choice of prompt)."""
        return self.model(input_ids, attention_mask, probe=probe)

    def batch_terms(self) -> dict:
        """Loss terms of the last forward beyond the data's (L2P's pull of the chosen keys), summed over samples."""
        return {}

    def loss(self, logits, batch, counts, replayed: bool, probe=None):
        """This rank's share of a micro-batch's loss, as a global mean, and its terms {name: (sum, global count)}.

        CE over the labelled tokens (Eq. 1); a replayed batch adds logit distillation mixed by λ1 (Eq. 3, 13) and
        λ2 · the attention distillation of `probe` (Eq. 12, 13); a new-task batch LwF's KL(θ_{k−1} ‖ θ); LFPT5
        scales its terms as (1 − kd)(CE + λ_gen·LM) + kd·KD. `counts` holds the global batch's labelled tokens,
        samples, query rows and LM tokens.
        """
        cfg, does, n_tokens = self.cfg, self.does, counts["tokens"]
        predicting = batch["labels"][:, 1:] != -100
        ce = token_losses(logits, batch["labels"])[predicting].sum()
        sums, loss = {}, ce / n_tokens
        for name, term in self.batch_terms().items():
            loss = loss + term / counts["samples"]
            sums[name] = (term, counts["samples"])
        if does.learns_inputs:   # LFPT5 (lfpt5.py): (1 − kd)·(CE + λ_gen·LM) on new and replayed batches
            written = batch["attention_mask"].bool()   # the LM: every token after the first, prompt and answer
            lm = token_losses(logits, batch["input_ids"].masked_fill(~written, -100)).sum()
            loss = (1 - cfg.lfpt5_kd) * (loss + cfg.lfpt5_gen_weight * lm / counts["lm"])
            sums["lm"] = (lm, counts["lm"])
        if not replayed:
            sums["task_ce"] = (ce, n_tokens)
            if self.teacher is not None:
                with torch.no_grad():
                    old = self.teacher.model(batch["input_ids"], batch["attention_mask"])[:, :-1][predicting]
                lwf = logit_kl(logits[:, :-1][predicting], {"teacher_logits": old.float()}).sum()
                loss = loss + cfg.lwf_weight * lwf / n_tokens
                sums["lwf_kl"] = (lwf, n_tokens)
            return loss, sums
        sums["replay_ce"] = (ce, n_tokens)
        if does.distils_logits:
            distil = logit_kl if cfg.logit_loss == "kl" else logit_mse
            ld = distil(logits[:, :-1][predicting], batch).sum()
            if does.learns_inputs:   # LFPT5's + kd·KD: the KL summed over the vocabulary, per answer token
                loss = loss + cfg.lfpt5_kd * ld / n_tokens
            else:
                loss = cfg.lambda1 * loss + (1 - cfg.lambda1) * ld / n_tokens
            sums[f"logit_{cfg.logit_loss}"] = (ld, n_tokens)
        if probe is not None:
            ad, n_ad = self.attention_loss(probe, counts)
            loss = loss + cfg.lambda2 * ad / n_ad
            sums["attn_kl"] = (ad, n_ad)
        return loss, sums

    def attention_loss(self, probe, counts):
        """L_ad of this rank's samples as (sum, global divisor): the mean over the global batch's (sample, head,
        row) terms (`mean`), or the official per-layer batchmean (over each sample's heads × rows) divided by the
        micro-batch and averaged over the distilled layers (`official`). Eq. 12's plain sum would tie λ2 to B_H·B_T."""
        if self.cfg.ad_norm == "mean":
            return probe.total(), len(probe.pairs) * counts["rows"]
        return probe.layer_means().sum(), counts["samples"] * len(probe.kl)

    def penalty_grad(self, s: int) -> dict:
        """EWC's penalty gradient, added onto the shards' gradients before clipping; the penalty, logged."""
        return {"ewc": self.ewc.add_penalty_grad(self.engine)} if self.ewc else {}

    def end_task(self, s: int, train, pad_id: int):
        """θ_k is trained: LwF's teacher goes; EWC's Fisher on `ewc_samples` of the task's samples, and θ* = θ_k."""
        self.teacher = None
        if self.ewc:
            cfg = self.cfg
            picked = random.Random(f"{cfg.seed}-ewc-{s}").sample(range(len(train)), min(cfg.ewc_samples, len(train)))
            self.ewc.consolidate(self.engine, [device_batch([train[i]], pad_id, self.engine.device) for i in picked])

    def remember(self, s: int, path, trainer):
        pass

    def export(self, path):
        pass

    def save(self, path):
        """A resume point's files beyond the engine's: EWC's per-rank terms."""
        if self.ewc:
            self.ewc.save(Path(path) / f"ewc-rank{self.engine.rank:05d}.safetensors")

    def load(self, path):
        if self.ewc:
            self.ewc.load(Path(path) / f"ewc-rank{self.engine.rank:05d}.safetensors", self.engine.device)


class ParameterEfficient(FullFineTuning):
    """A method that trains its own module beside the frozen model (`pet.PET`: O-LoRA, PP, L2P, LFPT5, SAPT): its
    parameters in an AdamW replicated on every rank, a fresh one each task; its soft prompts, or SAPT's LoRA
    weights, chosen per input inside every forward."""

    def __init__(self, cfg, engine, tasks):
        super().__init__(cfg, engine, tasks)
        self.pet = pet.build(cfg, engine.model.args).to(engine.device).attach(engine.model)
        self.pending = None                 # a resumed AdamW state, for the next task's optimiser
        for task in tasks:   # what the pseudo-samples need, checked before training
            prompts = [r["prompt"] for r in task.train]
            if self.does.pseudo_replay and not pseudo.frame(prompts)[1]:
                raise InputError(f"task {task.name}: its prompts share no ending, so --method {cfg.method} cannot "
                                 f"tell a written input from its answer")
            if self.does.reflects and cfg.pseudo_inputs != "self":
                pseudo.released(cfg.pseudo_inputs, task.name, prompts)

    def start(self):
        """LoRA dropout's masks: a function of the seed and the rank (a resume restores the generator's state)."""
        torch.manual_seed(self.cfg.seed * 1000 + self.engine.rank)

    def begin_task(self, s: int, previous, at=None):
        """Task s's own parameters trainable (the earlier tasks' frozen) and a fresh AdamW for them; resumed inside
        the task, its moments too, else the run's step count."""
        super().begin_task(s, previous, at)
        cfg = self.cfg
        self.pet.begin_task(s, self.embedding_rows)
        self.optimiser = ReplicatedAdamW(self.pet.trainable(), cfg.betas, weight_decay=cfg.weight_decay,
                                         step=self.optimiser.step)
        if self.pending is not None:
            if at is not None and at.step > 0:
                self.optimiser.load_state_tensors(self.pending)
            else:
                self.optimiser.step = int(self.pending["step"])
            self.pending = None

    def forward(self, input_ids, attention_mask, probe=None, labels=None):
        """The logits of the model with its method's full forward: its soft prompts (or SAPT's weights), chosen from
        the prompt tokens as at generation (every real token without `labels`), read first; their rows dropped."""
        prompt = attention_mask.bool() if labels is None else attention_mask.bool() & (labels == -100)
        n = self.pet.n_prefix   # the prompts are read like tokens; their own outputs predict nothing
        mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], n), attention_mask], 1)
        choose = lambda embeddings, _: self.pet.choose(embeddings, prompt)   # noqa: E731
        return self.model(input_ids, mask, probe=probe, prefix=choose)[:, n:]

    def batch_terms(self) -> dict:
        return self.pet.batch_loss()

    def penalty_grad(self, s: int) -> dict:
        return self.pet.add_penalty_grad(s)

    def remember(self, s: int, path, trainer):
        """What the method keeps of task s from θ_k, exported at `path`, rather than from the task's data: LFPT5's
        R_k, samples θ_k writes, stored with θ_k's logits (`trainer.memory`); SAPT's w̄_k on held-out inputs and
        its pseudo-inputs (SAPT's released ones where `--pseudo-inputs` finds them, else written by θ_k), each
        pooled with EOS after it as SAPT's ARM reads them. Every rank writes the same samples (seeded)."""
        cfg, task, tok, rank = self.cfg, trainer.tasks[s], trainer.tok, self.engine.rank
        if not (self.does.pseudo_replay or self.does.reflects):
            return
        prompts = [r["prompt"] for r in task.train]
        inputs = None if self.does.pseudo_replay else \
            pseudo.released(cfg.pseudo_inputs, task.name, prompts, (trainer.spec or {}).get("data"))
        if inputs is None:
            if cfg.pseudo_inputs == "auto" and not self.does.pseudo_replay and rank == 0:
                tqdm.write(f"note: task {s} ({task.name}): no released pseudo-inputs for it in {pseudo.RELEASED}/ "
                           f"beside --data, so θ_{s + 1} writes them (as --pseudo-inputs self)", file=sys.stderr)
            model = trainer.exported_model(path)
            longest = max(len(tok.encode(r["prompt"] + r["answer"])) for r in task.train)
            wanted = max(1, round(cfg.replay_ratio * len(prompts)))
            samples = pseudo.generate_samples(model, tok, prompts, wanted, min(longest, cfg.max_len),
                                              cfg.seed * 1000 + s, answers=self.does.pseudo_replay)
            del model
            if len(samples) < wanted and rank == 0:   # what θ_k could not write is not kept: say so
                frame = "an input, their shared ending, an answer" if self.does.pseudo_replay else "an input"
                tqdm.write(f"warning: task {s} ({task.name}): θ_{s + 1} wrote {len(samples)} of {wanted} pseudo-"
                           f"samples in the frame of its prompts ({frame}); only those are kept", file=sys.stderr)
            if self.does.pseudo_replay:
                trainer.memory.write_records(s, samples, self.forward)
                return
            inputs = [r["prompt"] for r in samples]
        held_out = [r["prompt"] for r in task.eval or task.train]   # never the test split
        eos = self.embedding_rows(torch.tensor([tok.eos_id]))   # SAPT's ARM pools input + EOS (sapt.py)
        pseudo_rows = (torch.cat([x, eos.to(x)]) for x in self.prompt_embeddings(tok, inputs))
        self.pet.end_task(s, self.prompt_embeddings(tok, held_out), pseudo_rows)
        if rank == 0:   # the checkpoint's method file, with what it now keeps of task s
            self.pet.save(Path(path) / pet.FILE)

    def embedding_rows(self, ids):
        """Rows `ids` of the model's token embeddings, read from the engine (every rank iterates alike)."""
        for name, t in self.engine.full_tensors():
            if name == "model.embed_tokens.weight":
                return t[ids.to(t.device)].detach().clone()
        raise KeyError("model.embed_tokens.weight")

    def prompt_embeddings(self, tok, prompts):
        """Each prompt's frozen token embeddings (tokens, dim), as generation reads the prompt, one at a time."""
        if not prompts:   # the model wrote none (every rank alike)
            return iter(())
        ids = [torch.tensor(tok.prompt(p, self.cfg.max_prompt_len)) for p in prompts]
        unique, inverse = torch.cat(ids).unique(return_inverse=True)
        rows = self.embedding_rows(unique)
        return (rows[i] for i in inverse.split([len(x) for x in ids]))

    def export(self, path):
        """The method's file beside the checkpoint's weights (θ_0 is the bare model)."""
        if self.pet.tasks:
            self.pet.save(Path(path) / pet.FILE)

    def save(self, path):
        """Each rank's generator, and from rank 0 the method and its AdamW state (`pet.save_state`)."""
        pet.save_state(path, self.pet, self.optimiser, self.engine.rank, self.engine.device)

    def load(self, path):
        self.pending = pet.load_state(path, self.pet, self.engine.rank, self.engine.device)
