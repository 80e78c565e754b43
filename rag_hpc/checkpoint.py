"""Training checkpoints: plain dicts of tensors and primitives, written atomically, checked on load.

A checkpoint is ``<dir>/step_<step:09d>.pt`` plus a sidecar ``.sha256`` holding the digest and size
of the exact bytes. Both are written to a temporary file in the same directory, fsynced and renamed,
then the directory is fsynced: after a crash at any point, each name holds either nothing or complete
bytes. The data file is published before its sidecar, so a data file without a sidecar is an
interrupted write and is never trusted.

Loading takes the newest checkpoint whose bytes match their sidecar and that ``torch.load`` accepts
with ``weights_only=True`` (so nothing executable is unpickled); a corrupt or truncated newest one is
logged and the previous one is used. Only the newest ``keep`` are kept.

RNG states are converted to tensors and primitives (``rng_state`` / ``set_rng_state``), because
``weights_only`` refuses numpy arrays and arbitrary tuples of objects. torch is imported only where
tensors are (de)serialized: listing and verifying checkpoints (``status``) runs without it.
"""

from __future__ import annotations

# torch is imported only to (de)serialize: listing and verifying checkpoints (status) need none.
import hashlib
import io
import logging
import os
import pickle
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rag_hpc.errors import CheckpointError, InputError
from rag_hpc.fsutil import atomic_write, disk_space_for, temporaries

if TYPE_CHECKING:
    import torch

log = logging.getLogger("rag_hpc.train")

# 2: the model's parameters named as rag_hpc.model.layers names them (1: gap_score.0, head.1, ...).
CHECKPOINT_FORMAT = 2
_NAME = re.compile(r"^step_(\d{9,})\.pt$")


@dataclass(frozen=True)
class CheckpointFile:
    step: int
    path: Path

    @classmethod
    def named(cls, path: Path) -> CheckpointFile | None:
        """The checkpoint a file's name says it is (step_<N>.pt), or None: the one parser of the name."""
        match = _NAME.match(path.name)
        return cls(int(match.group(1)), path) if match else None

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.path.name + ".sha256")


# ------------------------------------------------------------------------------------------------
# RNG states as tensors and primitives


