"""Whole training runs on the tiny panel: exact resume, real signals, two gloo ranks, reports.

Runs that are compared with each other go through ``python -m rag_hpc.train`` in subprocesses with
the same thread count (OMP_NUM_THREADS=1), as a cluster job would; a few checks of the in-process API
(``train``, ``request_checkpoint``) run in the test process.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rag_hpc.config import load_config
from rag_hpc.errors import CheckpointError, InputError
from rag_hpc.train import TrainingInterrupted, request_checkpoint, train
from tests.train_helpers import (
    EPOCHS,
    ROOT,
    STEPS_PER_EPOCH,
    load_checkpoint,
    max_diff,
    run_cli,
    train_cmd,
    train_env,
    train_overrides,
)

TOTAL = STEPS_PER_EPOCH * EPOCHS
# Runs that a test signals at an early step hold each step >= 50 ms (a sleep that changes no number), so
# the run is still training when the signal comes, whatever the machine's speed.
HOLD = "train.min_step_seconds=0.05"


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended (rc {proc.returncode}) before logging {text!r}: {proc.stderr.read() if proc.stderr else ''}"
            )
        time.sleep(0.005)
    raise AssertionError(f"{text!r} never appeared in {path}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(workdir: Path, name: str = "metrics.csv") -> list[dict[str, str]]:
    with open(workdir / "runs" / "default" / name, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def uninterrupted(tiny_panel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Workdir of one complete uninterrupted run (with TensorBoard on), the yardstick of the others."""
    workdir = tmp_path_factory.mktemp("uninterrupted") / "work"
    out = run_cli(train_cmd(tiny_panel, workdir, "train.tensorboard=true"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(workdir / "runs" / "default" / "checkpoints" / f"step_{TOTAL:09d}.pt")
    return workdir


def test_each_epoch_reports_loss_accuracy_f1_and_dosage_r2_by_maf_bin(uninterrupted):
    rows = _metrics(uninterrupted)
    assert [(r["epoch"], r["step"]) for r in rows] == [("0", "27"), ("1", "54"), ("2", "81"), ("3", "108")]
    for r in rows:
        assert 0.5 < float(r["val_acc"]) <= 1.0 and float(r["val_loss"]) > 0
        assert 0.0 <= float(r["val_r2_maf_0.050-0.500"]) <= 1.0 and int(float(r["val_n_maf_0.050-0.500"])) > 0
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    log = (uninterrupted / "runs" / "default" / "train.log").read_text()
    assert "epoch 3 done in" in log and "r2 by MAF 0.000-0.005:" in log and "step/s" in log
    try:
        import tensorboard  # noqa: F401 - optional: without it the run says so and goes on
    except ImportError:
        assert "TensorBoard scalars off: the `tensorboard` package is not installed" in log
    else:
        assert any(p.name.startswith("events.out.tfevents") for p in (uninterrupted / "runs" / "default" / "tb").iterdir())


def test_interrupted_run_resumes_at_the_next_batch_with_identical_parameters(tiny_panel, uninterrupted, tmp_path):
    workdir = tmp_path / "work"
    first = run_cli(train_cmd(tiny_panel, workdir, max_steps=40))  # stops mid-epoch 1, in a process of its own
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().endswith("step_000000040.pt")
    second = run_cli(train_cmd(tiny_panel, workdir))
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and "step_000000040.pt: next step 40 (epoch 1, micro-batch 13)" in second.stderr

    want, got = load_checkpoint(uninterrupted, TOTAL), load_checkpoint(workdir, TOTAL)
    assert max_diff(want["model"], got["model"]) <= 1e-6
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()
    for key, state in want["optimizer"]["state"].items():
        assert max_diff(state, got["optimizer"]["state"][key]) <= 1e-6
    # Epoch rows (the resumed epoch included, whose loss spans both processes) match, timings aside.
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rows]  # noqa: E731
    assert timeless(_metrics(workdir)) == timeless(_metrics(uninterrupted))
    # The loss curve (one row per step here) holds each step once, with the uninterrupted run's losses.
    curve = lambda rows: [(r["step"], r["loss"]) for r in rows]  # noqa: E731
    assert curve(_metrics(workdir, "steps.csv")) == curve(_metrics(uninterrupted, "steps.csv"))
    assert [r["step"] for r in _metrics(uninterrupted, "steps.csv")] == [str(s) for s in range(1, TOTAL + 1)]


def test_sigterm_mid_run_checkpoints_at_the_next_step_and_the_rerun_ends_like_the_uninterrupted_run(
    tiny_panel, uninterrupted, tmp_path
):
    workdir = tmp_path / "work"
    # Each step held >= 50 ms: the 102 steps after the signal last >= 5 s, whatever the machine's speed.
    proc = subprocess.Popen(
        train_cmd(tiny_panel, workdir, HOLD), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=train_env(), cwd=ROOT
    )
    _wait_for(workdir / "runs" / "default" / "train.log", f"step 6/{TOTAL} ", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    stopped = int(err.split("interrupted (SIGTERM) at step ")[1].split(";")[0])
    assert 6 <= stopped < TOTAL
    assert load_checkpoint(workdir, stopped)["step"] == stopped

    rerun = run_cli(train_cmd(tiny_panel, workdir))
    assert rerun.returncode == 0, rerun.stderr
    assert f"next step {stopped} " in rerun.stderr
    assert max_diff(load_checkpoint(uninterrupted, TOTAL)["model"], load_checkpoint(workdir, TOTAL)["model"]) <= 1e-6


def _two_ranks(cmd: list[str]) -> list[subprocess.Popen]:
    port = str(_free_port())
    return [
        subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=train_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        )
        for r in range(2)
    ]


def test_two_gloo_ranks_reach_the_parameters_of_one_process_with_the_same_global_batch(tiny_panel, uninterrupted, tmp_path):
    workdir = tmp_path / "work"
    procs = _two_ranks(train_cmd(tiny_panel, workdir, max_steps=4))  # each rank takes 4 of the 8 queries per batch
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    assert "2 rank(s) on cpu (gloo)" in outs[0][1]
    one, two = load_checkpoint(uninterrupted, 4), load_checkpoint(workdir, 4)
    assert two["world_size"] == 2
    # Same batches, same loss normalisation: only the summation order differs (gradients all-reduced
    # over 2 ranks vs summed in one process). AdamW turns rounding noise on parameters whose true
    # gradient is 0 (attention key biases) into ~lr * 1e-2 steps, so parameters agree to 1e-5 here
    # (measured ~5e-6 after 4 steps) rather than to float32 epsilon; the losses agree to 1e-6.
    assert max_diff(one["model"], two["model"]) <= 1e-5
    assert two["epoch_accum"]["loss_sum"] == pytest.approx(one["epoch_accum"]["loss_sum"], rel=1e-6)


def test_a_signal_to_rank_1_alone_stops_both_ranks_at_the_same_step_with_one_checkpoint(tiny_panel, tmp_path):
    workdir = tmp_path / "work"
    procs = _two_ranks(train_cmd(tiny_panel, workdir, HOLD))
    _wait_for(workdir / "runs" / "default" / "train.log", f"step 3/{TOTAL} ", procs[0])
    procs[1].send_signal(signal.SIGUSR2)  # e.g. SLURM signalling one task, or a handler on a non-zero rank
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [75, 75], [e for _, e in outs]
    steps = [int(err.split(") at step ")[1].split(";")[0]) for _, err in outs]
    assert steps[0] == steps[1] and 3 <= steps[0] < TOTAL
    assert "interrupted (SIGUSR2)" in outs[1][1] and "interrupted (a request on another rank)" in outs[0][1]
    written = (workdir / "runs" / "default" / "train.log").read_text().count(f"step_{steps[0]:09d}.pt written")
    assert written == 1
    # The checkpoint carries the run on any world size: one process takes it from here.
    resumed = run_cli(train_cmd(tiny_panel, workdir, max_steps=steps[0] + 2))
    assert resumed.returncode == 0, resumed.stderr
    assert f"next step {steps[0]} " in resumed.stderr and load_checkpoint(workdir, steps[0] + 2)["world_size"] == 1


# -- the in-process API the launcher wraps ------------------------------------------------------------


def _when_logged(log: Path, text: str, action) -> threading.Thread:
    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if log.exists() and text in log.read_text():
                action()
                return
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_the_handler_a_signal_replaced_runs_only_after_the_checkpoint_is_on_disk(tiny_panel, tmp_path):
    config = load_config(overrides=train_overrides(tiny_panel, tmp_path / "work", HOLD))
    ckpt_dir = tmp_path / "work" / "runs" / "default" / "checkpoints"
    seen: list[list[str]] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(sorted(p.name for p in ckpt_dir.iterdir())))
    try:
        _when_logged(
            tmp_path / "work" / "runs" / "default" / "train.log", f"step 2/{TOTAL} ", lambda: os.kill(os.getpid(), signal.SIGUSR2)
        )
        with pytest.raises(TrainingInterrupted) as stop:
            train(config)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert stop.value.reason == "SIGUSR2" and stop.value.checkpoint.is_file()
    assert len(seen) == 1 and stop.value.checkpoint.name in seen[0]  # a submitit requeue would see the state


