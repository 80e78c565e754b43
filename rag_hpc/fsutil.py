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


# Temporaries are named <prefix><pid>.<name>: hidden, owned by one process, and ending in the name, so
# tools that go by the suffix (tabix on *.vcf.gz) treat the temporary as the file it will become.
TEMPORARY_PREFIX = ".tmp."


class AtomicFile:
    """A temporary file beside ``path`` for a writer whose output outlives one call (``VcfWriter``):
    ``commit`` fsyncs it and renames it over ``path`` (and fsyncs the directory), so readers see the old
    file or the whole new one; ``discard`` removes it and leaves ``path`` as it was."""

    def __init__(self, path: Path, pid: int | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(f"{TEMPORARY_PREFIX}{os.getpid() if pid is None else pid}.{self.path.name}")

    def commit(self) -> Path:
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def temporaries(directory: Path, name_glob: str = "*") -> list[Path]:
    """Temporaries of ``name_glob`` files in ``directory``: a writer's that died, or one still writing."""
    return sorted(directory.glob(f"{TEMPORARY_PREFIX}*.{name_glob}"))


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """``AtomicFile`` for a writer that streams within one block (HDF5, CSV): yields the temporary path,
    commits it when the block ends and discards it when the block raises."""
    file = AtomicFile(path)
    try:
        yield file.tmp
        file.commit()
    finally:
        file.discard()


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (``atomic_file``)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as ``path`` (format from its suffix) with ``atomic_write``."""
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip("."))
    atomic_write(path, buf.getvalue())
    return path
