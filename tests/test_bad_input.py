"""Bad input in the files a run reads (JSON, config.json, the safetensors index, the chat template, task data) ends
in one InputError naming the file and the field or record, what was found and what was expected."""
import json
import math
import re
import signal
import threading
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

from conftest import refused, tiny_run_inputs
from minseekr.evaluation.data import DataError, load_sequence, load_task
from minseekr.network import tokenizer as tokenizer_module
from minseekr.network.checkpoint import HFCheckpoint, load_hf, read_args, save_hf
from minseekr.network.model import ModelArgs, Transformer
from minseekr.network.tokenizer import Tokenizer
from minseekr.run.config import ContinualConfig, read_settings
from minseekr.runtime import InputError, read_json

DEEP = 200_000   # nested lists: far beyond the interpreter's recursion limit
GOOD = {"prompt": "2+2=", "answer": "4"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_inputs(tmp_path_factory.mktemp("bad-input"), n_train=8, n_test=2)


def copied_model(setup, tmp_path):
    """A copy of the tiny run's model folder (to edit) and train.py's flags for a short run on it."""
    model_dir, data = setup
    (tmp_path / "model").mkdir()
    for f in model_dir.iterdir():
        (tmp_path / "model" / f.name).write_bytes(f.read_bytes())
    return tmp_path / "model", ["--model", str(tmp_path / "model"), "--data", str(data), "--order", "rev,rot",
                                "--out", str(tmp_path / "run"), "--method", "seqft", "--epochs", "1", "--batch-size",
                                "8", "--max-len", "32", "--max-new-tokens", "4", "--threads", "1", "--device", "cpu"]


def tiny(tied=False, **kw):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**{**dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61,
                                            hidden_dim=48), **kw}, tie_embeddings=tied))
    model.init_weights(0.2)
    return model


