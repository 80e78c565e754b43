"""Exclusive file locks: one writer per run, one builder per cache key, one launch at a time.

Why POSIX record locks (``fcntl.lockf``, i.e. ``fcntl(F_SETLK)``) and not ``flock`` or a pid file:

- They are the locks shared filesystems implement across nodes: NFSv3 through NLM, NFSv4 in the
  protocol itself, GPFS/Spectrum Scale natively, Lustre when mounted with ``-o flock``, BeeGFS with
  global file locks. ``flock`` is node-local on several of them (Lustre ``localflock``, BeeGFS by
  default, NFS before Linux 2.6.12), so two nodes could both "hold" it.
- The kernel (or the NFS server, once the client's lease lapses) releases them when the holder dies,
  however it dies (SIGKILL, OOM, node crash): there is no stale lock to clean up, unlike a pid file.

POSIX locks belong to the process, not to the file descriptor: a second lock on the same file from
the same process succeeds, and closing ANY descriptor of the file drops the lock. So every lock file
is opened once per hold, only here, and a per-process registry makes a second hold of the same path
in this process (another thread, a second Trainer) wait or fail exactly as another process would.

Where the filesystem has no locks at all (ENOLCK, or EINVAL/ENOSYS from Lustre without ``flock``),
``hold`` warns once and yields without the lock: callers keep a second line of defence (the cache
publishes by rename; ``launch`` checks the queue for jobs of the same run).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rag_hpc.errors import ClusterError

log = logging.getLogger("rag_hpc.locks")

_BUSY = (errno.EACCES, errno.EAGAIN)
_NO_LOCKS = (errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
_held: dict[str, threading.Lock] = {}
_registry = threading.Lock()
_warned: set[str] = set()


class LockBusy(Exception):
    """Someone else holds the lock; ``holder`` is what they recorded in it ({} if nothing readable)."""

    def __init__(self, path: Path, holder: dict[str, Any]):
        super().__init__(f"{path} is held by {describe(holder)}")
        self.path = path
        self.holder = holder


def whoami() -> dict[str, Any]:
    """What a holder records about itself: enough for a user to find it and stop it."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": job, "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (it has not recorded who it is yet)"
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ", not a SLURM job"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{job}, since {holder.get('since', '?')}"


def read_holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _in_process_lock(key: str) -> threading.Lock:
    with _registry:
        return _held.setdefault(key, threading.Lock())


@contextlib.contextmanager
def hold(path: Path, wait_s: float | None = 0.0, record: bool = True, poll_s: float = 0.5) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block.

    ``wait_s``: 0 = fail at once with ``LockBusy``; None = wait as long as it takes; else wait up to
    that many seconds. With ``record`` the holder's host, pid and SLURM job id are written into the
    file, for the ``LockBusy`` of whoever comes next. The file itself is never removed: removing a
    lock file lets a waiter lock the unlinked inode while a newcomer locks a fresh one.
    """
    key = str(path.absolute())
    local = _in_process_lock(key)
    deadline = None if wait_s is None else time.monotonic() + wait_s
    if not local.acquire(timeout=-1 if wait_s is None else max(0.0, wait_s)):
        raise LockBusy(path, read_holder(path))
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            locked = _lock(fd, path, deadline, poll_s)
            if locked and record:
                data = json.dumps(whoami()).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                os.fsync(fd)
            yield
        finally:
            os.close(fd)  # releases the POSIX lock
    finally:
        local.release()


def _lock(fd: int, path: Path, deadline: float | None, poll_s: float) -> bool:
    """True once locked; False where the filesystem has no locks (warned once per directory)."""
    while True:
        try:
            # Waiting without a deadline blocks in the kernel (F_SETLKW): waiters queue, none polls.
            fcntl.lockf(fd, fcntl.LOCK_EX if deadline is None else fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno in _NO_LOCKS:
                if str(path.parent) not in _warned:
                    _warned.add(str(path.parent))
                    log.warning("%s: this filesystem offers no file locks (%s); going on without one", path.parent, exc.strerror)
                return False
            if exc.errno not in _BUSY:
                raise
        if deadline is not None and time.monotonic() >= deadline:
            raise LockBusy(path, read_holder(path))
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------------------
# one writer per run directory

WRITER_LOCK = "writer.lock"
# A requeued job (SLURM_RESTART_COUNT > 0) may start while the NFS server still holds the lock of its
# previous run on a node that died: the lock goes when that client's lease lapses (NFSv4: 90 s).
REQUEUE_WAIT_S = 180.0


class RunInUseError(ClusterError):
    """Another process writes this run directory."""


@contextlib.contextmanager
def one_writer(directory: Path, what: str) -> Iterator[None]:
    """Be the only ``what`` (e.g. "training") writing ``directory`` for the block, or raise
    ``RunInUseError`` naming the holder at once (after up to ``REQUEUE_WAIT_S`` in a requeued job)."""
    requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(hold(directory / WRITER_LOCK, REQUEUE_WAIT_S if requeued else 0.0))
    except LockBusy as exc:
        job, host, pid = exc.holder.get("slurm_job_id"), exc.holder.get("host", "?"), exc.holder.get("pid", "?")
        stop = f"`scancel {job}`" if job else f"`kill {pid}` on {host}"
        raise RunInUseError(
            f"{directory} is already in use by {describe(exc.holder)} ({what} writes one run at a time): "
            f"wait for it to finish, stop it ({stop}), or use another train.name"
        ) from None
    with stack:
        yield
