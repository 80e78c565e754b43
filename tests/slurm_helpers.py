"""Helpers for tests that submit real jobs to the single-node SLURM test cluster (slurm/up.sh) or the
two-node one (slurm/up.sh --nodes 2), and the tiny panel + tiny CPU model every launcher test runs
(``tiny_sets``).

Without a usable cluster they skip, except under CI=true, where that is a failure: CI exists to run them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").strip().lower() == "true"
USABLE = {"idle", "mixed", "allocated", "completing"}
# States that are not final (submitit.core.core.InfoWatcher.is_done, plus sacct's REQUEUED).
UNFINISHED = {"READY", "PENDING", "RUNNING", "UNKNOWN", "REQUEUED", "COMPLETING", "PREEMPTED", "CONFIGURING", "SUSPENDED"}


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"SLURM test cluster unavailable under CI=true: {reason}", pytrace=False)
    pytest.skip(f"SLURM test cluster unavailable: {reason}")


def run(cmd: list[str], timeout: float = 30, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


def node_states() -> set[str] | None:
    if shutil.which("sinfo") is None:
        return None
    try:
        out = run(["sinfo", "-h", "-N", "-o", "%T"], timeout=15)
    except subprocess.TimeoutExpired:
        return None
    states = set(out.stdout.split())
    return states if out.returncode == 0 and states else None


def healthy() -> bool:
    states = node_states()
    return bool(states) and states <= USABLE and shutil.which("sbatch") is not None


# The two-node cluster (slurm/up.sh --nodes 2): its clients find it through SLURM_CONF.
TWO_NODE_CONF = Path("/etc/slurm/two-nodes/slurm.conf")
TWO_NODES = ("rag-n1", "rag-n2")


def two_node_states() -> dict[str, str]:
    """node -> sinfo state of the two-node cluster ({} when its controller does not answer)."""
    if shutil.which("sinfo") is None or not TWO_NODE_CONF.exists():
        return {}
    try:
        out = run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=15, env={**os.environ, "SLURM_CONF": str(TWO_NODE_CONF)})
    except subprocess.TimeoutExpired:
        return {}
    return dict(line.split() for line in out.stdout.splitlines() if len(line.split()) == 2) if out.returncode == 0 else {}


def up_two_nodes() -> subprocess.CompletedProcess[str]:
    """``bash slurm/up.sh --nodes 2``: brings the two-node cluster up, or repairs it (dead slurmd, DOWN nodes)."""
    return run(["bash", str(REPO / "slurm" / "up.sh"), "--nodes", "2"], timeout=900)


def ensure_two_nodes() -> dict[str, Any]:
    """The two-node test cluster, brought up (root only) unless both nodes answer usable; skips or fails otherwise."""

    def usable(states: dict[str, str]) -> bool:
        return set(states) == set(TWO_NODES) and set(states.values()) <= USABLE

    if not usable(two_node_states()):
        if os.geteuid() != 0:
            unavailable("the two-node cluster does not answer and only root can run slurm/up.sh --nodes 2")
        try:
            up = up_two_nodes()
        except subprocess.TimeoutExpired:
            unavailable("slurm/up.sh --nodes 2 did not finish within 900 s")
        if up.returncode != 0:
            unavailable(f"slurm/up.sh --nodes 2 exited {up.returncode}:\n{up.stdout[-2000:]}\n{up.stderr[-6000:]}")
        if not usable(states := two_node_states()):
            unavailable(f"slurm/up.sh --nodes 2 succeeded but sinfo reports {states}")
    return {"conf": TWO_NODE_CONF, "nodes": TWO_NODES}


def ensure_cluster() -> dict[str, int]:
    """Brings the test cluster up when it is not answering (root only); skips or fails otherwise."""
    if not healthy():
        if os.geteuid() != 0:
            unavailable("sinfo does not answer with a usable node and only root can run slurm/up.sh")
        try:
            up = run(["bash", str(REPO / "slurm" / "up.sh")], timeout=900)
        except subprocess.TimeoutExpired:
            unavailable("slurm/up.sh did not finish within 900 s")
        if up.returncode != 0:
            unavailable(f"slurm/up.sh exited {up.returncode}:\n{up.stdout[-2000:]}\n{up.stderr[-6000:]}")
        if not healthy():
            unavailable(f"slurm/up.sh succeeded but sinfo reports {node_states()}")
    return {"cpus": int(run(["sinfo", "-h", "-N", "-o", "%c"]).stdout.split()[0])}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str | Callable[[], str], interval: float = 0.5) -> Any:
    """Polls predicate until truthy; ``what`` (or a callable describing the state at failure) names what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def sacct(job_id: str, fields: str = "JobID,State", all_runs: bool = False) -> list[list[str]]:
    cmd = ["sacct", "-n", "-X", "-P", "-o", fields, "-j", job_id] + (["-D"] if all_runs else [])
    out = run(cmd)
    assert out.returncode == 0, f"sacct failed: {out.stderr}"
    return [line.split("|") for line in out.stdout.splitlines() if line]