def hf_tokenizer(folder, chat_template="{{ messages[0]['content'] }}", eos="</s>"):
    """A word-level tokenizer.json (ids: <unk> 0, <s> 1, </s> 2, then words) and its tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<eot>", "hello", "world"])}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": eos, "chat_template": chat_template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer.json"


# --- one JSON reader: not UTF-8, not JSON, NaN and infinities, nesting too deep ---------------------------------

def data_json(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.json").write_text(json.dumps([GOOD]))
    return tmp_path / "t" / "train.json", lambda: load_task(tmp_path / "t")


def data_jsonl(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.jsonl").write_text(json.dumps(GOOD) + "\n")
    return tmp_path / "t" / "train.jsonl", lambda: load_task(tmp_path / "t")


def model_config(tmp_path):
    save_hf(tiny(), tmp_path)
    return tmp_path / "config.json", lambda: read_args(tmp_path)


def shard_index(tmp_path):
    save_hf(tiny(), tmp_path, max_shard_size="12KB")
    return tmp_path / "model.safetensors.index.json", lambda: HFCheckpoint(tmp_path)


def tokenizer_config(tmp_path):
    path = hf_tokenizer(tmp_path)
    return tmp_path / "tokenizer_config.json", lambda: Tokenizer(path)


def run_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(asdict(ContinualConfig())))
    return tmp_path / "config.json", lambda: read_settings(tmp_path / "config.json", ContinualConfig)


READERS = [data_json, data_jsonl, model_config, shard_index, tokenizer_config, run_config]


def first_member(text: str, value: str) -> str:
    """A JSON object or list (or a JSON Lines file of one object) with `value` written in as its first member."""
    return text[0] + ('"x": ' if text[0] == "{" else "") + value + ", " + text[1:]


@pytest.mark.parametrize("value, expected", [
    ("NaN", "NaN is not JSON"),
    ("Infinity", "Infinity is not JSON"),
    ("-Infinity", "-Infinity is not JSON"),
    ("[" * DEEP + "]" * DEEP, "JSON nested too deeply to read"),
    ('"\udcff"', "not UTF-8 text (byte"),      # written as the lone byte 0xff
    ("{", "not valid JSON (Expecting property name enclosed in double quotes at"),
], ids=["nan", "inf", "-inf", "deep", "not-utf8", "not-json"])
@pytest.mark.parametrize("reader", READERS, ids=lambda r: r.__name__)
def test_every_json_file_a_run_reads_refuses_what_is_not_json_naming_the_file(reader, value, expected, tmp_path):
    file, read = reader(tmp_path)
    file.write_bytes(first_member(file.read_text(), value).encode("utf-8", "surrogateescape"))
    with pytest.raises(InputError) as error:
        read()
    assert str(error.value).startswith(f"{file}: ") and expected in str(error.value), error.value
    assert "\n" not in str(error.value)


def test_an_infinite_setting_in_a_runs_config_is_refused_not_trained_on(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(asdict(ContinualConfig())).replace('"lr": 1e-05',
                                                                                         '"lr": Infinity'))
    assert "Infinity" in (tmp_path / "config.json").read_text()
    with pytest.raises(InputError, match=r"config\.json: Infinity is not JSON"):
        read_settings(tmp_path / "config.json", ContinualConfig)


def test_an_infinite_epsilon_in_the_models_config_is_one_line_from_train_py(setup, tmp_path, capsys):
    model_dir, argv = copied_model(setup, tmp_path)
    config = model_dir / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": Infinity'))
    assert "Infinity" in config.read_text()
    assert f"train.py: error: {config}: Infinity is not JSON" in refused(capsys, argv)


def test_read_json_gives_the_value_the_type_asked_for_and_json_lines_by_number(tmp_path):
    file = tmp_path / "a.json"
    file.write_text('{"a": [1, 2.5, "x"]}')
    assert read_json(file, dict) == {"a": [1, 2.5, "x"]}
    with pytest.raises(InputError, match=r"a\.json: expected a JSON list, got dict"):
        read_json(file, list)
    file.write_text('{"a": 1}\n\n{"a": 2}\n[1,\n')
    with pytest.raises(InputError, match=r"a\.json: line 4: not valid JSON \(Expecting value at column 4\)"):
        read_json(file, lines=True)
    file.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_json(file, lines=True) == [(1, {"a": 1}), (3, {"a": 2})]


def test_a_jsonl_record_may_hold_a_line_separator_inside_a_string(tmp_path):
    (tmp_path / "t").mkdir()
    record = {"prompt": "one\u2028two\u2029three\x85four", "answer": "5"}
    (tmp_path / "t" / "train.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n")
    assert load_task(tmp_path / "t").train == [record]


# --- config.json: every value checked where it is read, the error naming its key --------------------------------

BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=61,
            intermediate_size=48)


@pytest.mark.parametrize("key, value, expected", [
    ("hidden_size", 64.0, "hidden_size must be an int ≥ 1, got 64.0"),
    ("num_hidden_layers", True, "num_hidden_layers must be an int ≥ 1, got True"),
    ("num_attention_heads", 0, "num_attention_heads must be an int ≥ 1, got 0"),
    ("num_key_value_heads", "2", "num_key_value_heads must be an int ≥ 1 or null, got '2'"),
    ("vocab_size", -61, "vocab_size must be an int ≥ 1, got -61"),
    ("intermediate_size", 48.5, "intermediate_size must be an int ≥ 1, got 48.5"),
    ("head_dim", 8.0, "head_dim must be an int ≥ 1 or null, got 8.0"),
    ("max_position_embeddings", None, "max_position_embeddings must be an int ≥ 1, got None"),
    ("rms_norm_eps", math.inf, "rms_norm_eps must be a finite number > 0, got inf"),
    ("rms_norm_eps", 0, "rms_norm_eps must be a finite number > 0, got 0"),
    ("rms_norm_eps", "1e-5", "rms_norm_eps must be a finite number > 0, got '1e-5'"),
    ("rope_theta", 0, "rope_theta must be a finite number > 0, got 0"),
    ("rope_theta", math.nan, "rope_theta must be a finite number > 0, got nan"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": -1.0},
     "rope_parameters.rope_theta must be a finite number > 0, got -1.0"),
    ("rope_scaling", "none", "rope_scaling must be an object or null, got 'none'"),
    ("tie_word_embeddings", "true", "tie_word_embeddings must be true or false, got 'true'"),
    ("tie_word_embeddings", 1, "tie_word_embeddings must be true or false, got 1"),
    ("bos_token_id", 1.0, "bos_token_id must be a token id in 0..60 or null, got 1.0"),
    ("eos_token_id", 61, "eos_token_id must be a token id in 0..60 or a list of them, got 61"),
    ("eos_token_id", [2, "3"], "eos_token_id must be a token id in 0..60 or a list of them, got [2, '3']"),
    ("eos_token_id", None, "eos_token_id must be a token id in 0..60 or a list of them, got None"),
    ("attention_bias", "false", "attention_bias must be true or false, got 'false'"),
])
def test_each_config_value_is_checked_where_it_is_read(key, value, expected):
    with pytest.raises(ValueError) as error:
        ModelArgs.from_hf_config({**BASE, key: value}, source="m/config.json")
    assert str(error.value) == f"m/config.json: {expected}"


def test_head_counts_that_do_not_divide_are_named_by_their_keys():
    with pytest.raises(ValueError, match=r"config\.json: num_attention_heads=4 is not a multiple of "
                                         r"num_key_value_heads=3$"):
        ModelArgs.from_hf_config({**BASE, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match=r"config\.json: hidden_size=34 is not a multiple of num_attention_heads=4"):
        ModelArgs.from_hf_config({**BASE, "hidden_size": 34})
    assert ModelArgs.from_hf_config({**BASE, "hidden_size": 34, "head_dim": 8}).head_dim == 8


def test_eos_may_be_a_list_and_bos_null_as_transformers_allows():
    args = ModelArgs.from_hf_config({**BASE, "eos_token_id": [2, 3], "bos_token_id": None})
    assert (args.eos_id, args.bos_id) == ([2, 3], None)
    assert ModelArgs.from_hf_config(args.to_hf_config()) == args


def test_a_float_size_in_config_json_is_one_line_from_train_py(setup, tmp_path, capsys):
    model_dir, argv = copied_model(setup, tmp_path)
    config = model_dir / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "hidden_size": 32.0}))
    assert f"{config}: hidden_size must be an int ≥ 1, got 32.0" in refused(capsys, argv)


# --- the safetensors index and a tied lm_head ---------------------------------------------------------------------

@pytest.fixture
def sharded(tmp_path):
    """A sharded tiny model in tmp/model whose second shard is moved to tmp/other; (model dir, that shard's name)."""
    model_dir = tmp_path / "model"
    save_hf(tiny(), model_dir, max_shard_size="12KB")
    shard = sorted(model_dir.glob("model-*.safetensors"))[1].name
    (tmp_path / "other").mkdir()
    (model_dir / shard).rename(tmp_path / "other" / shard)
    return model_dir, shard


def point_index(model_dir, shard, to):
    index_file = model_dir / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"] = {name: to if file == shard else file for name, file in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))


@pytest.mark.parametrize("how", ["dot-dot", "absolute", "symlink"])
def test_an_index_cannot_place_a_shard_outside_the_model_folder(sharded, how):
    model_dir, shard = sharded
    outside = model_dir.parent / "other" / shard
    if how == "symlink":
        (model_dir / shard).symlink_to(outside)
    else:
        point_index(model_dir, shard, f"../other/{shard}" if how == "dot-dot" else str(outside))
    with pytest.raises(InputError) as error:
        load_hf(model_dir)
    message = str(error.value)
    assert message.startswith(f"{model_dir / 'model.safetensors.index.json'}: weight_map places 'model.")
    assert "outside the model folder" in message and shard in message


def test_the_hf_hub_caches_own_symlinks_into_blobs_are_followed(tmp_path):
    """`from_pretrained` downloads into models--org--name/blobs/ and links snapshots/<revision>/ files there."""
    repo, model = tmp_path / "models--org--tiny", tiny()
    save_hf(model, tmp_path / "saved", max_shard_size="12KB")
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted((tmp_path / "saved").iterdir())):
        f.rename(repo / "blobs" / f"sha{i}")
        (snapshot / f.name).symlink_to(f"../../blobs/sha{i}")
    loaded = load_hf(snapshot)
    assert all(torch.equal(loaded.get_parameter(n), p) for n, p in model.named_parameters())


