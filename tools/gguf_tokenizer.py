"""The tokenizer a GGUF file describes, written as an HF tokenizer.json (with the `tokenizers` library) and a
tokenizer_config.json; `convert_gguf.py` calls `write_tokenizer`.

A GGUF file holds no tokenizer file, only llama.cpp's metadata: the tokens, their scores and types (normal,
control, user-defined, byte), the merges of a byte-level BPE vocabulary, the special ids, whether BOS is
prepended, the chat template. Two kinds convert:

- `tokenizer.ggml.model = "gpt2"`: byte-level BPE with the file's merges (SmolLM2, Qwen2, Llama-3). How text is
  split before the merges is named by `tokenizer.ggml.pre`: GPT-2's regex (`gpt2`, `default`), GPT-2's plus single
  digits (`smollm`), Qwen2's regex (`qwen2`: case-insensitive contractions, single digits, letters kept apart from
  punctuation, runs of newlines) or Llama-3's (`llama-bpe`: Qwen2's with numbers in runs of up to three digits);
  another name is refused. Tokens that are not spelled in the byte alphabet are spelled in it, as transformers' GGUF loader does.
- `tokenizer.ggml.model = "llama"`: a SentencePiece BPE vocabulary with byte fallback (Gemma 3, Mistral, LLaMA-2).
  The file lists no merges; they are the ways each token splits into two tokens, ranked by the token they make:
  by score, except for Gemma, whose scores do not follow its merge order and whose tokens rank by their place in
  the file (transformers' GGUF loader ranks them the same way). Spaces become "▁" before the merges; a "▁" is
  prepended to the text only where `tokenizer.ggml.add_space_prefix` asks for it (Gemma's files say no).
  llama.cpp stores Gemma's tokens of two or more spaces with real spaces; they are spelled with "▁" again.

Why tokenizer.json for SentencePiece vocabularies too, rather than a `tokenizer.model` proto: the GGUF holds
neither the normalizer nor the merge order of the original proto, so a rebuilt proto would be a guess that
sentencepiece would trust, while a tokenizer.json states each rule explicitly (the one HF's GGUF loader uses, so
the ids can be checked against it), and its tokenizer_config.json carries BOS, EOS, pad and the chat template,
which minseekr's SentencePiece path does not read. Control tokens become special tokens and user-defined ones
(Gemma's runs of newlines and tabs, Qwen2's `<tool_call>`) added tokens, matched whole before the merges, as in
llama.cpp.
"""
import json
from pathlib import Path

from minseekr.runtime import InputError, atomic_write

CONTROL, USER_DEFINED = 3, 4    # llama.cpp's token types
# The regexes that split text before byte-level merges, for the `tokenizer.ggml.pre` names whose rule tokenizers
# can express. None: GPT-2's own regex, which ByteLevel applies itself.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
# Llama-3's (GPT-4's cl100k rule): Qwen2's, except that numbers split into runs of up to three digits.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# "llama3" and "llama-v3" are older names llama.cpp reads as "llama-bpe".
PRE_TOKENIZERS = {"gpt2": None, "default": None, "smollm": None, "qwen2": QWEN2_SPLIT, "llama-bpe": LLAMA3_SPLIT,
                  "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT}
# Architectures whose SentencePiece merges rank by the token's place in the file rather than by its score.
RANK_BY_POSITION = ("gemma3",)


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte: printable Latin-1 bytes stand for themselves, the rest are shifted
    past 255, so every token of a byte-level vocabulary is a string of these characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def byte_level_bpe(field, tokens):
    """tokenizers' byte-level BPE for a "gpt2" vocabulary: the file's merges, its pre-tokenizer's split rule."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    pre = field("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise InputError(f"tokenizer.ggml.pre is {pre!r}; supported: {', '.join(PRE_TOKENIZERS)}")
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(spelled)}, merges=merges))
    if PRE_TOKENIZERS[pre] is None:
        split = [pre_tokenizers.Digits(individual_digits=True)] if pre == "smollm" else []
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(split + [pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_TOKENIZERS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # A control token outside the byte alphabet is a llama.cpp mislabel: it stays an ordinary (respelled) token.
    return tokenizer, [t for t in tokens if set(t) <= alphabet]


def sentencepiece_merges(tokens: list[str], rank: list[float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies: every split of a token into two tokens, best-ranked token
    first; the splits of one token longest left part first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, r in zip(tokens, rank):
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        merges += [(r, left, right) for left, right in sorted(splits, key=lambda s: (vocab[s[0]], vocab[s[1]]))]
    merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)   # stable: ties keep the file's order
    return [(left, right) for _, left, right in merges]


def sentencepiece_bpe(field, tokens, arch: str):
    """tokenizers' BPE with byte fallback for a "llama" (SentencePiece) vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tokens = ["▁" * len(t) if t and not t.strip(" ") else t for t in tokens]
    rank = [-i for i in range(len(tokens))] if arch in RANK_BY_POSITION else field("tokenizer.ggml.scores")
    unk = tokens[field("tokenizer.ggml.unknown_token_id", 0)]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                     merges=sentencepiece_merges(tokens, rank), unk_token=unk, fuse_unk=True,
                                     byte_fallback=True))
    prefix = bool(field("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                       split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] * prefix)
    return tokenizer, tokens


def write_tokenizer(field, out: Path, arch: str, context_length: int) -> None:
    """tokenizer.json and tokenizer_config.json from the GGUF's tokenizer fields (`field(key, default)` reads one)."""
    from tokenizers import AddedToken, processors
    kind, tokens = field("tokenizer.ggml.model"), field("tokenizer.ggml.tokens")
    if kind == "gpt2":
        tokenizer, spelled = byte_level_bpe(field, tokens)
    elif kind == "llama":
        tokenizer, spelled = sentencepiece_bpe(field, tokens, arch)
    else:
        raise InputError(f"tokenizer.ggml.model is {kind!r}; supported: 'gpt2' (byte-level BPE), 'llama' "
                         f"(SentencePiece)")
    types, vocab = field("tokenizer.ggml.token_type"), set(spelled)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == CONTROL and t in vocab])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == USER_DEFINED and t in vocab])
    ids = {key: i for key in ("bos", "eos", "unknown", "padding")
           if (i := field(f"tokenizer.ggml.{key}_token_id", None)) is not None}
    special = {key: tokens[i] for key, i in ids.items()}
    # llama.cpp prepends BOS to a SentencePiece vocabulary unless the file says otherwise, never to a BPE one.
    add_bos = bool(field("tokenizer.ggml.add_bos_token", kind == "llama")) and "bos" in special
    if kind == "llama" and add_bos:
        bos = special["bos"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids["bos"])])
    atomic_write(out / "tokenizer.json", lambda tmp: tokenizer.save(str(tmp)))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special.get("bos"),
              "eos_token": special.get("eos"), "unk_token": special.get("unknown"), "pad_token": special.get("padding"),
              "add_bos_token": add_bos, "model_max_length": context_length,
              "chat_template": field("tokenizer.chat_template", "")}
    atomic_write(out / "tokenizer_config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=1)))
