"""Task data in TRACE's format, the paper's task orders, and reading answers out of generations.

A task is a folder `<task>/{train,eval,test}.json`, each a JSON list of {"prompt", "answer"} records (the
instruction is already inside the prompt), or the same records as `.jsonl`, one object per line. Only
train is required; eval and test are empty lists when absent. Records stay plain dicts holding "prompt",
"answer" and, when the file has it, "all_answers" (SuperNI's gold outputs, for max-over-references scoring);
other keys are dropped. Every file is read and checked when the sequence is loaded, so bad data stops the run
before training starts, with one message naming the file, the record and the problem. What is read stays under
`--data`: a task folder or file that a symlink takes outside it is refused, as a task name with `..` is.
"""
from dataclasses import dataclass, field
from pathlib import Path

from minseekr.evaluation.metrics import task_metric
from minseekr.runtime import InputError, read_json

SPLITS = ("train", "eval", "test")

TRACE_TASKS = ("C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten")

# Table 5 orders, named as in the paper (the official script calls them tracer1/2, superni1/2). Epochs are
# the official script's lists (Appendix B's prose lists 9 and 10 values for the 8 TRACE tasks; dropping
# the surplus 5s gives these). SuperNI folders are matched by their "taskNNN" prefix.
ORDERS = {
    "order1": (["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"],
               [5, 5, 5, 5, 5, 5, 10, 5]),
    "order2": (["NumGLUE-cm", "NumGLUE-ds", "FOMC", "20Minuten", "C-STANCE", "Py150", "MeetingBank", "ScienceQA"],
               [10, 10, 10, 5, 5, 5, 5, 5]),
    "order3": (["task1572", "task363", "task1290", "task181", "task002", "task1510", "task073", "task748",
                "task511", "task591", "task195", "task875"], [10] * 12),
    "order4": (["task748", "task073", "task1572", "task195", "task591", "task363", "task1510", "task181",
                "task511", "task002", "task1290", "task875"], [10] * 12),
}


class DataError(InputError):
    """Task data that cannot be trained on; the message names the file, the record and the problem."""


@dataclass
class Task:
    """One task of a sequence: its name (the folder name) and its records per split."""
    name: str
    train: list[dict]
    eval: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)


def _check_text(text: str, where: str) -> None:
    """A DataError for a string no tokenizer can encode: a JSON escape of half a UTF-16 pair ("\\ud800") decodes
    to a lone surrogate, which is not text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where} holds a lone surrogate U+{ord(text[e.start]):04X} at character {e.start} "
                        f"(half a UTF-16 pair); expected text") from None


def _check_record(obj, where: str) -> dict:
    """The record's prompt, answer and all_answers, or a DataError naming what is wrong."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with 'prompt' and 'answer', got {type(obj).__name__}")
    for key in ("prompt", "answer"):
        if key not in obj:
            raise DataError(f"{where}: missing key {key!r}")
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
        _check_text(obj[key], f"{where}: {key!r}")
    if not obj["answer"].strip():
        raise DataError(f"{where}: 'answer' is empty (nothing to train or score)")
    record = {"prompt": obj["prompt"], "answer": obj["answer"]}
    if "all_answers" in obj:
        answers = obj["all_answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise DataError(f"{where}: 'all_answers' must be a non-empty list of non-empty strings")
        for i, answer in enumerate(answers):
            _check_text(answer, f"{where}: 'all_answers'[{i}]")
        record["all_answers"] = answers
    return record


def _read_json(path, lines=False):
    """read_json's value; its errors (not UTF-8, not JSON, a NaN, too deep) are the data's."""
    try:
        return read_json(path, lines=lines)
    except InputError as e:
        raise DataError(str(e)) from None


def read_records(path) -> list[dict]:
    """The checked records of one .json (a list of objects) or .jsonl (one object per line) file."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return [_check_record(obj, f"{path}: line {n} (record {i})")
                for i, (n, obj) in enumerate(_read_json(path, lines=True))]
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [_check_record(obj, f"{path}: record {i}") for i, obj in enumerate(data)]


def load_task(folder, root=None) -> Task:
    """A task folder's train (required, non-empty), eval and test splits, each from .json or .jsonl; with `root`
    (--data), the folder and every file read must resolve inside it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"task folder {folder} does not exist")
    _check_inside(folder, root)
    splits = {}
    for split in SPLITS:
        found = [folder / f"{split}{ext}" for ext in (".json", ".jsonl") if (folder / f"{split}{ext}").exists()]
        if len(found) == 2:
            raise DataError(f"{folder}: both {split}.json and {split}.jsonl exist; keep one")
        if not found and split == "train":
            raise DataError(f"{folder}: no train.json or train.jsonl")
        splits[split] = read_records(_check_inside(found[0], root)) if found else []
    if not splits["train"]:
        raise DataError(f"{folder}: the train split has no records")
    return Task(folder.name, **splits)


