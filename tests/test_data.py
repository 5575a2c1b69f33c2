"""Task loading, the paper's task orders and answer extraction, on the shared data and on planted bad files."""
import json
from collections import Counter

import pytest
from conftest import shared_path

from minseekr.evaluation.data import DataError, ORDERS, TRACE_TASKS, extract_answer, load_sequence, load_task

README_ORDER3 = ["task1572", "task363", "task1290", "task181", "task002", "task1510", "task073", "task748",
                 "task511", "task591", "task195", "task875"]
README_ORDER4 = ["task748", "task073", "task1572", "task195", "task591", "task363", "task1510", "task181",
                 "task511", "task002", "task1290", "task875"]


def write_task(folder, train, test=None, ext=".json"):
    """A task folder with train (and test) records written as .json or .jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, records in (("train", train), ("test", test)):
        if records is None:
            continue
        text = "\n".join(json.dumps(r) for r in records) + "\n" if ext == ".jsonl" else json.dumps(records)
        (folder / f"{split}{ext}").write_text(text)
    return folder


# ---- the shared data ----------------------------------------------------------------------------------------

def test_superni_task363_loads_with_the_readmes_counts():
    task = load_task(shared_path("data", "superni", "task363_sst2_polarity_classification"))
    assert task.name == "task363_sst2_polarity_classification"
    assert (len(task.train), len(task.eval), len(task.test)) == (1000, 0, 100)
    assert Counter(r["answer"] for r in task.test) == {"POS": 51, "NEG": 49}
    assert set(task.train[0]) == {"prompt", "answer"}                          # "id" is dropped
    assert all(r["all_answers"] == [r["answer"]] for r in task.test)          # one gold answer each
    assert task.test[0]["prompt"].startswith("Definition: ") and task.test[0]["prompt"].endswith("\nOutput: ")


def test_trace_fomc_loads_with_the_readmes_counts():
    task = load_task(shared_path("data", "trace-partial", "FOMC"))
    assert (task.name, len(task.train), len(task.test)) == ("FOMC", 5000, 962)
    assert {r["answer"] for r in task.train + task.test} == {"A", "B", "C"}


def test_jsonl_records_equal_json_records(tmp_path):
    records = load_task(shared_path("data", "superni", "task363_sst2_polarity_classification")).test
    raw = [{**r, "id": f"x{i}"} for i, r in enumerate(records)]
    as_json = load_task(write_task(tmp_path / "a", raw, raw))
    as_jsonl = load_task(write_task(tmp_path / "b", raw, raw, ext=".jsonl"))
    assert as_json.train == as_jsonl.train == records
    assert as_json.test == as_jsonl.test == records


# ---- bad data -----------------------------------------------------------------------------------------------

GOOD = {"prompt": "p", "answer": "a"}


@pytest.mark.parametrize("content, message", [
    ('[{"prompt": "p", "answer": "a"},', r"train\.json: not valid JSON \(Expecting value at line 1"),
    ('{"prompt": "p", "answer": "a"}', r"train\.json: expected a JSON list of records, got dict"),
    ('[{"prompt": "p", "answer": "a"}, ["p", "a"]]', r"train\.json: record 1: expected an object .* got list"),
    ('[{"prompt": "p"}]', r"train\.json: record 0: missing key 'answer'"),
    ('[{"answer": "a"}]', r"train\.json: record 0: missing key 'prompt'"),
    ('[{"prompt": "p", "answer": 17}]', r"train\.json: record 0: 'answer' must be a string, got int"),
    ('[{"prompt": null, "answer": "a"}]', r"train\.json: record 0: 'prompt' must be a string, got NoneType"),
    ('[{"prompt": "p", "answer": "a"}, {"prompt": "p", "answer": " \\n"}]',
     r"train\.json: record 1: 'answer' is empty"),
    ('[{"prompt": "p", "answer": "a", "all_answers": []}]', r"record 0: 'all_answers' must be a non-empty list"),
    ('[]', r"the train split has no records"),
])
def test_bad_json_fails_naming_file_record_and_problem(tmp_path, content, message):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.json").write_text(content)
    with pytest.raises(DataError, match=message):
        load_task(tmp_path / "t")


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "p", "answer": "a"}\n{"prompt": "p", "answer": }\n', r"train\.jsonl: line 2: not valid JSON"),
    ('{"prompt": "p", "answer": "a"}\n\n{"prompt": "p"}\n',
     r"train\.jsonl: line 3 \(record 1\): missing key 'answer'"),
    ('["p", "a"]\n', r"train\.jsonl: line 1 \(record 0\): expected an object"),
])
def test_bad_jsonl_fails_naming_the_line(tmp_path, content, message):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        load_task(tmp_path / "t")


def test_bad_test_split_is_caught_too(tmp_path):
    folder = write_task(tmp_path / "t", [GOOD], [GOOD, {"prompt": "p", "answer": ""}])
    with pytest.raises(DataError, match=r"test\.json: record 1: 'answer' is empty"):
        load_task(folder)


def test_missing_train_file_and_missing_folder(tmp_path):
    folder = write_task(tmp_path / "t", [GOOD])
    (folder / "train.json").rename(folder / "test.json")
    with pytest.raises(DataError, match=r"t: no train\.json or train\.jsonl"):
        load_task(folder)
    with pytest.raises(DataError, match=r"task folder .*nope does not exist"):
        load_task(tmp_path / "nope")


def test_both_json_and_jsonl_is_ambiguous(tmp_path):
    folder = write_task(tmp_path / "t", [GOOD])
    write_task(folder, [GOOD], ext=".jsonl")
    with pytest.raises(DataError, match=r"both train\.json and train\.jsonl exist"):
        load_task(folder)


# ---- task sequences -----------------------------------------------------------------------------------------

def test_superni_orders_resolve_to_the_readmes_sequences_with_10_epochs():
    root = shared_path("data", "superni")
    for order, expected in (("order3", README_ORDER3), ("order4", README_ORDER4)):
        tasks, epochs = load_sequence(order, root)
        assert [t.name.split("_")[0] for t in tasks] == expected
        assert epochs == [10] * 12
    assert sum(len(t.train) for t in tasks) == 10467 and sum(len(t.test) for t in tasks) == 1063  # README totals


def test_trace_orders_and_their_epochs(tmp_path):
    # The official script's tracer1/tracer2 (Table 5's orders 1 and 2) with Appendix B's epochs.
    for name in TRACE_TASKS:
        write_task(tmp_path / name, [GOOD], [GOOD])
    tasks, epochs = load_sequence("order1", tmp_path)
    assert [t.name for t in tasks] == ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm",
                                       "NumGLUE-ds", "20Minuten"]
    assert epochs == [5, 5, 5, 5, 5, 5, 10, 5]
    tasks, epochs = load_sequence("order2", tmp_path)
    assert [t.name for t in tasks] == ["NumGLUE-cm", "NumGLUE-ds", "FOMC", "20Minuten", "C-STANCE", "Py150",
                                       "MeetingBank", "ScienceQA"]
    assert epochs == [10, 10, 10, 5, 5, 5, 5, 5]
    assert sorted(ORDERS["order1"][0]) == sorted(ORDERS["order2"][0]) == sorted(TRACE_TASKS)


def test_epochs_can_be_overridden(tmp_path):
    for name in TRACE_TASKS:
        write_task(tmp_path / name, [GOOD])
    assert load_sequence("order1", tmp_path, epochs=2)[1] == [2] * 8
    assert load_sequence("order1", tmp_path, epochs=list(range(1, 9)))[1] == list(range(1, 9))
    with pytest.raises(DataError, match=r"epochs must be one positive int or 8 of them"):
        load_sequence("order1", tmp_path, epochs=[5, 5])
    with pytest.raises(DataError, match=r"epochs must be"):
        load_sequence("order1", tmp_path, epochs=0)


def test_missing_trace_tasks_are_named():
    with pytest.raises(DataError) as err:
        load_sequence("order1", shared_path("data", "trace-partial"))
    message = str(err.value)
    assert "missing 5: C-STANCE, MeetingBank, Py150, ScienceQA, 20Minuten" in message
    assert "FOMC" not in message and "NumGLUE" not in message


def test_a_list_of_folders_is_a_sequence_of_one_epoch_each():
    root = shared_path("data", "trace-partial")
    tasks, epochs = load_sequence(["NumGLUE-cm", "FOMC"], root)
    assert [(t.name, len(t.train), len(t.test)) for t in tasks] == [("NumGLUE-cm", 5000, 122), ("FOMC", 5000, 962)]
    assert epochs == [1, 1]
    with pytest.raises(DataError, match=r"task folders do not exist: .*C-STANCE"):
        load_sequence(["FOMC", "C-STANCE"], root)


def test_unknown_order_name_is_refused():
    with pytest.raises(DataError, match=r"unknown task order 'order5': expected one of order1, order2"):
        load_sequence("order5", "/nonexistent")


# ---- answer extraction --------------------------------------------------------------------------------------

@pytest.mark.parametrize("generation, task, answer", [
    ("  POS \n", "task363_sst2_polarity_classification", "POS"),
    ("x = foo ( )\nReasoning: it calls foo", "Py150", "x = foo ( )"),
    ("Let me think.\nAnswer: 17\n", "NumGLUE-cm", "17"),
    ("Let me think.\nAnswer：17", "NumGLUE-cm", "17"),                   # full-width colon
    ("思考\n回答: 答案是A", None, "答案是A"),
    ("思考\n答案：B", None, "B"),
    ("a\nAnswer: 1\nAnswer: 2", None, "1"),                               # up to a second marker
    ("A\nReasoning: x\nAnswer: B", "FOMC", "A"),                          # Reasoning wins
    ("B. hawkish", "FOMC", "B"),                                          # first character for multiple choice
    ("Reasoning first\nAnswer: C) neutral", "C-STANCE", "C"),
    ("B. hawkish", "task073_commonsenseqa_answer_generation", "B. hawkish"),  # ROUGE-L task: no cut
    ("  \n", "FOMC", ""),
])
def test_extract_answer_follows_re_eval(generation, task, answer):
    assert extract_answer(generation, task) == answer
