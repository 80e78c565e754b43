"""The SLURM backend: partitions from ``sinfo``, jobs through submitit's SLURM executor (in an Apptainer
image when ``cluster.container`` is set), the queue read with ``squeue``.

Requeue inside a container: images rarely hold ``scontrol`` or the munge socket, so the job cannot
requeue itself. Every sbatch script therefore carries a host-side EXIT trap (``_requeue_trap``): a job
that finds no ``scontrol`` writes a request file instead (``rag_hpc.slurm_env``, the job environment
plugin), and the batch shell, on the host, outside the image, requeues the job once the step has ended.
With ``scontrol`` present, submitit's own path is used.

One launch at a time per workdir (``launch.lock``) checks the queue and submits.
"""

from __future__ import annotations

# status is imported when a launch prints it (rag_hpc.status imports the launch's record module).
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from rag_hpc.config import RagConfig
from rag_hpc.launch.core import (
    Backend,
    JobSpec,
    LaunchError,
    LaunchOptions,
    _timeout_min,
    ensure_data,
    submit,
    wait,
)
from rag_hpc.locks import LockBusy, describe, hold
from rag_hpc.runs import read_records
from rag_hpc.slurm_env import REQUEUE_ENV

LAUNCH_LOCK = "launch.lock"  # held while one launch checks the queue and submits
LAUNCH_LOCK_WAIT_S = 600.0
ATTACH_POLL_S = 5.0
# Overridable so tests can stand in for apptainer (not installable here) with a wrapper script.
APPTAINER_ENV = "RAG_HPC_APPTAINER"


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


@dataclass(frozen=True)
class PartitionInfo:
    name: str
    mem_per_node: int | None  # bytes; None when SLURM does not know it
    gpus_per_node: int
    time_limit: str


def _sinfo_partitions() -> list[str]:
    """Partition names as sinfo lists them, the default one marked with a trailing '*'."""
    out = _run(["sinfo", "-h", "-o", "%P"])
    if out.returncode != 0:
        raise LaunchError(f"sinfo failed: {out.stderr.strip()}")
    return [p for p in out.stdout.split() if p.strip()]


def slurm_partitions() -> list[str]:
    return sorted({p.rstrip("*") for p in _sinfo_partitions()})


def default_partition() -> str:
    listed = _sinfo_partitions()
    if not listed:
        raise LaunchError("sinfo lists no partition")
    return next((p for p in listed if p.endswith("*")), sorted(listed)[0]).rstrip("*")


def _gres_gpus(gres: str) -> int:
    total = 0
    for item in gres.split(","):
        fields = item.split("(")[0].split(":")
        if fields[0] == "gpu" and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def partition_info(name: str) -> PartitionInfo:
    out = _run(["sinfo", "-p", name, "-h", "-o", "%m %G %l"])
    lines = [x for x in out.stdout.splitlines() if x.strip()]
    if out.returncode != 0 or not lines:
        raise LaunchError(
            f"partition {name!r} does not exist; partitions here: {', '.join(slurm_partitions())}: "
            "pass one of them with --partition (or cluster.partition)"
        )
    mems, gpus, limit = [], [], "infinite"
    for line in lines:
        mem, gres, limit = ([*line.split(), "", "", ""])[:3]
        if mem.rstrip("+").isdigit():
            mems.append(int(mem.rstrip("+")) * 2**20)
        gpus.append(_gres_gpus(gres))
    # The smallest node bounds what a job can be sure to get.
    return PartitionInfo(name, min(mems) if mems else None, min(gpus) if gpus else 0, limit)


def slurm_target(partition: str | None, gpus_per_node: int) -> PartitionInfo:
    """The partition jobs go to (the cluster's default when None), checked against the GPUs per node asked for."""
    if shutil.which("sbatch") is None:
        raise LaunchError("--cluster slurm but sbatch is not on PATH")
    info = partition_info(partition or default_partition())
    if gpus_per_node > info.gpus_per_node:
        raise LaunchError(
            f"--gpus-per-node {gpus_per_node}, but nodes of partition {info.name} have {info.gpus_per_node} GPU(s): "
            f"ask for at most {info.gpus_per_node}, or pick a partition with bigger nodes (--partition)"
        )
    return info


def max_array_size() -> int:
    for line in _run(["scontrol", "show", "config"]).stdout.splitlines():
        if line.startswith("MaxArraySize"):
            return int(line.split("=")[1])
    return 1001


