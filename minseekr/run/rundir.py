"""The run directory: where a run keeps each thing, and the summary of its results; the one place that knows both.

    config.json                the resolved ContinualConfig          run.json    the entry point's own settings
    checkpoints/taskNN/        θ after NN tasks, HF format (task00 = θ_0)
    buffer/taskNN.{safetensors,json}   the memory buffer (buffer.py)
    snapshots/taskNN-rankRRRRR/batchBBBBB.safetensors   θ_{k−1}'s attention on R_k until task k is done
    head_scores.safetensors    per-task S^k and F^k (heads.HeadScores)
    metrics.jsonl              one line per optimiser step, one per finished task
    resume/latest.json, resume/<tag>/   the latest resume point (resume.py's format)
    results.json               R, base scores, OP, BWT, BWT_T, FWT, the selected heads
    run.lock                   held by the process that runs in it (its pid, host and start time inside)

A run claims its directory (`claim`) before it writes anything: one process at a time holds `run.lock` (an
advisory `flock`, released when the process ends, however it ends); a second one stops, naming the holder. A new
run needs a new or empty directory. The claim also refuses symlinks and hard-linked files anywhere inside the
directory (the trainer would read, write or truncate through them outside it) and removes the temporary files that
a killed process left in the run's own folders.
"""
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from minseekr.evaluation.metrics import backward_transfer, forward_transfer, overall_performance
from minseekr.runtime import DiskFullError, InputError, atomic_write, first_error

# runtime.atomic_write's and checkpoint.write_hf's temporary names (.NAME.tmpPID), and safetensors' own (.tmpXXXXXX)
_TEMPORARY = re.compile(r"^(\..+\.tmp\d+|\.tmp[A-Za-z0-9]{6})$")


class RunDir:
    """The paths of one run directory."""

    def __init__(self, root):
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.spec = self.root / "run.json"
        self.buffer = self.root / "buffer"
        self.head_scores = self.root / "head_scores.safetensors"
        self.metrics = self.root / "metrics.jsonl"
        self.resume = self.root / "resume"
        self.results = self.root / "results.json"

    def checkpoint(self, n_tasks: int) -> Path:
        """θ after `n_tasks` tasks (stages) in HF format: task00 is θ_0."""
        return self.root / "checkpoints" / f"task{n_tasks:02d}"

    def snapshot(self, task: int, rank: int) -> Path:
        """θ_{k−1}'s attention at R_k's rows for task k, this rank's share: a folder of one file per batch."""
        return self.root / "snapshots" / f"task{task:02d}-rank{rank:05d}"

    @contextmanager
    def claimed(self, rank: int, resume: bool, settings: dict):
        """The directory claimed by rank 0 for the block, every rank stopping together if it cannot be. A new run
        (not `resume`) needs a new or empty directory and writes its `settings` ({file: dict or None}) once."""
        claim, error = ExitStack(), None
        if rank == 0:
            try:
                claim.enter_context(self.claim(new=not resume))
                for file, values in settings.items():
                    if values is not None:
                        atomic_write(file, lambda tmp, values=values: tmp.write_text(json.dumps(values, indent=1)))
            except (InputError, OSError) as e:
                claim.close()
                error = e.strerror if isinstance(e, DiskFullError) else str(e)
        if error := first_error(error):
            raise InputError(error)
        with claim:
            yield

    @contextmanager
    def claim(self, new: bool = False):
        """Hold run.lock while the block runs. Refused: a directory in use; for a `new` run, one that holds
        anything (an earlier run, or files of the user's); symlinks or hard links inside it, through which the run
        would read or write outside it. The temporary files a killed process left in the run's own folders go."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = self.root / "run.lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise InputError(f"{lock} is a symlink; a run directory holds no symlinks") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                raise InputError(f"{self.root} is in use by {holder}: wait for that run to end, or give another "
                                 f"--out") from None
            if new:
                self.check_empty()
            self.check_contained()
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
            for folder in (self.root, self.buffer, self.resume, *self.root.glob("checkpoints/*"),
                           *self.resume.glob("*"), *self.root.glob("snapshots/*")):
                for path in folder.iterdir() if folder.is_dir() else ():
                    if path.is_file() and _TEMPORARY.match(path.name):
                        path.unlink()     # left by a killed process: never under a final name, never read
            yield
        finally:
            os.close(fd)              # releases the lock

    def log_mark(self) -> dict:
        """What metrics.jsonl holds now (its length and digest), kept in a resume point."""
        logged = self.metrics.read_bytes() if self.metrics.exists() else b""
        return {"metrics_bytes": len(logged), "metrics_sha256": hashlib.sha256(logged).hexdigest()}

    def rewind_log(self, mark: dict | None):
        """metrics.jsonl cut back to what it held at `mark` (None: emptied): what was logged after the resume point
        goes, so a resumed run logs each line once. Refused if the log no longer starts with the marked bytes."""
        if mark is None:
            self.metrics.unlink(missing_ok=True)
            return
        if not {"metrics_bytes", "metrics_sha256"} <= set(mark):
            raise InputError(f"{self.metrics}: the resume point holds no mark of the log (written by an older "
                             f"minseekr?): start the run again")
        logged = self.metrics.read_bytes()[:mark["metrics_bytes"]] if self.metrics.exists() else b""
        if hashlib.sha256(logged).hexdigest() != mark["metrics_sha256"]:
            raise InputError(f"{self.metrics} no longer starts with the {mark['metrics_bytes']} bytes logged before "
                             f"the resume point (edited or emptied?): restore it, or start the run again")
        atomic_write(self.metrics, lambda tmp: tmp.write_bytes(logged))

    def check_empty(self):
        """A new run's directory holds nothing but its lock: never an earlier run, nor files of the user's."""
        if self.config.exists():
            raise InputError(f"{self.root} already holds a run ({self.config.name}): continue it with --resume "
                             f"{self.root}, or give another --out")
        if found := sorted(p.name for p in self.root.iterdir() if p.name != "run.lock"):
            raise InputError(f"{self.root} is not empty ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}) "
                             f"and holds no run: a new run needs a new or empty --out")

    def check_contained(self):
        """No symlink and no hard-linked file anywhere inside: whatever the run reads, writes, truncates or deletes
        is its own."""
        for path in sorted(self.root.rglob("*")):
            if path.is_symlink():
                raise InputError(f"{path} is a symlink; a run directory holds no symlinks (the trainer would "
                                 f"read or write through it, outside {self.root})")
            if path.is_file() and path.stat().st_nlink > 1:
                raise InputError(f"{path} is hard-linked ({path.stat().st_nlink} names): a run directory's files are "
                                 f"its own (copy a run with cp -r, not cp -l)")


def summarize(R, base, tasks: list[str], method: str, joint: bool, heads, run_dir) -> dict:
    """results.json: R (a single row for joint training), base scores, OP (Eq. 14), BWT (Eq. 15, ÷ (T−1)),
    BWT_T (÷ T, the official show_results.py behind the paper's tables), FWT, the selected heads, the directory."""
    if joint:
        op, bwt, bwt_t, fwt = sum(R[0]) / len(R[0]), None, None, None
    else:
        op, fwt = overall_performance(R), forward_transfer(R, base)
        bwt, bwt_t = backward_transfer(R), backward_transfer(R, over_all_tasks=True)
    return {"method": method, "tasks": tasks, "R": R, "base": base, "OP": op, "BWT": bwt, "BWT_T": bwt_t,
            "FWT": fwt, "heads": heads, "run_dir": str(Path(run_dir).resolve())}
