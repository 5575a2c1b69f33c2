"""Pseudo-samples of a finished task, for the methods that keep no real data of it: SAPT's ARM replays inputs
through its selection alone (`sapt.py`), LFPT5 replays whole samples with distillation (`lfpt5.py`).

A task's prompts share a frame: the longest common prefix P (the instruction: SuperNI's "Definition: … Input: ",
inside the chat turn when the run uses one) and the longest common suffix S (its "\\nOutput: "); what lies
between is the sample's own input. Pseudo-samples keep that frame:

- `released`: inputs that another model generated, in SuperNI's task-file format. SAPT's are never the continual
  learner's: a generator trained apart writes them (their `pseudo_data/scripts/Ours_CL_lookback.sh` trains a LoRA on
  t5_large per task; which generator wrote the released LLaMA files is not stated), released as
  `generated_data/lora_gen_superni_llama/SuperNI/<task>/train.json`; the project's copy, `../shared/data/sapt-pseudo`,
  names each file `<task>/pseudo.json`. Each input is framed as P + input + S. `--pseudo-inputs` chooses (`released`
  reads the rule): `auto` (the default) takes a task's released inputs from `sapt-pseudo/` beside the `--data`
  folder when it has a folder for the task, and otherwise lets the model write them, as `self` does always; a
  folder given must hold every task;
- `generate_samples`: the model itself (with its method attached) continues P; the text up to S is the input
  and what follows it, up to EOS, the answer. LFPT5 trains the model to write its tasks' samples, so that this
  continuation is a sample of the task. Sampling is LFPT5's (`Classification/model.py`, `_generative_samples`):
  temperature 1, top-k 64, repetition penalty 2.5 on the tokens generated.

Never a test record: TRACE's LFPT5 builds its "pseudo data" from earlier tasks' test prompts, which the
evaluation then scores.
"""
import json
import os
from pathlib import Path

import torch

from minseekr.evaluation.data import DataError
from minseekr.network.generate import generate


def frame(prompts: list[str]) -> tuple[str, str]:
    """(P, S): the longest prefix and suffix every prompt shares, not overlapping in the shortest prompt."""
    prefix, suffix = os.path.commonprefix(prompts), os.path.commonprefix([p[::-1] for p in prompts])[::-1]
    shortest = min(len(p) for p in prompts)
    return prefix, suffix[max(0, len(prefix) + len(suffix) - shortest):]


RELEASED = "sapt-pseudo"   # `--pseudo-inputs auto`: the folder of released pseudo-inputs, beside the --data folder


def released(setting: str, task: str, prompts: list[str], data=None) -> list[str] | None:
    """The prompts of task's released pseudo-inputs under `--pseudo-inputs SETTING`, each framed as the task's own
    prompts are (P + input + S); None where the model writes them instead: `self`, or `auto` when `sapt-pseudo`
    beside the `data` folder (given by the run) has no folder for the task. The file is `<folder>/pseudo.json`, the
    folder matched by the task's name or its "taskNNN" prefix; a folder given that lacks the task is an error."""
    if setting == "self" or (setting == "auto" and not data):
        return None
    root = Path(data).parent / RELEASED if setting == "auto" else Path(setting)
    key = task.split("_")[0]
    folders = [f for f in sorted(root.glob("*")) if f.name == task or f.name.split("_")[0] == key] \
        if root.is_dir() else []
    if not folders:
        if setting == "auto":
            return None
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
                     top_k: int = 64, repetition_penalty: float = 2.5, tries: int = 4) -> list[dict]:
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
                            pad_id=tok.pad_id, temperature=1.0, top_k=top_k,
                            repetition_penalty=repetition_penalty, generator=generator):
            text = tok.decode(ids)
            body, answer = text.split(suffix, 1) if suffix and suffix in text else (text, "")
            if body.strip() and (answer.strip() or not answers):
                samples.append({"prompt": prefix + body + suffix, "answer": answer.strip()})
        if len(samples) == n:
            break
    return samples
