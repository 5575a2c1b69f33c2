"""O-LoRA (Wang et al., 2023, "Orthogonal Subspace Learning for Language Model Continual Learning").

Each task k gets a new LoRA on the frozen model; the LoRAs of earlier tasks stay, frozen, and every LoRA acts at
once (their updates add). The new one is pushed out of the earlier ones' subspaces:

    L = CE + λ1 · Σ_{old t} Σ_{layer, projection} Σ |A_t A_kᵀ|  +  λ2 · Σ_{new parameters} ‖p‖₂

The penalty is the authors' (`uie_trainer_lora.py`): the entries' absolute values of A_t A_kᵀ (r × r) summed,
and an L2 norm (not squared) of each new tensor. Defaults are their LLaMA scripts': q_proj and v_proj, r = 8,
α = 32, dropout 0.1, lr 1e-3, λ1 = 0.5, λ2 = 0. With one set of weights for every sample the LoRAs fold exactly
into W (`LoRABank.merged`).
"""
import torch

from minseekr.peft import LoRA, LoRABank, PETMethod, load_method, read_method


class OLoRA(PETMethod):
    def __init__(self, args, targets=("q_proj", "v_proj"), rank=8, alpha=32.0, dropout=0.1, lambda1=0.5,
                 lambda2=0.0, seed=0):
        super().__init__()
        self.args, self.targets, self.rank, self.alpha, self.dropout = args, tuple(targets), rank, alpha, dropout
        self.lambda1, self.lambda2, self.seed = lambda1, lambda2, seed
        self.bank = LoRABank()

    @classmethod
    def from_config(cls, args, cfg):
        return cls(args, cfg.lora_targets.split(","), cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                   cfg.olora_lambda1, cfg.olora_lambda2, cfg.seed)

    def begin_task(self, k: int, embedding_rows=None):
        """Task k's LoRA, new and trainable; every earlier one frozen."""
        for lora in self.bank.loras:
            lora.requires_grad_(False)
        while len(self.bank.loras) <= k:   # on resume the earlier tasks' LoRAs are already loaded
            with torch.random.fork_rng(devices=[]):   # the same A on every rank, whatever ran before
                torch.manual_seed(self.seed * 1000 + len(self.bank.loras))
                self.bank.add(LoRA(self.args, self.targets, self.rank, self.alpha, self.dropout))
        self.bank.loras[k].requires_grad_(True)

    @property
    def tasks(self) -> int:
        """Tasks with a LoRA so far (0: the bare model, nothing to save)."""
        return len(self.bank.loras)

    def attach(self, model):
        self.bank.attach(model, self.targets)
        return self

    def penalty(self, k: int) -> dict:
        """O-LoRA's terms for task k's LoRA: λ1 · orthogonality to every earlier LoRA, λ2 · its norms."""
        new, old = self.bank.loras[k], self.bank.loras[:k]
        orth = sum((o.A[key] @ new.A[key].t()).abs().sum() for o in old for key in new.A) if old else \
            torch.zeros(())
        norms = sum(p.norm(p=2) for p in new.parameters())
        return {"orth": self.lambda1 * orth, "l2": self.lambda2 * norms}

    def add_penalty_grad(self, k: int) -> dict:
        """Add the penalty's gradient to the parameters' (once per optimiser step); returns its logged values."""
        terms = self.penalty(k)
        total = sum(terms.values())
        if total.requires_grad:
            total.backward()
        return {f"olora_{name}": float(v.detach()) for name, v in terms.items()}

    def info(self) -> dict:
        return {"method": "olora", "tasks": self.tasks, "targets": list(self.targets), "rank": self.rank,
                "alpha": self.alpha, "dropout": self.dropout, "lambda1": self.lambda1, "lambda2": self.lambda2}

    @classmethod
    def load(cls, path, args):
        """An O-LoRA written by `save`, every task's LoRA frozen."""
        info, _ = read_method(path, tensors=False)
        method = cls(args, info["targets"], info["rank"], info["alpha"], info["dropout"], info["lambda1"],
                     info["lambda2"])
        method.begin_task(info["tasks"] - 1)
        load_method(method, path)
        return method.requires_grad_(False)
