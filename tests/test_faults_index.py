"""Fault injection on the window cache: real ``python -m rag_hpc.index`` processes over the tiny
panel, SIGKILLed mid-write, racing each other, reading corrupted files, running out of disk.

Each test records its reliability-ledger row before asserting. "Data lost" counts artifacts that
were committed (valid) before the fault and are gone, invalid or different afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from rag_hpc.config import load_config
from rag_hpc.data.panel import Panel
from rag_hpc.errors import DiskSpaceError
from rag_hpc.index.build import WindowCache, build_windows
from rag_hpc.index.cache import MANIFEST, Artifact
from tests import kill_points, reliability
from tests.slurm_helpers import IN_CI, REPO

# 4-site windows: 65 windows, one shard each, so a build writes for a measurable fraction of a
# second after the interpreter start-up instead of finishing within one poll.
WINDOW_SIZE = 4
SUMMARY = re.compile(r"^(\d+) windows: (\d+) built, (\d+) cached")

ArtifactFiles = dict[str, bytes]
Audit = tuple[dict[tuple[int, str], ArtifactFiles], list[str]]


@pytest.fixture(scope="module")
def settings(tiny_panel: Path, tiny_simulation: Path) -> list[str]:
    """Config overrides of every build here, less the cache directory: the targets' sites are the array."""
    return [
        f"data.panel_h5={tiny_panel}",
        f"data.targets_vcf={tiny_simulation / 'targets.array.vcf.gz'}",
        f"windows.window_size={WINDOW_SIZE}",
    ]


def _overrides(settings: list[str], cache_dir: Path) -> list[str]:
    return [*settings, f"paths.cache_dir={cache_dir}"]


@pytest.fixture(scope="module")
def reference(settings: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, str], ArtifactFiles]:
    """Bytes of every artifact from one undisturbed in-process build: what any recovered cache must hold."""
    overrides = _overrides(settings, tmp_path_factory.mktemp("reference") / "cache")
    build_windows(load_config(overrides=overrides), progress=False)
    committed, broken = _audit(overrides)
    assert not broken
    return committed


def _index_cli(overrides: list[str], *args: str) -> list[str]:
    sets = [flag for item in overrides for flag in ("--set", item)]
    return [sys.executable, "-m", "rag_hpc.index", *sets, "--quiet", *args]


