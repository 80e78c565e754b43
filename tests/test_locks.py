"""One writer per run: a second holder is refused at once, naming the first; a dead holder leaves no stale lock."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rag_hpc.errors import ClusterError
from rag_hpc.locks import LockBusy, RunInUseError, hold, one_writer
from tests.slurm_helpers import REPO, as_flags, cli, tiny_sets

HOLDER = """
import sys, time
from pathlib import Path
from rag_hpc.locks import one_writer
with one_writer(Path(sys.argv[1]), "training"):
    print("holding", flush=True)
    sys.stdin.read()  # until the test closes stdin, or kills this process
"""


def _holder(directory: Path, **env: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_writer_is_refused_at_once_naming_host_pid_and_slurm_job_of_the_first(tmp_path):
    proc = _holder(tmp_path, SLURM_JOB_ID="4242")
    try:
        with pytest.raises(RunInUseError) as refused, one_writer(tmp_path, "training"):
            pytest.fail("entered a run held by another process")
        message = str(refused.value)
        assert f"host {socket.gethostname()}, pid {proc.pid}, SLURM job 4242" in message and "`scancel 4242`" in message
        assert isinstance(refused.value, ClusterError)
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    proc = _holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "writer.lock").exists()
    with one_writer(tmp_path, "training"):
        pass


def test_a_second_hold_in_the_same_process_is_refused_too(tmp_path):
    # POSIX locks belong to the process: without the in-process registry this would succeed.
    with one_writer(tmp_path, "training"):
        with pytest.raises(RunInUseError), one_writer(tmp_path, "training"):
            pass
        errors: list[BaseException] = []
        thread = threading.Thread(target=lambda: _try_hold(tmp_path / "writer.lock", errors))
        thread.start()
        thread.join()
        assert len(errors) == 1 and isinstance(errors[0], LockBusy)
    with one_writer(tmp_path, "training"):
        pass


def _try_hold(path: Path, errors: list[BaseException]) -> None:
    try:
        with hold(path, wait_s=0.2):
            pass
    except LockBusy as exc:
        errors.append(exc)


def test_the_train_cli_refuses_a_run_another_process_writes_in_one_line_and_touches_nothing(tiny_simulation, tmp_path):
    work = tmp_path / "work"
    run = work / "runs" / "default"
    run.mkdir(parents=True)
    proc = _holder(run)
    try:
        out = cli("train", *as_flags(tiny_sets(tiny_simulation, work)))
        lines = out.stderr.strip().splitlines()
        assert out.returncode == ClusterError.exit_code and len(lines) == 1, out.stderr[-3000:]
        assert (
            lines[0].startswith("error: ") and f"pid {proc.pid}, not a SLURM job" in lines[0] and f"`kill {proc.pid}`" in lines[0]
        )
        assert sorted(p.name for p in run.iterdir()) == ["writer.lock"], "the refused trainer wrote into the run"
    finally:
        proc.kill()
        proc.wait()


def test_the_imputation_merge_is_refused_while_a_trainer_writes_the_run(tiny_simulation, tmp_path):
    from rag_hpc.config import load_config
    from rag_hpc.launch import merge_imputation, run_dir_of

    config = load_config(None, tiny_sets(tiny_simulation, tmp_path / "work"))
    run_dir = run_dir_of(config)
    run_dir.mkdir(parents=True)
    holder = _holder(run_dir)
    try:
        with pytest.raises(RunInUseError, match=r"the imputation merge writes one run at a time"):
            merge_imputation(config, [[0, 1, 2]])
    finally:
        holder.kill()
        holder.wait()
    assert not (run_dir / "report").exists()
