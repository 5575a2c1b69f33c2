"""The built-in demo benchmark: permutation tasks that a tiny LLaMA learns in seconds on a CPU.

Every task maps a string of symbols to a fixed permutation of it, named by a three-letter code in one
shared prompt format: `rev:abcdef=` -> `fedcba`. Solving a task is pure attention routing (output
position i copies input position π(i)), so all tasks share every head and differ only in where the
heads look. Training on a new permutation rewrites the routes of the old ones, which is the forgetting
SEEKR targets; distilling the old tasks' attention rows is exactly what should keep those routes.

`cpy` (the identity) is the pre-training task of the base model θ_0; the continual tasks follow it.
The tokenizer is a character-level SentencePiece model trained here, in code, so the demo needs no file.
"""
import io
import random

import sentencepiece as spm

SYMBOLS = "abcdefgh"
LENGTH = 6
PERMUTATIONS = {
    "cpy": [0, 1, 2, 3, 4, 5],  # the base model's pre-training task
    "rev": [5, 4, 3, 2, 1, 0],
    "rot": [2, 3, 4, 5, 0, 1],
    "swp": [1, 0, 3, 2, 5, 4],
    "evn": [0, 2, 4, 1, 3, 5],
}


def make_records(task: str, n: int, seed: int) -> list[dict]:
    """n seeded {"prompt", "answer"} records of one permutation task, in TRACE's format."""
    rng = random.Random(f"{task}-{seed}")
    perm = PERMUTATIONS[task]
    records = []
    for _ in range(n):
        x = "".join(rng.choice(SYMBOLS) for _ in range(LENGTH))
        records.append({"prompt": f"{task}:{x}=", "answer": "".join(x[i] for i in perm)})
    return records


def train_tokenizer(path) -> None:
    """Write a character-level SentencePiece model covering the benchmark's alphabet (deterministic)."""
    text = [SYMBOLS, "".join(PERMUTATIONS), ":="]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=buf, model_type="char", vocab_size=len(set("".join(text))) + 4,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, add_dummy_prefix=False,
        minloglevel=2, num_threads=1)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
