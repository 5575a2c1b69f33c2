"""LFPT5 (Qin & Joty, ICLR 2022, "LFPT5: A Unified Framework for Lifelong Few-shot Language Learning Based on
Prompt Tuning of T5"), for a decoder LLM.

One soft prompt P (n vectors), the model frozen, tuned through every task (each task starts from the last one's).
Besides answering, P learns to write the task's samples, and after task j the model writes pseudo-samples of task
j that later tasks replay. On every micro-batch (new-task samples, or replayed pseudo-samples of one earlier task j)

    L = (1 − kd) · ( CE(answer | P, x) + λ_gen · LM(x, answer | P) )  [ + kd · KD on replayed batches ]

where LM is the language-model loss on every token after the first (the prompt and the answer) and
KD = KL(θ_j ‖ θ), summed over the vocabulary at each answer position (the answer and EOS), against the logits θ_j
stored with the sample. As every term here, each is a sum over the micro-batch's tokens divided by the global
batch's count: CE and KD by its answer tokens, LM by its LM tokens (`continual.ContinualTrainer.micro_step`). So
KD is the mean over answer positions of the vocabulary-summed KL, weighted by kd rather than by DER++'s λ1.

After task j, θ_j (prompt attached) writes task j's pseudo-samples (`pseudo.generate_samples`: it continues the
task's shared instruction P; the text after the prompts' shared ending S is the answer); they form task j's replay
buffer with θ_j's logits. No real sample of a finished task is kept.

The authors' code followed: `Classification/Classification.py` (`train`; the main loop's generation and filter of
pseudo-samples), `Classification/model.py` (`T5forClassify.forward`, `_generative_samples`),
`Classification/dataset.py`, `Classification/utils.py` (`getpromptembedding`) and `Classification/Classification.sh`.
As theirs: the loss's form, λ_gen = 0.25 (`--lfpt5-gen-weight`; script and parser), kd = 0.01 (`--lfpt5-kd`;
script, their parser's default 0.05), the LM target holding the input and the answer and applied to pseudo-samples
too, KD = KL(teacher ‖ student) on pseudo-samples only, sampling with top-k 64 and repetition penalty 2.5, one
prompt carried from task to task. Where this differs (their value; why):
- Placement: P is read before the input (theirs: after it in T5's encoder, `torch.cat([input_embed_part,
  prompt_embed_repeat], 1)`). A decoder has no encoder; as every prompt method here, P comes first.
- Length: n = `--prompt-tokens`, 10 by default, shared with `pp` (theirs: 300 in Classification.sh, 100 the parser's
  default): the positions and compute of the CPU benchmarks; `--prompt-tokens 300` gives theirs.
- Start: the embeddings of n random vocabulary tokens (theirs: the mean embeddings of "sentence classification",
  of the task's name and of each label word, then random tokens among T5's 5000 most frequent, counted in their
  `allnumber.pickle`): these tasks have no label list, and the tokenizer no frequency table.
- The generating frame: the model continues the task's instruction P and S ends the input (theirs: one added token
  per task, e.g. "classifyagnews", is the whole encoder input and the decoder writes "input __ans__ label"). The
  LM here covers P and S too, which generation is given.
- KD's teacher: θ_j, whose logits were stored when it wrote the samples, at the answer positions only (theirs:
  `promptembedding_kd`, the prompt as the current task began, run live, over every decoder position of the padded
  batch, padding included). KD's normalisation: divided by the answer tokens as above (theirs: `kl_div(...,
  reduction='sum')` over samples × positions × vocabulary, divided by nothing, beside a CE averaged over tokens),
  so that the update does not depend on the batch size, the micro-batches or the ranks.
- Batches: pseudo-samples come in batches of their own, interleaved with the new task's by volume, as the trainer
  interleaves every replaying method's buffers (theirs: appended to the new task's training file and shuffled with
  it by one RandomSampler).
- Sampling length and count: up to the task's longest training sample (at most `--max-len`) and
  `--replay-ratio` × |D_j| samples, drawn again up to four rounds (theirs: max_length 128; 3, 6 or 12 returns per
  line of the earlier task's test file, copied 1, 4 or 4 times: the file sets only how many). Temperature 1 as
  theirs; top-p is not used.
- Filter: any continuation with an input, S and a non-empty answer (theirs: "x __ans__ y" with y in the task's
  label set, at most 2 per class for training and 2 for validation): most of these tasks are generative, with no
  label set.
- When: task j's pseudo-samples are written once, by θ_j, which knows task j best, and kept with θ_j's logits
  (theirs: every earlier task's are written again before each new task, by the newest prompt).
- Optimiser and selection: AdamW (`--lr`, `--betas`, `--clip`), `--batch-size`, `--epochs`, the last prompt kept
  (theirs: Adafactor with lr 0.5, clip_threshold 1.0, decay_rate −0.8, weight decay 1e-5, no relative step or
  parameter scaling; batch 8 (2 × 4 accumulation steps); up to 421 epochs, keeping from epoch 256 on the prompt of
  the best validation epoch).
TRACE's LFPT5 (`model/Replay/LFPT5.py`) instead replays earlier tasks' *test* prompts, which the evaluation then
scores.
"""
import torch
import torch.nn as nn

from minseekr.methods.peft import PETMethod, load_method, read_method


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