def _check_inside(path: Path, root) -> Path:
    """path, unless a symlink takes it outside root (--data): what a run reads stays where the user pointed it."""
    if root is not None and not path.resolve().is_relative_to(Path(root).resolve()):
        raise DataError(f"{path} resolves through a symlink to {path.resolve()}, outside --data {root}: copy it "
                        f"into {root}")
    return path


def _find_folder(root: Path, task: str) -> Path | None:
    """The folder of a task under root: its exact name, or for SuperNI the one folder named `<task>_*`."""
    if (root / task).is_dir():
        return root / task
    matches = sorted(p for p in root.glob(f"{task}_*") if p.is_dir()) if root.is_dir() else []
    if len(matches) > 1:
        raise DataError(f"{root}: several folders match task {task}: {', '.join(p.name for p in matches)}")
    return matches[0] if matches else None


def format_prompts(tasks: list[Task], prompt_format: str, tokenizer) -> None:
    """Rewrite every record's prompt as `--prompt-format` says: TRACE's text (plain) or the model's chat turn."""
    if prompt_format == "chat":
        for task in tasks:
            for split in (task.train, task.eval, task.test):
                split[:] = [{**r, "prompt": tokenizer.chat(r["prompt"])} for r in split]


def parse_order(text: str):
    """A command line's --order: a named order ("order1".."order4") or comma-separated task folder names."""
    return text if text.startswith("order") and "," not in text else [t for t in text.split(",") if t]


def load_sequence(spec, data_root=None, epochs=None) -> tuple[list[Task], list[int]]:
    """The tasks of a sequence, loaded and checked, with the epochs of each.

    spec is a named order ("order1".."order4", Table 5; their task folders are looked up in data_root) or a
    list of task folders (relative ones are taken under data_root when given). epochs overrides the order's
    per-task epochs (Appendix B) with one int for every task or a list with one per task; a folder list
    without epochs trains 1 epoch per task.
    """
    root = Path(data_root) if data_root is not None else None
    if isinstance(spec, str):
        if spec not in ORDERS:
            raise DataError(f"unknown task order {spec!r}: expected one of {', '.join(ORDERS)} or a list of folders")
        if root is None:
            raise DataError(f"task order {spec} needs data_root, the folder holding its task folders")
        names, default_epochs = ORDERS[spec]
        folders = [_find_folder(root, name) for name in names]
        missing = [name for name, folder in zip(names, folders) if folder is None]
        if missing:
            raise DataError(f"{spec} needs {len(names)} task folders under {root}; missing {len(missing)}: "
                            f"{', '.join(missing)}")
    else:
        if root is not None:   # a name must stay under --data: no "..", no absolute path (symlinks: load_task)
            outside = [f for f in spec if Path(f).is_absolute() or ".." in Path(f).parts]
            if outside:
                raise DataError(f"task {outside[0]!r} is not a folder under {root}: give task folder names "
                                f"relative to --data, without '..'")
        folders = [root / f if root is not None else Path(f) for f in spec]
        default_epochs = [1] * len(folders)
        missing = [str(f) for f in folders if not f.is_dir()]
        if missing:
            raise DataError(f"task folders do not exist: {', '.join(missing)}")
    if not folders:
        raise DataError("the task sequence is empty")
    if epochs is None:
        epochs = default_epochs
    elif isinstance(epochs, int):
        epochs = [epochs] * len(folders)
    epochs = list(epochs)
    if len(epochs) != len(folders) or not all(isinstance(e, int) and e >= 1 for e in epochs):
        raise DataError(f"epochs must be one positive int or {len(folders)} of them (one per task), got {epochs}")
    return [load_task(f, root) for f in folders], epochs


ANSWER_MARKERS = ("\nAnswer:", "\n回答:", "\n答案:")


def extract_answer(text: str, task: str | None = None) -> str:
    """The answer in a generation, by the official re_eval.py rules, in order:

    1. a full-width colon "：" becomes ":";
    2. if "\\nReasoning:" occurs, the text before it (Py150 answers first, then reasons);
    3. else if "\\nAnswer:", "\\n回答:" or "\\n答案:" occurs (tried in that order), the text after its first
       occurrence, up to a second one if any;
    4. stripped of surrounding whitespace;
    5. for multiple-choice tasks (C-STANCE and FOMC, scored by first-character accuracy; ScienceQA, whose
       reference is also cut to its letter), only the first character.
    An empty answer stays "" (the official code writes " " here; `metrics.score` scores a blank as " ").
    """
    text = text.replace("：", ":")
    if "\nReasoning:" in text:
        text = text.split("\nReasoning:")[0]
    else:
        for marker in ANSWER_MARKERS:
            if marker in text:
                text = text.split(marker)[1]
                break
    text = text.strip()
    if task is not None and task_metric(task) in ("first-char-accuracy", "letter-accuracy"):
        text = text[:1]
    return text
