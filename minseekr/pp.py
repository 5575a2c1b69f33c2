"""Progressive Prompts (Razdaibiedina et al., ICLR 2023, "Progressive Prompts: Continual Learning for Language
Models without Forgetting").

Each task k learns a soft prompt P_k (n vectors of the model's width) through a residual MLP, the model frozen;
the prompts of earlier tasks stay, frozen, and every input is read after all of them, the newest first:

    [ MLP_k(P_k) ; MLP_{k-1}(P_{k-1}) ; … ; MLP_1(P_1) ; x ]

As the authors' code (`T5_codebase/t5_continual.py`): a new prompt starts as the embeddings of n random vocabulary
tokens, the reparameterisation is their `ResMLP` 'MLP1' without LayerNorm (Linear d→800, tanh, Linear 800→d, plus
the input), and there is no penalty. Their defaults: n = 10 per task, lr 0.3. They keep MLP_j(P_j) after task j
and drop the MLP; here P_j and MLP_j are kept, frozen, which gives the same vectors.
"""
import torch
import torch.nn as nn

from minseekr.peft import PETMethod, load_method, read_method


class ResidualMLP(nn.Module):
    """x + W2 tanh(W1 x): the prompt's reparameterisation."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.down, self.up = nn.Linear(dim, bottleneck), nn.Linear(bottleneck, dim)

    def forward(self, x):
        return x + self.up(torch.tanh(self.down(x)))


class ProgressivePrompts(PETMethod):
    def __init__(self, args, n_tokens=10, bottleneck=800, seed=0):
        super().__init__()
        self.args, self.n_tokens, self.bottleneck, self.seed = args, n_tokens, bottleneck, seed
        self.prompts, self.mlps = nn.ParameterList(), nn.ModuleList()

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

    def begin_task(self, k: int, embedding_rows=None):
        """Task k's prompt and MLP, new and trainable, every earlier one frozen; the prompt starts as the
        embeddings of n random tokens (`embedding_rows(ids)`, the same on every rank) or zeros (to be loaded)."""
        for p in self.parameters():
            p.requires_grad_(False)
        while self.tasks <= k:   # on resume the earlier tasks' prompts are already loaded
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1000 + self.tasks)
                ids = torch.randint(0, self.args.vocab_size, (self.n_tokens,))
                mlp = ResidualMLP(self.args.dim, self.bottleneck)
            start = embedding_rows(ids).float() if embedding_rows else torch.zeros(self.n_tokens, self.args.dim)
            self.prompts.append(nn.Parameter(start.detach().clone()))
            self.mlps.append(mlp.to(start.device))
        for p in (self.prompts[k], *self.mlps[k].parameters()):
            p.requires_grad_(True)

    def prefix(self, batch_size: int):
        """(B, n·tasks, dim): every task's prompt through its MLP, the newest first."""
        vectors = torch.cat([self.mlps[j](self.prompts[j]) for j in reversed(range(self.tasks))])
        return vectors.unsqueeze(0).expand(batch_size, -1, -1)

    def info(self) -> dict:
        return {"method": "pp", "tasks": self.tasks, "n_tokens": self.n_tokens, "bottleneck": self.bottleneck}

    @classmethod
    def load(cls, path, args):
        """Progressive Prompts written by `save`, every prompt frozen."""
        info, _ = read_method(path, tensors=False)
        method = cls(args, info["n_tokens"], info["bottleneck"])
        method.begin_task(info["tasks"] - 1)
        load_method(method, path)
        return method.requires_grad_(False)
