"""Fault injection on the real single-node SLURM test cluster (slurm/up.sh): a training job preempted
again and again at random steps, and a training node that dies without any signal. Each run must end
with the parameters of one uninterrupted run of the same config and seed.

Every run of this module trains the launcher's tiny model on a shared prepared panel and a shared,
prebuilt window cache (so no index array is submitted), with a step logged per step so the tests can
act at a chosen step. The uninterrupted reference trains as a plain process in the background while
the SLURM jobs run: the jobs spend most of their time waiting to be rescheduled.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest

from tests import reliability
from tests.slurm_helpers import (
    UNFINISHED,
    TrainLog,
    as_flags,
    final_model,
    final_state,
    healthy,
    kill_node,
    launch_records,
    launcher,
    log_time,
    max_param_diff,
    plain_env,
    run,
    run_dir,
    sacct,
    squeue_ids,
    state_of,
    submit_urgent,
    tiny_sets,
    unavailable,
    wait_for,
)

if TYPE_CHECKING:
    import torch

pytestmark = pytest.mark.slow

SEED = 20261123  # draws the steps at which faults strike; printed with each timeline
PREEMPTIONS = 3
EPOCHS = 6  # 162 steps of the tiny run
# The jobs hold each step this long (train.min_step_seconds, a sleep that changes no number), so a run
# lasts >= 57 s whatever the machine's speed: every fault is drawn at least 28 s (node death: 40 s)
# before the run could end, far more than SLURM takes to deliver it (~2-5 s). The reference does not hold.
HOLD_S = 0.35
TOLERANCE = 1e-6  # max |parameter difference| to the uninterrupted run (bit-equal in practice on CPU)


class Uninterrupted:
    """The module's run config, and its reference: the same run as one plain process, never interrupted,
    with the jobs' thread count (so it computes bit-for-bit what an uninterrupted job would)."""

    def __init__(self, sim: Path, root: Path, threads: int):
        from rag_hpc.config import load_config
        from rag_hpc.index.build import build_windows
        from rag_hpc.launch import ensure_data

        self.sim, self.root = sim, root
        self.workdir = root / "reference"
        config = ensure_data(load_config(None, self.sets(self.workdir, hold=False)), log=lambda _m: None)
        build_windows(config, None, progress=False)
        self.stderr = root / "reference.err"
        with self.stderr.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rag_hpc.train", *as_flags(self.sets(self.workdir, hold=False))],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=plain_env(threads),
            )

    def sets(self, workdir: Path, hold: bool = True) -> list[str]:
        return tiny_sets(
            self.sim,
            workdir,
            self.root / "cache",
            EPOCHS,
            f"data.panel_h5={self.root / 'panel.h5'}",
            "train.log_every=1",
            f"train.min_step_seconds={HOLD_S if hold else 0}",
        )

    def model(self) -> dict[str, torch.Tensor]:
        rc = self.process.wait(timeout=600)
        assert rc == 0, self.stderr.read_text()[-3000:]
        return final_model(self.workdir)


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny_simulation, tmp_path_factory) -> Iterator[Uninterrupted]:
    reference = Uninterrupted(tiny_simulation, tmp_path_factory.mktemp("faults"), cluster["cpus"])
    yield reference
    if reference.process.poll() is None:
        reference.process.kill()
        reference.process.wait()


def _launch(reference: Uninterrupted, work: Path, cpus: int) -> tuple[str, TrainLog]:
    # --time 60: submitit counts a signal within 10 minutes of a limit of 10 minutes or less as a
    # time-out, whose requeues are capped; longer limits make it a preemption.
    out = launcher(*as_flags(reference.sets(work)), "--cpus-per-task", str(cpus), "--time", "60")
    assert out.returncode == 0, out.stderr[-3000:]
    return launch_records(work)[-1]["train_id"], TrainLog(run_dir(work) / "train.log")


def _await_step(log: TrainLog, start: int, step: int, job_id: str) -> None:
    wait_for(
        lambda: (log.progress(start) or 0) >= step,
        300,
        lambda: f"training run {start + 1} of job {job_id} to reach step {step} (at {log.progress(start)}; {state_of(job_id)})",
    )


