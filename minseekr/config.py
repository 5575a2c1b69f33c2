"""The continual-learning run's settings; every field is a train.py flag (underscores become dashes)."""
from dataclasses import dataclass, field

METHODS = ("seqft", "replay", "derpp", "seekr", "lwf", "ewc", "mtl")
SIGNAL_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class ContinualConfig:
    method: str = "seekr"             # seqft | replay | derpp | seekr | lwf | ewc | mtl
    lr: float = 1e-5                  # AdamW, constant (the paper's 7B setting)
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    clip: float = 1.0                 # global gradient-norm clip
    batch_size: int = 16              # sequences per micro-step, summed over ranks
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
    signal_dtype: str = "bfloat16"    # buffer logits dtype: bfloat16 | float16 | float32
    attn_dtype: str = ""              # buffer attention rows: signal_dtype if empty, or float8_e5m2 (half the bytes)
    logit_topk: int = 0               # buffer logits: 0 = the full vocabulary, k = the teacher's top k (+ the rest)
    lwf_weight: float = 1.0           # lwf: weight of KL(θ_{k−1} ‖ θ) on the new task's answer tokens
    ewc_weight: float = 1e4           # ewc: λ of the penalty (λ/2) Σ F (θ − θ*)²
    ewc_samples: int = 64             # ewc: samples of D_k for the diagonal Fisher
    eval_samples: int = 200           # test records per task (0 = all)
    max_new_tokens: int = 64
    checkpoint_every: int = 0         # optimiser steps between resume points inside a task (0: after tasks only)
    seed: int = 1234
    log_every: int = 10

    def __post_init__(self):
        choices = {"method": METHODS, "head_score": ("both", "sensitivity", "forgettability", "random"),
                   "teacher_heads": ("selected", "all"), "replay_select": ("random", "first")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {'|'.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        for name, allowed in (("signal_dtype", SIGNAL_DTYPES), ("attn_dtype", ("",) + SIGNAL_DTYPES + ("float8_e5m2",))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {'|'.join(a for a in allowed if a)}, "
                                 f"got {getattr(self, name)!r}")
        if not 0.0 <= self.replay_ratio <= 1.0:
            raise ValueError(f"--replay-ratio must be in [0, 1], got {self.replay_ratio}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"--batch-size and --grad-accum must be ≥ 1, got {self.batch_size}, {self.grad_accum}")
