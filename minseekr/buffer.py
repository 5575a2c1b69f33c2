"""The memory buffer: each finished task's replay samples and its teacher's signals, on disk.

For task k the trainer writes two files into the run's `buffer/` folder:

    task{k:02d}.safetensors   per replay sample i, at its true length n (no padding to the task's longest):
        {i}.input_ids (n,)  {i}.labels (n,)  {i}.rows (T,)      the sample and its sampled query rows
        {i}.logits (a, V)                                        the teacher's logits predicting its a labels, or
        {i}.topk_logp (a, k)  {i}.topk_ids (a, k)                their k largest log-probabilities and token ids
        {i}.attn (|H|, Σ_t (rows[t]+1))                          the stored heads' attention rows, causal prefixes only
    task{k:02d}.json          {"name", "heads": [[layer, head], ...], "lengths", "bytes", ...}: the manifest

Logits are taken at the positions that *predict* the labels (position p-1 for a label at p), so the
first answer token's distribution is distilled and the one after EOS is not (the official code is one
position off). Both files go to a temporary name and are renamed, manifest last, so a crash never
leaves a task that looks complete. Reading memory-maps the safetensors file: every rank of a
data-parallel job opens the same files and reads only the samples it replays.

Query row t sits at position rows[t] and, being causal, sees keys 0..rows[t] only: the rest of its row
is exactly zero. On disk each row keeps that prefix, the T prefixes concatenated per head; `TaskMemory`
expands them back to the dense (|H|, T, n) rows, zeros beyond each prefix, that the trainer distils.
Rows may repeat and come in any order; each occurrence is stored.

With `topk=k` the teacher's distribution over V tokens is cut to its k most likely tokens: ids (int16
while V fits, else int32) and log-probabilities of the full-vocabulary softmax. `logit_kl` then
compares teacher and student on k + 1 buckets, those tokens and the rest (exact when k = V).

Bytes per sample, signals in bf16: 2·a·V (full logits) or a·k·(2 + 2) (top-k, 4-byte ids when
V > 32767), plus 2·|H|·Σ_t (rows[t]+1) ≈ |H|·B_T·(n+1) (attention: rows drawn uniformly average
(n+1)/2 keys), with |H| = B_H for `teacher_heads="selected"` and n_layers·n_heads for `"all"`
(8x more at LLaMA-2-7B's 1024 heads and B_H=128).
"""
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minseekr.checkpoint import atomic_write
from minseekr.kl import attention_rows, query_rows


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


def write_task(root, k: int, name: str, samples: list[dict], heads: list[tuple[int, int]]) -> None:
    """Store task k's replay samples (dicts of the tensors `teacher_signals` returns) and the heads they cover."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {f"{i}.{key}": t.contiguous() for i, s in enumerate(samples) for key, t in _stored(i, s).items()}
    atomic_write(root / f"task{k:02d}.safetensors", lambda p: save_file(tensors, str(p)))
    manifest = {"name": name, "heads": [list(h) for h in heads], "n_samples": len(samples),
                "lengths": [int(s["input_ids"].numel()) for s in samples],
                "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    atomic_write(root / f"task{k:02d}.json", lambda p: p.write_text(json.dumps(manifest, indent=1)))


class TaskMemory:
    """Read-only, memory-mapped view of one task's stored samples, attention rows dense again."""

    def __init__(self, root, k: int):
        root = Path(root)
        manifest_path = root / f"task{k:02d}.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path}: no buffer manifest for task {k}")
        self.manifest = json.loads(manifest_path.read_text())
        self.name = self.manifest["name"]
        self.heads = [tuple(h) for h in self.manifest["heads"]]
        self.path = root / f"task{k:02d}.safetensors"
        self._file = safe_open(str(self.path), "pt")
        self._keys = sorted({name.split(".", 1)[1] for name in self._file.keys()})

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
                raise ValueError(f"{self.path}: {i}.attn is {tuple(s['attn'].shape)}, "
                                 f"expected (|H|, Σ(rows+1)) = {expected}")
            s["attn"] = unpack_rows(s["attn"], s["rows"], s["input_ids"].numel())
        if "topk_ids" in s:
            s["topk_ids"] = s["topk_ids"].long()
        return s


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-pad samples into a batch: query rows padded with −1, teacher rows with zeros (to the longest sample
    and the most rows), teacher logits stacked in label order."""
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
        batch["teacher_attn"] = torch.zeros(B, samples[0]["attn"].shape[0], batch["rows"].shape[1], S)
        for b, s in enumerate(samples):
            batch["teacher_attn"][b, :, :s["attn"].shape[1], :s["attn"].shape[2]] = s["attn"].float()
    # Samples are right-padded, so concatenating their labelled tokens is the batch's row-major label order.
    if "logits" in samples[0]:
        batch["teacher_logits"] = torch.cat([s["logits"] for s in samples]).float()           # (N, V)
    if "topk_ids" in samples[0]:
        batch["teacher_topk_ids"] = torch.cat([s["topk_ids"] for s in samples]).long()       # (N, k)
        batch["teacher_topk_logp"] = torch.cat([s["topk_logp"] for s in samples]).float()   # (N, k)
    return batch


def logit_kl(student_logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Eq. 3 per labelled token: KL(teacher ‖ student) (N,), over the vocabulary or top-k + rest buckets.

    student_logits is the model's (B, S, V) output, whose positions that predict a label are taken in
    row-major order, or those (N, V) rows already. The teacher comes from `collate`: full logits, or
    top-k ids and log-probabilities. Computed in fp32 (fp64 for fp64 logits); the caller reduces.
    """
    if student_logits.dim() == 3:
        predicting = batch["labels"][:, 1:] != -100                          # position p-1 predicts label p
        student_logits = student_logits[:, :-1][predicting.to(student_logits.device)]   # (N, V)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be (B, S, V) or (N, V), got {tuple(student_logits.shape)}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(dtype)
    if "teacher_logits" in batch:
        teacher = batch["teacher_logits"].to(s.device, dtype)
        if teacher.shape != s.shape:
            raise ValueError(f"teacher_logits is {tuple(teacher.shape)}, expected the student's {tuple(s.shape)}")
        log_p = teacher.log_softmax(-1)
        return (log_p.exp() * (log_p - s.log_softmax(-1))).sum(-1)
    if "teacher_topk_ids" not in batch:
        raise KeyError("batch has neither teacher_logits nor teacher_topk_ids: collate samples read from a TaskMemory")
    ids = batch["teacher_topk_ids"].to(s.device)
    log_p = batch["teacher_topk_logp"].to(s.device, dtype)                   # (N, k)
    if ids.shape[0] != s.shape[0] or ids.shape != log_p.shape:
        raise ValueError(f"teacher_topk_ids {tuple(ids.shape)} and teacher_topk_logp {tuple(log_p.shape)} must "
                         f"both be ({s.shape[0]}, k) to match the student's labelled tokens")
    lse = s.logsumexp(-1, keepdim=True)
    log_q = s.gather(-1, ids) - lse                                           # (N, k)
    # The student's rest mass as a sum over the tokens outside the top k, not 1 − Σq, which cancels to 0 when
    # the student is confident. The floor keeps p_rest·log q_rest finite when the rest is empty (k = V).
    outside = s.scatter(-1, ids, float("-inf"))
    log_q_rest = (outside.logsumexp(-1) - lse[:, 0]).clamp(min=math.log(torch.finfo(dtype).tiny))
    # The teacher's rest is only known as 1 − Σp; rounding of the stored log-probabilities can push it below 0.
    p_rest = (-torch.expm1(log_p.logsumexp(-1))).clamp(min=0)
    top = (log_p.exp() * (log_p - log_q)).sum(-1)
    return top + torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest


