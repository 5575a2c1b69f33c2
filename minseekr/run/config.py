"""Settings: the continual-learning run's settings, the presets, and their flags.

Defaults are the paper's (Sec. 4.1, Appendix B, the equations as written). Each place where the authors' code
chooses differently is one field away, named after what it does; `--preset official` sets them all. A field's
`help` and `choices` become its flag's help text and allowed values (`add_flags`), so every entry point's
dataclass is its command line. Settings resolve in one visible order (`resolve`): the library's defaults, then
the method's authors' defaults where they differ (`METHOD_DEFAULTS`), then the task order's epochs, then a preset,
then the flags typed on the command line (the demo: the library's defaults, the method's authors', its own
settings, the typed flags).
"""
import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field, fields

from minseekr.methods.peft import PROJECTIONS
from minseekr.methods.table import METHODS
from minseekr.runtime import InputError, read_json


SIGNAL_DTYPES = ("bfloat16", "float16", "float32")
PRESETS = ("paper", "official")


# Ranges a numeric field may take: (test, the words an error shows). A list or tuple field applies it to each item.
POSITIVE, NONNEGATIVE, AT_LEAST_1, UNIT, BETA = ((lambda v: v > 0, "> 0"), (lambda v: v >= 0, "≥ 0"),
                                                  (lambda v: v >= 1, "≥ 1"), (lambda v: 0 <= v <= 1, "in [0, 1]"),
                                                  (lambda v: 0 <= v < 1, "in [0, 1)"))
# Seeds reach torch.manual_seed as seed·1000 + task (or rank), which must stay below 2^64.
SEED = (lambda v: 0 <= v < 2**32, "in 0..2^32−1")


def option(default, help, choices=None, check=None, per_task=False):
    """A config field with its flag's one-line help, and its allowed values or range (checked by `validate`).
    A `per_task` number takes one value or a list of one per task; one value is kept as a plain number, so a
    run's config.json (and its fingerprint) reads as it did before lists were allowed."""
    kwargs = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(**kwargs, metadata={"help": help, "choices": choices, "check": check, "per_task": per_task})


def validate(config) -> None:
    """Every field of a config dataclass has its declared type, one of its choices and a value in its range;
    otherwise an InputError names the flag, the value found and what was expected."""
    for f in fields(config):
        value, flag = getattr(config, f.name), "--" + f.name.replace("_", "-")
        kind = type(f.default_factory() if f.default is dataclasses.MISSING else f.default)
        per_task = f.metadata.get("per_task") and isinstance(value, (list, tuple))
        if per_task:   # one value per task; a single one is every task's, kept as a plain number
            if not value:
                raise InputError(f"{flag} needs at least one value")
            value = [float(v) if kind is float and type(v) is int else v for v in value]
            value, per_task = (value[0], False) if len(value) == 1 else (value, True)
            setattr(config, f.name, value)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            setattr(config, f.name, value)
        if kind in (list, tuple) and isinstance(value, (list, tuple)):
            value = kind(value)
            setattr(config, f.name, value)
        if per_task:
            if not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
                raise InputError(f"{flag} must be a {kind.__name__} or one per task, got {value!r}")
        elif not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise InputError(f"{flag} must be a {kind.__name__}, got {value!r}")
        allowed, check = f.metadata.get("choices"), f.metadata.get("check")
        if allowed and value not in allowed:
            raise InputError(f"{flag} must be one of {'|'.join(a for a in allowed if a)}, got {value!r}")
        items = value if kind in (list, tuple) or per_task else [value]
        if kind in (list, tuple) and not items:
            raise InputError(f"{flag} needs at least one value")
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            raise InputError(f"{flag} must be a finite number, got {value!r}")
        if check and not all(isinstance(v, (int, float)) and not isinstance(v, bool) and check[0](v) for v in items):
            raise InputError(f"{flag} must be {check[1]}, got {value!r}")


