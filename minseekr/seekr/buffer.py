"""The memory buffer: each finished task's replay samples and its teacher's signals, on disk, and their batches.

For task k the trainer writes two files into the run's `buffer/` folder:

    task{k:02d}.safetensors   per replay sample i, at its true length n (no padding to the task's longest):
        {i}.input_ids (n,)  {i}.labels (n,)  {i}.rows (T,)      the sample and its sampled query rows
        {i}.logits (a, V)                                        the teacher's logits predicting its a labels, or
        {i}.topk_logp (a, k)  {i}.topk_ids (a, k)                their k largest log-probabilities and token ids
        {i}.attn (|H|, Σ_t (rows[t]+1))                          the stored heads' attention rows, causal prefixes only
    task{k:02d}.json          {"name", "fingerprint", "heads": [[layer, head], ...], "n_samples", "lengths", "rows",
                              "bytes", "sha256"}: the manifest; the safetensors file keeps its own copy in its
                              metadata. The fingerprint is the writing run's (`fingerprint.py`): the trainer
                              replays a buffer only under the task's name and on the run's model, data and settings

Logits are taken at the positions that *predict* the labels (position p-1 for a label at p), so the
first answer token's distribution is distilled and the one after EOS is not (the official code is one
position off). Both files go to a temporary name and are renamed, manifest last, so a crash never
leaves a task that looks complete. Reading memory-maps the safetensors file: every rank of a
data-parallel job opens the same files and reads only the samples it replays.

Query row t sits at position rows[t] and, being causal, sees keys 0..rows[t] only: the rest of its row
is exactly zero. On disk each row keeps that prefix, the T prefixes concatenated per head; `TaskMemory`
expands them back to the dense (|H|, T, n) rows, zeros beyond each prefix, that the trainer distils.
Rows may repeat and come in any order; each occurrence is stored.

With `topk=k` (`distill.teacher_signals`) the teacher's distribution over V tokens is cut to its k most likely
tokens: ids (int16 while V fits, else int32) and log-probabilities of the full-vocabulary softmax.
`distill.logit_kl` then compares teacher and student on k + 1 buckets, those tokens and the rest (exact when k = V).

Bytes per sample, signals in bf16: 2·a·V (full logits) or a·k·(2 + 2) (top-k, 4-byte ids when
V > 32767), plus 2·|H|·Σ_t (rows[t]+1) ≈ |H|·B_T·(n+1) (attention: rows drawn uniformly average
(n+1)/2 keys), with |H| = B_H for `teacher_heads="selected"` and n_layers·n_heads for `"all"`
(8x more at LLaMA-2-7B's 1024 heads and B_H=128).
"""
import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minseekr.runtime import InputError, atomic_write, read_json


def prefix_index(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row t, key j) of every stored entry, row by row, j = 0..rows[t]: two (Σ_t (rows[t]+1),) long tensors."""
    counts = rows.long() + 1
    t = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), counts)
    starts = torch.cumsum(counts, 0) - counts                                  # where each row's prefix begins
    j = torch.arange(int(counts.sum()), device=rows.device) - torch.repeat_interleave(starts, counts)
    return t, j


def pack_rows(attn: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Dense rows (|H|, T, n) -> their causal prefixes concatenated (|H|, Σ_t (rows[t]+1))."""
    t, j = prefix_index(rows)
    return attn[:, t, j]


