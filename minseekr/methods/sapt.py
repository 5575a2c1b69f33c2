"""SAPT (Zhao et al., ACL 2024, "SAPT: A Shared Attention Framework for Parameter-Efficient Continual Learning of
Large Language Models"): one LoRA per task, mixed per input by an attention over the tasks, kept in place by
replaying pseudo-inputs of earlier tasks through that attention.

SALS, the selection. Task t has a LoRA on q_proj and v_proj and a key k_t (dim). An input's query is its frozen
token embeddings max-pooled over its prompt tokens, through a small transform f (Linear d→100, Linear 100→d, SiLU,
LayerNorm, without biases in the linears); its weights over the s + 1 tasks seen so far are

    w(x) = softmax_t( k_t · f(maxpool E(x)) / √d ),      h_q/v += Σ_t w_t(x) · (α/r) B_t A_t h

the same vector for every layer, for q and v, and for every generated token. While task s trains, its LoRA, its
key and f train; earlier LoRAs and keys are frozen. No task id is needed at inference.

ARM, the reflection. After task j, its mean weight vector w̄_j over held-out inputs of task j is saved. While a
later task s trains, pseudo-inputs of each earlier task j pass through the selection alone (no model forward) and

    L_ARM = λ_ARM · Σ_{j<s} mean_x KL( [w̄_j ; 0] ‖ w(x) )          (w̄_j padded with zeros for tasks after j)

pulls their weights back (only f and the current key feel it). A pseudo-input's query is its prompt tokens
followed by EOS, as theirs (`LlamaForCausalLM.memory_replay` pools `input_ids`, the input with its empty label and
EOS), while routing, and so w̄_j, pools the prompt alone (their `input_ids_wo_label`).

Pseudo-inputs (`--pseudo-inputs`, `pseudo.released`): SAPT's are written by a generator trained apart from the
continual learner and released with their code; by default (`auto`) the project's copy is read from
`sapt-pseudo/<task>/pseudo.json` beside the `--data` folder. For a task it lacks, or with `self`, θ_j writes
them after task j (`pseudo.generate_samples`, `--replay-ratio` of the task): not SAPT's way.

The authors' code followed: `src/llama_prompt.py` (`LlamaModel.forward`, `cal_attention`,
`LlamaForCausalLM.memory_replay`), `src/cl_trainer.py` (`training_step`), `src/cl_collator.py` (`decoder_call`),
`src/run_llama.py` and `gen_script_superni_llama.py`: r = 4, α = 32, dropout 0, hidden width 100, keys uniform in
[−1, 1], λ_ARM = 1 (their script's `--kl_ratio`; run_llama.py's default is 0.5). Where this differs (their value;
why):
- Padding does not enter the max-pool (theirs pools left padding, whose pad id is BOS's): a query should not
  depend on the batch it is in.
- w̄_j is the mean over the held-out inputs of their weight vectors: the task's eval split, or its training prompts
  where it has none (theirs: during `trainer.predict` on the dev split, each forward appends its batch's mean
  vector, one per generation step, and the saved vector is the mean of those, so a batch weighs by how many steps
  it generated, and with several GPUs only rank 0's share is kept): a per-input mean does not depend on the batch
  size, the ranks or the lengths generated.
- ARM is one term per optimiser step over every stored pseudo-input of every earlier task (theirs: a batch of 2
  per earlier task at every micro-batch after the first optimiser step).
- Training: `--lr`, `--epochs`, `--batch-size`, `--betas`, the last LoRAs kept (theirs: lr 5e-5, constant, for 50
  epochs; batch 32 (2 per device × 4 accumulation steps × 4 GPUs); HF's AdamW with betas (0.9, 0.999), eps 1e-8,
  weight decay 0 and clip 1.0; `--load_best_model_at_end` with the dev ROUGE-L evaluated every 5 epochs).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minseekr.methods.peft import LoRA, LoRABank, PETMethod, load_method, read_method

HIDDEN = 100   # the transform's width (their `trans_hidden_dim`)


class SAPT(PETMethod):
    def __init__(self, args, targets=("q_proj", "v_proj"), rank=4, alpha=32.0, dropout=0.0, arm_weight=1.0,
                 seed=0):
        super().__init__()
        self.args, self.targets, self.rank, self.alpha, self.dropout = args, tuple(targets), rank, alpha, dropout
        self.arm_weight, self.seed = arm_weight, seed
        self.bank = LoRABank()
        self.keys = nn.ParameterList()
        with torch.random.fork_rng(devices=[]):   # the same transform on every rank
            torch.manual_seed(seed * 1000 - 1)
            self.transform = nn.Sequential(nn.Linear(args.dim, HIDDEN, bias=False),
                                           nn.Linear(HIDDEN, args.dim, bias=False), nn.SiLU(), nn.LayerNorm(args.dim))
        # Each finished task j keeps two buffers: anchor{j}, w̄_j (j + 1,), and pseudo{j}, its pseudo-inputs'
        # pooled embeddings (n_j, dim).

    @classmethod
    def from_config(cls, args, cfg):
        return cls(args, cfg.lora_targets.split(","), cfg.sapt_rank, cfg.lora_alpha, cfg.sapt_dropout,
                   cfg.arm_weight, cfg.seed)

    @property
    def device(self):
        """Where the method's parameters are (moved with the model)."""
        return self.transform[0].weight.device

    @property
    def tasks(self) -> int:
        return len(self.bank.loras)

    def begin_task(self, k: int, embedding_rows=None):
        """Task k's LoRA and key, new and trainable (with the transform); earlier ones frozen."""
        for p in self.parameters():
            p.requires_grad_(False)
        while self.tasks <= k:   # on resume the earlier tasks' LoRAs and keys are already loaded
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1000 + self.tasks)
                lora = LoRA(self.args, self.targets, self.rank, self.alpha, self.dropout)
                key = torch.empty(self.args.dim).uniform_(-1, 1)
            self.bank.add(lora.to(self.device))
            self.keys.append(nn.Parameter(key.to(self.device)))
        for p in (*self.bank.loras[k].parameters(), self.keys[k], *self.transform.parameters()):
            p.requires_grad_(True)

    def attach(self, model):
        """Hook the LoRAs into `model`; generation sets each prompt's weights through `model.soft_prompts`."""
        self.bank.attach(model, self.targets)
        model.soft_prompts = self.choose
        return self

    @staticmethod
    def pool(embeddings, mask):
        """maxpool E(x): the max of each input's token embeddings over its real (mask 1) tokens (B, dim)."""
        x = embeddings.detach().float()
        if mask is not None:
            x = x.masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
        return x.max(1).values

    def weights(self, pooled):
        """w(x) over every task so far (B, tasks): softmax of the keys' dot products with f(pooled), ÷ √d."""
        query = self.transform(pooled.to(self.transform[0].weight))
        return torch.softmax(query @ torch.stack(list(self.keys)).t() / math.sqrt(self.args.dim), dim=-1)

    def choose(self, embeddings, mask):
        """Set the LoRAs' per-sample weights from the batch's prompt tokens; no soft prompts (None)."""
        self.bank.weights = self.weights(self.pool(embeddings, mask))
        return None

    def arm(self, k: int):
        """L_ARM while task k trains: Σ over earlier tasks j of mean_x KL([w̄_j ; 0] ‖ w(x)), x in j's
        pseudo-inputs."""
        total = torch.zeros((), device=self.device)
        for anchor, inputs in zip(self.anchors[:k], self.pseudo[:k]):
            if not len(inputs):   # the model wrote none for that task: nothing to reflect on
                continue
            target = F.pad(anchor, (0, k + 1 - anchor.numel())).expand(inputs.shape[0], -1)
            total = total + F.kl_div(self.weights(inputs).clamp_min(1e-30).log(), target, reduction="batchmean")
        return self.arm_weight * total

    def add_penalty_grad(self, k: int) -> dict:
        """ARM's gradient (once per optimiser step, every rank alike); its logged value."""
        if k == 0:
            return {}
        term = self.arm(k)
        if term.requires_grad:   # not when the model wrote no pseudo-input for any earlier task
            term.backward()
        return {"arm_kl": float(term.detach())}

    @torch.no_grad()
    def end_task(self, k: int, held_out, pseudo):
        """After task k: w̄_k, the mean weights on the `held_out` inputs, and the `pseudo` inputs' pooled
        embeddings, kept for ARM (each an iterable of one input's token embeddings (tokens, dim))."""
        def pooled(inputs):
            vectors = [self.pool(x.unsqueeze(0), None)[0] for x in inputs]
            return torch.stack(vectors) if vectors else torch.zeros(0, self.args.dim)
        self.set_task_memory(k, self.weights(pooled(held_out)).mean(0), pooled(pseudo))

    def set_task_memory(self, k: int, anchor, pseudo):
        self.register_buffer(f"anchor{k}", anchor.float().to(self.device))
        self.register_buffer(f"pseudo{k}", pseudo.float().to(self.device))

    @property
    def anchors(self) -> list:
        """w̄_j of each finished task, in task order."""
        return [t for name, t in self.named_buffers(recurse=False) if name.startswith("anchor")]

    @property
    def pseudo(self) -> list:
        """The pooled pseudo-inputs of each finished task, in task order."""
        return [t for name, t in self.named_buffers(recurse=False) if name.startswith("pseudo")]

    def load_state_dict(self, state, strict=True, assign=False):
        """As nn.Module's, with the finished tasks' memories (their sizes vary) made from the state's tensors."""
        j = 0
        while f"anchor{j}" in state:
            self.set_task_memory(j, state[f"anchor{j}"], state[f"pseudo{j}"])
            j += 1
        return super().load_state_dict(state, strict, assign)

    def info(self) -> dict:
        return {"method": "sapt", "tasks": self.tasks, "targets": list(self.targets), "rank": self.rank,
                "alpha": self.alpha, "dropout": self.dropout, "arm_weight": self.arm_weight}

    @classmethod
    def load(cls, path, args):
        """SAPT written by `save`, everything frozen."""
        info, _ = read_method(path, tensors=False)
        method = cls(args, info["targets"], info["rank"], info["alpha"], info["dropout"], info["arm_weight"])
        method.begin_task(info["tasks"] - 1)
        load_method(method, path)
        return method.requires_grad_(False)