def container_python(image: Path, binds: Sequence[Path], apptainer: str | None = None) -> str:
    """The command submitit runs instead of ``python``: apptainer exec in the image, with every
    path the job touches bound at the same place. Quoted: paths may hold spaces or ';'."""
    exe = apptainer or os.environ.get(APPTAINER_ENV) or "apptainer"
    unique = list(dict.fromkeys(str(Path(b).absolute()) for b in binds))
    parts = [exe, "exec", "--nv"]
    for b in unique:
        parts += ["--bind", f"{b}:{b}"]
    parts += [str(Path(image).absolute()), "python"]
    return " ".join(shlex.quote(p) for p in parts)


def _requeue_trap(folder: Path) -> list[str]:
    request = shlex.quote(str(folder.absolute())) + '/requeue-"$SLURM_JOB_ID"'
    return [
        f"export {REQUEUE_ENV}={request}",
        f'trap \'if [ -e "${REQUEUE_ENV}" ]; then rm -f "${REQUEUE_ENV}"; '
        f'scontrol requeue "$SLURM_JOB_ID" && echo "rag_hpc: requeued $SLURM_JOB_ID from the host"; fi\' EXIT',
    ]


class SlurmBackend(Backend):
    """sbatch through submitit: memory, partition, GPUs and ``afterok`` dependencies per job."""

    cluster = "slurm"

    def target(self, config: RagConfig, opts: LaunchOptions) -> tuple[str | None, int | None]:
        info = slurm_target(opts.partition or config.cluster.partition, config.cluster.gpus_per_node)
        return info.name, opts.mem or info.mem_per_node

    def executor(self, config: RagConfig, opts: LaunchOptions, folder: Path, job: JobSpec) -> submitit.AutoExecutor:
        c = config.cluster
        kwargs: dict[str, Any] = {"slurm_max_num_timeout": opts.max_timeouts}
        if c.container is not None:
            binds = [config.paths.workdir, config.paths.cache, folder, config.train.resolved_run_dir(config.paths.workdir)]
            for _, one in config.genome():  # every chromosome's files
                d = one.data
                binds += [one.panel_h5.parent] + [
                    Path(p).parent for p in (d.panel_vcf, d.populations, d.targets_vcf, d.truth_vcf) if p is not None
                ]
            # A constructor argument of AutoExecutor, not an update_parameters one.
            kwargs["slurm_python"] = container_python(c.container, binds)
        executor = self.base_executor(config, opts, folder, job.name, **kwargs)
        setup = [f"export OMP_NUM_THREADS={opts.cpus_per_task}", *_requeue_trap(folder)]
        if c.container is None:
            # Jobs unpickle functions by reference: the package must import on the node.
            root = str(Path(__file__).resolve().parents[2])
            setup.insert(0, f"export PYTHONPATH={shlex.quote(root)}${{PYTHONPATH:+:$PYTHONPATH}}")
        limit = _timeout_min(c.time) * 60
        params: dict[str, Any] = {
            "slurm_partition": job.partition or opts.partition,
            "slurm_setup": setup,
            "slurm_mem": f"{job.mem_mb}M",
            # submitit's default 90 s warning would exceed short limits; a third of the limit leaves the run time to work.
            "slurm_signal_delay_s": min(90, max(10, limit // 3)),
            "nodes": job.nodes,
            "tasks_per_node": job.tasks_per_node,
        }
        if c.account:
            params["slurm_account"] = c.account
        if c.qos:
            params["slurm_qos"] = c.qos
        if job.gpus:
            params["slurm_gpus_per_node"] = job.gpus
        if job.array_parallelism:
            params["slurm_array_parallelism"] = job.array_parallelism
        if job.after:
            params["slurm_additional_parameters"] = {"dependency": "afterok:" + ":".join(job.after), "kill_on_invalid_dep": "yes"}
        executor.update_parameters(**params)
        return executor

    def max_array_size(self) -> int:
        return max_array_size()

    def in_flight(self, records: list[dict[str, Any]], cache: Path) -> dict[tuple[int, str], str]:
        return _windows_in_flight(records, cache)


def queued_jobs(job_ids: Sequence[str]) -> dict[str, str]:
    """Which of our ``job_ids`` (plain jobs or whole arrays) are still in the queue: id -> state(s).

    Read from this user's whole queue, not ``squeue -j``, which fails outright when one id is gone;
    only jobs named ``rag_hpc-*`` count, since job ids restart on a cluster with a fresh state."""
    wanted = set(job_ids)
    if not wanted:
        return {}
    out = _run(["squeue", "-h", "--me", "-o", "%F|%i|%T|%j"])
    if out.returncode != 0:
        raise LaunchError(f"squeue failed ({out.stderr.strip()}): cannot tell whether jobs of this run are still queued")
    found: dict[str, set[str]] = {}
    for line in out.stdout.splitlines():
        array_job, jid, state, name = ([*line.split("|"), "", "", "", ""])[:4]
        if name.startswith("rag_hpc-"):
            for j in {jid, array_job} & wanted:
                found.setdefault(j, set()).add(state)
    return {j: "/".join(sorted(states)) for j, states in found.items()}


def _job_order(job_id: str) -> tuple[int, str]:
    head, _, tail = job_id.partition("_")
    return int(head) if head.isdigit() else 0, tail


def _listing(jobs: dict[str, str], states: dict[str, str]) -> str:
    """'index array 12 (PENDING), training job 13 (PENDING)': ``states``' jobs by id, named by ``jobs``."""
    return ", ".join(f"{jobs[j]} {j} ({states[j]})" for j in sorted(states, key=_job_order))


def _jobs_of_run(records: list[dict[str, Any]], run_dir: Path) -> dict[str, str]:
    """job id -> what it is, for every job any launch of ``run_dir`` submitted."""
    jobs: dict[str, str] = {}
    for r in records:
        if Path(r.get("run_dir", "")) == run_dir:
            jobs.update(dict.fromkeys(r.get("phase_ids", []), "phase job"))
            jobs.update(dict.fromkeys(r.get("array_ids", []), "index array"))
            if r.get("train_id"):
                jobs[r["train_id"]] = "training job"
            jobs.update(dict.fromkeys(r.get("impute_ids", []), "imputation array"))
            if r.get("merge_id"):
                jobs[r["merge_id"]] = "merge job"
    return jobs


def _windows_in_flight(records: list[dict[str, Any]], cache: Path) -> dict[tuple[int, str], str]:
    """(window, artifact-key digest) -> the still-queued array of an earlier launch that builds it."""
    building = {
        (int(w), digest): aid
        for r in records
        if r.get("cache") == str(cache)
        for aid, windows in r.get("array_windows", {}).items()
        for w, digest in windows.items()
    }
    queued = queued_jobs(sorted(set(building.values())))
    return {key: aid for key, aid in building.items() if aid in queued}


def _attach(jobs: dict[str, str], queued: dict[str, str], workdir: Path, log: Any) -> dict[str, Any]:
    """Wait for the queued jobs of this run instead of submitting; returns the newest record of the run."""
    from rag_hpc.status import job_states, render, run_status

    log(f"attached (nothing submitted): {_listing(jobs, queued)}")
    while queued:
        time.sleep(ATTACH_POLL_S)
        now = queued_jobs(sorted(jobs))
        if now != queued:
            log(f"  {_listing(jobs, now) or 'all left the queue'}")
        queued = now
    record = next(r for r in reversed(read_records(workdir)) if r.get("train_id") in jobs)
    log(render(run_status(record)))
    return {**record, "attached": True, "train_state": job_states([record["train_id"]]).get(record["train_id"], "unknown")}


def launch_slurm(config: RagConfig, opts: LaunchOptions, log: Any = print) -> dict[str, Any]:
    """Prepare the data, guard, then submit the job graph (``submit``); returns the run record.

    On SLURM one launch at a time per workdir (``launch.lock``) checks the queue and submits, so two
    launches of one run pressed seconds apart cannot both submit: the second finds the first's jobs
    queued and refuses (or, with ``attach``, waits for them). Windows that a queued array of another
    launch is building (same cache, same artifact keys) are not submitted again: training depends
    on that array instead."""
    workdir = config.paths.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with hold(workdir / LAUNCH_LOCK, wait_s=LAUNCH_LOCK_WAIT_S):
            records = read_records(workdir)
            run_dir = config.train.resolved_run_dir(workdir)
            jobs = _jobs_of_run(records, run_dir)
            queued = queued_jobs(sorted(jobs))
            if queued and not opts.attach:
                order = sorted(queued, key=_job_order)
                raise LaunchError(
                    f"run {run_dir} already has {_listing(jobs, queued)} in the queue, which would write the same checkpoints: "
                    f"watch it (`python -m rag_hpc.status --workdir {shlex.quote(str(workdir))}`), wait for it (launch --attach), "
                    f"or cancel it first (`scancel {' '.join(order)}`)"
                )
            if queued:
                return _attach(jobs, queued, workdir, log)
            # Under the lock: a second launch pressed at once must not prepare the same panel beside it.
            record, submitted = submit(ensure_data(config, log, in_jobs=True), opts, SlurmBackend(), log, records)
    except LockBusy as exc:
        raise LaunchError(
            f"another launch in {workdir} has been submitting for {LAUNCH_LOCK_WAIT_S:.0f} s ({describe(exc.holder)}): "
            f"let it finish, or stop it, then launch again"
        ) from None
    return wait(record, submitted, opts, log)