def with_lm_head(tmp_path, lm_head):
    save_hf(tiny(tied=True), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = lm_head(tensors["model.embed_tokens.weight"])
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})


def test_a_tied_checkpoint_may_store_its_lm_head_only_as_a_copy_of_the_embeddings(tmp_path):
    with_lm_head(tmp_path / "copy", lambda embed: embed.clone())
    model = load_hf(tmp_path / "copy")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with_lm_head(tmp_path / "differs", lambda embed: embed + (torch.arange(61)[:, None] == 60))   # the last row
    with pytest.raises(InputError, match=r"differs/model\.safetensors: config\.json ties lm_head to the embeddings "
                                         r"\(tie_word_embeddings true\) but the file's lm_head\.weight differs from "
                                         r"model\.embed_tokens\.weight: set tie_word_embeddings to false"):
        load_hf(tmp_path / "differs")


# --- the chat template: a time limit, the sandbox, one line naming the file --------------------------------------

def test_a_chat_template_that_renders_for_too_long_is_stopped(tmp_path, monkeypatch):
    tok = Tokenizer(hf_tokenizer(tmp_path, "{% for i in range(10**5) %}{% for j in range(10**5) %}x{% endfor %}"
                                           "{% endfor %}"))
    monkeypatch.setattr(tokenizer_module, "RENDER_SECONDS", 0.2)
    before = signal.getsignal(signal.SIGALRM)
    with pytest.raises(InputError, match=rf"^{re.escape(str(tmp_path / 'tokenizer_config.json'))}: the chat "
                                         rf"template did not render a prompt within 0\.2 s$"):
        tok.chat("hello")
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_chat_template_renders_outside_the_main_thread_without_a_limit(tmp_path):
    tok, out = Tokenizer(hf_tokenizer(tmp_path)), []
    thread = threading.Thread(target=lambda: out.append(tok.chat("hello world")))
    thread.start()
    thread.join()
    assert out == ["hello world"]


