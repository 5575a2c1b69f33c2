"""What every process of a run shares: the process group, rank-0 output, the default dtype, and safe file writes.

One code path serves a plain `python` process and a `torchrun` job: `init_distributed` makes a process group of
one when torchrun's environment is absent, so collectives are always legal, and `distributed()` is the one
test for "are there other ranks". Files are written under a temporary name beside their final one and renamed
into place (`atomic_write`), so a reader, or a run killed mid-write, never sees half a file.
"""
import os
from pathlib import Path

import torch
import torch.distributed as dist


def init_distributed():
    """(rank, world, device) from torchrun's environment; a plain `python` run is a world of one."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)  # before the process group, or NCCL binds every rank to GPU 0
        kwargs = dict(backend="nccl", device_id=device)
    else:
        device, kwargs = torch.device("cpu"), dict(backend="gloo")
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(**kwargs)
        else:  # one code path for world 1: a process group of one over an in-memory store
            dist.init_process_group(**kwargs, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


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


def gather(obj) -> list:
    """Every rank's `obj`, in rank order."""
    if not distributed():
        return [obj]
    out = [None] * rank_world()[1]
    dist.all_gather_object(out, obj)
    return out


def barrier():
    """Wait for every rank (a no-op in a world of one)."""
    if distributed():
        dist.barrier()


def default_compute_dtype(device):
    """bf16 on GPUs; fp32 on the CPU, where bf16 matmuls are slow."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def atomic_write(file: Path, write):
    """Call write(tmp) on a temporary name beside `file`, then move it into place in one step."""
    file = Path(file)
    tmp = file.with_name(f".{file.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
