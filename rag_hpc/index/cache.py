"""Content-addressed artifact store (DESIGN.md §3).

An artifact is a directory ``<root>/<kind>/<key[:2]>/<key>/`` holding its files and a
``manifest.json`` (key, the fields the key hashes, each file's size and sha256). The key is the
sha256 of the canonical JSON of those fields, so an artifact can only be found by the exact inputs
that made it.

Writes build the whole directory under a temporary name in the same filesystem, fsync every file
and the directory, then publish it with one ``rename``: a reader sees a complete artifact or none,
whatever kills the writer and whenever. Concurrent builders of one key serialise on an advisory
lock; where the filesystem has no locks, both build and the first rename wins, the other's copy is
discarded — identical bytes, no corruption.

Readers trust nothing: a missing manifest, a manifest for other fields, a wrong size (truncation)
or, when the bytes are read (for use, or by a build that verifies what it skips), a wrong checksum
makes the artifact invalid and it is rebuilt. A full disk while publishing raises ``DiskFullError``
naming the cache directory and the bytes the artifact needs; its temporary directory is removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rag_hpc.errors import InputError
from rag_hpc.fsutil import disk_space_for, fsync_dir, write_durable
from rag_hpc.locks import hold

ARTIFACT_FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class CacheError(InputError):
    """The cache directory (paths.cache_dir) cannot be created or written: not a directory, permissions, a
    read-only filesystem; the message names the directory. A full disk is ``DiskFullError`` instead."""


def artifact_key(fields: Mapping[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Artifact:
    kind: str
    fields: dict[str, Any]

    @property
    def key(self) -> str:
        return artifact_key({"kind": self.kind, "format_version": ARTIFACT_FORMAT_VERSION, **self.fields})


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, artifact: Artifact) -> Path:
        key = artifact.key
        return self.root / artifact.kind / key[:2] / key

    # -- reading -----------------------------------------------------------------------------

    def _manifest(self, artifact: Artifact) -> dict[str, Any] | None:
        try:
            manifest = json.loads((self.path(artifact) / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict) or manifest.get("key") != artifact.key:
            return None
        if manifest.get("fields") != json.loads(json.dumps(artifact.fields, default=str)):
            return None
        if not isinstance(manifest.get("files"), dict):
            return None
        return manifest

    def problem(self, artifact: Artifact, checksums: bool = False) -> str | None:
        """Why the artifact cannot be used (None = valid).

        Without ``checksums``: manifest, key, fields and sizes only, cheap enough to run over every
        window of a chromosome (a bit flip passes it). With ``checksums``: also the sha256 of every
        file modified since it was committed (mtime differs from the manifest's stamp): that catches
        anything that rewrote a file, truncated or not, while a warm rerun over a whole chromosome
        does not re-hash gigabytes. Corruption that leaves mtime alone (bit rot) is caught by
        ``read``, which always hashes.
        """
        if checksums:
            return self._verified(artifact, only_modified=True)[1]
        directory = self.path(artifact)
        if not directory.is_dir():
            return "missing"
        manifest = self._manifest(artifact)
        if manifest is None:
            return "manifest missing or for other inputs"
        for name, meta in manifest["files"].items():
            try:
                size = (directory / name).stat().st_size
            except OSError:
                return f"{name} missing"
            if size != meta.get("size"):
                return f"{name} truncated or resized ({size} != {meta.get('size')} bytes)"
        return None

    def read(self, artifact: Artifact) -> dict[str, bytes] | None:
        """All files of a valid artifact, checksums verified; None if anything is wrong."""
        return self._verified(artifact)[0]

    def _verified(self, artifact: Artifact, only_modified: bool = False) -> tuple[dict[str, bytes] | None, str | None]:
        """(files, None) when every checksum matches, else (None, why); with ``only_modified``, files
        whose mtime still equals the manifest's stamp are trusted and left out of ``files``."""
        why = self.problem(artifact)
        if why is not None:
            return None, why
        manifest = self._manifest(artifact)
        if manifest is None:  # replaced between the two reads
            return None, "manifest missing or for other inputs"
        out: dict[str, bytes] = {}
        for name, meta in manifest["files"].items():
            path = self.path(artifact) / name
            try:
                if only_modified and path.stat().st_mtime_ns == meta.get("mtime_ns"):
                    continue
                data = path.read_bytes()
            except OSError:
                return None, f"{name} unreadable"
            if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
                return None, f"{name} fails its sha256 checksum (corrupted on disk)"
            out[name] = data
        return out, None

    # -- writing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, artifact: Artifact) -> Iterator[None]:
        """Advisory lock per key so two builders of one window don't both do the work."""
        held = contextlib.ExitStack()
        with disk_space_for(self.root, 0, f"the lock file of {artifact.kind} {artifact.key[:12]}"):
            self._mkdir(self.root / ".locks")
            # Without locks on this filesystem, hold() goes on unlocked: rename-publishing alone keeps it safe.
            held.enter_context(hold(self.root / ".locks" / f"{artifact.key}.lock", wait_s=None, record=False))
        with held:
            yield

    def _mkdir(self, path: Path) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise  # the caller's disk_space_for names the bytes it needed
            raise CacheError(f"cannot create cache directory {path}: {exc.strerror}; set paths.cache_dir") from None

    def sweep_stale(self) -> int:
        """Remove temporary directories left by killed writers on this host; returns how many."""
        host = socket.gethostname()
        removed = 0
        for tmp in self.root.glob("*/*/.tmp-*"):
            rest, _, _rand = tmp.name.rpartition("-")
            owner, _, pid = rest.rpartition("-")
            if not owner.endswith(f"-{host}") or not pid.isdigit():
                continue  # another node's writer may still be alive
            try:
                os.kill(int(pid), 0)
                continue
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
        return removed

    def commit(self, artifact: Artifact, files: Mapping[str, bytes]) -> Path:
        """Publish ``files`` as the artifact, atomically; returns its directory."""
        final = self.path(artifact)
        tmp = final.parent / f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        manifest = {
            "key": artifact.key,
            "kind": artifact.kind,
            "format_version": ARTIFACT_FORMAT_VERSION,
            "fields": artifact.fields,
            "files": {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        # The manifest's own size is a rounding error here; the stamps added below are a few bytes.
        needed = sum(len(d) for d in files.values()) + len(json.dumps(manifest, indent=1, default=str))
        try:
            # The MiB figure rounds a small artifact to 0.0, so the exact bytes go in ``what`` too.
            with disk_space_for(self.root, needed, f"{artifact.kind} {artifact.key[:12]} ({needed:,} bytes)"):
                self._mkdir(final.parent)
                os.mkdir(tmp)  # default mode: the user's umask decides who may read the cache
                for name, data in files.items():
                    write_durable(tmp / name, data)
                    # A rename keeps mtime: an unchanged stamp later means "not rewritten since its checksum".
                    manifest["files"][name]["mtime_ns"] = (tmp / name).stat().st_mtime_ns
                manifest_bytes = json.dumps(manifest, indent=1, default=str).encode()
                write_durable(tmp / MANIFEST, manifest_bytes)
                fsync_dir(tmp)
                self._publish(tmp, final, artifact)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CacheError(f"cannot write to cache directory {self.root}: {exc}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _publish(self, tmp: Path, final: Path, artifact: Artifact) -> None:
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if self.read(artifact) is not None:
                shutil.rmtree(tmp, ignore_errors=True)  # someone published the same bytes first
                return
            # A broken artifact (truncated, bit-flipped, foreign) sits there: move it aside, publish ours.
            trash = final.parent / f".trash-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        fsync_dir(final.parent)
