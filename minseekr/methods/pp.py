"""Progressive Prompts (Razdaibiedina et al., ICLR 2023, "Progressive Prompts: Continual Learning for Language
Models without Forgetting").

Each task k learns a new soft prompt P_k (n vectors of the model's width d) through its own residual MLP, the model
frozen. When task k is over its MLP is dropped and the prompt is kept as the vectors MLP_k(P_k), frozen; every
input is read after all the prompts, the newest first:

    [ MLP_k(P_k) ; MLP_{k−1}(P_{k−1}) ; … ; MLP_1(P_1) ; x ]        (all but the first fixed while task k trains)

    MLP(P) = P + W3·tanh(W2·relu(W1·P + b1) + b2) + b3,     W1: d→b, W2: b→b/2, W3: b/2→d, b = 2·d

This follows TRACE's LLM port (BeyonderXX/TRACE `model/Dynamic_network/PP.py` @3df6d6c). Its `convert_PP_model`
builds one `ResMLP(bottleneck_size=2*embed_tokens_dim)` per task, whose default `module_type='MLP2'` is the MLP
above with its residual (torch's default Linear initialisation, drawn here from the run's seed and the task), and
starts the prompt as the embeddings of random tokens of the whole vocabulary ÷ 100 (`init_new_prompt`, `w/100`).
`train_step_lester` reads [MLP(P); earlier prompts; x] and `progress_previous_prompts` puts the new one first.
TRACE's `training/main.py` (@0712fff) sets n = 20 (`prefix_len`), pp's default here (`config.METHOD_DEFAULTS`;
`--prompt-bottleneck` sets b, 0 meaning TRACE's 2·d). The paper's own code (arazd/ProgressivePrompts
`T5_codebase/t5_continual.py`) has the same order; its documented run (README) uses no MLP (`--prefix_MLP` defaults
to 'None'), and its 'MLP1' cannot run (`ResMLP` reads an undefined `layer_norm`). No penalty, in either.

Where this differs from theirs, with their values:
- A new prompt per task, as the paper and arazd's `train_one_task` (`init_new_prompt` for every task). TRACE's
  stored code keeps one `model.model.prompt` for every task (its re-initialisation is commented out), and its
  `train_one_task` calls `progress_previous_prompts(task=task)` on a method whose argument is `task_num`: a
  TypeError after the first task, so there earlier prompts never accumulate.
- The prompt kept is the last epoch's. arazd's `--early_stopping 1` (their README run, and the default) keeps
  `best_prompt`, the epoch best on the task's validation split (`update_best_model`, `progress_previous_prompts`);
  here no method is selected on held-out data during training (the trainer has no per-epoch validation), so every
  method is scored after its last epoch. TRACE's port also keeps the current prompt.
- The optimiser is AdamW at arazd's settings (`T5ContinualLearner`, `get_optimizer`; lr 0.3 in their README run):
  weight decay 1e-5 and the prompt's rate for the MLP too, transformers' AdamW betas (0.9, 0.999), eps 1e-8; pp's
  defaults here. TRACE's
  `training/main.py` uses DeepSpeed's FusedAdam with betas (0.9, 0.95), and its one continual script
  (`scripts/train_seq_cl.sh`, 0a09a39, run with EWC; none for PP was found) lr 1e-5 with a cosine schedule; here
  the rate is constant (one per task with `--lr`).
- Epochs and batch are the run's (`--epochs`, the order's; `--batch-size`): arazd's README runs 10 epochs at batch
  8; TRACE's script 5,3,7,5,3,5,5,7 epochs at 2 per GPU × 8 accumulation steps × 8 GPUs.
- arazd's prompts start unscaled (`init_new_prompt`, no ÷ 100), 10 vectors (`--prefix_len 10`).
A method file holds the finished tasks' MLP_j(P_j) and the newest task's P_k with its MLP (a resume inside or
right after task k needs both); `load` folds that MLP in, and so does `begin_task` when the next task starts.
"""
import torch
import torch.nn as nn

from minseekr.methods.peft import PETMethod, load_method, read_method


