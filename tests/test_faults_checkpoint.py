"""Checkpoint faults on real training processes: SIGKILL while a checkpoint is being written, a damaged
newest checkpoint, a disk that fills up while checkpointing.

Every run is ``python -m rag_hpc.train`` in a subprocess, as a job runs it, checkpointing every step
(5.9 MB checkpoints). A kill is placed inside a write by the process itself (``tests/kill_points.py``), so no test
here depends on the speed of the disk or the CPU. Whatever the fault, rerunning the same command must
end with the parameters and optimizer state of one uninterrupted run.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rag_hpc.checkpoint import CheckpointError, CheckpointFile, CheckpointManager
from rag_hpc.errors import DiskSpaceError
from rag_hpc.fsutil import TEMPORARY_PREFIX, AtomicFile, human_bytes, temporaries
from tests import kill_points, reliability
from tests.train_helpers import ROOT, STEPS_PER_EPOCH, checkpoint_dir, load_checkpoint, max_diff, run_cli, train_cmd, train_env

pytestmark = pytest.mark.slow

TOTAL = STEPS_PER_EPOCH  # one epoch
KEEP = 3
TOLERANCE = 1e-6
KILL_SEED = 20261123
KILL_TRIALS = 10  # runs killed inside a checkpoint write, one after the other in one run directory
_WRITTEN = re.compile(r"checkpoint \S*/step_(\d{9})\.pt written in ")


def _cmd(panel: Path, workdir: Path, *extra: str, max_steps: int | None = None) -> list[str]:
    return train_cmd(
        panel,
        workdir,
        "model.dims=128",
        "train.epochs=1",
        "train.checkpoint_every_steps=1",
        f"train.keep_checkpoints={KEEP}",
        *extra,
        max_steps=max_steps,
    )


@pytest.fixture(scope="module")
def reference(tiny_panel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Workdir of one uninterrupted run that keeps every step's checkpoint: where each faulted run must be."""
    workdir = tmp_path_factory.mktemp("reference") / "work"
    out = run_cli(_cmd(tiny_panel, workdir, f"train.keep_checkpoints={TOTAL}"))
    assert out.returncode == 0, out.stderr
    return workdir


def _distance(reference: Path, state: dict[str, Any]) -> float:
    """Largest difference of parameters and optimizer state from the uninterrupted run at the same step."""
    want = load_checkpoint(reference, int(state["step"]))
    opt_want, opt_got = want["optimizer"]["state"], state["optimizer"]["state"]
    if opt_want.keys() != opt_got.keys():
        return math.inf
    return max([max_diff(want["model"], state["model"]), *(max_diff(opt_want[k], opt_got[k]) for k in opt_want)])


def _checkpoint_bytes(workdir: Path) -> int:
    """Bytes of one checkpoint of these runs (every step's has the same size)."""
    return (checkpoint_dir(workdir) / "step_000000001.pt").stat().st_size


def _loads(manager: CheckpointManager, ckpt: CheckpointFile) -> bool:
    try:
        return int(manager.load(ckpt)["step"]) == ckpt.step
    except (CheckpointError, OSError):
        return False


def _resumed_from(newest: CheckpointFile | None, stderr: str) -> bool:
    if newest is None:
        return "fresh start: no usable checkpoint in" in stderr
    return f"resumed from {newest.path}: next step {newest.step} " in stderr


# -- SIGKILL during a checkpoint write --------------------------------------------------------------


# Where in the write of one checkpoint a run SIGKILLs itself (tests/kill_points.py), so the kill lands
# inside that write by construction, however fast the disk and the CPU are. "fsync": the data's
# temporary file is written, not yet durable; "rename": durable, not yet published; "sidecar": the data
# is published, its sidecar is not.
KILL_POINTS = ("fsync", "rename", "sidecar")


def _killed_in_write(cmd: list[str], step: int, point: str) -> list[str]:
    name = re.escape(f"step_{step:09d}.pt")
    call, pattern = {
        "fsync": ("fsync", rf"{re.escape(TEMPORARY_PREFIX)}\d+\.{name}"),
        "rename": ("replace", name),
        "sidecar": ("replace", rf"{name}\.sha256"),
    }[point]
    return kill_points.command(call, pattern, 1, "before", "rag_hpc.train", *cmd[3:])  # cmd: python -m rag_hpc.train ...