def rng_state() -> dict[str, Any]:
    """Every RNG state this process uses, in a form ``torch.load(weights_only=True)`` accepts."""
    import torch

    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["mt"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "checkpoint holds CUDA RNG states of %d devices, this process sees %d: CUDA RNG not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


# ------------------------------------------------------------------------------------------------
# the manager


class CheckpointManager:
    """Save, list, verify and load the checkpoints of one run directory."""

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep

    def list(self) -> list[CheckpointFile]:
        """Checkpoint data files present, oldest first (not verified)."""
        if not self.directory.is_dir():
            return []
        found = [c for c in map(CheckpointFile.named, self.directory.iterdir()) if c is not None]
        return sorted(found, key=lambda c: c.step)

    def path_for(self, step: int) -> Path:
        return self.directory / f"step_{step:09d}.pt"

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Serialize ``state`` for ``step``, publish it atomically, then prune to the newest ``keep``.

        A full disk raises ``DiskFullError`` naming the directory and the checkpoint's size, and
        leaves no file of this checkpoint behind: older checkpoints are only pruned after a success.
        """
        import torch

        self.directory.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        sidecar = f"{hashlib.sha256(data).hexdigest()}  {len(data)}\n".encode()
        ckpt = CheckpointFile(step, self.path_for(step))
        with disk_space_for(self.directory, len(data) + len(sidecar), f"checkpoint {ckpt.path.name}"):
            atomic_write(ckpt.path, data)
            try:
                atomic_write(ckpt.sidecar, sidecar)
            except BaseException:
                # Never trusted without its sidecar, but it would hold the space the next attempt needs.
                ckpt.path.unlink(missing_ok=True)
                raise
        self._prune()
        return ckpt.path

    def _prune(self) -> None:
        for old in self.list()[: -self.keep]:
            old.sidecar.unlink(missing_ok=True)
            old.path.unlink(missing_ok=True)
        for stray in temporaries(self.directory, "step_*.pt*"):
            # A writer's that died: ours were renamed or removed already, and one process writes a run's.
            stray.unlink(missing_ok=True)

    def verify(self, ckpt: CheckpointFile) -> bytes:
        """The checkpoint's bytes if they match the sidecar; CheckpointError naming what is wrong otherwise."""
        if not ckpt.sidecar.is_file():
            raise CheckpointError(f"{ckpt.path.name} has no {ckpt.sidecar.name} (its write was interrupted)")
        try:
            digest, size = ckpt.sidecar.read_text().split()
            want_size = int(size)
        except ValueError:
            raise CheckpointError(f"{ckpt.sidecar.name} is malformed") from None
        data = ckpt.path.read_bytes()
        if len(data) != want_size:
            raise CheckpointError(f"{ckpt.path.name} is truncated or padded: {len(data)} bytes, sidecar says {want_size}")
        if hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointError(f"{ckpt.path.name} fails its sha256 (bytes changed after writing)")
        return data

    def load(self, ckpt: CheckpointFile, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        return self._deserialize(ckpt, self.verify(ckpt), map_location)

    def _deserialize(self, ckpt: CheckpointFile, data: bytes, map_location: str | torch.device) -> dict[str, Any]:
        import torch

        try:
            with warnings.catch_warnings():
                # A foreign pickle's protocol draws a multi-line warning before the refusal below says it all.
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not loadable"
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
            if isinstance(exc, pickle.UnpicklingError):
                # torch's message wraps the one line that matters in advice to retry with weights_only=False,
                # which is exactly what must not happen here.
                boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
                detail = next((line for line in lines if not line.startswith(boilerplate)), lines[0])
                raise CheckpointError(
                    f"{ckpt.path} refused: it holds pickled objects no rag_hpc checkpoint contains ({detail}), so it was "
                    "not written by rag_hpc.train or was altered; never load it with weights_only=False: use a "
                    "checkpoint from a run directory only you can write"
                ) from None
            raise CheckpointError(f"{ckpt.path.name} does not load with weights_only=True: {lines[0]}") from None
        if not isinstance(state, dict) or "format" not in state:
            raise CheckpointError(f"{ckpt.path.name} is not a rag_hpc training checkpoint")
        if state["format"] != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{ckpt.path.name} is a checkpoint of format {state['format']}; this rag_hpc reads format "
                f"{CHECKPOINT_FORMAT}: train a new run (--set train.name=NEW) or use the rag_hpc that wrote it"
            )
        return state

    def latest_valid(self) -> CheckpointFile | None:
        """The newest checkpoint that verifies, logging each newer one that does not."""
        for ckpt in reversed(self.list()):
            try:
                self.verify(ckpt)
            except (CheckpointError, OSError) as exc:
                log.warning("checkpoint %s is unusable (%s); falling back to the previous one", ckpt.path, exc)
                continue
            return ckpt
        return None

    def load_latest(
        self, map_location: str | torch.device = "cpu", set_aside: bool = True
    ) -> tuple[CheckpointFile, dict[str, Any]] | None:
        """(file, state) of the newest checkpoint whose bytes verify; None when there is none.

        A file that fails its checksum (or has no sidecar) is logged and skipped for the previous
        one; with ``set_aside`` it is renamed to ``*.unusable``, since left in place it would count
        among the newest ``keep`` and could push the good one out at the next prune. A file whose
        bytes verify but that does not load is not damage but an incompatibility (another format,
        another torch): that raises, because falling back past it would silently rewind the run.
        """
        for ckpt in reversed(self.list()):
            try:
                data = self.verify(ckpt)
            except (CheckpointError, OSError) as exc:
                log.warning("checkpoint %s is unusable (%s); falling back to the previous one", ckpt.path, exc)
                if set_aside:
                    self._set_aside(ckpt)
                continue
            return ckpt, self._deserialize(ckpt, data, map_location)
        return None

    def _set_aside(self, ckpt: CheckpointFile) -> None:
        for path in (ckpt.path, ckpt.sidecar):
            if path.exists():
                os.replace(path, path.with_name(path.name + ".unusable"))


def load_checkpoint(checkpoint: str | os.PathLike[str]) -> dict:
    """State of a checkpoint file, or of the newest valid one in a run or checkpoint directory;
    checksum-verified and loaded with ``weights_only=True``."""
    path = Path(checkpoint)
    if path.is_dir():
        directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = CheckpointManager(directory).load_latest(set_aside=False)
        if found is None:
            raise CheckpointError(f"no valid checkpoint in {directory}: train first (python -m rag_hpc.train)")
        return found[1]
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist: pass a step_<N>.pt file or a run directory")
    ckpt = CheckpointFile.named(path)
    if ckpt is None:
        raise CheckpointError(f"{path} is not a rag_hpc checkpoint (expected step_<N>.pt from python -m rag_hpc.train)")
    return CheckpointManager(path.parent).load(ckpt)
