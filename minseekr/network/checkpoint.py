"""Hugging Face checkpoint directories in and out: `config.json` plus safetensors, single file or sharded.

This module owns the format. Every reader goes through `HFCheckpoint`, which applies one name→file rule
(`model.safetensors` first, as transformers does, else the index and its shards) and one validation: every
name, shape and dtype in every header against the model the config describes, each error naming the file and
the tensor. An index may name only files of its own folder: no absolute path, no `..`, no symlink out of it (but
the HF hub cache's own, from `snapshots/<revision>/` into `blobs/`). A tied checkpoint (`tie_word_embeddings`
true) that stores an `lm_head.weight` as well, as many exports do, is read only when that tensor equals
`model.embed_tokens.weight` (compared block by block at construction, the one case that reads the embeddings
twice); one that differs is refused, since the tie would drop it silently (`tie_word_embeddings` false uses it).
Every writer goes through `write_hf`, which takes (name, tensor) pairs in any order from any producer:
a model's parameters (`save_hf`), or an engine's full tensors gathered one at a time (`engine.export_hf`, where
every rank drains the stream and rank 0 alone writes).

Loading never holds two copies of the weights. The Transformer is built on the `meta` device, where
parameters have shapes but no storage (random initialisation skipped: there is nothing to initialise),
so building a 7B model costs nothing. Then the tensors are read one by one:
- on the CPU in the checkpoint's own dtype, no copy is made at all: a tensor is the file's pages,
  mapped copy-on-write (safetensors' mmap backend), read by the kernel on first touch; an in-place
  update copies only the pages it writes. As with transformers, a file must not be overwritten in
  place while a model loaded from it lives (`save_hf` replaces files, so saving back is safe);
- with a cast or a move to another device, each tensor is read with `pread` into memory of its own,
  converted and its source freed, so the file is never resident beside the converted copy.
The meta parameters are swapped for these tensors with `load_state_dict(assign=True)`: peak memory is
the final model plus one tensor in flight. Assigning replaces parameters, which breaks the
embedding/lm_head tie, so `tie_weights()` runs last. A sharded engine reads only the rows it owns
(`HFCheckpoint.rows`).

Writing produces HF's layout, which `transformers.LlamaForCausalLM.from_pretrained` reads unchanged:
`model.safetensors`, or `model-0000i-of-0000N.safetensors` shards plus `model.safetensors.index.json`
when the weights exceed `max_shard_size`. Tensors fill shards in the order they come, a new shard starting
before a tensor would pass the limit (only a tensor larger than the limit alone exceeds it). Tied models omit
`lm_head.weight`, as HF does. Each file is written under a hidden temporary name and renamed into place once
the number of shards is known; config.json and the index go last, being the files that make a new set of
shards visible, and files of an earlier save that the new one does not use are removed afterwards.
"""
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from minseekr.network.model import ModelArgs, Transformer
from minseekr.runtime import InputError, atomic_write, disk_space, read_json, umask

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# safetensors dtype codes this loader accepts; anything else (int8, fp8, fp64, ...) is refused by name.
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _check_dtype(dtype):
    if dtype is not None and dtype not in _DTYPES.values():
        raise InputError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")


