"""General ability (SEEKR Table 2): MMLU, BoolQ, PIQA, GSM8K and BBH, scored offline as lm-evaluation-harness does.

SEEKR reports general ability before and after continual learning (TRACE ran OpenCompass); the benchmarks' items
live under one folder (`../shared/data/general`, its README says where each comes from). The prompts and rules are
lm-evaluation-harness's task configs (v0.4, the task named in brackets), written again here:

- Multiple choice, by log-likelihood (`loglikelihoods`): each choice is a continuation of the prompt, scored by the
  sum of its tokens' log-probabilities. Encoding as lm-eval's `_encode_pair`: a prompt's trailing whitespace moves to
  the continuation, the prompt is tokenised alone and the pair as one text, and the continuation is what the pair
  has beyond the prompt's tokens. Sequences start as the model's do (BOS where it uses one; lm-eval's HF backend
  adds none by default, OpenCompass's does for LLaMA) and a longer one keeps BOS and its newest tokens.
  - MMLU [mmlu]: "The following are multiple choice questions (with answers) about {subject}.\n\n{question}\nA. …
    \nD. …\nAnswer:" and the choices " A" … " D"; accuracy over items (lm-eval weights subjects by size,
    OpenCompass averages them). **0-shot**: lm-eval and OpenCompass give 5 shots from the dev split, not here.
  - BoolQ [boolq]: "{passage}\nQuestion: {question}?\nAnswer:", choices " no" / " yes"; accuracy.
  - PIQA [piqa]: "Question: {goal}\nAnswer:", choices " {solution}"; accuracy (in GA) and acc_norm, the argmax of
    the log-likelihood divided by the solution's length in characters (lm-eval's `len(choice)`, without the space).
- Generation, greedy with the KV cache (`generations`), stopped at EOS or after `max_new_tokens` (256; lm-eval: until
  a stop string), then cut at the first stop string; prompts keep their newest tokens, as many as the model's
  positions leave beside the new ones.
  - GSM8K [gsm8k, v3]: 5-shot, the first 5 items of `gsm8k/fewshot.jsonl` (the first train items: lm-eval's
    `first_n`), each "Question: {question}\nAnswer: {answer}" joined by blank lines, then "Question: {question}
    \nAnswer:"; cut at "Question:". The answer is the number after "#### " (lm-eval's strict match), else the last
    number in the text (its flexible extract); commas, "$" and a trailing "." dropped on both sides; exact match.
  - BBH [bbh_cot_fewshot]: the task's 3-shot chain-of-thought prompt (`cot-prompts/<task>.txt` after its canary
    lines), then "\n\nQ: {input}\nA: Let's think step by step.\n"; cut at a blank line or "Q:" (lm-eval cuts at
    any "Q", which truncates "(Q)", an answer of reasoning_about_colored_objects). The answer is the rest of the line
    after the first "the answer is ", stripped, without a trailing "." (lm-eval's regex drops the line's last
    character, whatever it is); exact match with the target, averaged over items (lm-eval weights tasks by size).
Prompts are plain text, without a chat template (lm-eval's default). TyDiQA, Table 2's sixth benchmark, is not here.
Scores are on 0-100; GA is their mean (`metrics.general_ability`).

`samples=N` scores a deterministic subset: the first N items of BoolQ, PIQA and GSM8K, the first ⌈N/57⌉ items of each
MMLU subject and the first ⌈N/27⌉ of each BBH task, in file order. Under torchrun every rank scores every world-th
batch with its own copy of the model, as `evaluation.evaluate` does; results are gathered.
"""
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minseekr.evaluation.metrics import delta_general_ability, general_ability
from minseekr.network.generate import generate
from minseekr.runtime import InputError, gather, rank_world, read_json

BENCHMARKS = ("mmlu", "boolq", "piqa", "gsm8k", "bbh")
DEFAULT_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "general"   # ../shared beside the project
FILES = {"mmlu": "mmlu/test.jsonl", "boolq": "boolq/dev.jsonl", "piqa": "piqa/valid.jsonl",
         "gsm8k": "gsm8k/test.jsonl", "gsm8k-shots": "gsm8k/fewshot.jsonl"}
