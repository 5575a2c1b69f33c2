"""LFPT5 (Qin & Joty, ICLR 2022, "LFPT5: A Unified Framework for Lifelong Few-shot Language Learning Based on
Prompt Tuning of T5"), for a decoder LLM.

One soft prompt P (n vectors), the model frozen, tuned through every task. Besides answering, P learns to write
the task's inputs (LAMOL's trick, which LFPT5 takes up): on each new-task sample

    L = CE(answer | P, x) + λ_gen · CE(x | P, instruction)

where CE(x | …) is the language-model loss on the prompt's own tokens after the first. After task j the model,
prompt attached, writes pseudo-samples of task j (`pseudo.generate_samples`: it continues the task's shared
instruction, and the text after the prompts' shared ending is the answer); they form task j's replay buffer,
stored with θ_j's logits, and later tasks replay them as DER++ does (λ1·CE + (1 − λ1)·KL to the stored logits):
LFPT5's label and output distillation. No real sample of a finished task is kept.

Defaults: λ_gen = 0.25 (LFPT5's and LAMOL's), as many pseudo-samples as Replay keeps real ones
(`--replay-ratio`), the prompt's length shared with `pp` (`--prompt-tokens`), its start the embeddings of random
vocabulary tokens. Where this differs from the authors', and why: the generation prompt of task j is its own
instruction (an instruction-tuned LLM's natural task marker) instead of a "__gen__" token and a task name;
task j's pseudo-samples are written once, by θ_j, which knows task j best, instead of again before every later
task by the newest model, and they are distilled from θ_j's outputs accordingly; the LM loss is on new-task
samples only. TRACE's LFPT5 instead replays earlier tasks' *test* prompts, which the evaluation then scores.
"""
import torch
import torch.nn as nn

from minseekr.peft import PETMethod, load_method, read_method


class LFPT5(PETMethod):
    def __init__(self, args, n_tokens=10, seed=0):
        super().__init__()
        self.args, self.n_tokens, self.seed = args, n_tokens, seed
        self.prompt = nn.Parameter(torch.zeros(n_tokens, args.dim))
        self.tasks = 0

    @classmethod
    def from_config(cls, args, cfg):
        return cls(args, cfg.prompt_tokens, cfg.seed)

    def attach(self, model):
        model.soft_prompts = self.choose
        return self

    def begin_task(self, k: int, embedding_rows=None):
        """The prompt starts before the first task as the embeddings of n random tokens (every rank alike) and
        trains on every task."""
        if self.tasks == 0 and embedding_rows is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1000)
                ids = torch.randint(0, self.args.vocab_size, (self.n_tokens,))
            with torch.no_grad():
                self.prompt.copy_(embedding_rows(ids).float().to(self.prompt.device))
        self.tasks = max(self.tasks, k + 1)
        self.requires_grad_(True)

    @property
    def n_prefix(self) -> int:
        return self.n_tokens

    def choose(self, embeddings, mask):
        """The prompt before every input (B, n, dim)."""
        return self.prompt.unsqueeze(0).expand(embeddings.shape[0], -1, -1).to(embeddings.dtype)

    def info(self) -> dict:
        return {"method": "lfpt5", "tasks": self.tasks, "n_tokens": self.n_tokens}

    @classmethod
    def load(cls, path, args):
        info, _ = read_method(path, tensors=False)
        method = cls(args, info["n_tokens"])
        load_method(method, path)
        method.tasks = info["tasks"]
        return method.requires_grad_(False)