def read_args(path) -> ModelArgs:
    """The ModelArgs of a checkpoint directory, from its config.json."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: a checkpoint directory needs a config.json")
    cfg = read_json(config, dict)
    try:
        return ModelArgs.from_hf_config(cfg, source=str(config))
    except ValueError as e:   # the model's own checks of the file's values
        raise InputError(f"{config}: {e}" if str(config) not in str(e) else str(e)) from None


class _SkipInit(TorchFunctionMode):
    """Turns random initialisation into a no-op while a model is built on the meta device.

    There is nothing to initialise, and on meta tensors `normal_` runs through torch._refs, whose first
    call imports torch._dynamo: two seconds and 70 MB that a loader has no use for.
    """

    skipped = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.nn.init.normal_, torch.nn.init.uniform_,
               torch.nn.init.kaiming_uniform_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.skipped:  # torch.nn.init passes the tensor by keyword
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def meta_model(args: ModelArgs) -> Transformer:
    """The Transformer of `args` on the meta device: shapes without storage, nothing initialised."""
    with torch.device("meta"), _SkipInit():
        return Transformer(args)


def _inside(file: Path, folder: Path) -> bool:
    """Whether file resolves into folder, or into the HF hub cache's blobs/ when folder is one of its snapshots:
    `snapshots/<revision>/` holds symlinks into `../../blobs/`, the layout `from_pretrained` downloads into."""
    target, home = file.resolve(), folder.resolve()
    return target.is_relative_to(home) or (home.parent.name == "snapshots"
                                           and target.parent == home.parent.parent / "blobs")


def _open(file: Path, backend: str = "mmap"):
    try:
        return safe_open(file, framework="pt", backend=backend)
    except SafetensorError as e:
        raise InputError(f"{file} is not a readable safetensors file (truncated or corrupt: {e})") from None


def _get(f, file: Path, name: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except SafetensorError as e:
        raise InputError(f"{file}: tensor {name!r} cannot be read (truncated or corrupt: {e})") from None


def _finite(t: torch.Tensor, file: Path, name: str) -> torch.Tensor:
    """t, or an InputError naming it: a single NaN weight would train to an all-NaN model. One pass without
    temporaries: a sum is NaN or infinite when any term is; only then (or if it overflowed) are values counted."""
    if torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)):
        return t
    bad = sum(int((~torch.isfinite(block)).sum()) for block in t.reshape(-1).split(1 << 20))
    if bad:
        raise InputError(f"{file}: tensor {name!r} holds {bad} NaN or infinite values")
    return t


class HFCheckpoint:
    """A checked HF checkpoint directory: its ModelArgs, and for every parameter the file that holds it.

    Construction reads config.json and every header (no tensor data) and raises, naming the file and the
    tensor, on a missing config or shard, an unreadable file, a missing or unexpected tensor, a wrong shape or
    an unsupported dtype. `shapes` lists the parameters in the model's order (a tied lm_head is not one).
    """

    def __init__(self, path):
        self.path = Path(path)
        self.args = read_args(self.path)
        self.shapes = {name: tuple(p.shape) for name, p in meta_model(self.args).named_parameters()}
        self.files = self._weight_files()
        if missing := [name for name in self.shapes if name not in self.files]:
            raise InputError(f"{self.path}: checkpoint lacks tensor {missing[0]!r} that config.json implies "
                             f"({len(missing)} missing)")
        # A tied checkpoint may still carry its lm_head copy (checked below to be one).
        ignored = {"lm_head.weight"} if self.args.tie_embeddings else set()
        if unexpected := sorted(set(self.files) - set(self.shapes) - ignored):
            name = unexpected[0]
            raise InputError(f"{self.files[name]}: unexpected tensor {name!r}, not a parameter of the model "
                             f"config.json describes")
        self.dtypes = {}
        for file in dict.fromkeys(self.files[name] for name in self.shapes):
            with _open(file) as f:
                present = set(f.keys())
                for name in (n for n in self.shapes if self.files[n] == file):
                    if name not in present:
                        raise InputError(f"{file}: tensor {name!r} is missing although the index places it here")
                    meta = f.get_slice(name)
                    code, shape = meta.get_dtype(), tuple(meta.get_shape())
                    if code not in _DTYPES:
                        raise InputError(f"{file}: tensor {name!r} has dtype {code}; only F32, F16 and BF16 "
                                         f"are supported")
                    if shape != self.shapes[name]:
                        raise InputError(f"{file}: tensor {name!r} has shape {shape}, expected "
                                         f"{self.shapes[name]} from config.json")
                    self.dtypes[name] = _DTYPES[code]
        if "lm_head.weight" in ignored and "lm_head.weight" in self.files:
            self._check_tied_copy()

    def _check_tied_copy(self):
        """Refuse a tied checkpoint whose own lm_head.weight is not a copy of the embeddings: the tie would drop it
        silently. Compared block by block, stopping at the first difference."""
        head, embed = "lm_head.weight", "model.embed_tokens.weight"
        with _open(self.files[head]) as f, _open(self.files[embed]) as g:
            a, b = f.get_slice(head), g.get_slice(embed)
            block = max(1, (1 << 22) // self.args.dim)   # rows of 4M values: 16 MiB in fp32
            same = tuple(a.get_shape()) == self.shapes[embed] and all(
                torch.equal(a[i:i + block].float(), b[i:i + block].float())
                for i in range(0, self.args.vocab_size, block))
        if not same:
            raise InputError(f"{self.files[head]}: config.json ties lm_head to the embeddings (tie_word_embeddings "
                             f"true) but the file's {head} differs from {embed}: set tie_word_embeddings to false "
                             f"in config.json to use it")

    def _weight_files(self) -> dict[str, Path]:
        """Every tensor name in the checkpoint mapped to its file: model.safetensors first, else the index."""
        single, index = self.path / SINGLE_FILE, self.path / INDEX_FILE
        if single.is_file():
            with _open(single) as f:
                return dict.fromkeys(f.keys(), single)
        if not index.is_file():
            raise FileNotFoundError(f"{self.path} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
        weight_map = read_json(index, dict).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise InputError(f"{index}: expected a 'weight_map' object that maps tensor names to shard file names")
        files = {}
        for name, shard in weight_map.items():
            file = files[name] = self.path / shard
            if Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise InputError(f"{index}: weight_map places {name!r} in {shard!r}, outside the model folder "
                                 f"{self.path}: shards must be files of that folder")
            if not file.is_file():
                raise FileNotFoundError(f"shard {file.name} (holding {name!r}) is named in {index} but does not exist")
            if not _inside(file, self.path):
                raise InputError(f"{index}: weight_map places {name!r} in {shard!r}, a symlink to {file.resolve()} "
                                 f"outside the model folder {self.path}")
        return files

    def read(self, dtype=None, device="cpu") -> dict[str, torch.Tensor]:
        """Every parameter, file by file: the file's own pages on the CPU in its dtype, else cast one at a time
        straight from the mapped file (no copy in the file's dtype), each tensor's mapping closed once it is cast,
        so the file is never resident beside the converted weights."""
        state = {}
        for file in dict.fromkeys(self.files[name] for name in self.shapes):
            names = [n for n in self.shapes if self.files[n] == file]
            if torch.device(device).type == "cpu" and all(dtype in (None, self.dtypes[n]) for n in names):
                with _open(file) as f:
                    state.update((name, _finite(_get(f, file, name), file, name)) for name in names)
                continue
            for name in names:
                with _open(file) as f:
                    state[name] = _finite(_get(f, file, name), file, name).to(device=device, dtype=dtype)
        return state

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop−1 of one parameter (the whole of a 1-D one's range), fp32, without reading the rest."""
        file = self.files[name]
        with _open(file) as f:
            try:
                return _finite(f.get_slice(name)[start:stop].float(), file, name)
            except SafetensorError as e:
                raise InputError(f"{file}: tensor {name!r} cannot be read (truncated or corrupt: {e})") from None


def load_hf(path, dtype: torch.dtype | None = None, device="cpu") -> Transformer:
    """A Transformer in eval mode with the weights of an HF checkpoint directory (or an `HFCheckpoint`);
    dtype None keeps the file's."""
    _check_dtype(dtype)
    checkpoint = path if isinstance(path, HFCheckpoint) else HFCheckpoint(path)
    model = meta_model(checkpoint.args)
    state = checkpoint.read(dtype, device)
    if checkpoint.args.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    return model.eval()


def parse_size(size) -> int:
    """Bytes in an int or a string such as "500MB", "5GB", "2GiB" (decimal units as in transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise InputError(f"max_shard_size must be an int or a string like '500MB' or '5GB', got {size!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def write_hf(args: ModelArgs, tensors, path, max_shard_size="5GB", dtype=torch.float32, write=True) -> None:
    """Stream `tensors`, (HF name, full tensor) pairs, into an HF checkpoint directory for `args`.

    Each tensor is cast and moved to the CPU as it comes, so at most one shard is held. With `write` false the
    stream is drained and nothing is written: the ranks of an engine that are not rank 0. A failed write (a full
    disk) still drains the stream, whose every step is a collective of all ranks, before it raises.
    """
    _check_dtype(dtype)
    path, limit = Path(path), parse_size(max_shard_size)
    shards, current, size, total = [], {}, 0, 0

    def flush():
        tmp = path / f".part{len(shards)}.tmp{os.getpid()}"
        shards.append((tmp, list(current)))
        with disk_space(tmp, sum(t.nbytes for t in current.values())):
            save_file(current, str(tmp), metadata={"format": "pt"})
            os.chmod(tmp, 0o666 & ~umask())
        current.clear()

    try:
        failure = None
        for name, t in tensors:
            if not write or failure is not None:
                continue
            try:
                path.mkdir(parents=True, exist_ok=True)
                nbytes = t.numel() * dtype.itemsize
                if current and size + nbytes > limit:
                    flush()
                    size = 0
                current[name] = t.detach().to(device="cpu", dtype=dtype).contiguous()
                size, total = size + nbytes, total + nbytes
            except OSError as e:
                failure = e
        if failure is not None:
            raise failure
        if not write:
            return
        flush()
        n = len(shards)
        files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for (tmp, _), file in zip(shards, files):
            os.replace(tmp, path / file)
        config = json.dumps(args.to_hf_config(dtype), indent=2)
        atomic_write(path / "config.json", lambda tmp: tmp.write_text(config))
        if n > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {name: file for (_, names), file in zip(shards, files) for name in names}}
            atomic_write(path / INDEX_FILE, lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
    finally:
        for tmp, _ in shards:
            tmp.unlink(missing_ok=True)
    # Stale files of an earlier save: the single file before the shards it would shadow, index before shards.
    stale = [SINGLE_FILE] if n > 1 else [INDEX_FILE]
    stale += sorted(f.name for f in path.iterdir() if _SHARD_NAME.fullmatch(f.name) and f.name not in files)
    for name in stale:
        (path / name).unlink(missing_ok=True)


def save_hf(model: Transformer, path, max_shard_size="5GB", dtype: torch.dtype | None = None) -> None:
    """Write `model` as an HF checkpoint directory (config.json + safetensors), sharded above max_shard_size."""
    params = model.named_parameters()  # a tied lm_head is listed once, as embed_tokens
    write_hf(model.args, params, path, max_shard_size, dtype or model.model.embed_tokens.weight.dtype)