@pytest.mark.parametrize("template, expected", [
    ("{{ ''.__class__.__mro__ }}", "SecurityError: access to attribute '__class__' of 'str' object is unsafe"),
    ("{{ messages.append(1) }}", "SecurityError: access to attribute 'append' of 'list' object is unsafe"),
    ("{% for m in messages %}", "TemplateSyntaxError at line 1: Unexpected end of template"),
    ("{{ messages }}\n{% if %}", "TemplateSyntaxError at line 2: Expected an expression"),
    ("{{ nothing() }}", "UndefinedError: 'nothing' is undefined"),
    ("{{ range(10**6) | list }}", "OverflowError: Range too big"),
    ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
])
def test_a_chat_template_error_is_one_line_naming_the_file(tmp_path, template, expected):
    tok = Tokenizer(hf_tokenizer(tmp_path, template))
    with pytest.raises(InputError) as error:
        tok.chat("hello")
    assert str(error.value).startswith(f"{tmp_path / 'tokenizer_config.json'}: the chat template cannot be "
                                       f"rendered ({expected}")
    assert "\n" not in str(error.value)


def test_a_tokenizer_whose_eos_is_not_the_models_is_refused(tmp_path):
    model_dir = tmp_path / "model"
    save_hf(tiny(), model_dir)                                  # eos_token_id 2
    args = read_args(model_dir)
    Tokenizer(hf_tokenizer(tmp_path / "a", eos="</s>")).check_model(args, model_dir)      # id 2
    other = Tokenizer(hf_tokenizer(tmp_path / "b", eos="<eot>"))                          # id 3
    with pytest.raises(InputError, match=rf"tokenizer\.json ends a sequence with EOS id 3 but "
                                         rf"{re.escape(str(model_dir / 'config.json'))} names eos_token_id 2"):
        other.check_model(args, model_dir)
    other.check_model(ModelArgs(**{**asdict(args), "eos_id": [2, 3]}), model_dir)          # one of a list
    with pytest.raises(InputError, match=r"tokenizer\.json has 6 tokens but .* embeds 5"):
        other.check_model(ModelArgs(**{**asdict(args), "vocab_size": 5, "eos_id": 3}), model_dir)


# --- task data: reads stay under --data, strings are text ---------------------------------------------------------

def test_a_task_file_or_folder_symlinked_out_of_the_data_root_is_refused(setup, tmp_path):
    _, data = setup
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    (root / "rev").mkdir(parents=True)
    (root / "rev" / "train.json").write_bytes((data / "rev" / "train.json").read_bytes())
    outside.mkdir()
    (outside / "test.json").write_bytes((data / "rev" / "test.json").read_bytes())
    (root / "rev" / "test.json").symlink_to(outside / "test.json")
    with pytest.raises(DataError, match=rf"^{re.escape(str(root / 'rev' / 'test.json'))} resolves through a "
                                        rf"symlink to {re.escape(str(outside / 'test.json'))}, outside --data"):
        load_sequence(["rev"], root)
    (root / "rot").symlink_to(data / "rot")
    with pytest.raises(DataError, match=rf"^{re.escape(str(root / 'rot'))} resolves through a symlink to "
                                        rf"{re.escape(str(data / 'rot'))}, outside --data"):
        load_sequence(["rot"], root)
    (root / "rev" / "test.json").unlink()
    (root / "rev" / "test.json").symlink_to("train.json")           # a link inside --data is followed
    task = load_sequence(["rev"], root)[0][0]
    assert task.test == task.train and task.train


@pytest.mark.parametrize("text, ext, expected", [
    (r'[{"prompt": "a\ud800b", "answer": "4"}]', ".json",
     r"train\.json: record 0: 'prompt' holds a lone surrogate U\+D800 at character 1"),
    ('{"prompt": "p", "answer": "4"}\n{"prompt": "p", "answer": "\\udfff"}\n', ".jsonl",
     r"train\.jsonl: line 2 \(record 1\): 'answer' holds a lone surrogate U\+DFFF at character 0"),
    (r'[{"prompt": "p", "answer": "4", "all_answers": ["4", "\ud83d"]}]', ".json",
     r"train\.json: record 0: 'all_answers'\[1\] holds a lone surrogate U\+D83D"),
])
def test_a_string_holding_half_a_surrogate_pair_is_refused_naming_record_and_field(tmp_path, text, ext, expected):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / f"train{ext}").write_text(text)
    with pytest.raises(DataError, match=expected):
        load_task(tmp_path / "t")
    good = r'[{"prompt": "\ud83d\ude00", "answer": "4"}]'           # a whole pair is one character: 😀
    (tmp_path / "t" / f"train{ext}").unlink()
    (tmp_path / "t" / "train.json").write_text(good)
    assert load_task(tmp_path / "t").train[0]["prompt"] == "😀"
