"""``python -m rag_hpc.launch`` against the real single-node SLURM cluster (slurm/up.sh).

Tiny simulated panel (3 windows of 100 sites), tiny CPU model. Each test launches through the CLI in a
subprocess, exactly as a user would, and checks what SLURM and the run directory say afterwards.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import stat
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from tests.slurm_helpers import (
    REPO, as_flags, ensure_cluster, final_state, launcher, run, sacct, squeue_ids, state_of, tiny_sets, wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> dict[str, int]:
    return ensure_cluster()


@pytest.fixture(scope="module")
def epochs_for(cluster, tiny_simulation, tmp_path_factory):
    """Epochs of the tiny run that take about ``seconds`` of training on this machine now.

    The other engineers' runs share these 2 cores, so the step rate varies ~10x over a day; tests
    that must catch a running job (preemption, time limit) size their runs from a measured rate."""
    work = tmp_path_factory.mktemp("calibrate")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": str(cluster["cpus"])}  # fmt: skip
    out = run([sys.executable, "-m", "rag_hpc.launch", "--cluster", "local", *as_flags(tiny_sets(tiny_simulation, work))],
              timeout=300, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    row = next(csv.DictReader((_run_dir(work) / "metrics.csv").open()))
    steps_per_s = int(row["step"]) / float(row["epoch_seconds"])
    print(f"\ncalibration: {steps_per_s:.1f} steps/s on the tiny run")

    def epochs(seconds: float, lo: int, hi: int) -> int:
        return max(lo, min(hi, math.ceil(seconds * steps_per_s / int(row["step"]))))

    return epochs


def _records(workdir: Path) -> list[dict]:
    return json.loads((workdir / "launch.json").read_text())


def _run_dir(workdir: Path) -> Path:
    return workdir / "runs" / "default"


def _final_model(workdir: Path) -> dict[str, torch.Tensor]:
    newest = max((_run_dir(workdir) / "checkpoints").glob("step_*.pt"))
    return torch.load(newest, weights_only=True)["model"]


def _status(workdir: Path) -> tuple[int, str]:
    out = run([sys.executable, "-m", "rag_hpc.status", "--workdir", str(workdir)], env={**os.environ, "PYTHONPATH": str(REPO)})
    return out.returncode, out.stdout + out.stderr


def _log_time(line: str) -> float:
    return datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S").timestamp()


def test_launch_builds_the_index_array_then_trains_and_a_relaunch_builds_nothing(cluster, tiny_simulation, tmp_path):
    work = tmp_path / "work"
    flags = [*as_flags(tiny_sets(tiny_simulation, work)), "--windows-per-task", "1", "--time", "10"]
    first = launcher(*flags, "--wait")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    record = _records(work)[-1]
    assert record["windows_todo"] == 3 and record["array_tasks"] == 3 and len(record["array_ids"]) == 1
    array_id, train_id = record["array_ids"][0], record["train_id"]
    tasks = {r[0]: r for r in sacct(array_id, "JobID,State,End")}
    assert {tasks[f"{array_id}_{i}"][1] for i in range(3)} == {"COMPLETED"}, tasks
    assert final_state(train_id, 60) == "COMPLETED"
    (train_row,) = sacct(train_id, "JobID,State,Start")
    assert train_row[2] >= max(t[2] for t in tasks.values()), "training started before the index array ended"
    assert (_run_dir(work) / "metrics.csv").exists() and list((_run_dir(work) / "checkpoints").glob("step_*.pt"))
    for expected in (f"training job: {train_id}", "_%a_0_log.out", "python -m rag_hpc.status --workdir", "RAM per index-array task"):
        assert expected in first.stdout

    second = launcher(*flags, "--wait")
    assert second.returncode == 0, second.stderr[-3000:]
    again = _records(work)[-1]
    assert again["array_ids"] == [] and again["windows_todo"] == 0
    assert "none (all windows cached)" in second.stdout
    # --wait returns when the result file exists; sacct may say RUNNING a moment longer.
    assert final_state(again["train_id"], 60) == "COMPLETED"
    assert "resumed from" in (_run_dir(work) / "train.log").read_text()
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
    record = _records(work)[-1]
    array_id = record["array_ids"][0]
    assert final_state(record["train_id"], 120) == "CANCELLED"
    assert final_state(f"{array_id}_1", 60) == "FAILED"
    assert record["train_id"] not in squeue_ids(), "training left pending"
    rc, text = _status(work)
    assert rc != 0
    assert f"index task {array_id}_1 FAILED" in text and "cancelled because index task" in text, text
    assert not (_run_dir(work) / "checkpoints").exists()


def test_preempted_training_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(cluster, tiny_simulation, tmp_path, epochs_for):
    work = tmp_path / "work"
    sets = tiny_sets(tiny_simulation, work, None, epochs_for(20, 4, 40))
    t_submit = time.time()
    out = launcher(*as_flags(sets), "--cpus-per-task", str(cluster["cpus"]), "--time", "60")
    assert out.returncode == 0, out.stderr[-3000:]
    train_id = _records(work)[-1]["train_id"]
    log = _run_dir(work) / "train.log"
    # Preempt as soon as training runs (its signal handlers are in place once the log says so).
    wait_for(lambda: log.exists() and "epoch 0:" in log.read_text(), 180, lambda: f"training to start ({state_of(train_id)})")
    t_urgent = time.time()
    urgent = run(["sbatch", "--parsable", "-p", "urgent", "-c", "1", "-o", str(tmp_path / "urgent.out"), "--wrap", "sleep 2"])
    assert urgent.returncode == 0, urgent.stderr
    urgent_id = urgent.stdout.strip().split(";")[0]
    assert final_state(urgent_id, 120) == "COMPLETED"
    assert final_state(train_id, 300) == "COMPLETED", (_run_dir(work) / "train.log").read_text()[-3000:]
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
        f"\npreemption timeline (s after submit): training started {_log_time(started) - t_submit:.1f}, "
        f"urgent submitted {t_urgent - t_submit:.1f}, checkpoint on SIGUSR2 at step {step} {_log_time(stopped) - t_submit:.1f}, "
        f"urgent ran {t_urgent_start - t_submit:.1f}, requeued+resumed {_log_time(resumed) - t_submit:.1f}, "
        f"done {_log_time(finished) - t_submit:.1f}; sacct runs {runs}"
    )
    assert "SIGUSR2" in stopped
    job_log = Path(_records(work)[-1]["folder"]) / f"{train_id}_0_log.out"
    assert "this job is preempted" in job_log.read_text(), "submitit took the signal for a timeout"

    # The same run without interruption, same seed and thread count, as a plain process.
    ref = tmp_path / "ref"
    ref_sets = [*sets, f"paths.workdir={ref}", f"data.panel_h5={work / 'panel.h5'}"]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": str(cluster["cpus"])}  # fmt: skip
    plain = run([sys.executable, "-m", "rag_hpc.train", *as_flags(ref_sets)], timeout=600, env=env)
    assert plain.returncode == 0, plain.stderr[-3000:]
    a, b = _final_model(work), _final_model(ref)
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    print(f"max |param difference| preempted vs uninterrupted: {diff:.3g}")
    assert diff < 1e-5


def _fake_apptainer(folder: Path) -> Path:
    """Stands in for apptainer: drops ``exec --nv --bind ... IMAGE python`` and runs this python with
    a PATH that has no scontrol, as inside an image."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    script = folder / "apptainer"
    script.write_text(
        "#!/bin/bash\n"
        'shift; binds=(); while [ "$1" = --nv ] || [ "$1" = --bind ]; do [ "$1" = --bind ] && { binds+=("$2"); shift; }; shift; done\n'
        f'shift; shift; echo "fake apptainer: ${{#binds[@]}} binds" >&2\n'
        f"export PATH={bin_dir}\n"
        f"export PYTHONPATH={REPO}\n"
        f'exec {bin_dir}/python "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_time_limit_requeues_from_a_container_without_scontrol_and_finishes(cluster, tiny_simulation, tmp_path, epochs_for):
    odd = tmp_path / "dir with space;echo injected"
    work = odd / "work"
    apptainer = _fake_apptainer(tmp_path / "fake")
    image = odd / "rag hpc.sif"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_text("stand-in image")
    # Longer than one run under a 1-minute limit (SLURM may signal up to 60 s early: a run gets ~10-40 s).
    sets = tiny_sets(tiny_simulation, work, None, epochs_for(50, 6, 120))
    t0 = time.time()
    out = launcher(*as_flags(sets), "--time", "1", "--container", str(image), "--cpus-per-task", "2",
                   env={"RAG_HPC_APPTAINER": str(apptainer)})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    record = _records(work)[-1]
    train_id = record["train_id"]
    assert final_state(train_id, 400) == "COMPLETED", (_run_dir(work) / "train.log").read_text()[-3000:]
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
    record = _records(work)[-1]
    assert final_state(record["train_id"], 60) == "COMPLETED"
    assert "training job" in out.stdout and "x 2 task(s)" in out.stdout
    assert "2 rank(s) on cpu (gloo)" in (_run_dir(work) / "train.log").read_text()


def test_the_guard_refuses_an_over_budget_plan_and_submits_nothing(cluster, tiny_simulation, tmp_path):
    before = squeue_ids()
    out = launcher(*as_flags(tiny_sets(tiny_simulation, tmp_path / "work")), "--mem", "100M")
    assert out.returncode != 0
    assert "OVER" in out.stdout and "RAM per index-array task" in out.stdout and "nothing was submitted" in out.stderr
    assert not (tmp_path / "work" / "launch.json").exists()
    assert squeue_ids() <= before


def test_an_unknown_partition_is_a_clear_error(cluster, tiny_simulation, tmp_path):
    out = launcher(*as_flags(tiny_sets(tiny_simulation, tmp_path / "work")), "--partition", "nosuch")
    assert out.returncode != 0
    assert "partition 'nosuch' does not exist" in out.stderr and "gpu" in out.stderr and "urgent" in out.stderr


def test_more_gpus_per_node_than_the_nodes_have_is_a_clear_error(cluster, tiny_simulation, tmp_path):
    out = launcher(*as_flags(tiny_sets(tiny_simulation, tmp_path / "work")), "--gpus-per-node", "8")
    assert out.returncode != 0 and "--gpus-per-node 8" in out.stderr and "have 2 GPU(s)" in out.stderr
