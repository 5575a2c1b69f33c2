"""The LLaMA-2 tokenizer reproduces Meta's ids, and the TRACE encoding labels exactly the answer and EOS."""
import json

import pytest
from conftest import shared_path

from minseekr.network.tokenizer import IGNORE, Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(shared_path("artifacts", "llama2-tokenizer", "tokenizer.model"))


@pytest.fixture(scope="module")
def sst2():
    path = shared_path("data", "superni", "task363_sst2_polarity_classification", "train.json")
    return json.loads(path.read_text())[:50]


def labelled(labels):
    return [t for t in labels if t != IGNORE]


def test_reproduces_meta_ids_of_the_llama2c_golden_prompts(tok):
    golden = json.loads(shared_path("artifacts", "goldens", "llama2_tokenizer_golden.json").read_text())
    assert len(golden) == 5
    for case in golden:
        assert tok.encode(case["text"]) == case["ids_with_bos"], case["text"]


def test_llama2_special_ids_and_pad_is_unk(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, 0)
    assert tok.encode("Hello world", bos=False) == [15043, 3186]
    assert tok.encode("Hello world", eos=True) == [1, 15043, 3186, 2]


def test_decode_skips_bos_eos_and_pad(tok):
    text = "Simply put, the theory of relativity states that 😀"
    ids = tok.encode(text, eos=True)
    assert tok.decode(ids) == text
    assert tok.decode([tok.pad_id] * 3 + ids + [tok.pad_id]) == text


def test_missing_or_corrupt_model_file_is_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00not a sentencepiece model")
    with pytest.raises(ValueError, match="bad.model is not a SentencePiece model"):
        Tokenizer(bad)


def test_training_example_is_bos_prompt_answer_eos_with_labels_on_answer_and_eos(tok, sst2):
    for row in sst2:
        prompt, answer = row["prompt"], row["answer"]
        assert prompt.endswith("Output: ") and answer in ("POS", "NEG")
        ids, labels = tok.encode_example(prompt, answer, max_len=1536)
        assert ids == [tok.bos_id] + tok.sp.encode(prompt + answer) + [tok.eos_id]
        assert len(labels) == len(ids)
        n = len(labelled(labels))
        # Labels are a suffix equal to the inputs there: answer tokens then EOS.
        assert labels[:-n] == [IGNORE] * (len(ids) - n) and labels[-n:] == ids[-n:]
        assert labels[-1] == tok.eos_id
        assert tok.decode(labelled(labels)) == answer
        assert tok.decode(ids[:-n]) == prompt.rstrip(" ")


def test_prompt_space_merged_into_the_answers_first_piece_is_labelled(tok, sst2):
    ids, labels = tok.encode_example(sst2[0]["prompt"], "POS", max_len=1536)
    # "...\nOutput: POS" ends `Output : ▁P OS`: `▁P` holds the prompt's trailing space and the "P".
    assert tok.sp.id_to_piece(ids[-5:]) == ["Output", ":", "▁P", "OS", "</s>"]
    assert labelled(labels) == [349, 3267, tok.eos_id]


def test_boundary_comes_from_the_joint_tokenization_not_the_answer_alone(tok, sst2):
    # The official rule labels len(encode(answer)) + 1 trailing tokens; for these answers that
    # count is one too many and would put a prompt token ("▁" or ":") under the loss.
    for prompt, answer, first in [(sst2[0]["prompt"], "1", "1"), ("Output:", "POS", "POS")]:
        ids, labels = tok.encode_example(prompt, answer, max_len=1536)
        assert tok.sp.id_to_piece(labelled(labels)) == [first, "</s>"]
        official_count = len(tok.sp.encode(answer)) + 1
        assert official_count == len(labelled(labels)) + 1


def test_multibyte_and_emoji_answers_keep_every_byte_piece(tok, sst2):
    prompt = sst2[1]["prompt"]
    for answer in ["😀", "très bien 😀👍", "日本語"]:
        ids, labels = tok.encode_example(prompt, answer, max_len=1536)
        assert tok.decode(labelled(labels)) == answer
        assert tok.decode(ids) == prompt + answer
    # The emoji falls back to four byte pieces (<0xF0> <0x9F> <0x98> <0x80>), all labelled, while
    # the prompt's trailing space becomes a piece `▁` of its own and stays unlabelled.
    ids, labels = tok.encode_example(prompt, "😀", max_len=1536)
    assert labelled(labels) == [243, 162, 155, 131, tok.eos_id]
    assert tok.sp.id_to_piece(ids[-6]) == "▁" and tok.decode(ids[:-5]) == prompt


def test_left_truncation_keeps_bos_and_drops_the_oldest_prompt_tokens(tok, sst2):
    prompt, answer = sst2[2]["prompt"], sst2[2]["answer"]
    full_ids, full_labels = tok.encode_example(prompt, answer, max_len=1536)
    assert len(full_ids) > 20
    ids, labels = tok.encode_example(prompt, answer, max_len=20)
    assert len(ids) == len(labels) == 20
    assert ids == [tok.bos_id] + full_ids[-19:]
    assert labels == [IGNORE] + full_labels[-19:]
    assert tok.decode(labelled(labels)) == answer


def test_an_answer_longer_than_max_len_keeps_bos_its_end_and_eos(tok):
    ids, labels = tok.encode_example("Output: ", "NEG", max_len=3)      # ▁N EG </s> does not fit
    assert ids == [tok.bos_id, 11787, tok.eos_id]
    assert labels == [IGNORE, 11787, tok.eos_id]
    with pytest.raises(ValueError, match="max_len=1"):
        tok.encode_example("Output: ", "NEG", max_len=1)