def test_request_checkpoint_without_stop_writes_one_and_training_goes_on(tiny_panel, tmp_path):
    config = load_config(
        overrides=train_overrides(
            tiny_panel, tmp_path / "work", "train.checkpoint_every_steps=0", "train.max_steps=20", "train.min_step_seconds=0.2"
        )
    )
    _when_logged(tmp_path / "work" / "runs" / "default" / "train.log", f"step 2/{TOTAL} ", lambda: request_checkpoint(stop=False))
    final = train(config)
    steps = sorted(int(p.stem.split("_")[1]) for p in final.parent.glob("step_*.pt"))
    assert final.name == "step_000000020.pt" and len(steps) == 2 and 2 <= steps[0] < 20


def test_resuming_under_a_config_that_changes_the_trajectory_is_refused_naming_the_fields(tiny_panel, tmp_path):
    train(load_config(overrides=train_overrides(tiny_panel, tmp_path / "work", "train.max_steps=1")))
    changed = load_config(
        overrides=train_overrides(tiny_panel, tmp_path / "work", "train.max_steps=2", "model.dims=64", "train.lr=0.01")
    )
    with pytest.raises(CheckpointError, match="different config") as exc:
        train(changed)
    assert "model.dims: checkpoint 16, now 64" in str(exc.value) and "train.lr: checkpoint 0.001, now 0.01" in str(exc.value)


def test_the_cli_reports_a_missing_panel_in_one_line(tmp_path):
    out = run_cli(
        [
            sys.executable,
            "-m",
            "rag_hpc.train",
            "--set",
            f"data.panel_h5={tmp_path / 'nope.h5'}",
            "--set",
            f"paths.workdir={tmp_path}",
        ]
    )
    assert out.returncode == InputError.exit_code
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: prepared panel {tmp_path / 'nope.h5'} does not exist")
