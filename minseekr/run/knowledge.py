"""Continual knowledge learning on LAMA-ckl (TAALM's protocol): train θ on the to-learn facts' documents, epoch by
epoch, with a method's token weights, and score what it learnt and what it kept after every epoch.

    python train.py --knowledge ../shared/data/lama-ckl --model DIR --method taalm --out runs/ckl-taalm
    python train.py --knowledge ../shared/data/lama-ckl --resume runs/ckl-taalm

A run:
  1. The filter: θ_0 scores the variant facts and the invariant (descriptive) ones; TL = the first `learn` it
     scores 0 on, NF = the first `keep` it scores 1 on (`filter.json` keeps every score, and says how many remain).
  2. taalm: φ is meta-learned on episodes of facts disjoint from TL and NF (their evidence, their schematic probe:
     `knowledge.taalm.meta_loss`), identically on every rank, with resume points of its own, saved as
     phi.safetensors, then frozen (`phi.py`).
  3. Epoch 0 is θ_0's TL and NF accuracy. Each epoch trains θ (in the engine, every rank its share of each batch)
     on the TL evidence documents with the method's weighted loss, AdamW and a clip, then scores TL and NF again
     (metrics.jsonl). mixreview adds review documents to each batch, recadam steps with RecAdam
     (`knowledge/baselines.py`). A resume point follows every epoch; a resumed run's log goes back to it.
  4. results.json: the curves and the authors' table (Top Acc over the trained epochs 1..E, its Epoch, NF Acc
     there, Total Knowledge); curves.png with matplotlib.

What the run depends on (θ_0, the tokenizer, the three files, the settings) is fingerprinted, kept in filter.json,
φ's files and every resume point, and held against them on resume: a resume on other inputs is refused, naming them.
"""
import json
import math
import random
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from minseekr.engines.engine import export_hf, load_engine
from minseekr.knowledge.baselines import RecAdam, check_recadam, review_indices
from minseekr.knowledge.lama import FILES, held_out, load_facts, score_facts, split, summary
from minseekr.knowledge.taalm import TrainAttention
from minseekr.knowledge.weights import oracle_weights, rho1_weights, token_nll, weighted_loss
from minseekr.network.checkpoint import load_hf
from minseekr.network.tokenizer import Tokenizer, find_tokenizer
from minseekr.run.batches import index_batches, my_part
from minseekr.run.config import (AT_LEAST_1, NONNEGATIVE, POSITIVE, SEED, UNIT, from_flags, option, parser_for,
                                 read_settings, typed_flags, validate)
from minseekr.run.fingerprint import changes, digest, fingerprint
from minseekr.run.phi import train_phi
from minseekr.run.resume import LATEST, Position, latest_point, load_sharded, write_point
from minseekr.run.rundir import RunDir
from minseekr.runtime import InputError, all_reduce, atomic_write, disk_space, init_distributed, print0, read_json
from minseekr.seekr.buffer import device_batch

METHODS = ("finetune", "oracle", "rho1", "taalm", "mixreview", "recadam")
# Settings that say where things are, not what the run computes (paths are fingerprinted by content).
_PLACES = ("knowledge", "model", "tokenizer", "out", "resume", "threads")