@dataclass
class _Kill:
    step: int  # the checkpoint being written
    point: str  # where in its write the process died (KILL_POINTS)
    where: str  # what the directory shows: "data write" (temp file, nothing published), "sidecar write"
    # (data published, sidecar not) or "after the write" (the kill missed: never expected here)
    lost: list[int]  # checkpoints reported written and due to be kept that no longer load
    newest: CheckpointFile | None  # what the loader takes afterwards
    newest_is_due: bool  # ... is the newest completed checkpoint, not an older or a partial one
    distance: float  # ... its distance from the uninterrupted run
    resumed: bool = False  # the rerun of the same command resumed from it

    @property
    def ok(self) -> bool:
        expected = "sidecar write" if self.point == "sidecar" else "data write"
        return self.where == expected and not self.lost and self.newest_is_due and self.distance <= TOLERANCE and self.resumed


def _inspect_after_kill(workdir: Path, reference: Path, pid: int, step: int, point: str) -> _Kill:
    ckpt_dir = checkpoint_dir(workdir)
    names = set(os.listdir(ckpt_dir))
    data = f"step_{step:09d}.pt"
    if AtomicFile(ckpt_dir / data, pid).tmp.name in names:
        where = "data write"
    elif data in names and f"{data}.sha256" not in names:
        where = "sidecar write"
    else:
        where = "after the write"
    manager = CheckpointManager(ckpt_dir, KEEP)
    loadable = {c.step for c in manager.list() if _loads(manager, c)}
    reported = {int(s) for s in _WRITTEN.findall((workdir / "runs" / "default" / "train.log").read_text())}
    # Older ones than the newest KEEP completed were the prune's to delete.
    due = sorted(reported | loadable)[-KEEP:]
    found = manager.load_latest(set_aside=False)  # leave the directory as the kill left it, for the rerun
    newest = found[0] if found else None
    return _Kill(
        step,
        point,
        where,
        lost=[s for s in due if s in reported and s not in loadable],
        newest=newest,
        newest_is_due=(newest.step if newest else None) == (due[-1] if due else None),
        distance=_distance(reference, found[1]) if found else 0.0,
    )


def _kill_repeatedly(cmd: list[str], workdir: Path, reference: Path, rng: random.Random, err_dir: Path) -> list[_Kill]:
    """Rerun ``cmd`` in ``workdir`` KILL_TRIALS times, each run killed at a seeded point of the write of a
    seeded checkpoint 1-3 steps past the newest one on disk."""
    kills: list[_Kill] = []
    newest = 0
    for trial in range(KILL_TRIALS):
        step, point = newest + rng.randint(1, 3), rng.choice(KILL_POINTS)
        err_file = err_dir / f"kill_{trial}.err"
        with open(err_file, "w") as err:
            proc = subprocess.Popen(
                _killed_in_write(cmd, step, point), stdout=subprocess.DEVNULL, stderr=err, env=train_env(), cwd=ROOT
            )
            rc = proc.wait(timeout=240)
        stderr = err_file.read_text()
        assert rc == -9, f"trial {trial}: the run did not die in the write of step {step} ({point}): {stderr[-1500:]}"
        if kills:
            kills[-1].resumed = _resumed_from(kills[-1].newest, stderr)
        kills.append(_inspect_after_kill(workdir, reference, proc.pid, step, point))
        newest = kills[-1].newest.step if kills[-1].newest else 0
    return kills


def test_sigkill_during_checkpoint_writes_loses_no_completed_checkpoint_and_the_rerun_ends_like_the_uninterrupted_run(
    tiny_panel, reference, tmp_path
):
    workdir = tmp_path / "work"
    cmd = _cmd(tiny_panel, workdir)
    kills = _kill_repeatedly(cmd, workdir, reference, random.Random(KILL_SEED), tmp_path)
    final = run_cli(cmd)
    kills[-1].resumed = _resumed_from(kills[-1].newest, final.stderr)
    distance = _distance(reference, load_checkpoint(workdir, TOTAL)) if final.returncode == 0 else math.inf
    leftovers = [p.name for p in temporaries(checkpoint_dir(workdir))]
    reliability.record(
        fault="SIGKILL during checkpoint write",
        trials=len(kills),
        survived=sum(k.ok for k in kills) if final.returncode == 0 and distance <= TOLERANCE and not leftovers else 0,
        data_lost=sum(len(k.lost) for k in kills),
        note=", ".join(f"{sum(k.point == p for k in kills)} at {p}" for p in KILL_POINTS)
        + f" (steps {[k.step for k in kills]}); {_checkpoint_bytes(reference) / 1e6:.1f} MB checkpoint every step, seed {KILL_SEED}",
    )
    assert [(k.step, k.point, k.where) for k in kills if not k.ok] == [], "a kill missed its write, or a rerun did not resume"
    assert final.returncode == 0 and distance <= TOLERANCE and leftovers == [], (final.returncode, distance, leftovers)


