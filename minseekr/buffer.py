"""The memory buffer: each finished task's replay samples and its teacher's signals, on disk.

For task k the trainer writes two files into the run's `buffer/` folder:

    task{k:02d}.safetensors   per replay sample i, at its true length n (no padding to the task's longest):
        {i}.input_ids (n,)  {i}.labels (n,)  {i}.rows (T,)      the sample and its sampled query rows
        {i}.logits (a, V)   the teacher's logits that predict each of its a labelled tokens
        {i}.attn (|H|, T, n) the teacher's attention rows of the stored heads, zeros beyond each row's prefix
    task{k:02d}.json          {"name", "heads": [[layer, head], ...], "lengths", ...}: the manifest

Logits are taken at the positions that *predict* the labels (position p-1 for a label at p), so the
first answer token's distribution is distilled and the one after EOS is not (the official code is one
position off). Both files go to a temporary name and are renamed, manifest last, so a crash never
leaves a task that looks complete. Reading memory-maps the safetensors file: every rank of a
data-parallel job opens the same files and reads only the samples it replays.

Bytes per sample, signals in bf16: 2·a·V (logits) + 2·|H|·T·n (attention), with |H| = B_H for
`teacher_heads="selected"` and n_layers·n_heads for `"all"` (8x more at LLaMA-2-7B's 1024 heads and B_H=128).
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minseekr.checkpoint import atomic_write
from minseekr.kl import attention_rows, query_rows


def write_task(root, k: int, name: str, samples: list[dict], heads: list[tuple[int, int]]) -> None:
    """Store task k's replay samples (dicts of the tensors above) and the heads their attention rows cover."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {f"{i}.{key}": t.contiguous() for i, s in enumerate(samples) for key, t in s.items()}
    atomic_write(root / f"task{k:02d}.safetensors", lambda p: save_file(tensors, str(p)))
    manifest = {"name": name, "heads": [list(h) for h in heads], "n_samples": len(samples),
                "lengths": [int(s["input_ids"].numel()) for s in samples],
                "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    atomic_write(root / f"task{k:02d}.json", lambda p: p.write_text(json.dumps(manifest, indent=1)))


class TaskMemory:
    """Read-only, memory-mapped view of one task's stored samples."""

    def __init__(self, root, k: int):
        root = Path(root)
        manifest_path = root / f"task{k:02d}.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path}: no buffer manifest for task {k}")
        self.manifest = json.loads(manifest_path.read_text())
        self.name = self.manifest["name"]
        self.heads = [tuple(h) for h in self.manifest["heads"]]
        self._file = safe_open(str(root / f"task{k:02d}.safetensors"), "pt")

    def __len__(self):
        return self.manifest["n_samples"]

    def __getitem__(self, i: int) -> dict:
        return {key: self._file.get_tensor(f"{i}.{key}") for key in ("input_ids", "labels", "rows", "logits", "attn")}


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-pad samples into a batch; stored teacher rows are padded with zeros, logits stacked in label order."""
    B, S = len(samples), max(s["input_ids"].numel() for s in samples)
    batch = {
        "input_ids": torch.full((B, S), pad_id, dtype=torch.long),
        "labels": torch.full((B, S), -100, dtype=torch.long),
        "attention_mask": torch.zeros(B, S, dtype=torch.long),
    }
    for b, s in enumerate(samples):
        n = s["input_ids"].numel()
        batch["input_ids"][b, :n] = s["input_ids"]
        batch["labels"][b, :n] = s["labels"]
        batch["attention_mask"][b, :n] = 1
    if "rows" in samples[0]:
        batch["rows"] = torch.stack([s["rows"] for s in samples])
    if "attn" in samples[0]:
        H, T = samples[0]["attn"].shape[:2]
        batch["teacher_attn"] = torch.zeros(B, H, T, S)
        for b, s in enumerate(samples):
            batch["teacher_attn"][b, :, :, :s["attn"].shape[-1]] = s["attn"].float()
        batch["teacher_logits"] = torch.cat([s["logits"] for s in samples]).float()
    return batch


class RowRecorder:
    """Probe that keeps the attention rows of chosen heads at chosen query rows, without S×S maps."""

    def __init__(self, heads: list[tuple[int, int]], rows, key_mask):
        self.by_layer = {}
        for l, h in heads:
            self.by_layer.setdefault(l, []).append(h)
        self.rows, self.key_mask, self.out = rows, key_mask, {}

    def __call__(self, layer, q, k, v, out):
        if layer not in self.by_layer:
            return
        heads = torch.tensor(self.by_layer[layer], device=q.device)
        q_rows, kv_heads = query_rows(q, heads, self.rows, k.shape[1])         # (B, h_l, T, D)
        self.out[layer] = attention_rows(q_rows, k, self.rows, self.key_mask, kv_heads=kv_heads)

    def stacked(self, heads):
        """(B, |H|, T, S) in the order of `heads`."""
        pos = {l: {h: i for i, h in enumerate(hs)} for l, hs in self.by_layer.items()}
        return torch.stack([self.out[l][:, pos[l][h]] for l, h in heads], 1)


@torch.no_grad()
def teacher_signals(model, batch: dict, heads: list[tuple[int, int]], dtype=torch.bfloat16) -> list[dict]:
    """Per sample of a right-padded batch: the teacher's logits predicting its labels, its attention rows of `heads`."""
    recorder = RowRecorder(heads, batch["rows"], batch["attention_mask"])
    logits = model(batch["input_ids"], batch["attention_mask"], probe=recorder)
    attn = recorder.stacked(heads) if heads else None
    samples = []
    for b in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        labels = batch["labels"][b, :n]
        predicting = (labels[1:] != -100).nonzero().squeeze(1)              # position p-1 predicts label p
        samples.append({
            "input_ids": batch["input_ids"][b, :n].clone(), "labels": labels.clone(), "rows": batch["rows"][b].clone(),
            "logits": logits[b, predicting].to(dtype),
            "attn": (attn[b, :, :, :n] if heads else torch.zeros(0, batch["rows"].shape[1], n)).to(dtype),
        })
    return samples
