"""Tokenizers: a SentencePiece `tokenizer.model` (LLaMA-2) or an HF `tokenizer.json` (byte-level BPE such as
SmolLM2's), behind one interface, and the TRACE training encoding built on it.

`Tokenizer(path)` reads either file (or finds one in a model directory). SentencePiece goes through the
`sentencepiece` library and gives the ids Meta's and HF's slow `LlamaTokenizer` give; tokenizer.json goes
through HF's `tokenizers` library (an optional dependency), with BOS, EOS, pad and the chat template read from
the tokenizer_config.json beside it. `encode(text, bos=True)` starts a sequence as the model expects: LLaMA-2
prepends BOS, SmolLM2 prepends nothing (its `add_bos_token` is false). A chat template is a program that comes
with the model: it runs in jinja2's sandbox, as in transformers, and whatever stops it (a syntax error, a way out
of the sandbox, more than `RENDER_SECONDS` of rendering) is one InputError naming its file. `check_model`
refuses a tokenizer whose vocabulary or EOS does not fit a model's config.json.

`encode_example` is the TRACE/SEEKR training sample: [BOS] + prompt + answer + EOS, with the loss on the
answer and EOS only. The official code tokenizes the joined text, then labels "the last len(tokenize(answer))
+ 1 tokens", which is off by one wherever the answer tokenized alone differs from its share of the joint text:
"Output: " + "1" is `▁Output : ▁ 1` but "1" alone is `▁ 1` (the prompt's space gets a label), "Output:" + "POS"
is `▁Output : POS` but "POS" alone is `▁P OS` (the colon gets a label). Here the boundary comes from the joint
tokenization itself: both libraries report each token's span in the input (bytes for SentencePiece,
characters for tokenizers), and a token belongs to the answer as soon as it covers a piece of it. A token
straddling the boundary ("Output: " + "POS" gives `▁P`, the prompt's last space plus the answer's "P") is
therefore labelled, and the labelled tokens decode to exactly the answer.
"""
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import sentencepiece as spm

from minseekr.runtime import InputError, read_json

IGNORE = -100  # label of positions that carry no loss (cross_entropy's ignore_index)
FILES = ("tokenizer.model", "tokenizer.json")
# A chat template is a program that comes with the model; one that renders for longer than this is refused.
RENDER_SECONDS = 10.0


def find_tokenizer(model_dir) -> Path:
    """The tokenizer file a model directory holds: tokenizer.model (SentencePiece) or tokenizer.json."""
    for name in FILES:
        if (Path(model_dir) / name).is_file():
            return Path(model_dir) / name
    raise FileNotFoundError(f"{model_dir} holds neither {' nor '.join(FILES)}; pass --tokenizer FILE")


