"""Hugging Face checkpoints in and out: `config.json` plus safetensors, single file or sharded.

Loading never holds two copies of the weights. The Transformer is built on the `meta` device, where
parameters have shapes but no storage (random initialisation skipped: there is nothing to initialise),
so building a 7B model costs nothing. Each file's header is checked first: every name, shape and dtype
against the model the config describes, and an error names the file and the tensor. Then the tensors
are read one by one:
- on the CPU in the checkpoint's own dtype, no copy is made at all: a tensor is the file's pages,
  mapped copy-on-write (safetensors' mmap backend), read by the kernel on first touch; an in-place
  update copies only the pages it writes. As with transformers, a file must not be overwritten in
  place while a model loaded from it lives (`save_hf` replaces files, so saving back is safe);
- with a cast or a move to another device, each tensor is read with `pread` into memory of its own,
  converted and its source freed, so the file is never resident beside the converted copy.
The meta parameters are swapped for these tensors with `load_state_dict(assign=True)`: peak memory is
the final model plus one tensor in flight. Assigning replaces parameters, which breaks the
embedding/lm_head tie, so `tie_weights()` runs last.

Saving writes HF's layout, which `transformers.LlamaForCausalLM.from_pretrained` reads unchanged:
`model.safetensors`, or `model-0000i-of-0000N.safetensors` shards plus `model.safetensors.index.json`
when the weights exceed `max_shard_size`. Tied models omit `lm_head.weight`, as HF does. Each file is
written under a temporary name and `os.replace`d into place, so a reader never sees half a file;
the index goes last, being the file that makes a new set of shards visible. Files of an earlier save
into the same directory that the new one does not use are removed afterwards. Readers (this one and
HF's) prefer `model.safetensors` over an index, so each intermediate state of a re-save is either
the old checkpoint or the new one.
"""
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from minseekr.model import ModelArgs, Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# safetensors dtype codes this loader accepts; anything else (int8, fp8, ...) is a quantised format.
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _check_dtype(dtype):
    if dtype is not None and dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")