class ResidualMLP(nn.Module):
    """P + W3 tanh(W2 relu(W1 P)) with biases, widths d→b→b/2→d: TRACE's `ResMLP` 'MLP2'."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.module = nn.Sequential(nn.Linear(dim, bottleneck), nn.ReLU(), nn.Linear(bottleneck, bottleneck // 2),
                                    nn.Tanh(), nn.Linear(bottleneck // 2, dim))

    def forward(self, x):
        return x + self.module(x)


class ProgressivePrompts(PETMethod):
    def __init__(self, args, n_tokens=20, bottleneck=0, seed=0):
        super().__init__()
        self.args, self.n_tokens, self.seed = args, n_tokens, seed
        self.bottleneck = bottleneck or 2 * args.dim          # 0: TRACE's 2·d
        self.prompts = nn.ParameterList()   # the finished tasks' MLP_j(P_j), then the newest task's P_k
        self.mlp = None                     # the newest task's MLP, until it is folded into its prompt

    @classmethod
    def from_config(cls, args, cfg):
        return cls(args, cfg.prompt_tokens, cfg.prompt_bottleneck, cfg.seed)

    @property
    def tasks(self) -> int:
        return len(self.prompts)

    def attach(self, model):
        """Generation from `model` (`generate`) prepends the prompts: `model.soft_prompts` is read there."""
        model.soft_prompts = self.choose
        return self

    @property
    def n_prefix(self) -> int:
        return self.n_tokens * self.tasks

    def choose(self, embeddings, mask):
        """The prompts before a batch: the same for every input."""
        return self.prefix(embeddings.shape[0])

    @torch.no_grad()
    def fold(self):
        """The newest task's prompt kept as MLP(P), fixed; its MLP dropped (their `progress_previous_prompts`)."""
        if self.mlp is not None:
            self.prompts[-1] = nn.Parameter(self.mlp(self.prompts[-1]).detach(), requires_grad=False)
            self.mlp = None

    def begin_task(self, k: int, embedding_rows=None):
        """Task k's prompt and MLP, new and trainable, the task before it folded, every earlier one frozen; the
        prompt starts as the embeddings of n random tokens ÷ 100 (`embedding_rows(ids)`, the same on every rank) or
        zeros (to be loaded, as are the earlier tasks' prompts)."""
        for p in self.parameters():
            p.requires_grad_(False)
        while self.tasks <= k:   # on resume the earlier tasks' prompts are already loaded
            self.fold()
            j = self.tasks
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1000 + j)
                ids = torch.randint(0, self.args.vocab_size, (self.n_tokens,))
                mlp = ResidualMLP(self.args.dim, self.bottleneck) if j == k else None
            start = embedding_rows(ids).float() / 100 if embedding_rows and j == k else \
                torch.zeros(self.n_tokens, self.args.dim)
            self.prompts.append(nn.Parameter(start.detach().clone(), requires_grad=False))
            self.mlp = mlp.to(start.device) if mlp is not None else None
        for p in (self.prompts[k], *self.mlp.parameters()):
            p.requires_grad_(True)

    def prefix(self, batch_size: int):
        """(B, n·tasks, dim): the newest prompt (through its MLP while it trains), then the earlier ones."""
        vectors = [self.prompts[j] for j in reversed(range(self.tasks))]
        if self.mlp is not None:
            vectors[0] = self.mlp(vectors[0])
        return torch.cat(vectors).unsqueeze(0).expand(batch_size, -1, -1)

    def info(self) -> dict:
        return {"method": "pp", "tasks": self.tasks, "n_tokens": self.n_tokens, "bottleneck": self.bottleneck,
                "mlp": self.mlp is not None}

    @classmethod
    def load(cls, path, args):
        """Progressive Prompts written by `save`, the newest MLP folded in: fixed vectors, frozen."""
        info, _ = read_method(path, tensors=False)
        method = cls(args, info["n_tokens"], info["bottleneck"])
        method.begin_task(info["tasks"] - 1)
        if not info.get("mlp"):
            method.mlp = None
        load_method(method, path)
        method.fold()
        return method.requires_grad_(False)
