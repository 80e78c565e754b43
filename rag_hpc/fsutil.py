"""Durable, atomic file writes shared by every stage that publishes files (cache, checkpoints,
reports): a reader sees the old bytes or the new bytes, never a mix, after any crash."""

from __future__ import annotations

import errno
import io
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rag_hpc.errors import DiskSpaceError


def human_bytes(n: float) -> str:
    """Bytes for people: 1.5 GiB, 340.0 KiB, 512 B."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class DiskFullError(DiskSpaceError):
    """A write ran out of space (ENOSPC/EDQUOT); the message names the directory, the bytes needed and free."""


@contextmanager
def disk_space_for(directory: Path, needed_bytes: int, what: str) -> Iterator[None]:
    """Turn a full disk or quota while writing ``what`` into ``directory`` into one error that names
    the directory, the bytes needed and the bytes free. The caller's cleanup (``finally``) still
    removes its partial temp files, so nothing half-written is left looking valid."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(directory).free if directory.exists() else 0
        raise DiskFullError(
            f"no space left in {directory} writing {what}: needs about {human_bytes(needed_bytes)}, "
            f"{human_bytes(free)} free; free space there or point the config at a larger filesystem"
        ) from exc


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write and fsync ``path``; created with the user's umask (no world-writable files)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` via a temporary file in the same directory and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)  # atomic_file fsyncs it before the rename


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """For a writer that streams (HDF5, CSV): a temporary path beside ``path`` to write; when the block
    ends it is fsynced and renamed over ``path`` (and the directory fsynced), so readers see the old file
    or the whole new one; when the block raises it is removed and ``path`` is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as ``path`` (format from its suffix) with ``atomic_write``."""
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip("."))
    atomic_write(path, buf.getvalue())
    return path