@dataclass
class KnowledgeConfig:
    knowledge: str = option("", "the LAMA-ckl folder (variant.jsonl, invariant_descriptive.jsonl, "
                            "invariant_schematic.jsonl): continual knowledge learning instead of a task sequence")
    model: str = option("", "HF checkpoint directory of θ_0 (and of φ's trunk)")
    tokenizer: str = option("", "tokenizer.model or tokenizer.json (default: the one in MODEL)")
    out: str = option("runs/ckl", "run directory")
    resume: str = option("", "continue this run directory from its latest resume point, with its own settings")
    device: str = option("", "cpu or cuda (default: cuda when a GPU is visible)", ("", "cpu", "cuda"))
    fsdp: str = option("minseekr", "training engine for θ", ("minseekr", "torch"))
    threads: int = option(0, "torch CPU threads (0 = torch's default)", check=NONNEGATIVE)
    method: str = option("taalm", "token weights: finetune (uniform), oracle (the object's tokens), rho1 (top "
                         "excess loss against θ_0), taalm (the meta-learned φ); or finetune's with review documents "
                         "in each batch (mixreview) or RecAdam's recall of θ_0 (recadam)", METHODS)
    epochs: int = option(30, "epochs over the TL documents (the authors': 30)", check=AT_LEAST_1)
    lr: float = option(1e-4, "θ's AdamW learning rate (the authors': 1e-4)", check=POSITIVE)
    batch_size: int = option(8, "documents per optimiser step, summed over ranks", check=AT_LEAST_1)
    max_len: int = option(512, "document tokens kept (the authors': 512)", check=(lambda v: v >= 2, "≥ 2"))
    learn: int = option(500, "TL facts kept after the filter (0 = every one θ_0 scores 0 on)", check=NONNEGATIVE)
    keep: int = option(500, "NF facts kept after the filter (0 = every one θ_0 scores 1 on)", check=NONNEGATIVE)
    rho_fraction: float = option(0.6, "rho1: the share of each document's tokens trained", check=UNIT)
    review_ratio: float = option(1.0, "mixreview: review documents per document to learn in each batch, rounded "
                                 "and at least one (the authors': 1)", check=POSITIVE)
    review_pool: str = option("held-out", "mixreview: what is reviewed: held-out (the evidence of LAMA-ckl facts "
                              "outside TL and NF, text of the kind the model was pre-trained on) or nf (the NF facts' "
                              "own evidence, as the authors' script)", ("held-out", "nf"))
    recadam_k: float = option(0.5, "recadam: the slope k of λ(t) (the authors': 0.5)", check=POSITIVE)
    recadam_t0: float = option(250, "recadam: the step t0 where λ(t) = 1/2 (the authors': 250)", check=NONNEGATIVE)
    recadam_gamma: float = option(5000.0, "recadam: γ, the quadratic penalty's coefficient (the authors': 5000)",
                                  check=NONNEGATIVE)
    episodes: int = option(200, "taalm: φ's meta-training episodes, facts disjoint from TL and NF", check=AT_LEAST_1)
    phi_epochs: int = option(1, "taalm: passes over the episodes", check=AT_LEAST_1)
    phi_batch: int = option(16, "taalm: episodes per φ step (the authors': 16)", check=AT_LEAST_1)
    phi_lr: float = option(2e-4, "taalm: φ's AdamW learning rate, and the inner step's (the authors': 2e-4)",
                           check=POSITIVE)
    phi_lora: int = option(0, "taalm: 0 = φ trains whole; R = φ's trunk frozen with a LoRA of rank R on every "
                           "projection (the authors' φ: a LoRA of TinyLlama)", check=NONNEGATIVE)
    warmup_steps: int = option(1, "taalm: inner AdamW steps before the differentiable one (the authors' code: 1)",
                               check=NONNEGATIVE)
    inner_layers: int = option(0, "taalm: the inner step updates the last N blocks of θ only (0 = every parameter; "
                               "the authors update a LoRA of every layer): second-order memory grows with what it "
                               "updates", check=NONNEGATIVE)
    phi_checkpoint_every: int = option(10, "taalm: φ steps between φ's resume points (0: none; a crash then "
                                       "meta-trains φ again)", check=NONNEGATIVE)
    eval_batch: int = option(16, "probes per forward when scoring", check=AT_LEAST_1)
    seed: int = option(0, "shuffling and φ's episodes", check=SEED)

    def __post_init__(self):
        validate(self)
        if self.method == "recadam":
            check_recadam(self.lr, self.recadam_gamma)


