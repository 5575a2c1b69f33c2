"""What every process of a run shares: the process group, rank-0 output, the default dtype, safe file writes, and
the errors that tell a user what to fix.

One code path serves a plain `python` process and a `torchrun` job: `init_distributed` makes a process group of
one when torchrun's environment is absent, so collectives are always legal, and `distributed()` is the one
test for "are there other ranks". Files are written under a temporary name beside their final one and renamed
into place (`atomic_write`), so a reader, or a run killed mid-write, never sees half a file; they get the
user's umask (safetensors alone would create them 0600), and a full disk is one `DiskFullError` naming the file
and the space it needed.

`InputError` is bad input (a file, field or flag): its message names the thing, what was found and what was
expected, and the entry points print it as one line without a traceback (`exit_on_input_errors`); every other
exception is a bug and keeps its traceback.
"""
import errno
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

_UMASK = os.umask(0)
os.umask(_UMASK)


def umask() -> int:
    """The process's umask (files a run writes get 0o666 & ~umask, as any file the user creates)."""
    return _UMASK


class InputError(ValueError):
    """Bad input from the user: the message names the file, field or flag, what was found and what was expected."""


class NonFiniteError(InputError):
    """A NaN or an infinity where training needs numbers: the message names the step or tensor; nothing was saved."""


class DiskFullError(OSError):
    """A write that found no space left; the message names the file and the space it needed."""


def init_distributed(device: str = ""):
    """(rank, world, device) from torchrun's environment; a plain `python` run is a world of one.

    `device` is "cpu", "cuda" or "" (CUDA when present). With CUDA every rank needs a GPU of its own on its node.
    The first call starts the process group (NCCL on GPUs, gloo on CPUs); later calls return its device kind.
    """
    if device not in ("", "cpu", "cuda"):
        raise InputError(f"--device must be cpu or cuda, got {device!r}")
    if dist.is_initialized():
        on_gpu = dist.get_backend() == "nccl"
    else:
        on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
        if on_gpu and not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is visible to this process")
    if not on_gpu:
        if not dist.is_initialized():
            _start_group(dict(backend="gloo"))
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
    if per_node > gpus:
        raise InputError(f"torchrun started {per_node} ranks on this node but {gpus} GPU(s) are visible: start at "
                         f"most {gpus} per node (--nproc-per-node {gpus}) or train on the CPU (--device cpu)")
    gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        torch.cuda.set_device(gpu)  # before the process group, or NCCL binds every rank to GPU 0
        _start_group(dict(backend="nccl", device_id=gpu))
    return dist.get_rank(), dist.get_world_size(), gpu


def _start_group(kwargs):
    if "RANK" in os.environ:
        dist.init_process_group(**kwargs)
    else:  # one code path for world 1: a process group of one over an in-memory store
        dist.init_process_group(**kwargs, store=dist.HashStore(), rank=0, world_size=1)


def shutdown() -> None:
    """End a torchrun job together: every rank waits for the others, destroys the process group and ends its process
    at once, exit code 0. A process group of one that this process made for itself (no torchrun) stays up for later
    callers in the same process, which goes on.

    Why the process ends here: gloo's threads outlive destroy_process_group while anything still holds the group
    (torch.distributed.nn binds it as a default argument when torch.optim or fully_shard imports it after the group
    exists; DTensor's caches under --fsdp torch), and such a thread frees a finished collective's tensors a moment
    after the collective returns. If that moment falls after the interpreter began to finalize, the thread is killed
    inside a destructor: std::terminate ("terminate called without an active exception"), a rank aborted after its
    work was done."""
    if dist.is_initialized() and "RANK" in os.environ:
        dist.barrier()
        dist.destroy_process_group()
        _end(0)


def _end(code: int):
    """Leave a torchrun rank's process now, its output flushed, without finalizing the interpreter (`shutdown`)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank_world() -> tuple[int, int]:
    """This process's rank and the world size ((0, 1) before any process group exists)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def distributed() -> bool:
    """Whether other ranks take part: the one test for it."""
    return rank_world()[1] > 1


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if rank_world()[0] == 0:
        print(*args, **kwargs, flush=True)


def all_reduce(tensor, op=dist.ReduceOp.SUM):
    """In-place all-reduce across ranks (a no-op in a world of one); returns the tensor."""
    if distributed():
        dist.all_reduce(tensor, op=op)
    return tensor


def gather(obj, dst: int | None = None) -> list | None:
    """Every rank's `obj`, in rank order, on every rank, or on rank `dst` alone (None on the others)."""
    if not distributed():
        return [obj]
    out = [None] * rank_world()[1]
    if dst is None:
        dist.all_gather_object(out, obj)
        return out
    dist.gather_object(obj, out if rank_world()[0] == dst else None, dst=dst)
    return out if rank_world()[0] == dst else None


