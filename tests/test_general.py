"""General ability (Table 2): the benchmarks' log-likelihoods against transformers, answer extraction on their own
gold strings, the subset rule on the real files, GA/ΔGA, and eval.py end to end."""
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import LlamaForCausalLM

from conftest import refused, shared_path, tiny_flags, tiny_run_inputs
from minseekr.evaluation import general
from minseekr.evaluation.metrics import delta_general_ability, general_ability
from minseekr.methods.pp import ProgressivePrompts
from minseekr.methods.sapt import SAPT
from minseekr.network.checkpoint import load_hf, save_hf
from minseekr.network.model import ModelArgs, Transformer
from minseekr.network.tokenizer import Tokenizer
from minseekr.runtime import InputError


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().split("\n") if line.strip()]   # not splitlines: U+2028


@pytest.fixture(scope="module")
def root():
    return shared_path("data", "general")


# ---- log-likelihoods against transformers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny random LLaMA saved with save_hf, loaded by minseekr and by transformers, with stories260K's
    SentencePiece tokenizer (512 tokens, BOS). 96 positions: the longer prompts are cut."""
    tokenizer = shared_path("artifacts", "stories260K-hf", "tokenizer.model")
    path = tmp_path_factory.mktemp("tiny")
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=64,
                                  max_seq_len=96))
    with torch.no_grad():   # far from uniform, so that a misplaced position or token shows
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight") else 0.5 * torch.randn_like(p))
    save_hf(model, path, dtype=torch.float32)
    shutil.copy(tokenizer, path / "tokenizer.model")
    hf = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    return load_hf(path), hf, Tokenizer(path), spm.SentencePieceProcessor(model_file=str(tokenizer)), path


def reference(hf, sp, context, continuation, max_len):
    """lm-eval's `_encode_pair` on SentencePiece ids with BOS, cut to BOS + the newest tokens, and the continuation's
    log-probabilities summed from transformers' logits of the whole sequence, one sequence at a time (of a
    continuation too long for the positions, the tokens after BOS and one context token)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = [sp.bos_id()] + sp.encode(context)
    cont = ([sp.bos_id()] + sp.encode(context + continuation))[len(ctx):]
    ids = ctx + cont
    ids = [sp.bos_id()] + ids[-(max_len - 1):] if len(ids) > max_len else ids
    with torch.no_grad():
        logp = hf(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    cont = cont[-(max_len - 2):]
    start = len(ids) - len(cont)
    return sum(float(logp[start - 1 + k, t]) for k, t in enumerate(cont))


def test_the_prompts_are_lm_evals(root):
    boolq, piqa = lines(root / "boolq/dev.jsonl")[0], lines(root / "piqa/valid.jsonl")[0]
    mmlu = lines(root / "mmlu/test.jsonl")[0]
    assert general.load(root, "boolq", 1)[0]["context"] == \
        f"{boolq['passage']}\nQuestion: {boolq['question']}?\nAnswer:"
    assert general.load(root, "piqa", 1)[0]["context"] == f"Question: {piqa['goal']}\nAnswer:"
    c = mmlu["choices"]
    assert general.load(root, "mmlu", 1)[0]["context"] == (
        f"The following are multiple choice questions (with answers) about {mmlu['subject']}.\n\n"
        f"{mmlu['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:")
    shots = lines(root / "gsm8k/fewshot.jsonl")[:5]
    gsm = lines(root / "gsm8k/test.jsonl")[0]
    assert general.load(root, "gsm8k", 1)[0]["prompt"] == \
        "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots) + \
        f"Question: {gsm['question']}\nAnswer:"
    cot = (root / "bbh/cot-prompts/boolean_expressions.txt").read_text()
    first = json.loads((root / "bbh/boolean_expressions.json").read_text())["examples"][0]
    bbh = general.load(root, "bbh", 1)[0]["prompt"]
    assert bbh == cot[cot.index("-----\n") + 6:].strip() + f"\n\nQ: {first['input']}\nA: Let's think step by step.\n"
    assert "canary" not in bbh and bbh.startswith("Evaluate the result of a random Boolean expression.\n\nQ: ")


def test_choice_loglikelihoods_equal_transformers(pair, root):
    ours, hf, tok, sp, _ = pair
    pairs = [(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", " " + c)
             for r in lines(root / "boolq/dev.jsonl")[:3] for c in r["choices"]]
    pairs += [(f"Question: {r['goal']}\nAnswer:", " " + c) for r in lines(root / "piqa/valid.jsonl")[:4]
              for c in r["choices"]]
    pairs += [(it["context"], " " + c) for it in general.load(root, "mmlu", 57)[:2] for c in it["choices"]]
    pairs += [("The answer is: ", "yes"), ("Tom and Ann", " went to the park and played")]   # a trailing space moves
    expected = [reference(hf, sp, c, x, 96) for c, x in pairs]
    # A small token budget: several right-padded batches of mixed lengths, some of them cut to 96 positions.
    got = general.loglikelihoods(ours, tok, pairs, batch_tokens=400)
    assert len(got) == len(pairs) == 24
    assert any(len(sp.encode(c)) > 96 for c, _ in pairs) and any(len(sp.encode(c)) < 40 for c, _ in pairs)
    for (c, x), a, b in zip(pairs, got, expected):
        assert a == pytest.approx(b, abs=2e-4), (c[-40:], x)
    assert max(abs(a) for a in expected) > 5   # far from uniform


def test_piqa_acc_and_acc_norm_from_the_reference_loglikelihoods(pair, root):
    ours, hf, tok, sp, _ = pair
    items, acc, norm = general.load(root, "piqa", 24), 0, 0
    for it in items:
        ll = [reference(hf, sp, it["context"], " " + c, 96) for c in it["choices"]]
        acc += ll.index(max(ll)) == it["label"]
        normed = [v / len(c) for v, c in zip(ll, it["choices"])]   # lm-eval: per character, without the space
        norm += normed.index(max(normed)) == it["label"]
    result = general.score(ours, tok, "piqa", items)
    assert result["items"] == 24 and result["metric"] == "acc"
    assert result["score"] == pytest.approx(100 * acc / 24) and result["acc_norm"] == pytest.approx(100 * norm / 24)
    assert result["score"] != result["acc_norm"]   # the two rules disagree on this model: both are checked


@pytest.mark.parametrize("method", ["pp", "sapt"])
def test_an_attached_method_chooses_from_the_context_as_at_generation(pair, root, method):
    """With soft prompts (Progressive Prompts) or per-input LoRA weights (SAPT), a continuation's log-likelihood is
    that of the model generating after its context: the method reads the context alone, in a batch of one."""
    ours, _, tok, _, path = pair
    model = load_hf(path)
    pet = ProgressivePrompts(model.args, n_tokens=3, bottleneck=8) if method == "pp" else SAPT(model.args, rank=2)
    pet.begin_task(0)
    pet.begin_task(1)
    with torch.no_grad():
        for p in pet.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    pet.attach(model)
    pairs = [(f"Question: {r['goal']}\nAnswer:", " " + c) for r in lines(root / "piqa/valid.jsonl")[:3]
             for c in r["choices"]]
    got = general.loglikelihoods(model, tok, pairs, batch_tokens=250)
    plain = general.loglikelihoods(ours, tok, pairs, batch_tokens=250)
    for (c, x), value, without in zip(pairs, got, plain):
        ids, n = general.encode_pair(tok, c, x, 96)
        context = torch.tensor([ids[:-n]])
        with torch.no_grad():
            prefix = model.soft_prompts(model.model.embed_tokens(context), torch.ones_like(context))
            k = 0 if prefix is None else prefix.shape[1]
            logp = model(torch.tensor([ids]), torch.ones(1, k + len(ids), dtype=torch.long),
                         prefix=prefix)[0, k:].double().log_softmax(-1)
        expected = sum(float(logp[len(ids) - n - 1 + i, t]) for i, t in enumerate(ids[-n:]))
        # float32 sums of about 180 nats in another batch shape: a few parts in 1e6 (2.1e-4 on an Intel Xeon)
        assert value == pytest.approx(expected, rel=1e-5, abs=2e-4)
        assert abs(value - without) > 1e-2   # the method took part


def test_acc_takes_the_largest_loglikelihood_and_acc_norm_the_largest_per_character(monkeypatch):
    # Planted log-likelihoods: "a" −3.0 (−3.0 a character), "bbbb" −10.0 (−2.5); counting the space, −1.5 and −2.0.
    monkeypatch.setattr(general, "loglikelihoods", lambda m, t, pairs, *a, **k: [-3.0, -10.0] * (len(pairs) // 2))
    items = [dict(context="Q", choices=["a", "bbbb"], label=0), dict(context="Q", choices=["a", "bbbb"], label=1)]
    result = general.score(None, None, "piqa", items)
    assert (result["score"], result["acc_norm"]) == (50.0, 50.0)
    assert [general.score(None, None, "piqa", [it])["acc_norm"] for it in items] == [0.0, 100.0]
    assert [general.score(None, None, "piqa", [it])["score"] for it in items] == [100.0, 0.0]
    monkeypatch.setattr(general, "loglikelihoods", lambda m, t, pairs, *a, **k: [-1.0, -1.0, -1.0])
    tie = dict(context="Q", choices=["x", "y", "z"], label=0)
    assert general.score(None, None, "boolq", [tie])["score"] == 100.0   # a tie goes to the first, as np.argmax


# ---- answer extraction -------------------------------------------------------------------------------------------

def test_every_gsm8k_answer_text_extracts_to_its_own_number(root):
    records = lines(root / "gsm8k/test.jsonl")
    assert len(records) == 1319
    for r in records:
        number = r["answer"].split("####")[1].strip().replace(",", "")
        assert re.fullmatch(r"-?\d+", number)
        assert general.extract_gsm8k(r["answer"]) == number == general.gsm8k_gold(r["answer"])
    assert [it["target"] for it in general.load(root, "gsm8k", 3)] == \
        [r["answer"].split("#### ")[1].replace(",", "") for r in records[:3]]


@pytest.mark.parametrize("text, expected", [
    ("Tom has 3 apples and buys 15 more, so 18 in all.", "18"),          # no "####": the last number
    ("It costs $1,200.50.", "1200.50"),
    ("#### 18\n\nQuestion: 5 apples", "18"),                             # the "####" answer, not the last number
    ("so she lost 7.\n#### -7.", "-7"),
    ("I do not know", ""),
])
def test_gsm8k_extraction(text, expected):
    assert general.extract_gsm8k(text) == expected


def worked_examples(root, task):
    """(question, the answer text after "A: ") of the three worked examples of a BBH cot prompt."""
    text = (root / "bbh/cot-prompts" / f"{task}.txt").read_text().split("-----\n", 1)[1]
    found = re.findall(r"Q: (.*?)\nA: (.*?)(?=\n\nQ: |\Z)", text, flags=re.S)
    assert len(found) == 3, task
    return found


def closes(sequence: str, answer: str) -> bool:
    """Whether `answer` closes every bracket `sequence` leaves open, in order."""
    pairs, stack = {")": "(", "]": "[", "}": "{", ">": "<"}, []
    for t in (sequence + " " + answer).split():
        if t in pairs:
            if not stack or stack.pop() != pairs[t]:
                return False
        else:
            stack.append(t)
    return not stack


def test_bbh_worked_examples_extract_to_their_targets(root):
    checked = 0
    for task in general.BBH_TASKS:
        targets = {e["target"] for e in json.loads((root / "bbh" / f"{task}.json").read_text())["examples"]}
        for question, answer in worked_examples(root, task):
            got = general.extract_bbh(answer)
            if task == "word_sorting":
                assert got == " ".join(sorted(question.split("List: ")[1].split()))
            elif task == "multistep_arithmetic_two":
                expression = question.rstrip(" =")
                assert re.fullmatch(r"[-+*() 0-9]+", expression)
                assert got == str(eval(expression))   # noqa: S307 (digits and operators only, checked above)
            elif task == "dyck_languages":
                assert closes(question.split("Input: ")[1], got), (question, got)
            else:
                assert got in targets, (task, got)
            checked += 1
    assert checked == 81


def test_bbh_targets_extract_from_answer_lines(root):
    targets = [e["target"] for t in general.BBH_TASKS
               for e in json.loads((root / "bbh" / f"{t}.json").read_text())["examples"]]
    assert len(targets) == 6511
    for target in targets:
        for text in (f"Step one.\nSo the answer is {target}.", f"So the answer is {target}",
                     f"Hence the answer is {target}.\nthe answer is (Z).", f" the answer is  {target} .\n"):
            assert general.extract_bbh(text) == target, text
    assert general.extract_bbh("So The Answer Is (A).") == ""
    assert general.cut("So the answer is (Q).\n\nQ: next", general.BBH_STOPS) == "So the answer is (Q)."


# ---- GA, ΔGA, the table ------------------------------------------------------------------------------------------

def test_ga_is_the_mean_of_the_headline_scores_and_dga_their_change():
    before = {"mmlu": dict(score=30.0, metric="acc", setting="0-shot", items=57),
              "piqa": dict(score=60.0, acc_norm=90.0, metric="acc", setting="0-shot", items=10),
              "gsm8k": dict(score=3.0, metric="exact_match", setting="5-shot", items=10)}
    after = {n: dict(r, score=r["score"] + d) for (n, r), d in zip(before.items(), (-6.0, 3.0, 0.0))}
    assert general.headline(before) == {"mmlu": 30.0, "piqa": 60.0, "gsm8k": 3.0}   # acc_norm is not in GA
    assert general_ability(general.headline(before)) == 31.0
    assert general_ability(general.headline(after)) == 30.0
    assert delta_general_ability(general.headline(before), general.headline(after)) == -1.0
    table = general.format_table({"before": before, "after": after}).splitlines()
    assert table[0].split() == ["benchmark", "items", "before", "after", "Δ"]
    assert table[-1].split() == ["GA", "31.00", "30.00", "-1.00"]
    assert table[1].split()[-3:] == ["30.00", "24.00", "-6.00"]
    assert [r.split()[-3:] for r in table if r.startswith("piqa (acc_norm")] == [["90.00", "90.00", "+0.00"]]


# ---- the subset rule --------------------------------------------------------------------------------------------

def test_samples_take_the_first_items_of_each_subject_and_task(root):
    mmlu = lines(root / "mmlu/test.jsonl")
    subjects = list(dict.fromkeys(r["subject"] for r in mmlu))
    assert len(mmlu) == 14042 and len(subjects) == 57
    for n, per in ((100, 2), (57, 1), (58, 2), (200, 4)):
        assert math.ceil(n / 57) == per
        expected = [r for s in subjects for r in [x for x in mmlu if x["subject"] == s][:per]]
        got = general.load(root, "mmlu", n)
        assert len(got) == 57 * per
        key = lambda items: sorted((r["group"] if "group" in r else r["subject"], r["label"],   # noqa: E731
                                    r["context"].split("\n\n", 1)[1] if "context" in r else r["question"].strip())
                                   for r in items)
        assert [k[:2] for k in key(got)] == [k[:2] for k in key(expected)]
        assert all(a[2].startswith(b[2]) for a, b in zip(key(got), key(expected)))
    bbh = {t: json.loads((root / "bbh" / f"{t}.json").read_text())["examples"] for t in general.BBH_TASKS}
    for n, per in ((100, 4), (27, 1), (20, 1)):
        got = general.load(root, "bbh", n)
        assert [(it["group"], it["target"]) for it in got] == \
            [(t, e["target"]) for t in general.BBH_TASKS for e in bbh[t][:per]]
        assert all(e["input"] in it["prompt"] for it, e in zip(got, [e for t in general.BBH_TASKS
                                                                      for e in bbh[t][:per]]))
    assert [it["label"] for it in general.load(root, "boolq", 7)] == [r["label"] for r in
                                                                      lines(root / "boolq/dev.jsonl")[:7]]
    assert len(general.load(root, "piqa", 0)) == 1838 and len(general.load(root, "bbh", 0)) == 6511
    assert len(general.load(root, "gsm8k", 5)) == 5


# ---- eval.py ------------------------------------------------------------------------------------------------------

def test_eval_scores_a_model_directory(root, tmp_path, capsys):
    import eval as eval_cli
    model = shared_path("artifacts", "stories260K-hf")
    out = tmp_path / "general.json"
    eval_cli.main(["--model", str(model), "--general", "boolq,piqa,gsm8k", "--general-data", str(root),
                   "--general-samples", "4", "--general-max-new-tokens", "16", "--out", str(out)])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())["general"]
    assert list(result["scores"]) == ["boolq", "piqa", "gsm8k"] and result["samples"] == 4
    assert all(r["items"] == 4 and 0 <= r["score"] <= 100 for r in result["scores"].values())
    assert result["GA"] == pytest.approx(sum(r["score"] for r in result["scores"].values()) / 3)
    assert "acc_norm" in result["scores"]["piqa"] and f"{result['GA']:.2f}" in printed.splitlines()[-2]
    # The same numbers from the library, on the same model.
    again = general.score_general(load_hf(model), Tokenizer(model), root, ["boolq", "piqa"], 4, 16, progress=False)
    assert again["scores"] == {n: result["scores"][n] for n in ("boolq", "piqa")}


def test_eval_run_reports_theta0_and_the_last_model(root, tmp_path):
    import eval as eval_cli
    import train as train_cli
    model_dir = shared_path("artifacts", "stories260K-hf")
    run, order = tmp_path / "run", "task363_sst2_polarity_classification,task195_sentiment140_classification"
    train_cli.main(["--model", str(model_dir), "--data", str(shared_path("data", "superni")), "--order", order,
                    "--method", "seqft", "--out", str(run), "--train-samples", "16", "--test-samples", "2",
                    "--epochs", "1", "--lr", "3e-3", "--batch-size", "8", "--max-len", "128", "--max-new-tokens", "4",
                    "--threads", "1", "--device", "cpu"])
    eval_cli.main([str(run), "--general", "piqa,boolq,gsm8k", "--general-data", str(root), "--general-samples", "8",
                   "--general-max-new-tokens", "8"])
    out = json.loads((run / "eval.json").read_text())["general"]
    tok = Tokenizer(model_dir / "tokenizer.model")
    for side, ckpt in (("before", "task00"), ("after", "task02")):
        expected = general.score_general(load_hf(run / "checkpoints" / ckpt), tok, root, ["piqa", "boolq", "gsm8k"],
                                         8, 8, progress=False)
        assert out[side] == expected["scores"], side
    assert out["before"] != out["after"]   # training moved them: each column is its own model's
    assert out["GA_before"] == pytest.approx(general_ability(general.headline(out["before"])))
    assert out["dGA"] == pytest.approx(out["GA_after"] - out["GA_before"])
    assert out["before"]["boolq"]["items"] == 8 and out["samples"] == 8 and out["data"] == str(root.resolve())


@pytest.mark.parametrize("extra, expected", [
    (["--general", "boolq,tydiqa"], "--general: unknown benchmark 'tydiqa'; expected names among mmlu,boolq,"),
    (["--general", "boolq,boolq"], "--general needs distinct names"),
    (["--general-samples", "5"], "--general-data and --general-samples go with --general"),
    (["--general", "piqa", "--general-samples", "-1"], "--general-samples must be ≥ 0, got -1"),
    (["--general", "gsm8k", "--general-max-new-tokens", "511"],
     "--general-max-new-tokens 511 leaves no room for a prompt in the model's 512 positions"),
])
def test_bad_general_flags_are_one_line(root, capsys, extra, expected):
    model = shared_path("artifacts", "stories260K-hf")
    err = refused(capsys, ["--model", str(model), "--general-data", str(root), *extra]
                  if "--general" in extra else ["--model", str(model), *extra], script="eval")
    assert expected in err


def test_a_missing_benchmark_file_is_named(root, tmp_path, capsys):
    model = shared_path("artifacts", "stories260K-hf")
    shutil.copytree(root / "boolq", tmp_path / "boolq")
    err = refused(capsys, ["--model", str(model), "--general", "boolq,piqa", "--general-data", str(tmp_path)],
                  script="eval")
    assert f"{tmp_path / 'piqa/valid.jsonl'} not found: benchmark piqa needs it" in err
    (tmp_path / "bbh/cot-prompts").mkdir(parents=True)
    for t in general.BBH_TASKS:
        shutil.copy(root / "bbh" / f"{t}.json", tmp_path / "bbh" / f"{t}.json")
    err = refused(capsys, ["--model", str(model), "--general", "bbh", "--general-data", str(tmp_path)], script="eval")
    assert f"{tmp_path / 'bbh/cot-prompts/boolean_expressions.txt'} not found: benchmark bbh needs it" in err


def test_the_default_data_root_is_shared_beside_the_project(root, monkeypatch, tmp_path):
    assert general.data_root("") == root and general.data_root(str(tmp_path)) == tmp_path
    monkeypatch.setattr(general, "DEFAULT_ROOT", tmp_path / "absent")
    with pytest.raises(InputError, match=f"--general needs --general-data ROOT.*{tmp_path / 'absent'} is not there"):
        general.data_root("")


def test_train_py_scores_general_ability_at_the_end_of_a_run_into_results_json(tmp_path):
    """`train.py --general` scores θ_0 and the last model as `eval.py RUN --general` does, into results.json."""
    import eval as eval_cli
    import train as train_cli
    inputs = tiny_run_inputs(tmp_path / "in", n_train=16, n_test=2)
    run = tmp_path / "run"
    train_cli.main(tiny_flags(inputs, run, "--method", "seqft", "--general", "boolq,piqa", "--general-samples", "3",
                              "--general-data", str(shared_path("data", "general"))))
    trained = json.loads((run / "results.json").read_text())["general"]
    eval_cli.main([str(run), "--general", "boolq,piqa", "--general-samples", "3", "--general-data",
                   str(shared_path("data", "general"))])
    evaluated = json.loads((run / "eval.json").read_text())["general"]
    assert set(trained["before"]) == {"boolq", "piqa"} and trained["before"]["piqa"]["items"] == 3
    for key in ("before", "after", "GA_before", "GA_after", "dGA"):
        assert trained[key] == evaluated[key], key