def picked(chosen: dict, facts: dict, file) -> list[list]:
    """[TL, NF] as filter.json (`file`) names them: from variant.jsonl and invariant_descriptive.jsonl."""
    out = []
    for key, kind in (("learn", "variant"), ("keep", "descriptive")):
        by_id = {f.uuid: f for f in facts[kind]}
        if missing := [u for u in chosen.get(key, []) if u not in by_id]:
            raise InputError(f"{file}: {key} names {missing[0]!r}, which {FILES[kind]} does not hold")
        out.append([by_id[u] for u in chosen.get(key, [])])
    return out


def data_digests(facts: dict) -> dict:
    """Each LAMA-ckl file's digest, as the run's fingerprint keeps it."""
    return {kind: digest([asdict(f) for f in group]) for kind, group in facts.items()}


def documents(tok, facts, cfg):
    """Each fact's evidence as tokens (BOS first, cut to max_len) and, for the oracle, its object mask."""
    out = []
    for fact in facts:
        ids, w = oracle_weights(tok, fact.evidence, fact.object)
        out.append({"input_ids": torch.tensor(ids[:cfg.max_len]), "oracle": torch.tensor(w[:cfg.max_len - 1])})
    return out


class KnowledgeTrainer:
    """One continual-knowledge-learning run into `run_dir` (see the module docstring)."""

    def __init__(self, cfg: KnowledgeConfig, run_dir, device: str = ""):
        self.cfg, self.run = cfg, RunDir(run_dir)
        root = Path(cfg.knowledge)
        self.facts = {kind: load_facts(root / name) for kind, name in FILES.items()}
        self.tok = Tokenizer(cfg.tokenizer or find_tokenizer(cfg.model))
        self.rank, self.world, self.device = init_distributed(device)
        dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.engine = load_engine(cfg.model, cfg.fsdp, device=self.device, compute_dtype=dtype,
                                  betas=(0.9, 0.999), weight_decay=0.01)
        self.model = self.engine.model
        if cfg.max_len > self.model.args.max_seq_len:
            raise InputError(f"--max-len {cfg.max_len}: {cfg.model} has {self.model.args.max_seq_len} positions")
        self.knowledge_file = self.run.root / "knowledge.json"
        # What the run depends on (θ_0, tokenizer, the three files, the settings), held against every file it
        # reads back on resume: filter.json, φ's files and the resume points.
        self.fingerprint = fingerprint(self.engine, self.tok, [], {k: v for k, v in asdict(cfg).items()
                                                                   if k not in _PLACES}, None)
        self.fingerprint["tasks"] = data_digests(self.facts)

    def held_to(self, recorded, file):
        """Refuse `file`, written by a run with other inputs than this one's."""
        if changed := changes(recorded or {}, self.fingerprint):
            raise InputError(f"{file} was written for other inputs than this run has: {'; '.join(changed)}; "
                             f"restore them, or start a new run")

    def log(self, record):
        if self.rank == 0:
            with disk_space(self.run.metrics), self.run.metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def accuracy(self, facts) -> float:
        """Mean score over `facts`; every rank runs every forward (the engine gathers collectively)."""
        if not facts:   # no known fact kept (a small model): NF is reported as null
            return None
        return sum(score_facts(self.model, self.tok, facts, batch_size=self.cfg.eval_batch,
                               progress=self.rank == 0)) / len(facts)

    def filter(self):
        """TL and NF for θ_0, kept in filter.json (read back on resume)."""
        file = self.run.root / "filter.json"
        variant, known = self.facts["variant"], self.facts["descriptive"]
        if file.is_file():
            chosen = read_json(file, dict)
            self.held_to(chosen.get("fingerprint"), file)
        else:
            s_var = score_facts(self.model, self.tok, variant, batch_size=self.cfg.eval_batch, progress=self.rank == 0)
            s_known = score_facts(self.model, self.tok, known, batch_size=self.cfg.eval_batch, progress=self.rank == 0)
            learn, keep = (group[:n or None] for group, n in zip(
                (split(variant, s_var)[0], split(known, s_known)[1]), (self.cfg.learn, self.cfg.keep)))
            chosen = {"learn": [f.uuid for f in learn], "keep": [f.uuid for f in keep],
                      "variant_scores": s_var, "descriptive_scores": s_known, "fingerprint": self.fingerprint}
            if self.rank == 0:
                atomic_write(file, lambda tmp: tmp.write_text(json.dumps(chosen)))
            print0(f"filter: θ_0 scores 0 on {sum(s == 0 for s in s_var)} of {len(variant)} facts to learn and 1 on "
                   f"{sum(s == 1 for s in s_known)} of {len(known)} known facts; kept {len(chosen['learn'])} TL, "
                   f"{len(chosen['keep'])} NF")
        return picked(chosen, self.facts, file)

    def phi(self, evaluated: list, rewind: bool) -> TrainAttention:
        """taalm's φ (`phi.py`), meta-learned on facts held out from `evaluated` (TL and NF, and their evidence)."""
        pool = held_out([f for kind in ("variant", "schematic", "descriptive") for f in self.facts[kind]], evaluated)
        return train_phi(self.cfg, self.run, self.tok, pool, self.device, self.rank, self.log, rewind,
                         (self.fingerprint, self.held_to))

    def weights(self, batch, phi):
        """The method's w (B, S−1) for a batch of TL documents."""
        method, mask = self.cfg.method, batch["attention_mask"]
        if method == "oracle":
            return batch["oracle"].to(torch.float32)
        if method == "taalm":
            with torch.no_grad():
                return phi.weights(batch["input_ids"], mask)
        w = mask[:, 1:].to(torch.float32)
        if method == "rho1":
            with torch.no_grad():
                nll = token_nll(self.model(batch["input_ids"], mask), batch["input_ids"])
            w = rho1_weights(nll, batch["reference"], self.cfg.rho_fraction, mask)
        return w

    def run_all(self, resume=False):
        cfg = self.cfg
        with self.run.claimed(self.rank, resume, {} if resume else {self.knowledge_file: asdict(cfg)}):
            learn, keep = self.filter()
            if not learn:
                raise InputError("no fact to learn: θ_0 scores above 0 on every variant fact")
            docs, review = self.documents(learn), self.review(learn, keep) if cfg.method == "mixreview" else []
            recall = RecAdam(self.engine, cfg.recadam_k, cfg.recadam_t0, cfg.recadam_gamma) \
                if cfg.method == "recadam" else None   # anchored at θ_0, before a resume point is loaded
            curves, start, point = {"tl": [], "nf": []}, 0, resume and (self.run.resume / LATEST).is_file()
            if point:   # the log goes back to the point; without one, to φ (`phi.py`), or to nothing
                state = load_sharded(self.engine, latest_point(self.run.resume))
                self.held_to(state.get("fingerprint"), latest_point(self.run.resume))
                curves, start = state["curves"], state["epoch"]
            if resume and self.rank == 0 and (point or cfg.method != "taalm"):
                self.run.rewind_log(state if point else None)
            phi = self.phi(learn + keep, resume and not point) if cfg.method == "taalm" else None
            if not curves["tl"]:
                curves = {"tl": [self.accuracy(learn)], "nf": [self.accuracy(keep)]}
                self.log({"epoch": 0, "tl": curves["tl"][0], "nf": curves["nf"][0]})
            for epoch in range(start, cfg.epochs):
                self.train_epoch(epoch, docs + review, len(docs), phi, recall)
                curves["tl"].append(self.accuracy(learn))
                curves["nf"].append(self.accuracy(keep))
                self.log({"epoch": epoch + 1, "tl": curves["tl"][-1], "nf": curves["nf"][-1]})
                write_point(self.run.resume, Position(0, epoch + 1), self.engine,
                            {"curves": curves, "fingerprint": self.fingerprint, **self.run.log_mark()})
            results = {"method": cfg.method, "learn": len(learn), "keep": len(keep), **curves,
                       **summary(curves["tl"], curves["nf"]),
                       "documents_without_object": sum(not d["oracle"].any().item() for d in docs)}
            self.export()
            if self.rank == 0:
                atomic_write(self.run.results, lambda tmp: tmp.write_text(json.dumps(results, indent=1)))
                draw_curves(self.run.root / "curves.png", {cfg.method: curves})
            return results

    def documents(self, learn):
        """The TL documents; for rho1 with θ_0's own token losses, the reference, taken before any training."""
        docs = documents(self.tok, learn, self.cfg)
        if empty := sum(not d["oracle"].any().item() for d in docs):
            print0(f"{empty} of {len(docs)} TL documents hold no token of their object within --max-len "
                   f"{self.cfg.max_len}: the oracle's weights are 0 on them")
        if self.cfg.method == "rho1":
            for d in docs:
                with torch.no_grad():
                    ids = d["input_ids"][None].to(self.device)
                    d["reference"] = token_nll(self.model(ids), ids)[0].cpu()
        return docs

    def review(self, learn, keep):
        """Mix-Review's documents: held-out known facts' evidence, or the NF facts' own (`--review-pool nf`)."""
        facts = keep if self.cfg.review_pool == "nf" else held_out(
            self.facts["schematic"] + self.facts["descriptive"], learn + keep)
        if not facts:
            raise InputError(f"--review-pool {self.cfg.review_pool}: no document to review")
        print0(f"mix-review: {len(facts)} documents to review ({self.cfg.review_pool}), {self.cfg.review_ratio:g} "
               f"per document to learn in each batch (rounded, at least one)")
        return documents(self.tok, facts, self.cfg)

    def export(self):
        """θ after the last epoch as an HF directory with its tokenizer (checkpoints/final), for eval.py."""
        path = self.run.root / "checkpoints" / "final"
        export_hf(self.engine, path, dtype=self.engine.compute_dtype)
        if self.rank == 0:
            for file in self.tok.files:
                atomic_write(path / file.name, lambda tmp, file=file: shutil.copyfile(file, tmp))

    def train_epoch(self, epoch, docs, n_learn, phi, recall):
        """One epoch over docs[:n_learn] (TL) in seeded batches; Mix-Review adds docs[n_learn:] to each batch."""
        cfg = self.cfg
        self.model.train()
        batches = index_batches(n_learn, cfg.batch_size, random.Random(f"{cfg.seed}-{epoch}"))
        if len(docs) > n_learn:
            extra = review_indices([len(b) for b in batches], len(docs) - n_learn, cfg.review_ratio,
                                   random.Random(f"{cfg.seed}-review-{epoch}"))
            batches = [b + [n_learn + r for r in e] for b, e in zip(batches, extra)]
        for idx in tqdm(batches, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", leave=False,
                        disable=self.rank != 0):
            part, weight = my_part(idx, self.rank, self.world)
            batch = device_batch([{"input_ids": docs[i]["input_ids"], "labels": docs[i]["input_ids"]} for i in part],
                                 self.tok.pad_id, self.device)
            S = batch["input_ids"].shape[1]
            for key in ("oracle", "reference"):
                if key in docs[part[0]]:
                    batch[key] = torch.stack([torch.nn.functional.pad(docs[i][key], (0, S - 1 - len(docs[i][key])))
                                              for i in part]).to(self.device)
            w = self.weights(batch, phi)
            loss = weighted_loss(self.model(batch["input_ids"], batch["attention_mask"]), batch["input_ids"], w,
                                 batch["attention_mask"]).sum()
            (loss * weight * self.world / len(idx)).backward()
            norm = float(self.engine.clip_grad_norm_(1.0))
            if not math.isfinite(norm):
                raise InputError(f"epoch {epoch + 1}: the gradient norm is {norm}; nothing of this step was applied")
            (recall.step if recall else self.engine.optimizer_step)(cfg.lr)
            self.engine.zero_grad()
            total = all_reduce(loss.detach() * weight).item() / len(idx)   # the global batch's mean
            self.log({"epoch": epoch + 1, "loss": total, "grad_norm": norm, "step": self.engine.step})
        self.model.eval()