def read_args(path) -> ModelArgs:
    """The ModelArgs of a checkpoint directory, from its config.json."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: a checkpoint directory needs a config.json")
    try:
        cfg = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config} is not valid JSON ({e})") from e
    return ModelArgs.from_hf_config(cfg, source=str(config))


def _weight_files(path: Path) -> dict[str, Path]:
    """Map every tensor name in the checkpoint to the safetensors file holding it."""
    single, index = path / SINGLE_FILE, path / INDEX_FILE
    if single.is_file():  # preferred over an index, as transformers does
        with _open(single) as f:
            return dict.fromkeys(f.keys(), single)
    if not index.is_file():
        raise FileNotFoundError(f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is not a safetensors index with a 'weight_map' ({e!r})") from e
    files = {}
    for name, shard in weight_map.items():
        files[name] = path / shard
        if not files[name].is_file():
            raise FileNotFoundError(f"shard {shard} (holding {name!r}) is named in {index} but does not exist")
    return files


def _open(file: Path, backend: str = "mmap"):
    try:
        return safe_open(file, framework="pt", backend=backend)
    except SafetensorError as e:
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt: {e})") from e


def _read_shard(file: Path, expected: dict[str, tuple], dtype, device) -> dict[str, torch.Tensor]:
    """The tensors `expected` names (with their shapes) from one safetensors file, checked, cast, on device."""
    with _open(file) as f:
        present = set(f.keys())
        codes = {}
        for name, shape in expected.items():
            if name not in present:
                raise ValueError(f"{file}: tensor {name!r} is missing although the index places it here")
            meta = f.get_slice(name)
            codes[name] = meta.get_dtype()
            if codes[name] not in _DTYPES:
                raise ValueError(f"{file}: tensor {name!r} has dtype {codes[name]}; only F32, F16 and BF16 are supported")
            if tuple(meta.get_shape()) != shape:
                raise ValueError(f"{file}: tensor {name!r} has shape {tuple(meta.get_shape())}, "
                                 f"expected {shape} from config.json")
        zero_copy = torch.device(device).type == "cpu" and all(dtype in (None, _DTYPES[c]) for c in codes.values())
        if zero_copy:  # the file's own pages, mapped copy-on-write
            return {name: _get(f, file, name) for name in expected}
    # Otherwise a tensor of its own per read, so the file is never resident beside the converted copy.
    with _open(file, backend="pread") as f:
        return {name: _get(f, file, name).to(device=device, dtype=dtype) for name in expected}


def _get(f, file: Path, name: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except SafetensorError as e:
        raise ValueError(f"{file}: tensor {name!r} cannot be read (truncated or corrupt: {e})") from e


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


def load_hf(path, dtype: torch.dtype | None = None, device="cpu") -> Transformer:
    """A Transformer in eval mode with the weights of an HF checkpoint directory; dtype None keeps the file's."""
    _check_dtype(dtype)
    path = Path(path)
    args = read_args(path)
    with torch.device("meta"), _SkipInit():
        model = Transformer(args)
    # named_parameters lists a tied weight once, under model.embed_tokens.weight.
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    files = _weight_files(path)
    if missing := sorted(set(expected) - set(files)):
        raise ValueError(f"{path}: checkpoint lacks tensor {missing[0]!r} that config.json implies "
                         f"({len(missing)} missing)")
    # A tied checkpoint may still carry its lm_head copy; the tie wins, as in transformers.
    ignored = {"lm_head.weight"} if args.tie_embeddings else set()
    if unexpected := sorted(set(files) - set(expected) - ignored):
        name = unexpected[0]
        raise ValueError(f"{files[name]}: unexpected tensor {name!r}, not a parameter of the model config.json describes")

    by_file: dict[Path, dict[str, tuple]] = {}
    for name, shape in expected.items():
        by_file.setdefault(files[name], {})[name] = shape
    state = {}
    for file, shapes in by_file.items():
        state.update(_read_shard(file, shapes, dtype, device))
    if args.tie_embeddings:
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
        raise ValueError(f"max_shard_size must be an int or a string like '500MB' or '5GB', got {size!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def atomic_write(file: Path, write):
    """Call write(tmp) on a temporary name beside `file`, then move it into place in one step."""
    tmp = file.with_name(f".{file.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def save_hf(model: Transformer, path, max_shard_size="5GB", dtype: torch.dtype | None = None) -> None:
    """Write model as an HF checkpoint directory (config.json + safetensors), sharded above max_shard_size."""
    _check_dtype(dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    params = dict(model.named_parameters())  # a tied lm_head is listed once, as embed_tokens
    dtype = dtype or params["model.embed_tokens.weight"].dtype
    shards, size = [[]], 0
    for name, p in params.items():  # greedy, in model order, so shards follow the layers
        nbytes = p.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for shard, names_in in zip(names, shards):
        # One shard at a time is cast and moved to the CPU, so saving adds at most a shard of memory.
        tensors = {k: params[k].detach().to(device="cpu", dtype=dtype).contiguous() for k in names_in}
        atomic_write(path / shard, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        del tensors
    config = json.dumps(model.args.to_hf_config(dtype), indent=2)
    atomic_write(path / "config.json", lambda tmp: tmp.write_text(config))
    if n > 1:
        index = {"metadata": {"total_size": sum(p.numel() * dtype.itemsize for p in params.values())},
                 "weight_map": {k: shard for shard, names_in in zip(names, shards) for k in names_in}}
        atomic_write(path / INDEX_FILE, lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
    # Stale files of an earlier save: the single file before the shards it would shadow, index before shards.
    stale = [SINGLE_FILE] if n > 1 else [INDEX_FILE]
    stale += sorted(f.name for f in path.iterdir() if _SHARD_NAME.fullmatch(f.name) and f.name not in names)
    for name in stale:
        (path / name).unlink(missing_ok=True)