def first_error(error: str | None) -> str | None:
    """The first rank's error message, on every rank (None when no rank has one): so that all stop together."""
    return next((e for e in gather(error) if e is not None), None)


@contextmanager
def together():
    """A block that may fail on some ranks only (their own files, a full disk): once every rank has left it, an
    error on any rank is raised on every rank, so that none waits in a collective for one that has stopped."""
    error = None
    try:
        yield
    except (InputError, OSError) as e:
        error = e
    text = None if error is None else error.strerror if isinstance(error, DiskFullError) else str(error)
    message = first_error(text)
    if error is not None:
        raise error
    if message is not None:
        raise InputError(message)


def barrier():
    """Wait for every rank (a no-op in a world of one)."""
    if distributed():
        dist.barrier()


def default_compute_dtype(device):
    """bf16 on GPUs; fp32 on the CPU, where bf16 matmuls are slow."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def tmp_name(file: Path) -> Path:
    """The hidden temporary name beside `file` that this process writes it under."""
    return file.with_name(f".{file.name}.tmp{os.getpid()}")


@contextmanager
def disk_space(file: Path, needed: int | None = None):
    """Turn a full disk while writing `file` into a DiskFullError naming it, the space it needed and the space that
    was free before the write began (measured then: by the time the error is seen, writers have removed their
    partial files)."""
    parent = Path(file).parent
    free = shutil.disk_usage(parent).free if parent.is_dir() else 0
    try:
        yield
    except Exception as e:   # OSError from Python, SafetensorError from safetensors' writer
        if getattr(e, "errno", None) != errno.ENOSPC and "No space left on device" not in str(e):
            raise
        what = f"{needed / 2**20:.1f} MiB" if needed is not None else "more space"
        raise DiskFullError(errno.ENOSPC, f"{file}: no space left on the device to write it: it needs {what}, "
                                          f"{free / 2**20:.1f} MiB were free before the write; nothing under its "
                                          f"name was changed") from None


def atomic_write(file: Path, write, needed: int | None = None):
    """Call write(tmp) on a temporary name beside `file`, then move it into place in one step, with the user's
    umask. `needed` (bytes) is only for the message if the disk is full."""
    file = Path(file)
    tmp = tmp_name(file)
    try:
        with disk_space(file, needed):
            write(tmp)
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def exit_on_input_errors(prog: str):
    """Run an entry point: bad input, a missing file or a full disk ends it with one line on stderr, exit code 2."""
    try:
        yield
    except (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            DiskFullError) as e:
        if rank_world()[0] == 0:
            print(f"{prog}: error: {e.strerror if isinstance(e, DiskFullError) else e}", file=sys.stderr, flush=True)
        if dist.is_initialized() and "RANK" in os.environ:
            _end(2)   # a rank of a torchrun job: as `shutdown`, never through the interpreter's teardown
        sys.exit(2)


def read_json(path, what: type | None = None, lines: bool = False):
    """The value of a UTF-8 JSON file, of type `what` (dict or list) when given; with `lines`, a JSON Lines file's
    values as (line number, value) pairs, blank lines skipped. Anything else is one InputError naming the file (and
    line): not UTF-8, not valid JSON (where), a NaN or an infinity, a value of another type, nesting too deep.

    Python's json accepts NaN, Infinity and -Infinity, which JSON does not have: an `"rms_norm_eps": Infinity`
    would pass every `> 0` check, so they are refused here. Nesting deeper than the interpreter's recursion limit
    raises a RecursionError that names no file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None

    def parse(text, where):
        def refuse(constant):
            raise InputError(f"{where}: {constant} is not JSON (a number must be finite)")
        try:
            value = json.loads(text, parse_constant=refuse)
        except json.JSONDecodeError as e:
            at = f"column {e.colno}" if lines else f"line {e.lineno}, column {e.colno}"
            raise InputError(f"{where}: not valid JSON ({e.msg.removesuffix(' at')} at {at})") from None
        except RecursionError:
            raise InputError(f"{where}: JSON nested too deeply to read (the limit is about "
                             f"{sys.getrecursionlimit()} levels)") from None
        if what is not None and not isinstance(value, what):
            raise InputError(f"{where}: expected a JSON {'object' if what is dict else what.__name__}, "
                             f"got {type(value).__name__}")
        return value

    if not lines:
        return parse(text, path)
    # Lines end at "\n" alone: str.splitlines would also cut at U+2028 and the like, which a JSON string may hold.
    return [(n, parse(line, f"{path}: line {n}")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
