"""``python -m rag_hpc.launch`` against the real single-node SLURM cluster (slurm/up.sh).

Tiny simulated panel (3 windows of 100 sites), tiny CPU model. Each test launches through the CLI in a
subprocess, exactly as a user would, and checks what SLURM and the run directory say afterwards.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.slurm_helpers import (
    as_flags, cli, fake_apptainer, final_model, final_state, launch_records, launcher, log_time, max_param_diff, run_dir, sacct, squeue_ids, state_of, submit_urgent, tiny_sets, wait_for,
)

pytestmark = pytest.mark.slow


def _status(workdir: Path) -> tuple[int, str]:
    out = cli("status", "--workdir", str(workdir))
    return out.returncode, out.stdout + out.stderr


def test_launch_builds_the_index_array_then_trains_and_a_relaunch_builds_nothing(cluster, tiny_simulation, tmp_path):
    work = tmp_path / "work"
    flags = [*as_flags(tiny_sets(tiny_simulation, work)), "--windows-per-task", "1", "--time", "10"]
    first = launcher(*flags, "--wait")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    record = launch_records(work)[-1]
    assert record["windows_todo"] == 3 and record["array_tasks"] == 3 and len(record["array_ids"]) == 1
    array_id, train_id = record["array_ids"][0], record["train_id"]
    tasks = {r[0]: r for r in sacct(array_id, "JobID,State,End")}
    assert {tasks[f"{array_id}_{i}"][1] for i in range(3)} == {"COMPLETED"}, tasks
    assert final_state(train_id, 60) == "COMPLETED"
    (train_row,) = sacct(train_id, "JobID,State,Start")
    assert train_row[2] >= max(t[2] for t in tasks.values()), "training started before the index array ended"
    assert (run_dir(work) / "metrics.csv").exists() and list((run_dir(work) / "checkpoints").glob("step_*.pt"))
    for expected in (f"training job: {train_id}", "_%a_0_log.out", "python -m rag_hpc.status --workdir", "RAM per index-array task"):
        assert expected in first.stdout

    second = launcher(*flags, "--wait")
    assert second.returncode == 0, second.stderr[-3000:]
    again = launch_records(work)[-1]
    assert again["array_ids"] == [] and again["windows_todo"] == 0
    assert "none (all windows cached)" in second.stdout
    # --wait returns when the result file exists; sacct may say RUNNING a moment longer.
    assert final_state(again["train_id"], 60) == "COMPLETED"
    assert "resumed from" in (run_dir(work) / "train.log").read_text()
    rc, text = _status(work)
    assert rc == 0 and "windows cached: 3 / 3" in text and "COMPLETED" in text, text


def test_a_failing_index_task_cancels_training_and_status_says_why(cluster, tiny_simulation, tmp_path):
    from rag_hpc.config import load_config
    from rag_hpc.index.build import WindowCache
    from rag_hpc.launch import ensure_data

    work = tmp_path / "work"
    sets = tiny_sets(tiny_simulation, work)
    config = ensure_data(load_config(None, sets), log=lambda _m: None)
    # A file where window 1's shard directory must go: a real corrupt cache, which the task cannot
    # repair (root ignores permissions, so a read-only directory would not stop it).
    cache = WindowCache(config)
    blocker = cache.store.path(cache.artifacts(cache.windows[1])["shard"])
    cache.panel.close()
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a directory")

    out = launcher(*as_flags(sets), "--windows-per-task", "1", "--time", "10")
    assert out.returncode == 0, out.stderr[-3000:]
    record = launch_records(work)[-1]
    array_id = record["array_ids"][0]
    assert final_state(record["train_id"], 120) == "CANCELLED"
    assert final_state(f"{array_id}_1", 60) == "FAILED"
    assert record["train_id"] not in squeue_ids(), "training left pending"
    rc, text = _status(work)
    assert rc != 0
    assert f"index task {array_id}_1 FAILED" in text and "cancelled because index task" in text, text
    assert not (run_dir(work) / "checkpoints").exists()


def test_preempted_training_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(cluster, tiny_simulation, tmp_path, epochs_for):
    work = tmp_path / "work"
    sets = tiny_sets(tiny_simulation, work, None, epochs_for(20, 4, 40))
    t_submit = time.time()
    out = launcher(*as_flags(sets), "--cpus-per-task", str(cluster["cpus"]), "--time", "60")
    assert out.returncode == 0, out.stderr[-3000:]
    train_id = launch_records(work)[-1]["train_id"]
    log = run_dir(work) / "train.log"
    # Preempt as soon as training runs (its signal handlers are in place once the log says so).
    wait_for(lambda: log.exists() and "epoch 0:" in log.read_text(), 180, lambda: f"training to start ({state_of(train_id)})")
    t_urgent = time.time()
    urgent_id = submit_urgent(tmp_path / "urgent.out")
    assert final_state(urgent_id, 120) == "COMPLETED"
    assert final_state(train_id, 300) == "COMPLETED", (run_dir(work) / "train.log").read_text()[-3000:]
    runs = [r[0] for r in sacct(train_id, "State", all_runs=True)]
    assert runs[-1] == "COMPLETED" and {"REQUEUED", "PREEMPTED"} & set(runs[:-1]), runs

    text = log.read_text()
    stopped = next(x for x in text.splitlines() if "stopping at step" in x)
    resumed = next(x for x in text.splitlines() if "resumed from" in x)
    finished = next(x for x in text.splitlines() if " finished at step " in x)
    started = next(x for x in text.splitlines() if "fresh start" in x)
    step = int(re.search(r"stopping at step (\d+)", stopped).group(1))
    (urgent_row,) = sacct(urgent_id, "Start,End")
    t_urgent_start = datetime.fromisoformat(urgent_row[0]).timestamp()
    print(
        f"\npreemption timeline (s after submit): training started {log_time(started) - t_submit:.1f}, "
        f"urgent submitted {t_urgent - t_submit:.1f}, checkpoint on SIGUSR2 at step {step} {log_time(stopped) - t_submit:.1f}, "
        f"urgent ran {t_urgent_start - t_submit:.1f}, requeued+resumed {log_time(resumed) - t_submit:.1f}, "
        f"done {log_time(finished) - t_submit:.1f}; sacct runs {runs}"
    )
    assert "SIGUSR2" in stopped
    job_log = Path(launch_records(work)[-1]["folder"]) / f"{train_id}_0_log.out"
    assert "this job is preempted" in job_log.read_text(), "submitit took the signal for a timeout"

    # The same run without interruption, same seed and thread count, as a plain process.
    ref = tmp_path / "ref"
    ref_sets = [*sets, f"paths.workdir={ref}", f"data.panel_h5={work / 'panel.h5'}"]
    plain = cli("train", *as_flags(ref_sets), timeout=600, env={"OMP_NUM_THREADS": str(cluster["cpus"])})
    assert plain.returncode == 0, plain.stderr[-3000:]
    diff = max_param_diff(final_model(work), final_model(ref))
    print(f"max |param difference| preempted vs uninterrupted: {diff:.3g}")
    assert diff < 1e-5


def test_time_limit_requeues_from_a_container_without_scontrol_and_finishes(cluster, tiny_simulation, tmp_path, epochs_for):
    odd = tmp_path / "dir with space;echo injected"
    work = odd / "work"
    apptainer = fake_apptainer(tmp_path / "fake")
    image = odd / "rag hpc.sif"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_text("stand-in image")
    # Longer than one run under a 1-minute limit (SLURM may signal up to 60 s early: a run gets ~10-40 s).
    sets = tiny_sets(tiny_simulation, work, None, epochs_for(50, 6, 120))
    t0 = time.time()
    out = launcher(*as_flags(sets), "--time", "1", "--container", str(image), "--cpus-per-task", "2",
                   env={"RAG_HPC_APPTAINER": str(apptainer)})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    record = launch_records(work)[-1]
    train_id = record["train_id"]
    assert final_state(train_id, 400) == "COMPLETED", (run_dir(work) / "train.log").read_text()[-3000:]
    runs = [r[0] for r in sacct(train_id, "State", all_runs=True)]
    job_log = Path(record["folder"]) / f"{train_id}_0_log.err"
    batch_out = Path(record["folder"]) / f"{train_id}_0_log.out"
    text = job_log.read_text() + batch_out.read_text()
    print(f"\ntime-limit run: {time.time() - t0:.1f} s, sacct runs {runs}")
    assert "timed-out" in text and "requeued" in text and "fake apptainer" in text, text[-3000:]
    assert runs[-1] == "COMPLETED" and len(runs) >= 2, runs
    assert not list(odd.parent.glob("injected*")) and "injected" not in text.replace(str(odd), "")


def test_a_two_task_training_job_runs_over_gloo(cluster, tiny_simulation, tmp_path):
    work = tmp_path / "work"
    out = launcher(*as_flags(tiny_sets(tiny_simulation, work, None, 1, "cluster.gpus_per_node=2")), "--time", "10", "--wait")
    assert out.returncode == 0, out.stderr[-3000:]
    record = launch_records(work)[-1]
    assert final_state(record["train_id"], 60) == "COMPLETED"
    assert "training job" in out.stdout and "x 2 task(s)" in out.stdout
    assert "2 rank(s) on cpu (gloo)" in (run_dir(work) / "train.log").read_text()


def test_the_guard_refuses_an_over_budget_plan_and_submits_nothing(cluster, tiny_simulation, tmp_path):
    before = squeue_ids()
    out = launcher(*as_flags(tiny_sets(tiny_simulation, tmp_path / "work")), "--mem", "100M")
    assert out.returncode != 0
    assert "OVER" in out.stdout and "RAM per index-array task" in out.stdout and "nothing was submitted" in out.stderr
    assert not (tmp_path / "work" / "launch.json").exists()
    assert squeue_ids() <= before
