"""Evaluation metrics: the per-answer scores of TRACE and SuperNI, and the continual-learning summaries.

Per-answer metrics reproduce the tools the official SEEKR/TRACE code scores with, so each can be checked
against that tool's published values; each keeps its tool's scale:

    exact_match, first_char_accuracy   1.0 or 0.0
    letter_accuracy                    1.0 or 0.0
    rouge_l                            an F in [0, 1]      (python `rouge` 1.0.1, pltrdy)
    edit_similarity                    an int in 0..100    (fuzzywuzzy `fuzz.ratio` over python-Levenshtein)
    sari                               0..100              (HF `evaluate`'s "sari")

`score(task, preds, refs)` averages one of them over a test set and always returns 0..100 (the paper's tables).
The official `show_results.py` instead guesses the scale (a score > 1 is divided by 100), which misreads a
genuine score <= 1 on the 0..100 scales; a fixed scale per metric avoids the guess. As in the official
`re_eval.py`, a blank prediction is scored as " " (0 under exact match, first character and ROUGE-L; a small
positive edit similarity or SARI where the reference has spaces) and counts in the mean.

The continual-learning summaries take an accuracy matrix R with R[i][j] = score on task j after training
task i (0-based). The paper writes a_{j,i} for the same number (task index first), so its Eq. 14 and 15 read
transposed here.
"""
import re
import string
from collections import Counter

# ---- answer-level metrics -----------------------------------------------------------------------------------


def exact_match(pred: str, ref: str) -> float:
    """Accuracy: 1.0 when the stripped prediction equals the stripped reference."""
    return float(pred.strip() == ref.strip())


def first_char_accuracy(pred: str, ref: str) -> float:
    """Multiple-choice accuracy (C-STANCE, FOMC): the prediction's first character is the whole answer."""
    return float(pred.strip()[:1] == ref.strip())


def letter_accuracy(pred: str, ref: str) -> float:
    """ScienceQA's accuracy: the first characters of prediction and reference, whose letter precedes its reasoning."""
    return float(pred.strip()[:1] == ref.strip()[:1])


def _lcs_table(x: list, y: list) -> list[list[int]]:
    """table[i][j] = length of the longest common subsequence of x[:i] and y[:j]."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            if x[i - 1] == y[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    return table


def _lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The distinct words of one LCS of x and y, walking the table back from the end: take a match, else
    step back in x only if that keeps a strictly longer LCS (the `rouge` package's walk; the LCS found
    decides the set)."""
    table, words = _lcs_table(x, y), set()
    i, j = len(x), len(y)
    while i and j:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l(pred: str, ref: str, *, variant: str = "rouge-1.0.1") -> float:
    """ROUGE-L F (Lin 2004, β = 1) of a prediction against one reference, in [0, 1].

    variant="rouge-1.0.1" (default; what SEEKR and TRACE report, via the python `rouge` package 1.0.1):
      - sentences: the text split at every "." (empty pieces dropped), each whitespace-normalised;
        words: each sentence split on " " (a whitespace-only piece gives one empty word "");
        case-sensitive, no stemming, other punctuation stays attached to words;
      - summary-level ROUGE-L with *distinct* words: L = |union over sentence pairs of the words of one LCS|,
        P = L / |distinct prediction words|, R = L / |distinct reference words|;
      - F = 2PR / (P + R + 1e-8): the F1 formula with an epsilon, so a perfect match gives 0.999999995.
      - A text with no sentence (empty, or only dots) raises in the package; the official code scores it 0.
    variant="lcs": the textbook sentence-level form on whitespace tokens with repetitions counted:
      L = LCS(pred tokens, ref tokens), P = L/|pred|, R = L/|ref|, F = 2PR/(P+R) (0 when L = 0).
    The two agree on a single sentence without "." and without repeated words (up to the epsilon).
    """
    if variant == "lcs":
        x, y = pred.split(), ref.split()
        lcs = _lcs_table(x, y)[-1][-1] if x and y else 0
        return 0.0 if lcs == 0 else 2 * lcs / (len(x) + len(y))  # 2PR/(P+R) with P = L/|x|, R = L/|y|
    if variant != "rouge-1.0.1":
        raise ValueError(f"rouge_l: variant must be 'rouge-1.0.1' or 'lcs', got {variant!r}")
    pred_sents = [" ".join(s.split()).split(" ") for s in pred.split(".") if s]
    ref_sents = [" ".join(s.split()).split(" ") for s in ref.split(".") if s]
    if not pred_sents or not ref_sents:
        return 0.0
    # The official call is get_scores(hyps=target, refs=prediction), so the LCS walk runs over
    # (prediction words, target words); F itself is symmetric.
    union = set()
    for x in pred_sents:
        for y in ref_sents:
            union |= _lcs_words(x, y)
    p = len(union) / len({w for s in ref_sents for w in s})
    r = len(union) / len({w for s in pred_sents for w in s})
    return 2.0 * p * r / (p + r + 1e-8)