def state_of(job_id: str) -> str:
    rows = [r for r in sacct(job_id) if r[0] == job_id]
    return rows[-1][1].split()[0] if rows else "UNKNOWN"


def final_state(job_id: str, timeout: float) -> str:
    return wait_for(
        lambda: (s := state_of(job_id)) not in UNFINISHED and s,
        timeout,
        lambda: f"job {job_id} to finish (now {state_of(job_id)})",
    )


def squeue_ids() -> set[str]:
    return set(run(["squeue", "-h", "-o", "%i"]).stdout.split())


# ---------------------------------------------------------------- the launcher's tiny run


# The tiny CPU model every launcher and training test runs (tests/train_helpers.py too).
TINY_RUN = (
    "windows.window_size=100",
    "masks.array_density=0.1",
    "model.dims=16",
    "model.layers=2",
    "model.k=8",
    "train.batch_size=8",
    "train.warmup_steps=5",
    "train.lr=1e-3",
)


def tiny_sets(sim: Path, workdir: Path, cache: Path | None = None, epochs: int = 1, *extra: str) -> list[str]:
    return [
        f"data.panel_vcf={sim / 'panel.vcf.gz'}",
        f"data.populations={sim / 'populations.tsv'}",
        f"data.targets_vcf={sim / 'targets.array.vcf.gz'}",
        f"data.truth_vcf={sim / 'targets.truth.vcf.gz'}",
        f"paths.workdir={workdir}",
        f"paths.cache_dir={cache or workdir / 'cache'}",
        *TINY_RUN,
        f"train.epochs={epochs}",
        "train.checkpoint_every_steps=4",
        "train.log_every=5",
        "train.progress=false",
        "train.tensorboard=false",
        "cluster.gpus_per_node=0",
        *extra,
    ]


def tiny_genome_sets(genome: Path, workdir: Path, *extra: str) -> list[str]:
    """``tiny_sets`` for the two chromosomes of ``tiny_genome``: one file of each kind per chromosome."""
    return [*tiny_sets(genome / "{chrom}", workdir, None, 1, *extra), "data.chromosomes=[20, 21]"]


def as_flags(sets: list[str]) -> list[str]:
    return [x for s in sets for x in ("--set", s)]


def cli(module: str, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m rag_hpc.<module> ARGS`` as a user runs it: from the repository, one thread, no SLURM_* variables."""
    return subprocess.run(
        [sys.executable, "-m", f"rag_hpc.{module}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**plain_env(1), **(env or {})},
        cwd=REPO,
        check=False,
    )


def launcher(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return cli("launch", *args, timeout=timeout, env=env)


def train_tiny(sim: Path, workdir: Path) -> Path:
    """The tiny run trained through the CLIs (prepare, then train) in ``workdir``; returns its final checkpoint."""
    flags = as_flags(tiny_sets(sim, workdir))
    for module, args in (("prepare", ["--quiet"]), ("train", [])):
        out = cli(module, *args, *flags)
        assert out.returncode == 0, f"{module}: {out.stderr[-3000:]}"
    return Path(out.stdout.strip().splitlines()[-1])


def plain_env(threads: int) -> dict[str, str]:
    """Environment of a plain (non-SLURM) run of this package with ``threads`` CPU threads: a job with
    ``--cpus-per-task threads`` computes bit-for-bit the same. SLURM_CONF stays: it names the cluster
    the SLURM commands talk to, not a job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_")) or k == "SLURM_CONF"}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}


def fake_apptainer(folder: Path) -> Path:
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


@contextlib.contextmanager
def node_occupied(cpus: int, out: Path) -> Iterator[str]:
    """A job holding every CPU of the test node for the block, so whatever is submitted meanwhile stays
    PENDING however fast this machine is; cancelled (and gone from the queue) afterwards."""
    job = run(["sbatch", "--parsable", "-p", "gpu", "-c", str(cpus), "-J", "occupier", "-o", str(out), "--wrap", "sleep 900"])
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: state_of(job_id) == "RUNNING", 60, lambda: f"the occupying job {job_id} to run ({state_of(job_id)})")
        yield job_id
    finally:
        run(["scancel", job_id])
        wait_for(lambda: job_id not in squeue_ids(), 60, f"the occupying job {job_id} to leave the queue")


