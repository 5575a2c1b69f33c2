"""Pseudo-samples of a finished task, for the methods that keep no real data of it: SAPT's ARM replays inputs
through its selection alone (`sapt.py`), LFPT5 replays whole samples with distillation (`lfpt5.py`).

A task's prompts share a frame: the longest common prefix P (the instruction: SuperNI's "Definition: … Input: ",
inside the chat turn when the run uses one) and the longest common suffix S (its "\\nOutput: "); what lies
between is the sample's own input. Pseudo-samples keep that frame:

- `released`: inputs that another run generated, in SuperNI's task-file format (SAPT's, in
  `../shared/data/sapt-pseudo/<task>/pseudo.json`), each framed as P + input + S;
- `generate_samples`: the model itself (with its method attached) continues P; the text up to S is the input
  and what follows it, up to EOS, the answer. LFPT5 trains the model to write its tasks' inputs, so that this
  continuation is a sample of the task.

Never a test record: TRACE's LFPT5 builds its "pseudo data" from earlier tasks' test prompts, which the
evaluation then scores.
"""
import json
import os
from pathlib import Path

import torch

from minseekr.data import DataError
from minseekr.generate import generate


def frame(prompts: list[str]) -> tuple[str, str]:
    """(P, S): the longest prefix and suffix every prompt shares, not overlapping in the shortest prompt."""
    prefix, suffix = os.path.commonprefix(prompts), os.path.commonprefix([p[::-1] for p in prompts])[::-1]
    shortest = min(len(p) for p in prompts)
    return prefix, suffix[max(0, len(prefix) + len(suffix) - shortest):]


def released(root, task: str, prompts: list[str]) -> list[str]:
    """The prompts of the pseudo-inputs in `root/<folder>/pseudo.json`, the folder matched by the task's name or
    its "taskNNN" prefix, each framed as the task's own prompts are (P + input + S)."""
    root = Path(root)
    key = task.split("_")[0]
    folders = [f for f in sorted(root.glob("*")) if f.name == task or f.name.split("_")[0] == key] \
        if root.is_dir() else []
    if not folders:
        raise DataError(f"--pseudo-inputs {root}: no folder for task {task} (expected {root / task}/pseudo.json)")
    file = folders[0] / "pseudo.json"
    try:
        instances = json.loads(file.read_text())["Instances"]
        inputs = [x["input"] for x in instances]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{file}: expected SuperNI's task format with Instances[{{input}}] ({e!r})") from None
    if bad := [i for i, x in enumerate(inputs) if not isinstance(x, str) or not x.strip()]:
        raise DataError(f"{file}: Instances[{bad[0]}].input is not a non-empty string")
    prefix, suffix = frame(prompts)
    return [prefix + x + suffix for x in inputs]


def generate_samples(model, tok, prompts: list[str], n: int, max_new_tokens: int, seed: int, answers: bool = True,
                     temperature: float = 1.0, top_p: float = 0.9, tries: int = 4) -> list[dict]:
    """n {"prompt", "answer"} samples of the task whose prompts are `prompts`, written by `model` from their
    shared P (sampled, seeded: every rank writes the same). The input is the text up to S (all of it where S never
    comes), the answer what follows S. A continuation without an input, or (with `answers`, LFPT5) without S and
    an answer after it, is drawn again, up to `tries` rounds."""
    prefix, suffix = frame(prompts)
    start = tok.encode(prefix)
    if not start:
        raise DataError("the task's prompts share no beginning and the tokenizer adds no BOS: nothing to "
                        "generate pseudo-samples from")
    generator = torch.Generator(device=model.model.embed_tokens.weight.device).manual_seed(seed)
    samples = []
    for _ in range(tries):
        for ids in generate(model, [start] * (n - len(samples)), max_new_tokens, eos_id=tok.eos_id,
                            pad_id=tok.pad_id, temperature=temperature, top_p=top_p, generator=generator):
            text = tok.decode(ids)
            body, answer = text.split(suffix, 1) if suffix and suffix in text else (text, "")
            if body.strip() and (answer.strip() or not answers):
                samples.append({"prompt": prefix + body + suffix, "answer": answer.strip()})
        if len(samples) == n:
            break
    return samples