def _draw_steps(rng: random.Random, total: int, n: int) -> list[int]:
    """One step in each of ``n`` equal slices of the run's 10%..60%: spread over the run, and the last
    >= 40 % of the run (x HOLD_S s a step) before its end, so the signal lands while it still trains."""
    lo, hi = max(1, total // 10), total * 6 // 10
    assert hi - lo >= n, f"a run of {total} steps is too short for {n} faults"
    edges = [lo + (hi - lo) * i // n for i in range(n + 1)]
    return [rng.randrange(a, b) for a, b in itertools.pairwise(edges)]


def _at(times: list[float], i: int) -> str:
    """Seconds ``times[i]`` as a timeline entry, "-" when that event never came."""
    return f"{times[i]:.1f}" if i < len(times) and math.isfinite(times[i]) else "-"


def _sacct_time(value: str) -> float:
    return datetime.fromisoformat(value).timestamp() if value[:1].isdigit() else math.nan


def test_training_preempted_three_times_at_random_steps_ends_equal_to_an_uninterrupted_run(cluster, uninterrupted, tmp_path):
    work = tmp_path / "work"
    t_submit = time.time()
    train_id, log = _launch(uninterrupted, work, cluster["cpus"])
    total = wait_for(log.total_steps, 180, lambda: f"training to start ({state_of(train_id)})")
    targets = _draw_steps(random.Random(SEED), total, PREEMPTIONS)
    urgent_at = []
    for i, target in enumerate(targets):
        # Step lines are logged by the training loop, so its signal handlers are in place.
        _await_step(log, i, target, train_id)
        urgent_at.append(time.time() - t_submit)
        submit_urgent(tmp_path / f"urgent-{i}.out")
        # Requeued and training again, or finished (a failure, asserted below) before the signal came.
        wait_for(
            lambda i=i: len(log.starts()) > i + 1 or state_of(train_id) not in UNFINISHED,
            300,
            lambda: f"job {train_id} to be preempted and resume ({state_of(train_id)})",
        )
    state = final_state(train_id, 300)

    stops, resumes = log.stops(), log.resumed_steps()
    runs = sacct(train_id, "State,Start,End", all_runs=True)
    requeued = [r for r in runs if r[0] in ("REQUEUED", "PREEMPTED")]
    diff = max_param_diff(final_model(work), uninterrupted.model()) if state == "COMPLETED" else math.inf
    at_checkpoint = [r == s for (s, _sig, _line), r in zip(stops, resumes)]
    survived = sum(at_checkpoint) if state == "COMPLETED" and diff <= TOLERANCE else 0
    lost = sum(r < s for (s, _sig, _line), r in zip(stops, resumes))
    checkpointed = [log_time(line) - t_submit for _s, _sig, line in stops]
    requeued_at = [_sacct_time(r[2]) - t_submit for r in requeued]
    resumed_at = [log_time(line) - t_submit for line in log.starts()[1:]]
    events = [
        f"preemption {i + 1} (drawn step {target}): urgent submitted {_at(urgent_at, i)}, checkpoint on "
        f"{stops[i][1] if i < len(stops) else '-'} at step {stops[i][0] if i < len(stops) else '-'} {_at(checkpointed, i)}, "
        f"requeued {_at(requeued_at, i)}, resumed at step {resumes[i] if i < len(resumes) else '-'} {_at(resumed_at, i)}"
        for i, target in enumerate(targets)
    ]
    finished = log.finished()
    done = f"done {log_time(finished) - t_submit:.1f}" if finished else f"not done ({state})"
    print(
        f"\npreemption timeline (s after submit; seed {SEED}, {total} steps):\n  "
        + "\n  ".join([*events, done])
        + f"\n  sacct runs {[r[0] for r in runs]}; max |param difference| to the uninterrupted run {diff:.3g}"
    )
    reliability.record(
        fault="preempted 3x at random steps (SLURM)",
        trials=PREEMPTIONS,
        survived=survived,
        data_lost=lost,
        note=f"stopped at steps {[s for s, _, _ in stops]} of {total}, resumed at {resumes}; max |dparam| {diff:.2g}",
    )

    assert state == "COMPLETED", log.lines()[-30:]
    assert len(stops) == PREEMPTIONS and all(s < total for s, _sig, _line in stops), (
        f"not every signal caught a running job: {stops}"
    )
    assert len(requeued) >= PREEMPTIONS and runs[-1][0] == "COMPLETED", runs
    assert [sig for _s, sig, _line in stops] == ["SIGUSR2"] * PREEMPTIONS, stops
    assert all(s >= t for (s, _sig, _line), t in zip(stops, targets)), (stops, targets)
    assert resumes == [s for s, _sig, _line in stops], "a requeued run did not resume from the checkpoint its preemption wrote"
    job_log = Path(launch_records(work)[-1]["folder"]) / f"{train_id}_0_log.out"
    assert job_log.read_text().count("this job is preempted") == PREEMPTIONS, "submitit took a preemption for a time-out"
    assert diff <= TOLERANCE
    assert survived == PREEMPTIONS and lost == 0


def _job_processes(job_id: str) -> list[psutil.Process]:
    """Every process of the job on this node: its slurmstepd daemons (batch script, steps) and all they started."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if " ".join(proc.info["cmdline"] or []).startswith(f"slurmstepd: [{job_id}."):
            with contextlib.suppress(psutil.NoSuchProcess):
                found += [proc, *proc.children(recursive=True)]
    return found


@contextlib.contextmanager
def _node_comes_back(node: str) -> Iterator[None]:
    """Puts ``node`` back in service afterwards, however the test ends. With ReturnToService=2 SLURM
    does so itself once the node's slurmd answers again, as a rebooted node's would; the resume only
    covers a slower answer, so later tests never find the cluster down."""
    try:
        yield
    finally:
        if not healthy():
            run(["scontrol", "update", f"nodename={node}", "state=resume"])
        wait_for(
            healthy, 60, lambda: f"node {node} to return to service ({run(['sinfo', '-h', '-N', '-o', '%T %E']).stdout.strip()})"
        )


def test_a_training_node_that_dies_without_a_signal_is_requeued_and_resumes_from_its_last_checkpoint(
    cluster, uninterrupted, tmp_path
):
    from rag_hpc.checkpoint import CheckpointManager

    # A node that dies takes every process of the job with it at once, with no signal anyone can
    # catch, and SLURM learns of it only by losing the node. Here: freeze (SIGSTOP) and SIGKILL the
    # job's slurmstepd daemons and everything under them, so neither the trainer nor srun nor the
    # batch step reacts, then mark the node DOWN, which is what slurmctld does when a node stops
    # answering (after SlurmdTimeout, 300 s here: too slow to wait for). SLURM then requeues the job
    # (NODE_FAIL; JobRequeue=1) and reruns it when the node is back, and the rerun must continue from
    # the checkpoints on disk. Killing only the python process would instead be a crashed task: the
    # job ends FAILED and no requeue follows. Taking the node down alone sends SIGTERM first, on
    # which the trainer checkpoints: a graceful stop, not a death.
    if os.geteuid() != 0:
        unavailable("marking a node DOWN (scontrol update) needs root")
    work = tmp_path / "work"
    t_submit = time.time()
    train_id, log = _launch(uninterrupted, work, cluster["cpus"])
    total = wait_for(log.total_steps, 180, lambda: f"training to start ({state_of(train_id)})")
    kill_at = random.Random(f"{SEED}-node").randrange(total // 4, total // 2)  # >= total / 2 * HOLD_S s before the end
    _await_step(log, 0, kill_at, train_id)
    node = run(["squeue", "-h", "-j", train_id, "-o", "%N"]).stdout.strip()
    checkpoints = CheckpointManager(run_dir(work) / "checkpoints")
    with _node_comes_back(node):
        procs = _job_processes(train_id)
        assert any("submitit" in " ".join(p.cmdline()) for p in procs), [p.cmdline() for p in procs]
        committed, last_step, t_kill = kill_node(procs, node, log, checkpoints, "rag_hpc fault test: node died")
        t_kill -= t_submit
        wait_for(
            lambda: any(r[0] == "NODE_FAIL" for r in sacct(train_id, "State", all_runs=True)),
            60,
            lambda: f"SLURM to record the node failure of job {train_id} ({sacct(train_id, 'State', all_runs=True)})",
        )
    # sacct says NODE_FAIL, a final state, until the requeued job starts again.
    wait_for(
        lambda: len(log.starts()) > 1 or train_id not in squeue_ids(),
        300,
        lambda: f"the requeued job {train_id} to start again ({state_of(train_id)})",
    )
    state = final_state(train_id, 300)

    runs = sacct(train_id, "State,Start,End", all_runs=True)
    resumes, stops = log.resumed_steps(), log.stops()
    diff = max_param_diff(final_model(work), uninterrupted.model()) if state == "COMPLETED" else math.inf
    resumed = resumes[0] if resumes else None
    ok = state == "COMPLETED" and resumes == [committed] and committed > 0 and not stops and diff <= TOLERANCE
    finished = log.finished()
    print(
        f"\nnode death timeline (s after submit; seed {SEED}, {total} steps): SIGKILL at {t_kill:.1f} "
        f"(drawn step {kill_at}, last logged step {last_step}, newest checkpoint step {committed}), "
        f"NODE_FAIL requeue {_at([_sacct_time(r[2]) - t_submit for r in runs if r[0] == 'NODE_FAIL'], 0)}, "
        f"resumed at step {resumed} {_at([log_time(line) - t_submit for line in log.starts()[1:]], 0)}, "
        f"{f'done {log_time(finished) - t_submit:.1f}' if finished else f'not done ({state})'}; "
        f"sacct runs {[r[0] for r in runs]}; max |param difference| {diff:.3g}"
    )
    reliability.record(
        fault="training node dies (SIGKILL, no signal)",
        trials=1,
        survived=int(ok),
        data_lost=int(resumed is None or resumed < committed),
        note=f"killed after step {last_step}, resumed at checkpoint step {resumed} of {committed}; max |dparam| {diff:.2g}",
    )

    assert state == "COMPLETED", log.lines()[-30:]
    assert last_step is not None and last_step < total, (
        f"the run was not training when the node died (step {last_step} of {total})"
    )
    assert [r[0] for r in runs] == ["NODE_FAIL", "COMPLETED"], runs
    assert not stops, f"the job had a chance to checkpoint on a signal: {stops}"
    assert committed > 0, "killed before the first checkpoint: nothing to resume from"
    assert resumes == [committed], f"resumed at {resumes}, newest checkpoint at kill time was step {committed}"
    assert diff <= TOLERANCE