@contextmanager
def _time_limit(seconds: float, message: str):
    """A block that raises InputError(message) once it has run `seconds`. SIGALRM is the one way to stop Python code
    from outside, and only the main thread receives signals: in any other thread the block runs without a limit.
    The previous handler, and a timer already running (pytest-timeout's, say), are restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise InputError(message)

    handler = signal.signal(signal.SIGALRM, stop)
    pending, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:   # restored even if the alarm went off on the line above
            signal.signal(signal.SIGALRM, handler)
            if pending:
                signal.setitimer(signal.ITIMER_REAL, max(pending - (time.monotonic() - start), 1e-3), interval)


class Tokenizer:
    """One interface over SentencePiece and HF tokenizers: ids, text, special ids, the training encoding.

    LLaMA-2 has no pad token: `pad_id` is the model's own pad when it has one, otherwise unk (0), as in the
    official SEEKR code (`pad = unk`). Any id is safe: padded positions are masked out of attention and carry
    label -100, so their embedding never reaches a real token or the loss.
    """

    def __init__(self, path):
        path = Path(path)
        if path.is_dir():
            path = find_tokenizer(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path} does not exist")
        self.path = path
        if path.suffix == ".json":
            self._open_hf(path)
        else:
            self._open_sentencepiece(path)

    def _open_sentencepiece(self, path):
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except RuntimeError as e:
            raise InputError(f"{path} is not a SentencePiece model ({e})") from None
        self.hf, self.files, self.add_bos, self.chat_template, self.template_file = None, [path], True, "", None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()
        self._special = {i for i in (self.bos_id, self.eos_id, self.pad_id, self.sp.unk_id()) if i >= 0}

    def _open_hf(self, path):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise InputError(f"{path}: reading tokenizer.json needs the tokenizers package "
                             f"(pip install tokenizers)") from None
        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as e:   # tokenizers raises plain Exceptions for malformed files
            raise InputError(f"{path} is not an HF tokenizer.json ({e})") from None
        config_path = path.with_name("tokenizer_config.json")
        config = read_json(config_path, dict) if config_path.is_file() else {}
        self.sp, self.files = None, [path] + ([config_path] if config_path.is_file() else [])
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)

        def token_id(key):
            token = config.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            if token is None:
                return None
            if (i := self.hf.token_to_id(token)) is None:
                raise InputError(f"{config_path}: {key} {token!r} is not a token of {path.name}")
            return i

        self.bos_id, self.eos_id = token_id("bos_token"), token_id("eos_token")
        if self.eos_id is None:
            raise InputError(f"{config_path}: no eos_token; the training encoding ends every sample with it")
        self.pad_id = next(i for i in (token_id("pad_token"), token_id("unk_token"), self.eos_id) if i is not None)
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_id is not None
        self.chat_template, self.template_file = config.get("chat_template") or "", config_path
        self._special = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}

    def _ids_and_spans(self, text: str):
        """Token ids of text (no specials) and each token's (start, end) span: bytes (SentencePiece) or chars."""
        if self.sp is not None:
            enc = self.sp.encode(text, return_type="offset_mapping", return_bytes=True)
            return enc["ids"], enc["offsets"]
        enc = self.hf.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of text, starting as the model's sequences start (BOS where it uses one), optionally with EOS."""
        return [self.bos_id] * (bos and self.add_bos) + self._ids_and_spans(text)[0] + [self.eos_id] * eos

    def decode(self, ids) -> str:
        """Text of ids, skipping BOS, EOS, pad and unk."""
        ids = [int(i) for i in ids if int(i) not in self._special]
        return self.sp.decode(ids) if self.sp is not None else self.hf.decode(ids, skip_special_tokens=False)

    def prompt(self, text: str, max_len: int) -> list[int]:
        """A generation prompt: [BOS] + the newest tokens of text, at most max_len ids in all."""
        ids = self.encode(text, bos=False)
        head = [self.bos_id] if self.add_bos else []
        return head + ids[len(ids) - (max_len - len(head)):] if len(head) + len(ids) > max_len else head + ids

    def chat(self, prompt: str) -> str:
        """The prompt as one user turn of the model's chat template, ready for the assistant's answer."""
        if not self.chat_template:
            raise InputError(f"{self.path}: the tokenizer has no chat template (--prompt-format chat needs one)")
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise InputError("--prompt-format chat renders the chat template with jinja2 (pip install jinja2)") \
                from None

        def refuse(message):
            raise InputError(f"{self.path}: the chat template refuses the prompt: {message}")

        # transformers' rendering: a sandbox, trimmed blocks, the special tokens and raise_exception in scope.
        special = {name: self.hf.id_to_token(i) if self.hf is not None else self.sp.id_to_piece(i)
                   for name, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id)) if i is not None}
        too_slow = f"{self.template_file}: the chat template did not render a prompt within {RENDER_SECONDS:g} s"
        try:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            template = env.from_string(self.chat_template)
            with _time_limit(RENDER_SECONDS, too_slow):
                return template.render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       raise_exception=refuse, **special)
        # A syntax error, a way out of the sandbox, an undefined name; the sandbox refuses a huge range() with an
        # OverflowError, and a template may divide by zero.
        except (TemplateError, ArithmeticError) as e:
            at = f" at line {e.lineno}" if getattr(e, "lineno", None) else ""   # a syntax error's
            raise InputError(f"{self.template_file}: the chat template cannot be rendered "
                             f"({type(e).__name__}{at}: {e})") from None

    def check_model(self, args, model_dir) -> None:
        """Refuse a tokenizer that does not fit the model in `model_dir` (`args`, its ModelArgs): more tokens than
        the model embeds, or an EOS that is not its config.json's eos_token_id (one of them, for a list)."""
        config = Path(model_dir) / "config.json"
        if self.vocab_size > args.vocab_size:
            raise InputError(f"{self.path} has {self.vocab_size} tokens but {model_dir} embeds {args.vocab_size}: "
                             f"pass the model's own tokenizer (--tokenizer)")
        if self.eos_id not in (args.eos_id if isinstance(args.eos_id, list) else [args.eos_id]):
            raise InputError(f"{self.path} ends a sequence with EOS id {self.eos_id} but {config} names "
                             f"eos_token_id {args.eos_id}: pass the model's own tokenizer (--tokenizer)")

    def encode_example(self, prompt: str, answer: str, max_len: int) -> tuple[list[int], list[int]]:
        """TRACE training sample: [BOS] + prompt + answer + EOS, labels on the answer and EOS only.

        Both lists have the same length; `labels[i]` is `input_ids[i]` on answer and EOS
        positions and -100 elsewhere (the causal shift is the loss's business).
        Left truncation keeps BOS and the newest tokens: the oldest prompt tokens go first; only an
        answer that alone exceeds the rest loses its beginning too. EOS is always kept. (The official
        code truncates BOS away and, on truncated samples, EOS too.)
        """
        head = [self.bos_id] if self.add_bos else []
        if max_len < len(head) + 1:
            raise InputError(f"max_len={max_len} leaves no room for {'BOS and ' if head else ''}EOS")
        ids, spans = self._ids_and_spans(prompt + answer)
        start = len(prompt.encode("utf-8")) if self.sp is not None else len(prompt)
        # Byte-fallback pieces of a multi-byte character have empty spans at the character's
        # start, so an empty span at or after the prompt's end is the answer's as well.
        first = next((i for i, (b, e) in enumerate(spans) if e > start or b == e >= start), len(ids))
        input_ids = head + ids + [self.eos_id]
        labels = [IGNORE] * (len(head) + first) + ids[first:] + [self.eos_id]
        if len(input_ids) > max_len:
            keep = max_len - len(head)
            input_ids, labels = head + input_ids[-keep:], [IGNORE] * len(head) + labels[-keep:]
        return input_ids, labels