def _start(overrides: list[str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(_index_cli(overrides, *args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(overrides: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_index_cli(overrides, *args), cwd=REPO, capture_output=True, text=True, timeout=300)


def _on_disk_problem(directory: Path) -> str | None:
    """Checked without ArtifactStore: the manifest lists exactly the files there, each with its size and sha256."""
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        return f"no usable manifest ({exc})"
    present = {p.name for p in directory.iterdir()} - {MANIFEST}
    if present != set(files):
        return f"holds {sorted(present)}, manifest lists {sorted(files)}"
    for name, meta in files.items():
        data = (directory / name).read_bytes()
        if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            return f"{name} does not match its manifest"
    return None


def _temporaries(root: Path) -> list[Path]:
    return [*root.glob("*/*/.tmp-*"), *root.glob("*/*/.trash-*")]


def _artifacts(cache: WindowCache) -> dict[tuple[int, str], Artifact]:
    return {(w.id, name): art for w in cache.windows for name, art in cache.artifacts(w).items()}


def _audit(overrides: list[str]) -> Audit:
    """(files of every artifact the store reports valid, what is wrong). Wrong: a directory at an
    artifact's place (any name not starting with '.') that fails the independent check — a partial
    directory treated as an artifact — or an artifact the store's cheap check passes but whose
    checksums fail."""
    cfg = load_config(overrides=overrides)
    root = cfg.paths.cache
    published = [p for p in root.glob("*/*/*") if p.is_dir() and not p.name.startswith(".")]
    broken = [f"{p}: {why}" for p in published if (why := _on_disk_problem(p)) is not None]
    committed: dict[tuple[int, str], ArtifactFiles] = {}
    with Panel(cfg.panel_h5) as panel:
        cache = WindowCache(cfg, panel)
        for key, art in _artifacts(cache).items():
            if cache.store.problem(art) is None:
                files = cache.store.read(art)
                if files is None:
                    broken.append(f"window {key[0]} {key[1]}: reported valid, fails its checksums")
                else:
                    committed[key] = files
    return committed, broken


def _lost(before: dict[tuple[int, str], ArtifactFiles], after: dict[tuple[int, str], ArtifactFiles]) -> int:
    return sum(after.get(key) != files for key, files in before.items())


def _wait_for(condition: Callable[[], bool], procs: list[subprocess.Popen[str]], what: str) -> bool:
    """Poll (no speed assumed) until ``condition``: True, or False once a builder has exited first."""
    deadline = time.monotonic() + 120
    while not condition():
        if any(p.poll() is not None for p in procs):
            return False
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting for {what} after 120 s")
        time.sleep(0.001)
    return True


# ------------------------------------------------------------------------------------------------
# 1. SIGKILL at seeded points across the write path

KILL_TRIALS = 20


@pytest.mark.slow
def test_sigkill_anywhere_in_the_write_path_loses_nothing_and_the_rerun_builds_exactly_the_rest(settings, reference, tmp_path):
    rng = np.random.default_rng(20)
    survived = lost = before_first = mid_build = inside_commit = finished = 0
    failures: list[str] = []
    for trial in range(KILL_TRIALS):
        overrides = _overrides(settings, tmp_path / f"trial{trial}")
        root = load_config(overrides=overrides).paths.cache
        # Kill points stratified over the artifacts the build publishes (seeded). The builder kills itself
        # (tests/kill_points.py) at the rename that publishes artifact number `target`: odd trials just
        # before it (a commit in flight: its complete temporary directory is left), even ones just after
        # (between two commits). So every trial lands where it is meant to, whatever this machine's speed.
        target = max(1, int(len(reference) * (trial + rng.uniform()) / KILL_TRIALS))
        mid_commit = trial % 2 == 1
        sets = [flag for item in overrides for flag in ("--set", item)]
        argv = kill_points.command(
            "rename", "[0-9a-f]{64}", target, "before" if mid_commit else "after", "rag_hpc.index", *sets, "--quiet"
        )
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == -9, f"trial {trial}: the builder was not killed at artifact {target}: {proc.stderr[-1500:]}"

        committed, broken = _audit(overrides)
        inside_commit += bool(_temporaries(root))
        before_first += not committed
        mid_build += 0 < len(committed) < len(reference)
        finished += len(committed) == len(reference)

        cfg = load_config(overrides=overrides)
        with Panel(cfg.panel_h5) as panel:
            cache = WindowCache(cfg, panel)
            rerun = cache.build(progress=False)
            expected = {w.id: [n for n in cache.artifacts(w) if (w.id, n) not in committed] for w in cache.windows}
        wrong = [
            r.window_id
            for r in rerun
            if r.built != expected[r.window_id] or (r.status == "cached") != (not expected[r.window_id])
        ]
        after, broken_after = _audit(overrides)
        trial_lost = _lost(committed, after)
        lost += trial_lost
        problems = broken + broken_after
        if wrong:
            problems.append(f"the rerun's built/cached report disagrees with what was committed for windows {wrong}")
        if after != reference:
            problems.append(f"{sum(reference[k] != after.get(k) for k in reference)} artifacts differ from an undisturbed build")
        if _temporaries(root):
            problems.append(f"temporaries left after the rerun: {_temporaries(root)}")
        if problems or trial_lost:
            failures.append(f"trial {trial} ({len(committed)} committed at the kill, {trial_lost} lost): {problems}")
        else:
            survived += 1

    note = (
        f"{len(reference)} artifacts/build; kills: {before_first} before the first commit, {mid_build} mid-build, "
        f"{inside_commit} inside a commit (temp dir left), {finished} after the last"
    )
    reliability.record(fault="index build SIGKILLed mid-write", trials=KILL_TRIALS, survived=survived, data_lost=lost, note=note)
    assert failures == []
    assert survived == KILL_TRIALS and lost == 0
    # The kills really spread over the write path, and every odd one hit a commit between its first
    # write and its rename.
    assert mid_build >= KILL_TRIALS // 2 and inside_commit == KILL_TRIALS // 2, note


# ------------------------------------------------------------------------------------------------
# 2. Two builders of overlapping window ranges at once

OVERLAPS = [("0-5", "3-8"), ("0-8", "0-8"), ("4-12", "0-6")]


def _window_range(spec: str) -> range:
    lo, hi = spec.split("-")
    return range(int(lo), int(hi) + 1)


def _lock_waiters(lock_file: Path) -> set[int]:
    """Pids blocked on the POSIX lock of ``lock_file`` (the kernel's own list, /proc/locks)."""
    inode = lock_file.stat().st_ino
    waiters = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "->" and fields[2] == "POSIX" and int(fields[6].rsplit(":", 1)[1]) == inode:
            waiters.add(int(fields[5]))
    return waiters


def test_two_builders_of_overlapping_window_ranges_leave_every_artifact_valid(settings, reference, tmp_path):
    survived = lost = 0
    failures: list[str] = []
    for trial, ranges in enumerate(OVERLAPS):
        overrides = _overrides(settings, tmp_path / f"trial{trial}")
        cfg = load_config(overrides=overrides)
        union = sorted(set(_window_range(ranges[0])) | set(_window_range(ranges[1])))
        with Panel(cfg.panel_h5) as panel:
            cache = WindowCache(cfg, panel)
            first_shared = max(_window_range(r)[0] for r in ranges)
            barrier = cache.artifacts(cache.windows[first_shared])["shard"]
            # Start-up times differ by more than a whole build, so "started together" alone would
            # rarely overlap: holding the first shared window's lock here queues both builders on
            # that key; released, they race through the shared windows in step.
            with cache.store.lock(barrier):
                procs = [_start(overrides, "--windows", r) for r in ranges]
                lock_file = cache.store.root / ".locks" / f"{barrier.key}.lock"
                queued = _wait_for(
                    lambda lock_file=lock_file, procs=procs: _lock_waiters(lock_file) == {p.pid for p in procs},
                    procs,
                    "both builders to queue",
                )
            outputs = [p.communicate() for p in procs]
        assert queued, f"a builder exited before reaching window {first_shared}: {outputs}"

        committed, broken = _audit(overrides)
        built = [int(m.group(2)) for out, _ in outputs if (m := SUMMARY.match(out))]
        problems = list(broken)
        if any(p.returncode != 0 for p in procs) or len(built) != 2:
            problems.append(f"exit codes {[p.returncode for p in procs]}: {[err.strip()[-300:] for _, err in outputs]}")
        elif sum(built) < len(union):
            problems.append(f"fewer windows built than the {len(union)} asked for: {[out for out, _ in outputs]}")
        want = {key: files for key, files in reference.items() if key[0] in union}
        trial_lost = sum(committed.get(key) != files for key, files in want.items())
        if set(committed) != set(want):
            problems.append(f"artifacts of windows outside {ranges}: {sorted(set(committed) - set(want))}")
        if _temporaries(cache.store.root):
            problems.append(f"temporaries left: {_temporaries(cache.store.root)}")
        lost += trial_lost
        if problems or trial_lost:
            failures.append(f"{ranges}: {trial_lost} artifacts missing or not as an undisturbed build made them; {problems}")
        else:
            survived += 1
    reliability.record(
        fault="two index builds, overlapping windows",
        trials=len(OVERLAPS),
        survived=survived,
        data_lost=lost,
        note="both queued on the first shared window's lock, then released together",
    )
    assert failures == []
    assert survived == len(OVERLAPS) and lost == 0


# ------------------------------------------------------------------------------------------------
# 3. Truncated or bit-flipped shard files

CORRUPTIONS = [("shard", "truncate"), ("shard", "flip")]
CORRUPTION_ROUNDS = 6  # each round damages one shard each way, in windows drawn afresh


def _corrupt(path: Path, how: str, rng: np.random.Generator) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: int(rng.integers(0, len(data)))]  # anywhere from empty to one byte short
    else:
        data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
    path.write_bytes(bytes(data))


def test_truncated_or_bit_flipped_artifacts_are_named_rebuilt_and_equal_the_original_bytes(settings, reference, tmp_path):
    overrides = _overrides(settings, tmp_path / "cache")
    cfg = load_config(overrides=overrides)
    build_windows(cfg, progress=False)
    rng = np.random.default_rng(3)
    survived = lost = 0
    failures: list[str] = []
    with Panel(cfg.panel_h5) as panel:
        cache = WindowCache(cfg, panel)
        artifacts = _artifacts(cache)
        for round_ in range(CORRUPTION_ROUNDS):
            # One corruption per window, so each warning line and each rebuild is attributable.
            windows = rng.choice(len(cache.windows), size=len(CORRUPTIONS), replace=False)
            corrupted = {}
            for wid, (name, how) in zip(windows, CORRUPTIONS):
                art = artifacts[(int(wid), name)]
                (file,) = [p for p in cache.store.path(art).iterdir() if p.name != MANIFEST]
                _corrupt(file, how, rng)
                corrupted[(int(wid), name)] = (how, file)
            out = _run(overrides)
            committed, broken = _audit(overrides)
            warnings = out.stderr.strip().splitlines()
            summary = f"{len(cache.windows)} windows: {len(corrupted)} built, {len(cache.windows) - len(corrupted)} cached"
            for (wid, name), (how, file) in corrupted.items():
                reason = "fails its sha256 checksum" if how == "flip" else "truncated"
                named = [w for w in warnings if str(file.parent) in w and f"window {wid}: {name} " in w]
                checks = {
                    "one warning line naming it, why, and that it is rebuilt": len(named) == 1
                    and reason in named[0]
                    and "rebuilding" in named[0],
                    "rebuilt equal to the original bytes": committed.get((wid, name)) == reference[(wid, name)],
                }
                if all(checks.values()) and out.returncode == 0 and summary in out.stdout and not broken:
                    survived += 1
                else:
                    failures.append(
                        f"round {round_} window {wid} {name} {how}: {checks}; rc {out.returncode}; {out.stdout!r} {broken}"
                    )
            lost += sum(committed.get(key) != files for key, files in reference.items() if key not in corrupted)
            if len(warnings) != len(corrupted):
                failures.append(
                    f"round {round_}: {len(warnings)} stderr lines for {len(corrupted)} corrupted artifacts: {warnings}"
                )
    trials = CORRUPTION_ROUNDS * len(CORRUPTIONS)
    reliability.record(
        fault="corrupted shard file",
        trials=trials,
        survived=survived,
        data_lost=lost,
        note="window shards; truncated (to 0..n-1 bytes) or one bit flipped; detected by sha256 on the next build",
    )
    assert failures == []
    assert survived == trials and lost == 0


# ------------------------------------------------------------------------------------------------
# 4. Disk full while building

# Bytes left free before the build (a filler file takes the rest): the build fails at its first
# artifact, after a few windows, after a dozen.
FREE_BYTES = [0, 48 * 1024, 256 * 1024]


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (room for two caches of the tiny panel), unmounted afterwards."""
    mount_point = tmp_path / "small_fs"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        mounted = None
    else:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True, text=True
        )
    if mounted is None or mounted.returncode != 0:
        reason = f"cannot mount a small tmpfs to fill: {mounted.stderr.strip() if mounted else 'no mount command'} (needs root)"
        if IN_CI:
            pytest.fail(f"under CI=true the disk-full test must run: {reason}", pytrace=False)
        pytest.skip(reason)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def _fill(directory: Path, leave: int) -> Path:
    stats = os.statvfs(directory)
    filler = directory / "filler"
    filler.write_bytes(bytes(max(0, stats.f_bavail * stats.f_frsize - leave)))
    return filler


def test_full_disk_fails_in_one_line_keeps_every_committed_artifact_and_completes_once_space_is_freed(
    settings, reference, small_filesystem
):
    survived = lost = 0
    failures: list[str] = []
    reached: list[int] = []  # artifacts committed by the failing build: where it ran out
    for trial, leave in enumerate(FREE_BYTES):
        overrides = _overrides(settings, small_filesystem / f"cache{trial}")
        cache_dir = load_config(overrides=overrides).paths.cache
        build_windows(load_config(overrides=overrides), range(10), progress=False)  # built while there was room
        prebuilt, _ = _audit(overrides)
        filler = _fill(small_filesystem, leave)

        full = _run(overrides)
        after_full, broken = _audit(overrides)
        problems = list(broken)
        one_line = full.stderr.strip().splitlines()
        if (
            full.returncode != DiskSpaceError.exit_code
            or len(one_line) != 1
            or not one_line[0].startswith(f"error: no space left in {cache_dir} writing ")
        ):
            problems.append(f"rc {full.returncode}, stderr {full.stderr[-800:]!r}")
        elif not re.search(r"\([\d,]+ bytes\): needs about", one_line[0]):
            problems.append(f"the bytes needed are not named: {one_line[0]}")
        if _temporaries(cache_dir):
            problems.append(f"half-written temporaries left: {_temporaries(cache_dir)}")
        trial_lost = _lost(prebuilt, after_full)
        reached.append(len(after_full) - len(prebuilt))

        filler.unlink()
        rerun = _run(overrides)
        after_rerun, broken_after = _audit(overrides)
        problems += broken_after
        cached = SUMMARY.match(rerun.stdout)
        complete = {wid for wid, _ in reference} - {wid for wid, name in reference if (wid, name) not in after_full}
        if rerun.returncode != 0 or cached is None or int(cached.group(3)) != len(complete):
            problems.append(f"rerun: rc {rerun.returncode}, {rerun.stdout!r} {rerun.stderr[-300:]!r}")
        if after_rerun != reference:
            problems.append("after the rerun the cache differs from an undisturbed build")
        trial_lost += _lost(after_full, after_rerun)
        lost += trial_lost
        if problems or trial_lost:
            failures.append(f"{leave} bytes free: {trial_lost} lost; {problems}")
        else:
            survived += 1
        shutil.rmtree(cache_dir)  # room for the next trial's cache
    reliability.record(
        fault="disk full while building the index",
        trials=len(FREE_BYTES),
        survived=survived,
        data_lost=lost,
        note=f"4 MiB tmpfs filled to {', '.join(f'{b // 1024} KiB' for b in FREE_BYTES)} free: out of space after {reached} more artifacts; rerun after freeing space",
    )
    assert failures == []
    assert survived == len(FREE_BYTES) and lost == 0