# -- a damaged newest checkpoint --------------------------------------------------------------------


def _flip_one_bit(raw: bytes) -> bytes:
    rng = random.Random(KILL_SEED)
    out = bytearray(raw)
    out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "truncated to 0 bytes": lambda raw: b"",
    "truncated to 4 KiB": lambda raw: raw[:4096],
    "truncated to half": lambda raw: raw[: len(raw) // 2],
    "one byte short": lambda raw: raw[:-1],
    "one bit flipped": _flip_one_bit,
}


def test_a_truncated_or_bit_flipped_newest_checkpoint_is_named_and_the_run_resumes_from_the_previous_one(
    tiny_panel, reference, tmp_path
):
    workdir = tmp_path / "work"
    ckpt_dir = checkpoint_dir(workdir)
    manager = CheckpointManager(ckpt_dir, KEEP)
    first = run_cli(_cmd(tiny_panel, workdir, max_steps=2))
    assert first.returncode == 0, first.stderr
    failures: dict[str, list[str]] = {}
    lost = 0
    # Each damage hits the newest checkpoint; its rerun runs one step past it (the next damage's target),
    # the last one to the end.
    for step, (what, damage) in enumerate(DAMAGE.items(), start=2):
        newest, previous = (CheckpointFile(s, manager.path_for(s)) for s in (step, step - 1))
        raw = newest.path.read_bytes()
        damaged = damage(raw)
        newest.path.write_bytes(damaged)
        reason = "fails its sha256" if len(damaged) == len(raw) else f"truncated or padded: {len(damaged)} bytes"
        last = what == list(DAMAGE)[-1]
        end = TOTAL if last else step + 1
        out = run_cli(_cmd(tiny_panel, workdir, max_steps=None if last else end))
        warning = next((line for line in out.stderr.splitlines() if f"checkpoint {newest.path} is unusable (" in line), "")
        resumed = _resumed_from(previous, out.stderr)
        lost += not resumed  # the good checkpoint before the damaged one was not usable
        failures[what] = [
            check
            for check, held in (
                (f"exit {out.returncode}: {out.stderr[-2000:]}", out.returncode == 0),
                (
                    f"no warning naming {newest.path} ({reason}) and the fallback",
                    reason in warning and "falling back to the previous one" in warning,
                ),
                (f"did not resume from {previous.path}", resumed),
                ("damaged file not set aside", (ckpt_dir / f"{newest.path.name}.unusable").is_file()),
                (
                    f"step {end} differs from the uninterrupted run",
                    out.returncode == 0 and _distance(reference, load_checkpoint(workdir, end)) <= TOLERANCE,
                ),
            )
            if not held
        ]

    reliability.record(
        fault="Truncated or bit-flipped checkpoint",
        trials=len(DAMAGE),
        survived=sum(not f for f in failures.values()),
        data_lost=lost,
        note="newest truncated to 0 B, 4 KiB, half, size-1, or one bit flipped; resumed from the previous one",
    )
    assert {what: f for what, f in failures.items() if f} == {}


# -- a full disk --------------------------------------------------------------------------------------


@pytest.fixture
def mount_tmpfs() -> Iterator[Callable[[Path, int], None]]:
    """Mount a tmpfs of the given bytes on a directory (root only); unmounted at teardown."""
    mounted: list[Path] = []

    def mount(directory: Path, size: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if shutil.which("mount") is None:
            problem = "no `mount` command"
        else:
            out = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True, text=True
            )
            if out.returncode == 0:
                mounted.append(directory)
                return
            problem = out.stderr.strip() or f"mount exited {out.returncode}"
        reason = f"cannot mount a small tmpfs to fill up ({problem}): the disk-full test needs root with mount rights"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)

    yield mount
    for directory in reversed(mounted):
        subprocess.run(["umount", str(directory)], check=True)