@dataclass
class ContinualConfig:
    method: str = option("seekr", "continual-learning method", tuple(METHODS))
    lr: float | list = option(1e-5, "AdamW learning rate, constant within a task: one value, or one per task "
                              "(default: 1e-05, the paper's 7B setting; olora 0.001 and pp 0.3, their authors')",
                              check=POSITIVE, per_task=True)
    weight_decay: float = option(0.0, "AdamW decoupled weight decay on matrices and embeddings (default: 0.0; pp "
                                 "1e-05, its authors')", check=NONNEGATIVE)
    betas: tuple = option((0.9, 0.95), "AdamW betas β1,β2 (default: 0.9,0.95, SEEKR's and TRACE's; olora, sapt and "
                          "pp default to 0.9,0.999, their authors')", check=BETA)
    clip: float = option(1.0, "global gradient-norm clip", check=POSITIVE)
    batch_size: int = option(16, "sequences per micro-step, summed over ranks", check=AT_LEAST_1)
    grad_accum: int = option(1, "micro-steps per optimiser step; the step's gradient is their mean", check=AT_LEAST_1)
    epochs: list = option([1], "epochs per task (one value repeats); default: the order's (Appendix B)",
                          check=AT_LEAST_1)
    max_len: int = option(1536, "training length: left truncation of BOS + prompt + answer + EOS", check=(
        lambda v: v >= 3, "≥ 3 (BOS, an answer token and EOS)"))
    replay_ratio: float = option(0.01, "|R_k| / |D_k|: the share of each task kept for replay", check=UNIT)
    replay_select: str = option("random", "R_k: a random draw (paper) or the first items of train.json (official)",
                                ("random", "first"))
    replay_rounding: str = option("round", "|R_k| = round(ratio·|D_k|) (nearest) or int(ratio·|D_k|) (floor: the "
                                  "official code)", ("round", "floor"))
    lambda1: float = option(0.5, "λ1 of Eq. 13: CE versus logit distillation on replayed samples", check=UNIT)
    lambda2: float = option(1e3, "λ2 of Eq. 13: the attention-distillation weight", check=NONNEGATIVE)
    layer_budget: int = option(24, "B_L: layers that may hold distilled heads (Eq. 11)", check=AT_LEAST_1)
    head_budget: int = option(128, "B_H: distilled heads (Eq. 11)", check=AT_LEAST_1)
    query_budget: int = option(100, "B_T: query rows distilled per sample; 0 = every row (the official script)",
                               check=NONNEGATIVE)
    head_score: str = option("both", "head ranking: I = S·F, or one factor, or random (Table 4's ablations)",
                             ("both", "sensitivity", "forgettability", "random"))
    importance: str = option("paper", "I = (Σ_k S̃^k)(Σ_k F^k) (paper, Eq. 8-10) or Σ_k S̃^k·F^k (official)",
                             ("paper", "official"))
    sensitivity_entries: str = option("valid", "∂L/∂A entries in S: causal and real (paper) or every entry (official)",
                                      ("valid", "all"))
    sensitivity_norm: str = option("frobenius", "S per sample: ‖∂L/∂A‖_F (paper, Eq. 7) or mean of squares (official)",
                                   ("frobenius", "mean_square"))
    forgettability_norm: str = option("frobenius", "F per sample: ‖ΔA‖_F (paper, Eq. 9) or mean of squares (official)",
                                      ("frobenius", "mean_square"))
    ad_norm: str = option("mean", "L_ad: mean over samples × heads × rows (mean), or per-layer batchmean, "
                          "÷ micro-batch, mean over layers (official)", ("mean", "official"))
    logit_loss: str = option("kl", "logit distillation: KL(teacher ‖ student) (Eq. 3) or MSE of logits (DER++'s)",
                             ("kl", "mse"))
    teacher_heads: str = option("selected", "heads stored per task: its own selection (official) or all (Eq. 12)",
                                ("selected", "all"))
    signal_dtype: str = option("bfloat16", "dtype of the buffer's teacher logits", SIGNAL_DTYPES)
    attn_dtype: str = option("", "dtype of the buffer's attention rows (empty: --signal-dtype)",
                             ("",) + SIGNAL_DTYPES + ("float8_e5m2",))
    logit_topk: int = option(0, "buffer logits: 0 = the whole vocabulary, k = the teacher's top k (+ the rest)",
                             check=NONNEGATIVE)
    lwf_weight: float = option(1.0, "lwf: weight of KL(θ_{k−1} ‖ θ) on the new task's answer tokens",
                               check=NONNEGATIVE)
    ewc_weight: float = option(1e4, "ewc: λ of the penalty (λ/2) Σ F (θ − θ*)²", check=NONNEGATIVE)
    ewc_samples: int = option(64, "ewc: samples of D_k for the diagonal Fisher", check=AT_LEAST_1)
    lora_targets: str = option("q_proj,v_proj", "olora, sapt: the projections a LoRA adapts (comma-separated)")
    lora_rank: int = option(8, "olora: the LoRA rank r (O-LoRA's scripts)", check=AT_LEAST_1)
    lora_alpha: float = option(32.0, "olora, sapt: LoRA's α; the update is scaled by α/r (O-LoRA's and SAPT's "
                               "scripts)", check=POSITIVE)
    lora_dropout: float = option(0.1, "olora: dropout on a projection's input while training, one mask shared by "
                                 "every task's LoRA (O-LoRA's)", check=BETA)
    olora_lambda1: float = option(0.5, "olora: λ1, the weight of Σ|A_old A_newᵀ| (O-LoRA's scripts)",
                                  check=NONNEGATIVE)
    olora_lambda2: float = option(0.0, "olora: λ2, the weight of the new LoRA's L2 norms (O-LoRA's scripts)",
                                  check=NONNEGATIVE)
    prompt_tokens: int = option(10, "soft-prompt vectors: pp's per task, lfpt5's one prompt's (default: 10; pp "
                                "20, TRACE's prefix_len)", check=AT_LEAST_1)
    prompt_bottleneck: int = option(0, "pp: b, the first width of the prompt's residual MLP d→b→b/2→d (TRACE's "
                                    "ResMLP 'MLP2'); 0 = 2·d, TRACE's", check=(lambda v: v == 0 or v >= 2,
                                                                               "0 or ≥ 2"))
    l2p_pool: int = option(10, "l2p: prompts in the pool, M (TRACE's training/main.py)", check=AT_LEAST_1)
    l2p_length: int = option(5, "l2p: vectors per prompt, L (TRACE's training/main.py)", check=AT_LEAST_1)
    l2p_top_k: int = option(3, "l2p: prompts read before an input, N (TRACE's L2P)", check=AT_LEAST_1)
    l2p_pull: float = option(0.5, "l2p: λ, the weight of the chosen keys' pull towards the query (TRACE's L2P)",
                             check=NONNEGATIVE)
    lfpt5_gen_weight: float = option(0.25, "lfpt5: λ_gen, the weight of the LM loss on every sample's prompt and "
                                     "answer (LFPT5's Classification.sh and parser)", check=NONNEGATIVE)
    lfpt5_kd: float = option(0.01, "lfpt5: kd in (1 − kd)·(CE + λ_gen·LM) + kd·KD, KD the KL to the stored "
                             "logits of replayed pseudo-samples (LFPT5's Classification.sh; their parser's default "
                             "is 0.05)", check=UNIT)
    sapt_rank: int = option(4, "sapt: each task's LoRA rank r (SAPT's gen_script_superni_llama.py; α is "
                            "--lora-alpha, 32 as theirs)", check=AT_LEAST_1)
    sapt_dropout: float = option(0.0, "sapt: dropout on a LoRA's input while training (SAPT's "
                                 "gen_script_superni_llama.py)", check=BETA)
    arm_weight: float = option(1.0, "sapt: λ_ARM, the weight of ARM's KL on pseudo-inputs (SAPT's --kl_ratio in "
                               "gen_script_superni_llama.py; run_llama.py's default is 0.5)", check=NONNEGATIVE)
    pseudo_inputs: str = option("auto", "sapt: the earlier tasks' pseudo-inputs. auto: SAPT's released ones (written "
                                "by a separate generator) from sapt-pseudo/<task>/pseudo.json beside the --data "
                                "folder, for each task that folder has; every other task's written by the model "
                                "itself (a note names it). self: all written by the model itself, after the task "
                                "(not SAPT's way), --replay-ratio of each task. A folder: its <task>/pseudo.json, "
                                "which every task must have")
    eval_samples: int = option(0, "test records scored per task (0 = the whole test set, as the paper)",
                               check=NONNEGATIVE)
    max_new_tokens: int = option(512, "generation length at evaluation (stops at EOS)", check=AT_LEAST_1)
    max_prompt_len: int = option(1024, "evaluation prompts: left truncation to this many tokens (BOS kept)",
                                 check=(lambda v: v >= 2, "≥ 2"))
    checkpoint_every: int = option(0, "optimiser steps between resume points inside a task (0: after tasks only)",
                                   check=NONNEGATIVE)
    seed: int = option(1234, "the seed of every draw", check=SEED)

    def __post_init__(self):
        validate(self)
        if len(self.betas) != 2:
            raise InputError(f"--betas takes two values β1,β2, got {len(self.betas)}: {self.betas}")
        targets = self.lora_targets.split(",")
        if not targets or any(t not in PROJECTIONS for t in targets) or len(set(targets)) != len(targets):
            raise InputError(f"--lora-targets must be distinct names among {','.join(PROJECTIONS)}, got "
                             f"{self.lora_targets!r}")
        if self.l2p_top_k > self.l2p_pool:
            raise InputError(f"--l2p-top-k {self.l2p_top_k} chooses more prompts than the pool holds "
                             f"(--l2p-pool {self.l2p_pool})")
        if self.logit_loss == "mse" and self.logit_topk:
            raise InputError("--logit-loss mse compares whole logit vectors: it needs --logit-topk 0 (full logits)")

    def lr_for(self, k: int) -> float:
        """Task k's learning rate: the one value, or the k-th of one per task."""
        return self.lr if isinstance(self.lr, float) else self.lr[k]