def edit_distance(a: str, b: str, *, substitution_cost: int = 1) -> int:
    """Levenshtein distance: insertions and deletions cost 1, a substitution `substitution_cost`.

    substitution_cost=1 is the classic distance ("kitten" → "sitting": 3); substitution_cost=2 is the InDel
    distance (a substitution is a deletion plus an insertion: |a| + |b| − 2·LCS; "kitten" → "sitting": 5).
    """
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        row = [i]
        for j, cb in enumerate(b, 1):
            row.append(min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (0 if ca == cb else substitution_cost)))
        prev = row
    return prev[-1]


def edit_similarity(pred: str, ref: str) -> int:
    """Edit similarity 0..100, as fuzzywuzzy's `fuzz.ratio` with python-Levenshtein installed (SEEKR's setup).

    round(100 · (|a| + |b| − d) / (|a| + |b|)) with d the InDel distance (substitution cost 2), i.e.
    `Levenshtein.ratio`, evaluated as 1 − d/(|a| + |b|) in floats as python-Levenshtein >= 0.20 does (the
    float decides exact halves: 2.5 → 3 here, 2 with the 0.12 formula); Python's round. Equal strings give
    100, then an empty one 0. (Without python-Levenshtein, fuzzywuzzy uses difflib's ratio, which differs.)
    """
    if pred == ref:
        return 100
    if not pred or not ref:
        return 0
    total = len(pred) + len(ref)
    return int(round(100 * (1 - edit_distance(pred, ref, substitution_cost=2) / total)))


def restore_literals(code: str) -> str:
    """Py150's literal placeholders back to code, as TRACE's eval_Py150 does before scoring.

    <NUM_LIT> → "0", <STR_LIT> and <CHAR_LIT> → "", and <STR_LIT:x>, <NUM_LIT:x>, <CHAR_LIT:x> → x.
    """
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return re.sub(r"<(?:STR|NUM|CHAR)_LIT:(.*?)>", r"\1", code, flags=re.S)


# mteval-v13a (sacrebleu's "13a"): ASCII punctuation except ' , - . becomes its own token; "." and "," split
# off unless between digits; "-" splits off after a digit.
_SEPARATE = re.compile("([" + re.escape("".join(sorted(set(string.punctuation) - set("',-.")))) + "])")