BBH_TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting")
GSM8K_SHOTS = 5
GSM8K_STOPS = ("Question:", "</s>", "<|im_end|>")
BBH_STOPS = ("\n\n", "Q:", "</s>", "<|im_end|>")
GENERATES = ("gsm8k", "bbh")
# Each benchmark's headline metric, the one GA averages.
METRIC = {"mmlu": "acc", "boolq": "acc", "piqa": "acc", "gsm8k": "exact_match", "bbh": "exact_match"}
SETTING = {"mmlu": "0-shot", "boolq": "0-shot", "piqa": "0-shot", "gsm8k": "5-shot", "bbh": "3-shot CoT"}


# ---- the data ------------------------------------------------------------------------------------------------------

def parse_names(text: str) -> list[str]:
    """The benchmarks named in a comma-separated list, each once and known."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in BENCHMARKS:
            raise InputError(f"--general: unknown benchmark {n!r}; expected names among {','.join(BENCHMARKS)}")
    if not names or len(set(names)) != len(names):
        raise InputError(f"--general needs distinct names among {','.join(BENCHMARKS)}, got {text!r}")
    return names


def data_root(path: str = "") -> Path:
    """The benchmarks' folder: `path` (--general-data), or else ../shared/data/general beside the project."""
    if path:
        return Path(path)
    if DEFAULT_ROOT.is_dir():
        return DEFAULT_ROOT
    raise InputError(f"--general needs --general-data ROOT, the folder holding mmlu/, boolq/, piqa/, gsm8k/ and bbh/ "
                     f"({DEFAULT_ROOT} is not there)")


def files(root, name: str) -> list[Path]:
    """Every file benchmark `name` reads under `root`."""
    root = Path(root)
    if name == "bbh":
        return [p for t in BBH_TASKS for p in (root / "bbh" / f"{t}.json", root / "bbh" / "cot-prompts" / f"{t}.txt")]
    return [root / FILES[name]] + ([root / FILES["gsm8k-shots"]] if name == "gsm8k" else [])