@dataclass
class GeneralSettings:
    """The general-ability flags (Table 2) that train.py and eval.py share."""
    general: str = option("", "general-ability benchmarks among mmlu,boolq,piqa,gsm8k,bbh, comma-separated: scored "
                          "on θ_0 and the last model (Table 2: GA and ΔGA; train.py at the end of the run, into "
                          "results.json; eval.py --model: that model)")
    general_data: str = option("", "the folder holding the benchmarks (default: ../shared/data/general beside the "
                               "project)")
    general_samples: int = option(0, "items per benchmark (0: all); MMLU takes ⌈N/57⌉ per subject, BBH ⌈N/27⌉ per "
                                  "task", check=NONNEGATIVE)
    general_max_new_tokens: int = option(256, "generation length of GSM8K and BBH", check=AT_LEAST_1)


@dataclass
class RunConfig(GeneralSettings):
    """train.py's own settings (run.json), beside the ContinualConfig of the run (config.json)."""
    model: str = option("", "HF checkpoint directory (config.json + safetensors); empty runs the demo")
    tokenizer: str = option("", "tokenizer.model (SentencePiece) or tokenizer.json (default: the one in MODEL)")
    data: str = option("", "folder holding the task folders")
    order: str = option("", "order1 | order2 | order3 | order4 (Table 5), or comma-separated task folder names")
    prompt_format: str = option("plain", "plain: TRACE's prompt text; chat: it as a user turn of the model's chat "
                                "template", ("plain", "chat"))
    out: str = option("runs/run", "run directory")
    preset: str = option("", "every setting as the paper (paper) or the authors' script (official) uses it; "
                         "typed flags still win", ("",) + PRESETS)
    device: str = option("", "cpu or cuda (default: cuda when a GPU is visible)", ("", "cpu", "cuda"))
    dtype: str = option("", "compute dtype (default: bfloat16 on GPUs, float32 on the CPU)",
                        ("", "float32", "bfloat16"))
    fsdp: str = option("minseekr", "training engine: the hand-written FSDP (minseekr) or PyTorch's FSDP2 (torch)",
                       ("minseekr", "torch"))
    activation_checkpointing: bool = option(False, "recompute each block in backward (long sequences, big models)")
    resume: str = option("", "continue this run directory from its latest resume point, with its own settings")
    threads: int = option(0, "torch CPU threads (0 = torch's default, recorded so that --resume uses the same)",
                          check=NONNEGATIVE)
    train_samples: int = option(0, "first N training records per task (0 = all): quick runs", check=NONNEGATIVE)
    test_samples: int = option(0, "first N test records per task kept in the run (0 = all)", check=NONNEGATIVE)
    demo_seeds: str = option("0", "demo only: comma-separated seeds to repeat the comparison over")
    demo_methods: str = option("seqft,replay,derpp,seekr", "demo only: comma-separated methods to compare (any "
                               "of --method's)")

    def __post_init__(self):
        validate(self)