def main(argv):
    """train.py's continual-knowledge-learning mode (`--knowledge DIR`)."""
    parser = parser_for("train.py", __doc__, KnowledgeConfig)
    cfg = from_flags(KnowledgeConfig, parser.parse_args(argv))
    typed = typed_flags(argv)
    if cfg.resume:
        run = RunDir(cfg.resume)
        if not (run.root / "knowledge.json").is_file():
            parser.error(f"--resume {run.root}: knowledge.json not found (a run of train.py --knowledge ...)")
        cfg = read_settings(run.root / "knowledge.json", KnowledgeConfig)
        cfg.resume, cfg.out = str(run.root), str(run.root)
        if changed := sorted(typed - {"resume", "threads", "knowledge"}):
            parser.error(f"--resume continues {run.root} with its own settings; drop --{', --'.join(changed)}")
    if not cfg.model:
        parser.error("--knowledge needs --model DIR")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.knowledge, cfg.model = str(Path(cfg.knowledge).resolve()), str(Path(cfg.model).resolve())
    results = KnowledgeTrainer(cfg, cfg.out, cfg.device).run_all(resume=bool(cfg.resume))
    nf = "— (no NF fact kept)" if results["nf_acc"] is None else f"{results['nf_acc']:.3f}"
    print0(f"{cfg.method}: Top Acc {results['top_acc']:.3f} (epoch {results['epoch']}), NF Acc {nf}, Total "
           f"Knowledge {results['total_knowledge']:.3f} ({results['learn']} TL, {results['keep']} NF facts)",
           file=sys.stderr)