def cancel(job_ids: list[str]) -> None:
    """Cancel jobs (pending ones leave at once) and wait until none is in the queue."""
    run(["scancel", *job_ids])
    wait_for(lambda: not {j.split("_")[0] for j in squeue_ids()} & set(job_ids), 60, f"jobs {job_ids} to leave the queue")


def submit_urgent(out: Path) -> str:
    """A short job in partition ``urgent``, which preempts whatever runs in ``gpu``; returns its id."""
    urgent = run(["sbatch", "--parsable", "-p", "urgent", "-c", "1", "-o", str(out), "--wrap", "sleep 2"])
    assert urgent.returncode == 0, urgent.stderr
    return urgent.stdout.strip().split(";")[0]


# ---------------------------------------------------------------- what a launch leaves in its workdir


STEP = re.compile(r" INFO step (\d+)/\d+ ")
TOTAL = re.compile(r" epochs = (\d+) steps")
START = re.compile(r"fresh start: |resumed from .+: next step (\d+)")
STOPPED = re.compile(r"stopping at step (\d+) on (\w+);")


def kill_node(procs: list[Any], node: str, log: TrainLog, checkpoints: Any, reason: str) -> tuple[int, int, float]:
    """A node's death as the tests make it: every one of ``procs`` (the node's processes) frozen (SIGSTOP) so
    the newest committed checkpoint and the last logged step can be read as they are at the moment of death,
    then SIGKILLed, waited for, and ``node`` set DOWN, which is what slurmctld does when a node stops
    answering. Returns (checkpoint step, last logged step, time.time() at the kill)."""
    import signal

    import psutil

    for proc in procs:
        proc.send_signal(signal.SIGSTOP)
    newest = checkpoints.latest_valid()
    committed, last_step = newest.step if newest is not None else 0, log.progress(0)
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
    t_kill = time.time()

    def gone(proc: psutil.Process) -> bool:
        try:
            return proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(lambda: all(gone(p) for p in procs), 30, f"the processes of {node} to be gone")
    down = run(["scontrol", "update", f"nodename={node}", "state=down", f"reason={reason}"])
    assert down.returncode == 0, down.stderr
    return committed, last_step, t_kill


class TrainLog:
    """A run's train.log, re-read on every question: the job appends to it across requeues."""

    def __init__(self, path: Path):
        self.path = path

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.exists() else []

    def total_steps(self) -> int | None:
        found = [int(m.group(1)) for line in self.lines() if (m := TOTAL.search(line))]
        return found[0] if found else None

    def starts(self) -> list[str]:
        """One line per time training began: "fresh start" or "resumed from ..."."""
        return [line for line in self.lines() if START.search(line)]

    def progress(self, start: int) -> int | None:
        """The last step logged after the ``start``-th beginning (0: the first), None before one."""
        begun, last = -1, None
        for line in self.lines():
            if START.search(line):
                begun += 1
            elif begun == start and (m := STEP.search(line)):
                last = int(m.group(1))
        return last

    def resumed_steps(self) -> list[int]:
        return [int(m.group(1)) for line in self.starts() if (m := START.search(line)) and m.group(1)]

    def stops(self) -> list[tuple[int, str, str]]:
        """(step, signal name, line) of each checkpoint written on a signal before stopping."""
        return [(int(m.group(1)), m.group(2), line) for line in self.lines() if (m := STOPPED.search(line))]

    def finished(self) -> str | None:
        return next((line for line in self.lines() if " finished at step " in line), None)


def launch_records(workdir: Path) -> list[dict[str, Any]]:
    return json.loads((workdir / "launch.json").read_text())


def run_dir(workdir: Path) -> Path:
    return workdir / "runs" / "default"


def final_model(workdir: Path) -> dict[str, torch.Tensor]:
    import torch

    newest = max((run_dir(workdir) / "checkpoints").glob("step_*.pt"))
    return torch.load(newest, weights_only=True)["model"]


def max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def log_time(line: str) -> float:
    """Epoch seconds of a train.log line (its timestamp has whole seconds)."""
    return datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S").timestamp()