def read_settings(file, cls):
    """A config dataclass from the JSON file a run wrote; a damaged or edited file is named."""
    settings = read_json(file, dict)
    try:
        return cls(**settings)
    except TypeError as e:
        raise InputError(f"{file} does not hold {cls.__name__}'s fields ({e})") from None
    except InputError as e:
        raise InputError(f"{file}: {e}") from None


# Each baseline's defaults where its authors' differ from the library's (SEEKR's), applied right after the library's
# defaults and before the order's epochs, a preset and the typed flags (`resolve`). The method's docstring names
# the sources and every setting left at the library's value:
# - olora: lr 1e-3 (scripts_llama/order_*.sh @a59baaa, every task; @ff73694 the first task only, olora.py) and the
#   betas of the HF Trainer's AdamW, to which their DeepSpeed configs leave them ("auto"). Weight decay 0 and clip
#   1.0, as the library's.
# - sapt: betas of the HF Trainer's AdamW (their configs/ds_configs/stage2.config holds no optimiser).
# - pp: lr 0.3, weight decay 1e-5 and transformers' AdamW betas (arazd/ProgressivePrompts' T5 README and
#   t5_continual.py `get_optimizer`); 20 prompt vectors per task (TRACE's training/main.py `prefix_len`).
METHOD_DEFAULTS = {
    "olora": dict(lr=1e-3, betas=(0.9, 0.999)),
    "sapt": dict(betas=(0.9, 0.999)),
    "pp": dict(lr=0.3, betas=(0.9, 0.999), weight_decay=1e-5, prompt_tokens=20),
}