def draw_curves(path, runs: dict) -> bool:
    """TL and NF accuracy after each epoch (0: θ_0), one line per run {name: curves}, if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharex=True)
    for name, curves in runs.items():
        for ax, key in zip(axes, ("tl", "nf")):
            if None not in curves[key]:
                ax.plot(range(len(curves[key])), curves[key], marker="o", ms=3, label=name)
    for ax, title in zip(axes, ("to learn (TL)", "not to forget (NF)")):
        ax.set(xlabel="epoch", ylabel="accuracy", title=title)
        if ax.lines:   # NF has no line where no known fact was kept
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


def evaluate(run_dir, batch_size: int = 16) -> dict:
    """eval.py on a run of this mode: θ_0 and the final θ re-scored on the run's own TL and NF facts."""
    run = RunDir(run_dir)
    for file in (run.root / "knowledge.json", run.root / "filter.json", run.root / "checkpoints" / "final"):
        if not file.exists():
            raise InputError(f"{file} not found: not a finished run of train.py --knowledge ...")
    cfg = read_settings(run.root / "knowledge.json", KnowledgeConfig)
    chosen = read_json(run.root / "filter.json", dict)
    facts = {kind: load_facts(Path(cfg.knowledge) / name) for kind, name in FILES.items()}
    if chosen.get("fingerprint", {}).get("tasks") != data_digests(facts):
        raise InputError(f"{cfg.knowledge}: its files are not those the run was trained and filtered on (edited "
                         f"since?); restore them to re-score the run")
    learn, keep = picked(chosen, facts, run.root / "filter.json")
    tok = Tokenizer(cfg.tokenizer or find_tokenizer(cfg.model))
    out = {}
    for name, folder in (("θ_0", cfg.model), ("final", run.root / "checkpoints" / "final")):
        model = load_hf(folder)
        mean = lambda s: sum(s) / len(s) if s else None   # noqa: E731
        out[name] = {"tl": mean(score_facts(model, tok, learn, batch_size=batch_size)),
                     "nf": mean(score_facts(model, tok, keep, batch_size=batch_size))}
        print(f"{name:6s} TL {out[name]['tl']:.3f}  NF " +
              ("—" if out[name]["nf"] is None else f"{out[name]['nf']:.3f}") + f"  ({len(learn)} TL, {len(keep)} NF)")
    return out