def test_a_full_disk_while_checkpointing_fails_in_one_line_keeps_the_earlier_checkpoints_and_the_rerun_finishes(
    tiny_panel, reference, tmp_path, mount_tmpfs
):
    page = os.sysconf("SC_PAGE_SIZE")
    data_bytes = _checkpoint_bytes(reference)
    sidecar_bytes = (checkpoint_dir(reference) / "step_000000001.pt.sha256").stat().st_size
    data_pages = -(-data_bytes // page)
    per_checkpoint = data_pages + -(-sidecar_bytes // page)  # tmpfs counts whole pages
    failing = KEEP + 1  # the first write that needs room beyond the KEEP checkpoints kept
    # Room left for the failing checkpoint: half its data (fails in the data write), or exactly its data
    # (the data is published, its sidecar fails: the data file must go again).
    spares = {"data write": data_pages // 2, "sidecar write": data_pages}
    failures: dict[str, list[str]] = {}
    lost = 0
    for where, spare in spares.items():
        workdir = tmp_path / where.replace(" ", "_") / "work"
        ckpt_dir = checkpoint_dir(workdir)
        # Someone else's file fills the rest; deleting it is the operator's fix.
        filler_pages = per_checkpoint
        mount_tmpfs(ckpt_dir, page * (KEEP * per_checkpoint + spare + filler_pages))
        (ckpt_dir / "filler").write_bytes(bytes(filler_pages * page))
        cmd = _cmd(tiny_panel, workdir)

        full = run_cli(cmd)
        errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
        want = (
            f"error: no space left in {ckpt_dir} writing checkpoint step_{failing:09d}.pt: needs about "
            f"{human_bytes(data_bytes + sidecar_bytes)}, {human_bytes(spare * page)} free; free space there"
        )
        kept = [f"step_{s:09d}.pt{ext}" for s in range(1, KEEP + 1) for ext in ("", ".sha256")]
        manager = CheckpointManager(ckpt_dir, KEEP)
        intact = [c.step for c in manager.list() if _loads(manager, c) and _distance(reference, manager.load(c)) <= TOLERANCE]
        lost += KEEP - len(intact)
        found = manager.load_latest(set_aside=False)
        checks = [
            (f"exit {full.returncode}, not {DiskSpaceError.exit_code}", full.returncode == DiskSpaceError.exit_code),
            (
                f"not one error line starting {want!r}: {full.stderr[-1500:]}",
                len(errors) == 1 and errors[0].startswith(want) and full.stderr.rstrip().endswith(errors[0]),
            ),
            ("a traceback or a logging error", "Traceback" not in full.stderr and "Logging error" not in full.stderr),
            (f"left {sorted(os.listdir(ckpt_dir))}", sorted(os.listdir(ckpt_dir)) == sorted([*kept, "filler"])),
            (f"earlier checkpoints intact: only {intact}", intact == list(range(1, KEEP + 1))),
            (f"the loader takes {found[0] if found else None}", found is not None and found[0].step == KEEP),
        ]

        (ckpt_dir / "filler").unlink()
        rerun = run_cli(cmd)
        checks += [
            (f"rerun exit {rerun.returncode}: {rerun.stderr[-2000:]}", rerun.returncode == 0),
            (
                "rerun did not resume from the last kept checkpoint",
                _resumed_from(CheckpointFile(KEEP, manager.path_for(KEEP)), rerun.stderr),
            ),
            (
                "rerun ends away from the uninterrupted run",
                rerun.returncode == 0 and _distance(reference, load_checkpoint(workdir, TOTAL)) <= TOLERANCE,
            ),
        ]
        failures[where] = [check for check, held in checks if not held]

    reliability.record(
        fault="Disk full while checkpointing",
        trials=len(spares),
        survived=sum(not f for f in failures.values()),
        data_lost=lost,
        note=f"tmpfs filled at checkpoint {failing} (in its data write; in its sidecar write); freed, rerun",
    )
    assert {where: f for where, f in failures.items() if f} == {}