# The settings each reading of the method uses, beyond what ContinualConfig's defaults already hold. The paper
# (Sec. 4.1): batch 128, lr 1e-5, λ1 0.5, λ2 1e3 at 1% replay and 1e2 at 10%, B_H 128, B_L 24 (8 for 13B
# models or 10% replay), B_T 100. The authors' script (reference notes §1-§8): the same optimiser and batch,
# λ2 1e3 everywhere, B_T = 0 (every row), the first 1% of train.json, and its own normalisations.
_OFFICIAL = dict(lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, clip=1.0, batch_size=16, grad_accum=8, max_len=1536,
                 replay_ratio=0.01, replay_select="first", replay_rounding="floor", lambda1=0.5, lambda2=1e3,
                 layer_budget=24, head_budget=128,
                 query_budget=0, importance="official", sensitivity_entries="all", sensitivity_norm="mean_square",
                 forgettability_norm="mean_square", ad_norm="official", logit_loss="kl", max_prompt_len=1024,
                 max_new_tokens=512, eval_samples=0)


def preset(name: str, replay_ratio: float, n_layers: int) -> dict:
    """The settings of `--preset paper|official` for a run at this replay ratio on a model of n_layers layers."""
    if name == "official":
        return dict(_OFFICIAL, replay_ratio=replay_ratio)
    if name != "paper":
        raise InputError(f"--preset must be one of {'|'.join(PRESETS)}, got {name!r}")
    ten_percent, thirteen_b = replay_ratio >= 0.1, n_layers == 40   # Vicuna-13B has 40 layers
    return dict(_OFFICIAL, replay_ratio=replay_ratio, replay_select="random", replay_rounding="round",
                lambda2=1e2 if ten_percent else 1e3,
                layer_budget=8 if ten_percent or thirteen_b else 24, query_budget=100, importance="paper",
                sensitivity_entries="valid", sensitivity_norm="frobenius", forgettability_norm="frobenius",
                ad_norm="mean")


def resolve(*layers: dict) -> ContinualConfig:
    """ContinualConfig from its defaults overridden by each layer in turn (later wins): for a run of train.py the
    method's authors' defaults (`METHOD_DEFAULTS`), the order's epochs, the preset, then the flags typed on the
    command line; for the demo the method's authors' defaults, its own settings, then the typed flags."""
    merged = {}
    for layer in layers:
        merged.update(layer)
    return ContinualConfig(**merged)


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One --flag per dataclass field, with the field's help, its choices and its default."""
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag, help = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if "default" not in help:
            help += f" (default: {','.join(map(str, default)) if isinstance(default, (list, tuple)) else default!r})"
        if f.metadata.get("per_task"):
            parser.add_argument(flag, default=default, help=help, metavar="A,B,...", type=_numbers)
        elif isinstance(default, (list, tuple)):
            kind = type(default[0]) if default else int
            parser.add_argument(flag, default=default, help=help, metavar="A,B,...",
                                type=lambda s, kind=kind: [kind(x) for x in s.split(",")])
        elif isinstance(default, bool):
            parser.add_argument(flag, default=default, help=help, metavar="{true,false}", type=_boolean)
        else:
            parser.add_argument(flag, default=default, type=type(default), help=help,
                                choices=[c for c in choices if c] if choices else None)


def _numbers(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def _boolean(text: str) -> bool:
    if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("1", "true", "yes")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (exit 2), not the usage block followed by it."""

    def error(self, message):
        if os.environ.get("RANK", "0") == "0":   # parsed before any process group: torchrun's rank 0 speaks
            print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def parser_for(prog: str, doc: str, *classes) -> argparse.ArgumentParser:
    """An entry point's parser: every field of `classes` a flag, no abbreviations (a typed flag is named in full,
    so that it can win over the presets and be refused on --resume)."""
    parser = Parser(prog=prog, description=doc, allow_abbrev=False,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in classes:
        add_flags(parser, cls)
    return parser


def typed_flags(argv) -> set:
    """The field names whose flags were typed on the command line (`--flag value` or `--flag=value`)."""
    return {a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")}


def from_flags(cls, ns, only=None):
    """The fields of `cls` from parsed flags: all of them, or a dict of those named in `only` (the typed ones)."""
    values = {f.name: getattr(ns, f.name) for f in fields(cls) if only is None or f.name in only}
    return values if only is not None else cls(**values)