def check(root, names: list[str], args=None, max_new_tokens: int = 256) -> None:
    """Before any model runs: every file present, and room for a prompt beside the generated tokens."""
    for name in names:
        for path in files(root, name):
            if not path.is_file():
                raise InputError(f"{path} not found: benchmark {name} needs it (--general-data is the folder "
                                 f"holding {', '.join(BENCHMARKS)})")
    if args is not None and set(names) & set(GENERATES) and args.max_seq_len - max_new_tokens < 2:
        raise InputError(f"--general-max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                         f"{args.max_seq_len} positions: give at most {args.max_seq_len - 2}")


def _records(path, keys) -> list[dict]:
    """A JSON Lines file's objects, each holding `keys`."""
    numbered = read_json(path, lines=True)
    for line, r in numbered:
        if not isinstance(r, dict) or any(k not in r for k in keys):
            raise InputError(f"{path} line {line}: expected an object with {', '.join(keys)}")
    return [r for _, r in numbered]


def first_per_group(records: list[dict], group, samples: int, n_groups: int) -> list[dict]:
    """The first ⌈samples/n_groups⌉ records of each group, in file order (all of them for samples 0)."""
    if not samples:
        return records
    k, seen, kept = math.ceil(samples / n_groups), {}, []
    for r in records:
        seen[group(r)] = seen.get(group(r), 0) + 1
        if seen[group(r)] <= k:
            kept.append(r)
    return kept


def load(root, name: str, samples: int = 0) -> list[dict]:
    """The items of one benchmark to score: multiple choice as {context, choices, label}, generation as {prompt,
    target}; each with its `group` (MMLU's subject, BBH's task)."""
    root = Path(root)
    if name == "mmlu":
        records = _records(root / FILES[name], ("subject", "question", "choices", "label"))
        records = first_per_group(records, lambda r: r["subject"], samples, len({r["subject"] for r in records}))
        return [dict(context=f"The following are multiple choice questions (with answers) about {r['subject']}.\n\n"
                             f"{r['question'].strip()}\n" + "".join(f"{letter}. {c}\n" for letter, c in
                                                                    zip("ABCD", r["choices"])) + "Answer:",
                     choices=list("ABCD"[:len(r["choices"])]), label=r["label"], group=r["subject"]) for r in records]
    if name == "boolq":
        return [dict(context=f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", choices=r["choices"],
                     label=r["label"]) for r in _records(root / FILES[name], ("passage", "question", "choices",
                                                                                "label"))[:samples or None]]
    if name == "piqa":
        return [dict(context=f"Question: {r['goal']}\nAnswer:", choices=r["choices"], label=r["label"])
                for r in _records(root / FILES[name], ("goal", "choices", "label"))[:samples or None]]
    if name == "gsm8k":
        shots = _records(root / FILES["gsm8k-shots"], ("question", "answer"))[:GSM8K_SHOTS]
        head = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
        return [dict(prompt=f"{head}Question: {r['question']}\nAnswer:", target=gsm8k_gold(r["answer"]))
                for r in _records(root / FILES[name], ("question", "answer"))[:samples or None]]
    if name == "bbh":
        items = []
        for task in BBH_TASKS:
            cot = (root / "bbh" / "cot-prompts" / f"{task}.txt").read_text(encoding="utf-8")
            cot = cot.split("-----\n", 1)[1].strip() if "-----\n" in cot else cot.strip()   # the canary lines
            examples = read_json(root / "bbh" / f"{task}.json", dict).get("examples")
            if not isinstance(examples, list) or not all(isinstance(e, dict) and "input" in e and "target" in e
                                                         for e in examples):
                raise InputError(f"{root / 'bbh' / f'{task}.json'}: expected examples, a list of {{input, target}}")
            k = math.ceil(samples / len(BBH_TASKS)) if samples else None
            items += [dict(prompt=f"{cot}\n\nQ: {e['input']}\nA: Let's think step by step.\n",
                           target=e["target"].strip(), group=task) for e in examples[:k]]
        return items
    raise InputError(f"--general: unknown benchmark {name!r}; expected names among {','.join(BENCHMARKS)}")


# ---- answers -------------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\$?[0-9][0-9,]*(?:\.[0-9]+)?")


def _plain_number(text: str) -> str:
    """lm-eval's gsm8k normalisation: commas and "$" removed, then a trailing period."""
    text = text.strip().replace(",", "").replace("$", "")
    return text[:-1] if text.endswith(".") else text


def gsm8k_gold(answer: str) -> str:
    """The reference number of a GSM8K answer text: what follows its "####"."""
    return _plain_number(answer.split("####")[-1])


def extract_gsm8k(text: str) -> str:
    """The number after the first "#### ", else the last number in the text ("" when there is none)."""
    if m := re.search(r"#### (-?[0-9.,]+)", text):
        return _plain_number(m.group(1))
    numbers = _NUMBER.findall(text)
    return _plain_number(numbers[-1]) if numbers else ""


def extract_bbh(text: str) -> str:
    """The rest of the line after the first "the answer is ", stripped, without a trailing "." ("" when absent)."""
    if (m := re.search(r"the answer is (.*)", text)) is None:
        return ""
    answer = m.group(1).strip()
    return answer[:-1].rstrip() if answer.endswith(".") else answer


def cut(text: str, stops) -> str:
    """`text` up to its first stop string."""
    return text[:min([i for s in stops if (i := text.find(s)) >= 0], default=len(text))]


# ---- the model -----------------------------------------------------------------------------------------------------

def encode_pair(tokenizer, context: str, continuation: str, max_len: int) -> tuple[list[int], int]:
    """lm-eval's `_encode_pair`: (ids of context + continuation, how many of them are the continuation's), at most
    `max_len` ids (BOS, where the model uses one, and the newest tokens kept, at least one of the context's)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:   # " yes" after "Answer: " would tokenise apart from how the pair does
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = tokenizer.encode(context)
    # One piece across the boundary (SentencePiece merges a run of unknown characters) leaves the pair no longer
    # than the context: then the continuation is tokenised alone.
    cont = tokenizer.encode(context + continuation)[len(ctx):] or tokenizer.encode(continuation, bos=False)
    if not ctx:   # nothing to condition on: lm-eval's prefix token
        ctx = [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id]
    head = [tokenizer.bos_id] if tokenizer.add_bos else []
    if not cont:
        raise InputError(f"the continuation {continuation!r} has no tokens to score")
    ids = ctx + cont
    if len(ids) > max_len:   # a continuation longer than the positions allow: its newest tokens are scored
        ids = head + ids[len(ids) - (max_len - len(head)):]
    return ids, min(len(cont), max_len - len(head) - 1)


def _logits(model, tokens, mask, context):
    """The model's logits with an attached method's soft prompts (or SAPT's weights), chosen from the context tokens
    as at generation; their rows dropped."""
    chooser = getattr(model, "soft_prompts", None)
    prefix = None if chooser is None else chooser(model.model.embed_tokens(tokens), context)
    if prefix is None:
        return model(tokens, mask)
    n = prefix.shape[1]
    return model(tokens, torch.cat([mask.new_ones(mask.shape[0], n), mask], 1), prefix=prefix)[:, n:]


def _batch_loglikelihoods(model, rows, pad_id: int) -> list[float]:
    """Σ log p(continuation | context) of each (ids, n continuation tokens) row, in one right-padded batch."""
    B, T, device = len(rows), max(len(ids) for ids, _ in rows), model.device
    tokens = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, T, dtype=torch.long, device=device)
    context = torch.zeros(B, T, dtype=torch.bool, device=device)
    scored = torch.zeros(B, T, dtype=torch.bool, device=device)   # the continuation's tokens
    for i, (ids, n) in enumerate(rows):
        tokens[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, :len(ids)] = 1
        context[i, :len(ids) - n] = True
        scored[i, len(ids) - n:len(ids)] = True
    logits = _logits(model, tokens, mask, context)                              # (B, T, V)
    # The logits at t predict token t + 1: only the continuation's rows go through log-softmax, in fp32.
    rows_logits = logits[:, :-1][scored[:, 1:]].float()                         # (K, V), row by row
    picked = F.log_softmax(rows_logits, -1).gather(-1, tokens[:, 1:][scored[:, 1:]][:, None]).squeeze(-1)
    return [float(s.sum()) for s in picked.split([n for _, n in rows])]


def _batches(lengths: list[int], budget: int, max_rows: int = 64) -> list[list[int]]:
    """Indices grouped longest first into batches of at most `budget` padded tokens (one sequence at least)."""
    order, out = sorted(range(len(lengths)), key=lambda i: -lengths[i]), []
    for i in order:
        if out and len(out[-1]) < max_rows and (len(out[-1]) + 1) * lengths[out[-1][0]] <= budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _on_ranks(batches: list[list[int]], run, desc: str, progress: bool) -> dict:
    """{index: run(batch)[k]} over every batch, each rank running every world-th one; gathered on every rank."""
    rank, world = rank_world()
    mine = {}
    for b in tqdm(batches[rank::world], desc=desc, leave=False, disable=not progress):
        mine.update(zip(b, run(b)))
    return {i: v for part in gather(mine) for i, v in part.items()}


@torch.no_grad()
def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], batch_tokens: int = 4096, progress=False,
                   desc="loglikelihood") -> list[float]:
    """Σ log p(continuation | context) for each (context, continuation) pair, encoded by `encode_pair`."""
    rows = [encode_pair(tokenizer, c, x, model.args.max_seq_len) for c, x in pairs]
    was_training = model.training
    model.eval()
    try:
        run = lambda b: _batch_loglikelihoods(model, [rows[i] for i in b], tokenizer.pad_id)   # noqa: E731
        done = _on_ranks(_batches([len(ids) for ids, _ in rows], batch_tokens), run, desc, progress)
    finally:
        model.train(was_training)
    return [done[i] for i in range(len(rows))]


def generations(model, tokenizer, prompts: list[str], max_new_tokens: int, stops=(), batch_size: int = 16,
                progress=False, desc="generate") -> list[str]:
    """Greedy KV-cache continuations of `prompts`, each cut at its first stop string; prompts keep their newest
    tokens, as many as the model's positions leave beside `max_new_tokens`."""
    room = model.args.max_seq_len - max_new_tokens
    ids = [tokenizer.prompt(p, room) for p in prompts]
    run = lambda b: [cut(tokenizer.decode(o), stops) for o in generate(   # noqa: E731
        model, [ids[i] for i in b], max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)]
    done = _on_ranks(_batches([len(p) for p in ids], 1 << 62, batch_size), run, desc, progress)
    return [done[i] for i in range(len(ids))]


# ---- scores --------------------------------------------------------------------------------------------------------

def _by_group(items, hits) -> dict:
    groups = {}
    for item, hit in zip(items, hits):
        groups.setdefault(item["group"], []).append(hit)
    return {g: 100 * sum(h) / len(h) for g, h in groups.items()}


def score(model, tokenizer, name: str, items: list[dict], max_new_tokens: int = 256, batch_tokens: int = 4096,
          batch_size: int = 16, progress=False) -> dict:
    """One benchmark's result: `score` (its METRIC, 0-100, what GA averages), `metric`, `items`, the setting, and
    acc_norm (PIQA) or the score of each subject or task (MMLU, BBH)."""
    if not items:
        raise InputError(f"benchmark {name}: no items to score")
    out = dict(metric=METRIC[name], setting=SETTING[name], items=len(items))
    desc = f"general {name}"
    if name in GENERATES:
        texts = generations(model, tokenizer, [it["prompt"] for it in items], max_new_tokens,
                            GSM8K_STOPS if name == "gsm8k" else BBH_STOPS, batch_size, progress, desc)
        extract = extract_gsm8k if name == "gsm8k" else extract_bbh
        hits = [extract(t) == it["target"] for t, it in zip(texts, items)]
    else:
        pairs = [(it["context"], " " + c) for it in items for c in it["choices"]]
        lls, hits, norm_hits = loglikelihoods(model, tokenizer, pairs, batch_tokens, progress, desc), [], []
        for it in items:
            ll, lls = lls[:len(it["choices"])], lls[len(it["choices"]):]
            normed = [v / len(c) for v, c in zip(ll, it["choices"])]
            hits.append(max(range(len(ll)), key=ll.__getitem__) == it["label"])   # ties: the first, as np.argmax
            norm_hits.append(max(range(len(ll)), key=normed.__getitem__) == it["label"])
        if name == "piqa":
            out["acc_norm"] = 100 * sum(norm_hits) / len(items)
    out["score"] = 100 * sum(hits) / len(items)
    if "group" in items[0]:
        out["groups"] = _by_group(items, hits)
    return out


def score_general(model, tokenizer, root, names: list[str], samples: int = 0, max_new_tokens: int = 256,
                  progress=True, **batching) -> dict:
    """The benchmarks on one model: {data, samples, max_new_tokens, scores: {benchmark: its result}, GA}."""
    check(root, names, model.args, max_new_tokens)
    scores = {n: score(model, tokenizer, n, load(root, n, samples), max_new_tokens, progress=progress, **batching)
              for n in names}
    return dict(data=str(Path(root).resolve()), samples=samples, max_new_tokens=max_new_tokens, scores=scores,
                GA=general_ability(headline(scores)))


def headline(results: dict[str, dict]) -> dict[str, float]:
    """{benchmark: the score GA averages}."""
    return {n: r["score"] for n, r in results.items()}


def compare(before, after, tokenizer, root, names: list[str], samples: int = 0, max_new_tokens: int = 256,
            progress=True, **batching) -> dict:
    """Table 2 for one run: the benchmarks on θ_0 (`before`) and on the last model (`after`), GA and ΔGA:
    {data, samples, max_new_tokens, before, after: {benchmark: its result}, GA_before, GA_after, dGA}."""
    check(root, names, after.args, max_new_tokens)
    b, a = (score_general(m, tokenizer, root, names, samples, max_new_tokens, progress, **batching)
            for m in (before, after))
    return dict(data=b["data"], samples=samples, max_new_tokens=max_new_tokens, before=b["scores"],
                after=a["scores"], GA_before=b["GA"], GA_after=a["GA"],
                dGA=delta_general_ability(headline(b["scores"]), headline(a["scores"])))


def format_table(columns: dict[str, dict[str, dict]]) -> str:
    """The benchmarks' scores as an aligned table, one column per model ({column name: score_general's result}),
    GA last; with two columns, also their difference (ΔGA in the last row)."""
    names, heads = list(next(iter(columns.values()))), list(columns)
    first = next(iter(columns.values()))
    rows = [[f"{n} ({first[n]['metric']}, {first[n]['setting']})", str(first[n]["items"]),
             *[f"{c[n]['score']:.2f}" for c in columns.values()]] for n in names]
    rows += [["piqa (acc_norm, not in GA)", str(first["piqa"]["items"]),
              *[f"{c['piqa']['acc_norm']:.2f}" for c in columns.values()]]] if "piqa" in names else []
    rows.append(["GA", "", *[f"{general_ability(headline(c)):.2f}" for c in columns.values()]])
    if len(columns) == 2:
        for row in rows:
            row.append(f"{float(row[3]) - float(row[2]):+.2f}")
        heads.append("Δ")
    table = [["benchmark", "items", *heads], *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in table)
