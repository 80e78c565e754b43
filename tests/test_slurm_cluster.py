"""Real jobs on the single-node SLURM test cluster (slurm/up.sh), submitted through submitit.

Covers what the pipeline relies on: plain jobs, arrays with per-task states, fake-GPU GRES,
`afterok` dependencies that get cancelled when a task fails, and preemption that reaches
submitit's checkpoint() and requeues. If the cluster is not answering, the tests bring it up with
`bash slurm/up.sh` (root only). When that is impossible they skip, except under CI=true, where a
missing cluster is a failure: CI exists to run these.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.slurm_helpers import REPO, UNFINISHED, run, wait_for

submitit = pytest.importorskip("submitit")

pytestmark = pytest.mark.slow


def _executor(folder: Path, **params) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    # Jobs unpickle the functions below by reference, so they must import this module even when
    # pytest was started from another directory.
    setup = [f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}"]
    executor.update_parameters(slurm_partition="gpu", timeout_min=10, cpus_per_task=1, slurm_setup=setup, name="rag_hpc_test")
    executor.update_parameters(**params)
    return executor


def _final_state(job, timeout: float = 90) -> str:
    """Waits until sacct, read through submitit's own watcher, shows the job finished.

    mode="force": submitit otherwise backs its sacct calls off to once a minute. `job.done()` alone
    is not enough: it turns true as soon as the result file exists, while sacct may still say
    RUNNING or COMPLETING for a moment."""

    def finished() -> str | None:
        state = job.watcher.get_state(job.job_id, mode="force")
        return state if state.split()[0] not in UNFINISHED else None

    state = wait_for(finished, timeout, lambda: f"job {job.job_id} to finish (last state {job.state}; {_accounting()})")
    assert job.done(), f"sacct says {state} but submitit's done() is still False"
    return state


def _accounting() -> str:
    # UNKNOWN forever for array tasks is what the jobcomp-based sacct shim gives: say so on failure.
    out = run(["scontrol", "show", "config"]).stdout
    line = next((x for x in out.splitlines() if x.startswith("AccountingStorageType")), "")
    return " ".join(line.split()) or "AccountingStorageType unknown"


def _sacct_states(job_id: str) -> dict[str, str]:
    out = run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", job_id])
    assert out.returncode == 0, f"sacct failed: {out.stderr}"
    return dict(line.split("|", 1) for line in out.stdout.splitlines() if line)


# ---------------------------------------------------------------- functions run inside jobs


def add(a: int, b: int) -> int:
    return a + b


def square_or_fail(x: int) -> int:
    if x < 0:
        raise ValueError(f"task given {x} fails on purpose")
    return x * x


def gpu_environment() -> dict:
    return {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_GPUS_PER_NODE")}


def urgent_work(seconds: float) -> float:
    time.sleep(seconds)
    return time.time()


class Preemptible(submitit.helpers.Checkpointable):
    """Counts to `steps`, one step a second. Progress lives in `workdir` (not in the pickled
    arguments), so the requeued run carries on instead of starting over."""

    def __call__(self, workdir: str, steps: int) -> dict:
        work = Path(workdir)
        progress = work / "progress"
        done = int(progress.read_text()) if progress.exists() else 0
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        with open(work / "starts", "a") as f:
            f.write(f"{time.time()} {restart} {done}\n")
        for step in range(done, steps):
            time.sleep(1)
            progress.write_text(str(step + 1))
        return {"steps": int(progress.read_text()), "restarts": restart, "finished": time.time()}

    def checkpoint(self, workdir: str, steps: int):
        with open(Path(workdir) / "checkpointed", "a") as f:
            f.write(f"{time.time()}\n")
        return super().checkpoint(workdir, steps)


# ---------------------------------------------------------------- tests


def test_a_job_returns_its_result(cluster, tmp_path):
    job = _executor(tmp_path / "submitit").submit(add, 2, 3)
    assert _final_state(job, 60) == "COMPLETED"
    assert job.result() == 5


def test_an_array_reports_every_task(cluster, tmp_path):
    executor = _executor(tmp_path / "submitit", slurm_array_parallelism=3)
    jobs = executor.map_array(square_or_fail, [1, 2, 3])
    array_id = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{array_id}_{i}" for i in range(3)]
    assert [_final_state(j, 90) for j in jobs] == ["COMPLETED"] * 3
    assert [j.result() for j in jobs] == [1, 4, 9]
    # Per-task rows need real accounting: the jobcomp-based sacct shim has no array detail.
    states = _sacct_states(array_id)
    expected = {j.job_id: "COMPLETED" for j in jobs}
    assert {k: states.get(k) for k in expected} == expected, (states, _accounting())


def test_a_gpu_job_runs_on_the_fake_gres(cluster, tmp_path):
    job = _executor(tmp_path / "submitit", slurm_gpus_per_node=1).submit(gpu_environment)
    assert _final_state(job, 60) == "COMPLETED"
    env = job.result()
    # One of the two fake devices, as a real GPU node would expose it.
    assert env["CUDA_VISIBLE_DEVICES"] in {"0", "1"}, env
    tres = run(["sacct", "-n", "-X", "-P", "-o", "AllocTRES", "-j", job.job_id]).stdout
    assert "gres/gpu=1" in tres, (tres, _accounting())


def test_a_dependent_job_is_cancelled_when_an_array_task_fails(cluster, tmp_path):
    executor = _executor(tmp_path / "submitit")
    tasks = executor.map_array(square_or_fail, [1, -1, 3])
    array_id = tasks[0].job_id.split("_")[0]
    executor.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{array_id}", "kill_on_invalid_dep": "yes"})
    dependent = executor.submit(add, 1, 1)
    t0 = time.monotonic()
    state = _final_state(dependent, 90)
    waited = time.monotonic() - t0
    assert state.startswith("CANCELLED"), state
    assert [_final_state(t, 60) for t in tasks] == ["COMPLETED", "FAILED", "COMPLETED"]
    with pytest.raises(Exception, match="fails on purpose"):
        tasks[1].result()
    print(f"\ndependent job {dependent.job_id} seen {state} by submitit {waited:.1f} s after submission")


def test_preemption_checkpoints_requeues_and_finishes(cluster, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    steps = 30  # one a second: the job still counts >= 25 s after the urgent job is submitted at its first step
    cpus = cluster["cpus"]
    # timeout_min well above the run time: submitit treats a signal within 80 % of the limit as a
    # timeout (limited requeues), anything earlier as a preemption.
    low = _executor(tmp_path / "submitit", cpus_per_task=cpus, timeout_min=60)
    t_submit = time.time()
    job = low.submit(Preemptible(), str(work), steps)
    starts = work / "starts"
    wait_for(lambda: starts.exists() and (work / "progress").exists(), 60, "the preemptable job to start working")
    t_running = float(starts.read_text().split()[0])

    urgent = _executor(tmp_path / "submitit_urgent", slurm_partition="urgent", cpus_per_task=1)
    t_urgent_submit = time.time()
    urgent_job = urgent.submit(urgent_work, 3)
    marker = work / "checkpointed"
    wait_for(marker.exists, 60, "checkpoint() of the preempted job")
    t_checkpoint = float(marker.read_text().split()[0])

    assert _final_state(urgent_job, 90) == "COMPLETED"
    t_urgent_done = urgent_job.result()
    wait_for(lambda: len(starts.read_text().splitlines()) >= 2, 90, "the requeued job to resume")
    assert _final_state(job, 90) == "COMPLETED"
    result = job.result()
    t_done = result["finished"]

    _, second = (line.split() for line in starts.read_text().splitlines()[:2])
    t_resumed, resumed_restart, resumed_from = float(second[0]), int(second[1]), int(second[2])
    assert result["steps"] == steps
    assert result["restarts"] >= 1 and resumed_restart >= 1
    assert 0 < resumed_from < steps, "resumed run did not pick up the saved progress"
    assert t_running < t_checkpoint < t_resumed < t_done
    assert t_urgent_done <= t_resumed, "the low-priority job resumed while the urgent one still ran"
    # -D keeps the first, preempted run: real accounting records it as REQUEUED.
    runs = run(["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", job.job_id]).stdout.split()
    assert runs[-1] == "COMPLETED" and {"REQUEUED", "PREEMPTED"} & set(runs[:-1]), runs
    # --open-mode=append (submitit's default) keeps both runs' output in one log.
    log = job.paths.stderr.read_text()
    timeline = (
        f"\npreemption timeline (s after submit): running {t_running - t_submit:.1f}, "
        f"urgent submitted {t_urgent_submit - t_submit:.1f}, checkpoint() {t_checkpoint - t_submit:.1f}, "
        f"urgent done {t_urgent_done - t_submit:.1f}, resumed {t_resumed - t_submit:.1f} "
        f"(restart {resumed_restart}, from step {resumed_from}), done {t_done - t_submit:.1f}"
    )
    print(timeline)
    assert "this job is preempted" in log, log[-3000:]