def unpack_rows(packed: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """Causal prefixes (|H|, Σ_t (rows[t]+1)) -> dense rows (|H|, T, n), zeros beyond each prefix."""
    t, j = prefix_index(rows)
    attn = packed.new_zeros(packed.shape[0], rows.numel(), n)
    attn[:, t, j] = packed
    return attn


def _stored(i: int, s: dict) -> dict:
    """Sample i as written to disk: attention rows packed to their causal prefixes."""
    s = dict(s)
    if "attn" in s:
        attn, rows, n = s["attn"], s["rows"], s["input_ids"].numel()
        if attn.dim() != 3 or attn.shape[1:] != (rows.numel(), n) or not bool(((rows >= 0) & (rows < n)).all()):
            raise ValueError(f"sample {i}: attn is {tuple(attn.shape)}, expected (|H|, {rows.numel()}, {n}) "
                             f"with rows in [0, {n})")
        s["attn"] = pack_rows(attn, rows)
        # Dropping the entries beyond each prefix is lossless only if they are zero, as causal attention makes them.
        if s["attn"].float().count_nonzero() != attn.float().count_nonzero():   # float: fp8 has no count_nonzero
            raise ValueError(f"sample {i}: attn has non-zero entries beyond a row's causal prefix (keys > rows[t])")
    return s


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_task(root, k: int, name: str, samples: list[dict], heads: list[tuple[int, int]],
               fingerprint: dict | None = None) -> None:
    """Store task k's replay samples (dicts of the tensors `teacher_signals` returns) and the heads they cover,
    with the fingerprint of the run that wrote them (`fingerprint.py`), which a reader compares with its own."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {f"{i}.{key}": t.contiguous() for i, s in enumerate(samples) for key, t in _stored(i, s).items()}
    contents = {"name": name, "fingerprint": fingerprint, "heads": [list(h) for h in heads], "n_samples": len(samples),
                "lengths": [int(s["input_ids"].numel()) for s in samples],
                "rows": [int(s["rows"].numel()) for s in samples] if samples and "rows" in samples[0] else [],
                "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    # The file carries its own description, so a manifest edited after the fact does not match it.
    data = root / f"task{k:02d}.safetensors"
    atomic_write(data, lambda p: save_file(tensors, str(p), metadata={"manifest": json.dumps(contents)}),
                 needed=contents["bytes"])
    manifest = {**contents, "sha256": _sha256(data)}
    atomic_write(root / f"task{k:02d}.json", lambda p: p.write_text(json.dumps(manifest, indent=1)))


class TaskMemory:
    """Read-only, memory-mapped view of one task's stored samples, attention rows dense again.

    Opening checks the task against its manifest and, given the model's `args`, against the model: the file's
    checksum (a full read: `checksum=False` skips it where another rank does it), its own copy of the manifest
    (heads, sample count, lengths), each sample's presence, and heads and vocabulary that fit the model. Any
    mismatch is an InputError naming the file.
    """

    def __init__(self, root, k: int, args=None, checksum: bool = True):
        root = Path(root)
        manifest_path = root / f"task{k:02d}.json"
        self.path = root / f"task{k:02d}.safetensors"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path}: no buffer manifest for task {k} (a finished task's replay "
                                    f"memory is gone: restore the run directory's buffer/)")
        self.manifest = read_json(manifest_path, dict)
        try:
            described = {key: self.manifest[key] for key in ("name", "fingerprint", "heads", "n_samples", "lengths",
                                                             "rows", "bytes")}
            expected_sha = self.manifest["sha256"]
        except KeyError as e:
            raise InputError(f"{manifest_path} is not a buffer manifest (no {e})") from None
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: task {k}'s replay samples are missing (its manifest is there)")
        if checksum and _sha256(self.path) != expected_sha:
            raise InputError(f"{self.path} does not match the checksum in {manifest_path.name}: the file is damaged")
        try:
            self._file = safe_open(str(self.path), "pt")
            own = json.loads((self._file.metadata() or {})["manifest"])
        except (SafetensorError, KeyError, json.JSONDecodeError) as e:
            raise InputError(f"{self.path} is not a buffer file written by write_task ({e!r})") from None
        if own != described:
            changed = sorted(key for key in described if own.get(key) != described[key])
            raise InputError(f"{manifest_path}: {', '.join(changed)} differ from what {self.path.name} was written with")
        self.name = self.manifest["name"]
        self.heads = [tuple(h) for h in self.manifest["heads"]]
        names = set(self._file.keys())
        if missing := [i for i in range(len(self)) if f"{i}.input_ids" not in names]:
            raise InputError(f"{self.path}: samples {missing[:5]} of {len(self)} are missing")
        self._keys = sorted({name.split(".", 1)[1] for name in names})
        if args is not None:
            if bad := [h for h in self.heads if not (0 <= h[0] < args.n_layers and 0 <= h[1] < args.n_heads)]:
                raise InputError(f"{manifest_path}: heads {bad} are not heads of the model "
                                 f"({args.n_layers} layers × {args.n_heads} heads)")
            if "logits" in self._keys and len(self) and self._file.get_slice("0.logits").get_shape()[-1] != args.vocab_size:
                raise InputError(f"{self.path}: teacher logits over {self._file.get_slice('0.logits').get_shape()[-1]} "
                                 f"tokens, but the model has {args.vocab_size}")

    def __len__(self):
        return self.manifest["n_samples"]

    def _check(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: sample {i} out of range, the task stores {len(self)}")

    def labels(self, i: int) -> torch.Tensor:
        """Sample i's labels alone (what counting its loss terms needs), without reading its signals."""
        self._check(i)
        return self._file.get_tensor(f"{i}.labels")

    def rows(self, i: int) -> torch.Tensor:
        """Sample i's query rows alone (what normalising its attention term needs)."""
        self._check(i)
        return self._file.get_tensor(f"{i}.rows")

    def __getitem__(self, i: int) -> dict:
        self._check(i)
        s = {key: self._file.get_tensor(f"{i}.{key}") for key in self._keys}
        if "attn" in s:
            expected = (len(self.heads), int((s["rows"] + 1).sum()))
            if tuple(s["attn"].shape) != expected:
                raise InputError(f"{self.path}: {i}.attn is {tuple(s['attn'].shape)}, "
                                 f"expected (|H|, Σ(rows+1)) = {expected}")
            s["attn"] = unpack_rows(s["attn"], s["rows"], s["input_ids"].numel())
        if "topk_ids" in s:
            s["topk_ids"] = s["topk_ids"].long()
        return s


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-pad samples into a batch: query rows padded with −1, teacher rows with zeros (to the longest sample
    and the most rows), teacher logits stacked in label order. The teacher's signals keep their stored dtype
    (bf16 by default): the losses compute in fp32 on the device, so a GPU receives half the bytes of fp32."""
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
    if "rows" in samples[0]:   # samples shorter than B_T have fewer rows: padding rows are −1, their teacher 0
        T = max(s["rows"].numel() for s in samples)
        batch["rows"] = torch.full((B, T), -1, dtype=torch.long)
        for b, s in enumerate(samples):
            batch["rows"][b, :s["rows"].numel()] = s["rows"]
    if "attn" in samples[0]:
        batch["teacher_attn"] = torch.zeros(B, samples[0]["attn"].shape[0], batch["rows"].shape[1], S,
                                            dtype=samples[0]["attn"].dtype)
        for b, s in enumerate(samples):
            batch["teacher_attn"][b, :, :s["attn"].shape[1], :s["attn"].shape[2]] = s["attn"]
    # Samples are right-padded, so concatenating their labelled tokens is the batch's row-major label order.
    if "logits" in samples[0]:
        batch["teacher_logits"] = torch.cat([s["logits"] for s in samples])                   # (N, V)
    if "topk_ids" in samples[0]:
        batch["teacher_topk_ids"] = torch.cat([s["topk_ids"] for s in samples]).long()       # (N, k)
        batch["teacher_topk_logp"] = torch.cat([s["topk_logp"] for s in samples])           # (N, k)
    return batch


def device_batch(samples: list[dict], pad_id: int, device) -> dict:
    """Samples collated into one right-padded batch on `device`."""
    return {key: t.to(device) for key, t in collate(samples, pad_id).items()}
