"""O-LoRA (Wang et al., 2023, "Orthogonal Subspace Learning for Language Model Continual Learning").

Each task k gets a new LoRA on the frozen model; the LoRAs of earlier tasks stay, frozen, and every LoRA acts at
once (their updates add). The new one is pushed out of the earlier ones' subspaces:

    L = CE + λ1 · Σ_{old t} Σ_{layer, projection} Σ |A_t A_kᵀ|  +  λ2 · Σ_{new parameters} ‖p‖₂

This follows the authors' code (cmnfriend/O-LoRA): the penalty of `src/uie_trainer_lora.py`
`UIETrainer.training_step`, the entries' absolute values of A_t A_kᵀ (r × r) summed and an L2 norm (not squared)
of each new tensor; the LoRA of `src/peft/tuners/lora.py` (@2a2e620) `Linear.forward`, where the stacked earlier
LoRAs and the new one read the same dropped-out input (one dropout mask per projection and forward, `LoRABank`),
each scaled by α/r, a new A kaiming-uniform and B zero; the LLaMA branch of `src/run_uie_lora.py`: r = 8, α = 32,
dropout 0.1, on q_proj and v_proj (PEFT's default targets for LLaMA); and `scripts_llama/order_*.sh`: λ1 = 0.5,
λ2 = 0, a constant rate without warmup, one epoch per task, the HF Trainer's AdamW (their DeepSpeed configs leave
its settings "auto": betas (0.9, 0.999), eps 1e-8, weight decay 0, clip 1.0; here the betas through
`config.METHOD_DEFAULTS`, the rest the library's). With one set of weights for every sample the LoRAs fold
exactly into W (`LoRABank.merged`).

Their learning rate and batch, in the two stored versions of `scripts_llama/order_{1,2,3}.sh`:
- @a59baaa: `--learning_rate 1e-03` for every task of all three orders; 4 per GPU × 1 accumulation step × 8 GPUs
  (32); `configs/ds_configs/stage2.config` (ZeRO-2).
- @ff73694: `--learning_rate 1e-03` for the first task and `1e-04` for the three later ones, in all three orders;
  1 per GPU × 8 accumulation steps × 8 GPUs (64); `configs/ds_configs/stage2_llama.config` (ZeRO-2, the optimiser
  offloaded to the CPU). Its scripts' header comments run them as the README's LLaMA commands do (@d8315ce:
  `scripts_llama/...> logs_and_outputs_llama/...`), but the index does not say which commit came later.
olora's default here is 1e-3 for every task (a59baaa's, and the first task's in both); `--lr 1e-3,1e-4,1e-4,1e-4`
gives ff73694's.

Where this differs from theirs, with their values:
- The batch is the run's `--batch-size` (16 by default): theirs is 32 (a59baaa) or 64 (ff73694).
- The epochs are the order's (`--epochs`): theirs 1 per task.
- The penalty is added once per optimiser step; theirs at every micro-step (`training_step`), the same with
  a59baaa's one accumulation step (ff73694's eight not checked).
- Each task's A is drawn from the run's seed and the task (the same on every rank); their code stacks the earlier
  tasks' A into one matrix (`src/peft/utils/save_and_load.py`, `torch.cat(..., dim=0)`), which is the same sum.
- One process or ranks of a sharded engine, in fp32 or bf16 (`--dtype`); theirs DeepSpeed ZeRO-2 on 8 GPUs.
"""
import torch

from minseekr.methods.peft import LoRA, LoRABank, PETMethod, load_method, read_method


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
