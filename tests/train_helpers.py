"""Tiny training runs launched as a cluster job would launch them: ``python -m rag_hpc.train`` in a
subprocess with one thread, on the ``tiny_panel`` fixture (conftest.py). Shared by the training tests
and the checkpoint fault tests, whose runs are compared with each other, so they must run alike."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from tests.slurm_helpers import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 27  # 3 windows (259 sites / 100) x 74 train haplotypes // batch 8 = 9 batches each
EPOCHS = 4


def train_overrides(panel: Path, workdir: Path, *extra: str) -> list[str]:
    """A small model on the tiny panel; ``extra`` (``section.key=value``) wins over these."""
    return [
        f"data.panel_h5={panel}",
        f"paths.workdir={workdir}",
        f"paths.cache_dir={workdir.parent / 'cache'}",
        *TINY_RUN,
        f"train.epochs={EPOCHS}",
        "train.checkpoint_every_steps=4",
        "train.keep_checkpoints=50",
        "train.log_every=1",
        "train.progress=false",
        "train.tensorboard=false",
        *extra,
    ]


def train_cmd(panel: Path, workdir: Path, *extra: str, max_steps: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "rag_hpc.train"]
    for item in train_overrides(panel, workdir, *extra):
        cmd += ["--set", item]
    return cmd + (["--max-steps", str(max_steps)] if max_steps else [])


def train_env(**extra: str) -> dict[str, str]:
    """This environment without any rank variables, one thread (runs compared with each other must agree)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def run_cli(cmd: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=train_env(**env), cwd=ROOT, timeout=240)


def checkpoint_dir(workdir: Path) -> Path:
    return workdir / "runs" / "default" / "checkpoints"


def load_checkpoint(workdir: Path, step: int) -> dict[str, Any]:
    return torch.load(checkpoint_dir(workdir) / f"step_{step:09d}.pt", weights_only=True)


def max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest absolute difference between two state dicts of tensors with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