def logit_mse(student_logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """DER++'s original logit term per labelled token (N,): the mean over the vocabulary of (student − teacher)².

    Buzzega et al. (2020) regress the stored logits; SEEKR's Eq. 3 uses the KL (`logit_kl`). Same inputs as
    `logit_kl` with full teacher logits (top-k logits cannot be regressed).
    """
    if "teacher_logits" not in batch:
        raise KeyError("logit_mse needs the teacher's full logits (a buffer written with --logit-topk 0)")
    if student_logits.dim() == 3:
        predicting = batch["labels"][:, 1:] != -100
        student_logits = student_logits[:, :-1][predicting.to(student_logits.device)]
    s = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    teacher = batch["teacher_logits"].to(s.device, s.dtype)
    if teacher.shape != s.shape:
        raise ValueError(f"teacher_logits is {tuple(teacher.shape)}, expected the student's {tuple(s.shape)}")
    return (s - teacher).square().mean(-1)


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
def teacher_signals(model, batch: dict, heads: list[tuple[int, int]], dtype=torch.bfloat16,
                    topk: int = 0, attn_dtype=None) -> list[dict]:
    """Per sample of a right-padded batch, on the CPU: the teacher's logits predicting its labels (all V, or the
    top-k log-probabilities and ids) in `dtype`, and its attention rows of `heads` (dense (|H|, T, n)) in
    `attn_dtype` (default `dtype`; float8_e5m2 halves them: ≤ 12.5% relative error, down to 1.5e-5)."""
    attn_dtype = attn_dtype or dtype
    recorder = RowRecorder(heads, batch["rows"], batch["attention_mask"])
    logits = model(batch["input_ids"], batch["attention_mask"], probe=recorder)
    V = logits.shape[-1]
    if not 0 <= topk <= V:
        raise ValueError(f"topk must be in [0, {V}] (0 keeps all logits), got {topk}")
    # One transfer for the whole batch; each sample's slice is then cloned so it does not pin the batch tensor.
    attn = recorder.stacked(heads).to("cpu", attn_dtype) if heads else None  # (B, |H|, T, S)
    samples = []
    for b in range(batch["rows"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        labels = batch["labels"][b, :n]
        predicting = (labels[1:] != -100).nonzero().squeeze(1)              # position p-1 predicts label p
        rows = batch["rows"][b][batch["rows"][b] >= 0].to("cpu", copy=True)    # without the padding rows
        s = {"input_ids": batch["input_ids"][b, :n].to("cpu", copy=True), "labels": labels.to("cpu", copy=True),
             "rows": rows,
             "attn": attn[b, :, :len(rows), :n].clone() if heads else torch.zeros(0, len(rows), n, dtype=attn_dtype)}
        if topk:
            logp, ids = logits[b, predicting].float().log_softmax(-1).topk(topk, -1)      # (a, k), largest first
            s["topk_logp"] = logp.to("cpu", dtype)
            s["topk_ids"] = ids.to("cpu", torch.int16 if V <= torch.iinfo(torch.int16).max else torch.int32)
        else:
            s["logits"] = logits[b, predicting].to("cpu", dtype)
        samples.append(s)
    return samples
