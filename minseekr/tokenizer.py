"""LLaMA-2's SentencePiece tokenizer, and the TRACE training encoding built on it.

`Tokenizer` is a thin wrapper over `sentencepiece` that gives the ids Meta's and HF's slow
`LlamaTokenizer` give (BOS prepended on request, no EOS unless asked).

`encode_example` is the TRACE/SEEKR training sample: BOS + prompt + answer + EOS, with the loss on
the answer and EOS only. The official code tokenizes the joined text, then labels "the last
len(tokenize(answer)) + 1 tokens", which is off by one wherever the answer tokenized alone differs
from its share of the joint text: "Output: " + "1" is `▁Output : ▁ 1` but "1" alone is `▁ 1`
(the prompt's space gets a label), "Output:" + "POS" is `▁Output : POS` but "POS" alone is
`▁P OS` (the colon gets a label). Here the boundary comes from the joint tokenization itself:
SentencePiece reports each piece's byte span in the input, and a piece belongs to the answer as
soon as it covers one of the answer's bytes. A piece straddling the boundary ("Output: " + "POS"
gives `▁P`, the prompt's last space plus the answer's "P") is therefore labelled, and the labelled
tokens decode to exactly the answer.
"""
from pathlib import Path

import sentencepiece as spm

from minseekr.runtime import InputError

IGNORE = -100  # label of positions that carry no loss (cross_entropy's ignore_index)


def find_tokenizer(model_dir) -> Path:
    """The tokenizer file a model directory holds: its SentencePiece `tokenizer.model`."""
    path = Path(model_dir) / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} holds no tokenizer.model; pass --tokenizer FILE")
    return path


class Tokenizer:
    """SentencePiece model with LLaMA-2's conventions.

    LLaMA-2 has no pad token. `pad_id` is the model's own pad piece when it has one, otherwise
    unk (0), as in the official SEEKR code (`pad = unk`). Any id is safe: padded positions are
    masked out of attention (a padded query row attends to itself only) and carry label -100, so
    their embedding never reaches a real token or the loss. unk is the natural choice because
    LLaMA-2's byte fallback never produces it from text, so `decode` can drop it with the other
    specials without losing anything.
    """

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} does not exist")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except RuntimeError as e:
            raise InputError(f"{path} is not a SentencePiece model ({e})") from None
        self.path = path
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()
        self._special = {i for i in (self.bos_id, self.eos_id, self.pad_id, self.sp.unk_id()) if i >= 0}

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of text, optionally with BOS before and EOS after."""
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        """Text of ids, skipping BOS, EOS, pad and unk."""
        return self.sp.decode([int(i) for i in ids if int(i) not in self._special])

    def encode_example(self, prompt: str, answer: str, max_len: int) -> tuple[list[int], list[int]]:
        """TRACE training sample: BOS + prompt + answer + EOS, labels on the answer and EOS only.

        Both lists have the same length; `labels[i]` is `input_ids[i]` on answer and EOS
        positions and -100 elsewhere (the causal shift is the loss's business).
        Left truncation keeps BOS and the newest `max_len - 1` tokens: the oldest prompt tokens go
        first; only an answer that alone exceeds `max_len - 2` tokens loses its beginning too (its
        labelled tokens then start right after BOS). EOS is always kept. (The official code
        truncates BOS away and, on truncated samples, EOS too.)
        """
        if max_len < 2:
            raise InputError(f"max_len={max_len} leaves no room for BOS and EOS (need at least 2)")
        enc = self.sp.encode(prompt + answer, return_type="offset_mapping", return_bytes=True)
        ids, spans = enc["ids"], enc["offsets"]
        start = len(prompt.encode("utf-8"))
        # Byte-fallback pieces of a multi-byte character have empty spans at the character's
        # start, so an empty span at or after the prompt's end is the answer's as well.
        first = next((i for i, (b, e) in enumerate(spans) if e > start or b == e >= start), len(ids))
        input_ids = [self.bos_id] + ids + [self.eos_id]
        labels = [IGNORE] * (1 + first) + ids[first:] + [self.eos_id]
        if len(input_ids) > max_len:
            keep = max_len - 1
            input_ids, labels = input_ids[:1] + input_ids[-keep:], labels[:1] + labels[-keep:]
        return input_ids, labels