def _tokenize_13a(text: str) -> str:
    """The mteval-v13a tokenisation SARI applies to every sentence (after lowercasing)."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = _SEPARATE.sub(r" \1 ", f" {text} ")
    text = re.sub(r"([^0-9])([.,])", r"\1 \2 ", text)
    text = re.sub(r"([.,])([^0-9])", r" \1 \2", text)
    text = re.sub(r"([0-9])(-)", r"\1 \2 ", text)
    return " ".join(text.split())


def _ngrams(words: list[str], n: int) -> list[tuple]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def _f1(p: float, r: float) -> float:
    return 0.0 if p == 0 and r == 0 else 2 * p * r / (p + r)


def sari_operations(source: str, pred: str, refs: list[str]) -> tuple[float, float, float]:
    """SARI's (keep F1, deletion precision, addition F1), each averaged over n = 1..4, on 0..1.

    Xu et al. 2016 as HF `evaluate`'s "sari" computes it (the tensor2tensor variant): sentences lowercased
    and 13a-tokenised; source and prediction n-gram counts are multiplied by the number of references before
    being compared with the pooled reference counts; 0/0 counts as 1; keep recall divides by the total count
    of source n-grams found in the references (the "fixed" keep recall); addition uses sets of n-grams.
    """
    s1, c1 = _tokenize_13a(source.lower()).split(" "), _tokenize_13a(pred.lower()).split(" ")
    r1 = [_tokenize_13a(r.lower()).split(" ") for r in refs]
    keep, delete, add = [], [], []
    for n in range(1, 5):
        s, c = Counter(_ngrams(s1, n)), Counter(_ngrams(c1, n))
        r = Counter(g for words in r1 for g in _ngrams(words, n))
        s_rep = Counter({g: k * len(refs) for g, k in s.items()})
        c_rep = Counter({g: k * len(refs) for g, k in c.items()})

        kept = s_rep & c_rep                     # source n-grams the prediction keeps
        kept_good, keep_all = kept & r, s_rep & r
        p = sum(kept_good[g] / kept[g] for g in kept_good) / len(kept) if kept else 1.0
        rec = sum(kept_good.values()) / sum(keep_all.values()) if keep_all else 1.0
        keep.append(_f1(p, rec))

        deleted = s_rep - c_rep                  # source n-grams the prediction drops
        deleted_good = deleted - r
        delete.append(sum(deleted_good[g] / deleted[g] for g in deleted_good) / len(deleted) if deleted else 1.0)

        added = set(c) - set(s)                  # prediction n-grams not in the source
        added_good, add_all = added & set(r), set(r) - set(s)
        p = len(added_good) / len(added) if added else 1.0
        rec = len(added_good) / len(add_all) if add_all else 1.0
        add.append(_f1(p, rec))
    return sum(keep) / 4, sum(delete) / 4, sum(add) / 4


def sari(source: str, pred: str, refs: list[str]) -> float:
    """SARI = (F1_keep + P_del + F1_add) / 3 on 0..100 (Xu et al. 2016; HF `evaluate`'s "sari")."""
    return 100 * (sum(sari_operations(source, pred, refs)) / 3)


# ---- test-set scores ----------------------------------------------------------------------------------------

# Each metric maps (prediction, references, source) to 0..100; several references give the best one,
# except SARI, which is defined over all of them.
METRICS = {
    "accuracy": lambda pred, refs, src: 100 * max(exact_match(pred, r) for r in refs),
    "first-char-accuracy": lambda pred, refs, src: 100 * max(first_char_accuracy(pred, r) for r in refs),
    "letter-accuracy": lambda pred, refs, src: 100 * max(letter_accuracy(pred, r) for r in refs),
    "rouge-l": lambda pred, refs, src: 100 * max(rouge_l(pred, r) for r in refs),
    "similarity": lambda pred, refs, src: max(edit_similarity(restore_literals(pred), restore_literals(r))
                                              for r in refs),
    "sari": lambda pred, refs, src: sari(src, pred, refs),
}

# The official show_results.py table. SuperNI folders are matched by their "taskNNN" prefix.
TASK_METRICS = {
    "C-STANCE": "first-char-accuracy", "FOMC": "first-char-accuracy", "ScienceQA": "letter-accuracy",
    "NumGLUE-cm": "accuracy", "NumGLUE-ds": "accuracy", "MeetingBank": "rouge-l", "Py150": "similarity",
    "20Minuten": "sari",
    "task363": "accuracy", "task195": "accuracy", "task875": "accuracy",
    **{t: "rouge-l" for t in ("task181", "task748", "task1510", "task002", "task073", "task591", "task511",
                              "task1290", "task1572")},
}


def task_metric(task: str) -> str:
    """The metric name of a task (folder) name; exact-match accuracy for tasks not in TASK_METRICS."""
    key = re.match(r"(task\d+)(_|$)", task)
    return TASK_METRICS.get(key.group(1) if key else task, "accuracy")


def score(task_or_metric: str, preds: list[str], refs: list, sources: list[str] | None = None) -> float:
    """Mean score of a test set on 0..100, by a task name (TASK_METRICS) or a metric name (METRICS).

    refs[i] is one reference string or a list of them (e.g. SuperNI's `all_answers`). A blank prediction is
    scored as " ", as the official code does. SARI needs the sources: TRACE passes the full prompts.
    """
    metric = task_or_metric if task_or_metric in METRICS else task_metric(task_or_metric)
    if len(preds) != len(refs) or not preds:
        raise ValueError(f"score({task_or_metric!r}): need as many references as predictions, at least one; "
                         f"got {len(preds)} predictions and {len(refs)} references")
    if metric == "sari" and (sources is None or len(sources) != len(preds)):
        raise ValueError(f"score({task_or_metric!r}): SARI needs sources= (the prompts), one per prediction")
    total = 0.0
    for i, (pred, ref) in enumerate(zip(preds, refs)):
        total += METRICS[metric](pred if pred.strip() else " ", [ref] if isinstance(ref, str) else list(ref),
                                 sources[i] if sources else None)
    return total / len(preds)


# ---- continual-learning summaries ---------------------------------------------------------------------------


def _entry(R, i: int, j: int, what: str) -> float:
    if i >= len(R) or j >= len(R[i]) or R[i][j] is None:
        raise ValueError(f"accuracy matrix: R[{i}][{j}] is missing; {what} needs it")
    return R[i][j]


def overall_performance(R) -> float:
    """Eq. 14: OP = (1/T) Σ_j R[T−1][j], the mean score over all T tasks after the last one."""
    n_tasks = len(R)
    return sum(_entry(R, n_tasks - 1, j, "OP (the last row)") for j in range(n_tasks)) / n_tasks


def backward_transfer(R, *, over_all_tasks: bool = False) -> float:
    """Eq. 15: BWT = (1/(T−1)) Σ_{j<T−1} (R[T−1][j] − R[j][j]), how much later training changed old tasks.

    over_all_tasks=True divides by T instead (the official show_results.py averages over all T tasks, the
    last term being 0). A single task gives 0.
    """
    last = len(R) - 1
    drops = [_entry(R, last, j, "BWT (the last row)") - _entry(R, j, j, "BWT (the diagonal)") for j in range(last)]
    if not drops:
        return 0.0
    return sum(drops) / (len(R) if over_all_tasks else last)


def forward_transfer(R, base: list[float]) -> float:
    """FWT = (1/(T−1)) Σ_{j≥1} (R[j−1][j] − b_j), the score on task j before training on it, minus the
    base model's zero-shot score b_j (Lopez-Paz & Ranzato 2017, with the base model as their random init)."""
    n_tasks = len(R)
    if len(base) != n_tasks:
        raise ValueError(f"forward_transfer: base needs one zero-shot score per task ({n_tasks}), got {len(base)}")
    if n_tasks < 2:
        return 0.0
    return sum(_entry(R, j - 1, j, "FWT (the first superdiagonal)") - base[j] for j in range(1, n_tasks)) / (n_tasks - 1)


def general_ability(scores: dict[str, float]) -> float:
    """GA: the mean score over the general-ability benchmarks (Table 2's MMLU, GSM, BBH, TydiQA, BoolQ, PIQA)."""
    if not scores:
        raise ValueError("general_ability: no benchmark scores given")
    return sum(scores.values()) / len(scores)


def delta_general_ability(before: dict[str, float], after: dict[str, float]) -> float:
    """ΔGA = GA after continual learning − GA of the initial model, over the same benchmarks."""
    if set(before) != set(after):
        raise ValueError(f"delta_general_ability: benchmarks differ: before {sorted(before)}, after {sorted(after)}")
    return general_ability(after) - general_ability(before)


def format_matrix(R, task_names: list[str], digits: int = 2, row_names: list[str] | None = None) -> str:
    """The accuracy matrix as an aligned table: row i = after training task i (or `row_names[i]`), column j =
    task j; '-' = not run."""
    row_names = row_names or task_names
    width = max([len(n) for n in task_names] + [digits + 4])
    label = max(len(n) for n in row_names) + len("after ")
    lines = [" " * label + "".join(f" {n:>{width}}" for n in task_names)]
    for i, row in enumerate(R):
        cells = "".join(f" {'-' if v is None else f'{v:.{digits}f}':>{width}}" for v in row)
        lines.append(f"{'after ' + row_names[i]:<{label}}{cells}")
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    """One line of a run's summary: OP, BWT (÷ (T−1), Eq. 15), BWT_T (÷ T, the paper's tables), FWT, the heads."""
    parts = [f"OP {summary['OP']:.2f}"]
    for key in ("BWT", "BWT_T", "FWT"):
        if summary.get(key) is not None:
            parts.append(f"{key} {summary[key]:.2f}")
    if summary.get("heads"):
        parts.append("heads (layer, head) " + " ".join(f"{l}.{h}" for l, h in summary["heads"]))
    if summary.get("run_dir"):
        parts.append(f"in {summary['run_dir']}")
    return "  ".join(parts)
