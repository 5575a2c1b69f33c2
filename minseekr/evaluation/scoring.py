"""Evaluation by greedy KV-cache generation, split over the ranks of a torchrun job (or one process)."""
import torch
from tqdm import tqdm

from minseekr.evaluation.data import extract_answer
from minseekr.evaluation.metrics import score
from minseekr.network.generate import generate
from minseekr.runtime import InputError, gather, rank_world


def prompt_room(max_prompt_len: int, max_new_tokens: int, args) -> int:
    """Prompt tokens kept at evaluation: at most `max_prompt_len`, and never more than the model's positions leave
    beside `max_new_tokens` of answer (a longer prompt loses its oldest tokens, as any too long for --max-prompt-len).
    Both entry points check their settings with it before loading anything."""
    room = args.max_seq_len - max_new_tokens
    if room < 2:
        raise InputError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                         f"{args.max_seq_len} positions (max_position_embeddings): give at most {args.max_seq_len - 2}")
    return min(max_prompt_len, room)


@torch.no_grad()
def evaluate(model, tokenizer, task, samples=0, max_prompt_len=1024, max_new_tokens=512, batch_size=32,
             progress=False) -> float:
    """Greedy KV-cache generation on the first `samples` test records (0 = all), scored by the task's metric (0-100).

    As the official inference: prompts keep BOS (where the model uses one) and their newest tokens, at most
    `max_prompt_len` in all (and at most what the model's positions leave: `prompt_room`); generation stops at EOS
    or after `max_new_tokens`. Under torchrun every rank runs every world-th batch with its own copy of
    the model; predictions are gathered. `progress` shows a bar over this rank's batches.
    """
    rank, world = rank_world()
    records = task.test[: samples or None]
    room = prompt_room(max_prompt_len, max_new_tokens, model.args)
    prompts = [tokenizer.prompt(r["prompt"], room) for r in records]
    starts = list(range(0, len(prompts), batch_size))
    mine = {}
    for s in tqdm(starts[rank::world], desc=f"eval {task.name}", leave=False, disable=not progress):
        out = generate(model, prompts[s:s + batch_size], max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        mine[s] = [extract_answer(tokenizer.decode(o), task.name) for o in out]
    preds = {s: p for part in gather(mine) for s, p in part.items()}
    preds = [p for s in starts for p in preds[s]]
    return score(task.name, preds, [r["answer"] for r in records], sources=[r["prompt"] for r in records])
