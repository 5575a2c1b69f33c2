"""L2P (Wang et al., CVPR 2022, "Learning to Prompt for Continual Learning"), for a decoder LLM.

One pool of M prompts (L vectors each) with one key each, shared by every task, the model frozen. An input's
query is a feature of the frozen model, the mean of its prompt's token embeddings (in training as at generation:
the trainer's mask leaves the answer out); the N prompts whose keys are most cosine-similar to it are read
before the input (most similar first), and the keys are pulled towards the queries that chose them:

    L = CE − λ · Σ_{chosen i} cos(q(x), k_i)      (summed over the chosen keys, averaged over the batch)

This follows TRACE's LLM adaptation, the one SEEKR compares with (BeyonderXX/TRACE `model/Dynamic_network/L2P.py`
@4bcc56e, class `L2P` and `convert_L2P_model`): N = 3 and λ = 0.5 (`top_k=3`, `pull_constraint_coeff=0.5`), the
mean of the token embeddings as the query (`embedding_key='mean'`), the prompts starting as the embeddings of
random tokens of the whole vocabulary, unscaled (`prompt_weight.append(w)`; the older L2P.py @0712fff divides
them by 100), and the keys as their prompts' means. M = 10 and L = 5 are TRACE's `training/main.py` (@0712fff:
`pool_size`, `prompt_length`). The tokens are drawn from the run's seed (the same on every rank).

Where this differs from TRACE's, with theirs:
- The query pools the prompt's tokens alone, in training as at generation. TRACE pools, without a mask, every
  position of `input_ids`: in training BOS + prompt + answer + EOS + left padding (its collator tokenises the
  instruction with its label), at its `evaluate_one_task` the prompt + padding. Pooling the answer in training
  would choose prompts from what generation cannot see, and padding would make the choice depend on the batch.
- The keys train (TRACE's `prompt_key` is computed once in `__init__`, a plain tensor never updated).
- Evaluation reads the chosen prompts; TRACE's inference (`inference/infer_single.py` @54e49e2) calls the bare
  model, and its `evaluate_one_task`, which prepends them, is never called.
- TRACE's optimiser is DeepSpeed's FusedAdam with betas (0.9, 0.95) (`training/main.py`), the library's; its one
  continual script (`scripts/train_seq_cl.sh`, 0a09a39, run with EWC; none for L2P was found) uses lr 1e-5, the
  library's, with a cosine schedule (here constant) and 2 per GPU × 8 accumulation steps × 8 GPUs (here
  `--batch-size`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from minseekr.methods.peft import PETMethod, load_method, read_method


class L2P(PETMethod):
    def __init__(self, args, pool=10, length=5, top_k=3, pull=0.5, seed=0):
        super().__init__()
        self.args, self.pool, self.length, self.top_k, self.pull, self.seed = args, pool, length, top_k, pull, seed
        self.prompts = nn.Parameter(torch.zeros(pool, length, args.dim))
        self.keys = nn.Parameter(torch.zeros(pool, args.dim))
        self.tasks = 0
        self.similarity = None   # the last forward's Σ cos(q, chosen keys) over its samples

    @classmethod
    def from_config(cls, args, cfg):
        return cls(args, cfg.l2p_pool, cfg.l2p_length, cfg.l2p_top_k, cfg.l2p_pull, cfg.seed)

    def attach(self, model):
        model.soft_prompts = self.choose
        return self

    def begin_task(self, k: int, embedding_rows=None):
        """The pool starts before the first task (every rank alike) and trains on every task."""
        if self.tasks == 0 and embedding_rows is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1000)
                ids = torch.randint(0, self.args.vocab_size, (self.pool * self.length,))
            with torch.no_grad():
                start = embedding_rows(ids).float().view(self.pool, self.length, -1)   # unscaled, as @4bcc56e
                self.prompts.copy_(start.to(self.prompts.device))
                self.keys.copy_(start.mean(1).to(self.keys.device))
        self.tasks = max(self.tasks, k + 1)
        self.requires_grad_(True)

    @property
    def n_prefix(self) -> int:
        return self.top_k * self.length

    def query(self, embeddings, mask):
        """q(x): the mean of the frozen token embeddings over the real tokens (B, dim)."""
        x = embeddings.detach().float()
        if mask is None:
            return x.mean(1)
        real = mask.to(x.dtype).unsqueeze(-1)
        return (x * real).sum(1) / real.sum(1).clamp(min=1)

    def choose(self, embeddings, mask):
        """The N prompts whose keys are nearest to each input's query, most similar first: (B, N·L, dim)."""
        similarity = F.normalize(self.query(embeddings, mask), dim=-1) @ F.normalize(self.keys, dim=-1).t()
        best, idx = similarity.topk(self.top_k, dim=-1)                        # (B, N), sorted
        self.similarity = best.sum()
        return self.prompts[idx].reshape(idx.shape[0], -1, self.args.dim).to(embeddings.dtype)

    def batch_loss(self) -> dict:
        """−λ Σ cos(q, chosen keys) of the last forward, summed over its samples (the trainer averages)."""
        if self.similarity is None:
            return {}
        term, self.similarity = -self.pull * self.similarity, None
        return {"l2p_pull": term}

    def info(self) -> dict:
        return {"method": "l2p", "tasks": self.tasks, "pool": self.pool, "length": self.length,
                "top_k": self.top_k, "pull": self.pull}

    @classmethod
    def load(cls, path, args):
        info, _ = read_method(path, tensors=False)
        method = cls(args, info["pool"], info["length"], info["top_k"], info["pull"])
        load_method(method, path)
        method.tasks = info["tasks"]
        return method.requires_grad_(False)
