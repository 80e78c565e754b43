"""``python -m rag_hpc.launch``: the whole pipeline as SLURM jobs (or on this machine).

    data (demo panel when none is given) -> memory guard -> index prebuild array -> training job

The prebuild array holds only windows whose cached artifacts are not all valid; the training job
depends on it with ``afterok`` and ``kill_on_invalid_dep`` so a failed task cancels training instead
of leaving it pending forever. Training is a submitit ``Checkpointable``: preemption (SIGUSR2) and the
time limit checkpoint to disk and requeue; the requeued job resumes from the newest checkpoint in the
run dir, never from pickled state.

Requeue inside a container: images rarely hold ``scontrol`` or the munge socket, so the job cannot
requeue itself. Every sbatch script therefore carries a host-side EXIT trap: a job that finds no
``scontrol`` writes a request file instead, and the batch shell (on the host, outside the image)
requeues the job once the step has ended. With ``scontrol`` present, submitit's own path is used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from rag_hpc.cli import add_config_args, config_from_args, run_main
from rag_hpc.config import RagConfig, load_config
from rag_hpc.errors import ClusterError, InputError
from rag_hpc.guard import Budget, Estimate, Plan, check, estimate, parse_bytes, plan_for, render
from rag_hpc.locks import LockBusy, describe, hold
from rag_hpc.slurm_env import REQUEUE_ENV

RUN_RECORD = "launch.json"
LAUNCH_LOCK = "launch.lock"  # held while one launch checks the queue and submits
LAUNCH_LOCK_WAIT_S = 600.0
ATTACH_POLL_S = 5.0
# Overridable so tests can stand in for apptainer (not installable here) with a wrapper script.
APPTAINER_ENV = "RAG_HPC_APPTAINER"
DEMO_SEED = 1
# The demo must run end to end in minutes on 2 CPU cores; applied only when no config file is given
# and the simulated demo panel is used; --set still wins.
DEMO_OVERRIDES: dict[str, Any] = {
    "windows": {"window_size": 255},
    "donors": {"train_samples": 128},
    "model": {"dims": 16, "layers": 1, "k": 16},
    "index": {"windows_per_task": 4},
    "train": {
        "batch_size": 32,
        "epochs": 1,
        "warmup_steps": 20,
        "lr": 1e-3,
        "checkpoint_every_steps": 50,
        "log_every": 20,
        "tensorboard": False,
    },
}


class LaunchError(ClusterError):
    """A launch the cluster cannot take (SLURM, partition, GPUs, memory guard, a failed job); the message says what to change."""


# ------------------------------------------------------------------------------------------------
# cluster facts


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


# ------------------------------------------------------------------------------------------------
# data


def ensure_data(config: RagConfig, log: Any = print) -> RagConfig:
    """Fill in the demo panel when none is given, and prepare the panel HDF5 when missing."""
    from rag_hpc.data.prepare import prepare_panel
    from rag_hpc.data.simulate import simulate_panel

    workdir = config.paths.workdir.absolute()
    config.paths.workdir = workdir
    if config.data.panel_vcf is None and config.data.panel_h5 is None:
        demo = simulate_panel(workdir / "demo" / config.data.demo_preset, config.data.demo_preset, DEMO_SEED, verbose=False)
        config.data.panel_vcf = demo / "panel.vcf.gz"
        config.data.populations = demo / "populations.tsv"
        config.data.targets_vcf = config.data.targets_vcf or demo / "targets.array.vcf.gz"
        config.data.truth_vcf = config.data.truth_vcf or demo / "targets.truth.vcf.gz"
        log(f"demo panel: {demo}")
    if not config.panel_h5.exists():
        if config.data.panel_vcf is None:
            raise InputError(
                f"data.panel_h5 {config.panel_h5} does not exist and data.panel_vcf is not set: "
                "set data.panel_vcf (the VCF to prepare), or point data.panel_h5 at a prepared panel"
            )
        t0 = time.perf_counter()
        prepare_panel(
            config.data.panel_vcf,
            config.panel_h5,
            config.data.populations,
            config.data.val_fraction,
            config.data.split_seed,
            config.data.skip_non_snps,
        )
        log(f"prepared {config.panel_h5} in {time.perf_counter() - t0:.1f} s")
    return config


def uncached_windows(config: RagConfig) -> tuple[dict[int, str], int]:
    """({window id: digest of its artifact keys} for windows with any invalid or missing artifact,
    number of windows). The digest tells whether another launch builds exactly these artifacts. A
    donor-table part counts as an artifact of the first window of its prebuild task, so a launch whose
    windows are cached but whose tables are not (another array, more training samples) still submits the
    tasks that compute them, and training only reads."""
    from rag_hpc.index.build import WindowCache
    from rag_hpc.index.donors import part_artifacts

    cache = WindowCache(config)
    try:
        todo = {}
        per_task = config.index.windows_per_task
        parts = part_artifacts(cache)
        for w in cache.windows:
            artifacts = list(cache.artifacts(w).values()) + (parts[w.id // per_task] if w.id % per_task == 0 else [])
            if any(cache.store.problem(a) is not None for a in artifacts):
                keys = "".join(sorted(a.key for a in artifacts))
                todo[w.id] = hashlib.sha256(keys.encode()).hexdigest()[:16]
        return todo, len(cache.windows)
    finally:
        cache.panel.close()


# ------------------------------------------------------------------------------------------------
# memory guard


@dataclass
class GuardResult:
    plan: Plan
    estimate: Estimate
    budget: Budget
    table: str
    ok: bool
    index_mem_mb: int
    train_mem_mb: int
    impute_mem_mb: int


def _disk_free(path: Path) -> int:
    import psutil

    probe = path.absolute()
    while not probe.exists():
        probe = probe.parent
    return int(psutil.disk_usage(str(probe)).free)


def run_guard(
    config: RagConfig, n_cached: int, mem: int | None, gpu_mem: int | None, tasks_per_node: int, cpus_per_task: int = 1
) -> GuardResult:
    from rag_hpc.data.panel import Panel

    with Panel(config.panel_h5) as panel:
        plan = plan_for(config, panel, n_cached, tasks_per_node, cpus_per_task)
    est = estimate(plan)
    # Every training rank of a node shares the node's memory.
    node_train = Estimate(**{**est.__dict__, "train_host_ram": est.train_host_ram * tasks_per_node})
    budget = Budget(mem=mem, disk_free=_disk_free(config.paths.cache), gpu_mem=gpu_mem)
    rows = check(plan, node_train, budget)
    # Headroom over the estimate: allocator fragmentation and library buffers the model leaves out.
    index_mb = math.ceil(est.index_task_ram * 1.5 / 2**20)
    train_mb = math.ceil(node_train.train_host_ram * 1.5 / 2**20)
    impute_mb = math.ceil(est.impute_task_ram * 1.5 / 2**20)
    ok = all(r.ok for r in rows)
    return GuardResult(plan, node_train, budget, render(plan, node_train, rows), ok, index_mb, train_mb, impute_mb)


# ------------------------------------------------------------------------------------------------
# what runs inside jobs


def build_window_range(config: RagConfig, window_ids: list[int]) -> dict[str, Any]:
    """One array task: build (or find cached) every artifact of ``window_ids`` and their donor-table parts."""
    from rag_hpc.index.build import prebuild

    t0 = time.perf_counter()
    done = prebuild(config, window_ids, progress=False)
    return {
        "windows": window_ids,
        "built": [r.window_id for r in done.windows if r.status == "built"],
        "donor_parts_built": done.donor_parts_built,
        "seconds": round(time.perf_counter() - t0, 2),
    }


class ImputeRangeJob(submitit.helpers.Checkpointable):
    """One imputation array task: the model's records of a range of windows, one content-addressed part
    (``rag_hpc.impute.impute_range``). Requeued as it stands on preemption or a time limit (submitit's
    default ``checkpoint``): the part is committed atomically, so a rerun redoes the range or finds it."""

    def __call__(self, config: RagConfig, window_ids: list[int]) -> str:
        from rag_hpc.impute import impute_range, load_model_predictor

        assert config.data.targets_vcf is not None  # submitted only with targets
        predictor = load_model_predictor(run_dir_of(config), config)
        status = impute_range(config, predictor, config.data.targets_vcf, window_ids)
        return f"windows {window_ids[0]}-{window_ids[-1]}: {status}"


def merge_imputation(config: RagConfig, ranges: list[list[int]]) -> dict[str, str]:
    """The merge job: the imputation array's ranges into ``<run>/report/imputed.vcf.gz`` (+ .tbi), then the
    report when the config names the truth. It writes the run's report as the run's one writer (a trainer
    started on the run meanwhile is refused, and this job is refused while one trains); the array's tasks
    write only their content-addressed ranges, each under its own lock, so they run side by side."""
    from rag_hpc.impute import load_model_predictor, merge_ranges
    from rag_hpc.locks import one_writer

    assert config.data.targets_vcf is not None
    run_dir = run_dir_of(config)
    out = run_dir / "report" / "imputed.vcf.gz"
    with one_writer(run_dir, "the imputation merge"):
        merge_ranges(config, load_model_predictor(run_dir, config), config.data.targets_vcf, out, ranges)
        return {key: str(path) for key, path in report(config, out).items()}


def run_dir_of(config: RagConfig) -> Path:
    return config.train.resolved_run_dir(config.paths.workdir)


def report(config: RagConfig, imputed: Path, log: Any = None) -> dict[str, Path]:
    """An imputed VCF's evaluation (when the config names the truth) and the loss curve, beside it."""
    from rag_hpc.evaluate import evaluate, write_report
    from rag_hpc.train.metrics import plot_loss_curve

    files: dict[str, Path] = {
        "imputed": imputed,
        "loss_curve": plot_loss_curve(run_dir_of(config), imputed.parent / "loss_curve.png"),
    }
    if config.data.truth_vcf is None:
        return files
    title = "Imputation accuracy (model)"
    evaluation = evaluate(imputed, config.data.truth_vcf, config.panel_h5, exclude_sites_vcf=config.data.targets_vcf)
    files.update(write_report(evaluation, imputed.parent, title=title))
    if log is not None:
        log(evaluation.markdown(title))
    return files


class TrainJob(submitit.helpers.Checkpointable):
    """Training as a requeueable job. Holds only the config: progress lives in the run dir's
    checkpoints, so the resubmitted copy of this object resumes from whatever is newest on disk."""

    def __init__(self, config: RagConfig):
        self.config = config

    def __call__(self) -> str:
        from rag_hpc.train import train

        if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=self.config.cluster.gpus_per_node > 0)
        checkpoint = train(self.config)
        # Done: a time-limit or preemption signal from now on must not kill the process (the job
        # would read FAILED) nor requeue a finished run.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        return str(checkpoint)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # train() has already written the checkpoint on SIGUSR2 before chaining to submitit's
        # handler, which calls this; the request only matters if that handler ran first.
        from rag_hpc.train import request_checkpoint

        request_checkpoint(stop=True, reason="submitit checkpoint")
        return submitit.helpers.DelayedSubmission(TrainJob(self.config))


# ------------------------------------------------------------------------------------------------
# executors


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


def _timeout_min(time_spec: str) -> int:
    """SLURM time formats ('30', 'MM:SS', 'HH:MM:SS', 'D-HH:MM:SS') -> whole minutes, >= 1."""
    days = 0
    if "-" in time_spec:
        d, time_spec = time_spec.split("-", 1)
        days = int(d)
    parts = [int(p) for p in time_spec.split(":")]
    if len(parts) == 1:
        minutes = parts[0]
    elif len(parts) == 2:
        minutes = parts[0] + math.ceil(parts[1] / 60)
    else:
        minutes = parts[0] * 60 + parts[1] + math.ceil(parts[2] / 60)
    return max(1, days * 1440 + minutes)


@dataclass
class LaunchOptions:
    cluster: str
    partition: str | None = None
    wait: bool = False
    dry_run: bool = False
    mem: int | None = None
    gpu_mem: int | None = None
    cpus_per_task: int = 1
    signal_delay_s: int | None = None
    # Requeues at the time limit before submitit gives up; a long training run under a short
    # partition limit legitimately needs many.
    max_timeouts: int = 10
    attach: bool = False  # jobs of this run already queued: wait for them instead of refusing
    extra: dict[str, Any] = field(default_factory=dict)


def _executor(config: RagConfig, opts: LaunchOptions, folder: Path, name: str) -> submitit.AutoExecutor:
    c = config.cluster
    kwargs: dict[str, Any] = {}
    if opts.cluster == "slurm" and c.container is not None:
        binds = [
            config.paths.workdir,
            config.paths.cache,
            folder,
            config.panel_h5.parent,
            config.train.resolved_run_dir(config.paths.workdir),
        ]
        binds += [
            Path(p).parent
            for p in (config.data.panel_vcf, config.data.populations, config.data.targets_vcf, config.data.truth_vcf)
            if p is not None
        ]
        # A constructor argument of AutoExecutor, not an update_parameters one.
        kwargs["slurm_python"] = container_python(c.container, binds)
    if opts.cluster == "slurm":
        kwargs["slurm_max_num_timeout"] = opts.max_timeouts
    executor = submitit.AutoExecutor(folder=folder, cluster=opts.cluster, **kwargs)
    params: dict[str, Any] = {"name": name, "timeout_min": _timeout_min(c.time), "cpus_per_task": opts.cpus_per_task}
    if opts.cluster == "slurm":
        setup = [f"export OMP_NUM_THREADS={opts.cpus_per_task}", *_requeue_trap(folder)]
        if c.container is None:
            # Jobs unpickle functions by reference: the package must import on the node.
            root = str(Path(__file__).resolve().parents[1])
            setup.insert(0, f"export PYTHONPATH={shlex.quote(root)}${{PYTHONPATH:+:$PYTHONPATH}}")
        params.update(slurm_partition=opts.partition, slurm_setup=setup)
        if c.account:
            params["slurm_account"] = c.account
        if c.qos:
            params["slurm_qos"] = c.qos
        limit = params["timeout_min"] * 60
        # submitit's default 90 s warning would exceed short limits; a third of the limit leaves the run time to work.
        params["slurm_signal_delay_s"] = opts.signal_delay_s or min(90, max(10, limit // 3))
    executor.update_parameters(**params)
    return executor


# ------------------------------------------------------------------------------------------------
# the launch


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def read_records(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / RUN_RECORD
    return json.loads(path.read_text()) if path.exists() else []


def _record(workdir: Path, record: dict[str, Any]) -> Path:
    path = workdir / RUN_RECORD
    runs = [*read_records(workdir), record]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(runs, indent=2) + "\n")
    os.replace(tmp, path)
    return path


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
    """Prepare the data, guard, then submit the prebuild array and the training job; returns the run record.

    On SLURM one launch at a time per workdir (``launch.lock``) checks the queue and submits, so two
    launches of one run pressed seconds apart cannot both submit: the second finds the first's jobs
    queued and refuses (or, with ``attach``, waits for them). Windows that a queued array of another
    launch is building (same cache, same artifact keys) are not submitted again: training depends
    on that array instead."""
    workdir = config.paths.workdir.absolute()
    if opts.cluster != "slurm":
        record, submitted = _submit(ensure_data(config, log), opts, log, [])
        return _wait(record, submitted, opts, log)
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
            record, submitted = _submit(ensure_data(config, log), opts, log, records)
    except LockBusy as exc:
        raise LaunchError(
            f"another launch in {workdir} has been submitting for {LAUNCH_LOCK_WAIT_S:.0f} s ({describe(exc.holder)}): "
            f"let it finish, or stop it, then launch again"
        ) from None
    return _wait(record, submitted, opts, log)


def _submit(config: RagConfig, opts: LaunchOptions, log: Any, records: list[dict[str, Any]]) -> tuple[dict[str, Any], list[Any]]:
    from rag_hpc.data.windows import window_ranges

    c = config.cluster
    info = slurm_target(opts.partition or c.partition, c.gpus_per_node) if opts.cluster == "slurm" else None
    partition = info.name if info is not None else opts.partition or c.partition
    opts.partition = partition
    tasks_per_node = max(1, c.gpus_per_node)
    todo, n_windows = uncached_windows(config)
    if info is None:
        import psutil

        mem = opts.mem or psutil.virtual_memory().total  # debug: everything runs in this process
    else:
        mem = opts.mem or info.mem_per_node
    guard = run_guard(config, n_windows - len(todo), mem, opts.gpu_mem, tasks_per_node, opts.cpus_per_task)
    log(guard.table)
    if not guard.ok:
        raise LaunchError("memory guard: over budget (OVER rows above); nothing was submitted")

    workdir = config.paths.workdir
    in_flight = _windows_in_flight(records, config.paths.cache) if opts.cluster == "slurm" else {}
    shared = {w: in_flight[(w, digest)] for w, digest in todo.items() if (w, digest) in in_flight}
    build = [w for w in todo if w not in shared]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = workdir / "submitit" / stamp
    groups = window_ranges(build, config.index.windows_per_task)
    record: dict[str, Any] = {
        "time": stamp,
        "cluster": opts.cluster,
        "partition": partition,
        "folder": str(folder),
        "run_dir": str(config.train.resolved_run_dir(workdir)),
        "cache": str(config.paths.cache),
        "windows_total": n_windows,
        "windows_todo": len(build),
        "array_ids": [],
        "array_tasks": 0,
        "array_windows": {},
        "depends_on": sorted(set(shared.values())),
        "train_id": None,
        "index_mem_mb": guard.index_mem_mb,
        "train_mem_mb": guard.train_mem_mb,
        "config": config.model_dump(mode="json"),
    }
    if opts.dry_run:
        log(
            f"dry run: would submit {len(groups)} array task(s) over {len(build)} uncached window(s) of {n_windows}, then training"
        )
        return record, []

    arrays = []
    if groups:
        ex = _executor(config, opts, folder, "rag_hpc-index")
        if opts.cluster == "slurm":
            ex.update_parameters(slurm_array_parallelism=c.array_parallelism, slurm_mem=f"{guard.index_mem_mb}M")
        for chunk in _chunks(groups, max_array_size() if opts.cluster == "slurm" else len(groups)):
            jobs = ex.map_array(build_window_range, [config] * len(chunk), chunk)
            arrays.append(jobs)
            array_id = jobs[0].job_id.split("_")[0]
            record["array_ids"].append(array_id)
            record["array_windows"][array_id] = {str(w): todo[w] for group in chunk for w in group}
        record["array_tasks"] = len(groups)
    ex = _executor(config, opts, folder, "rag_hpc-train")
    params: dict[str, Any] = {"nodes": c.nodes, "tasks_per_node": tasks_per_node}
    if opts.cluster == "slurm":
        extra = dict(opts.extra)
        after = [*record["array_ids"], *record["depends_on"]]
        if after:
            extra.update(dependency="afterok:" + ":".join(after), kill_on_invalid_dep="yes")
        params.update(slurm_mem=f"{guard.train_mem_mb}M", slurm_additional_parameters=extra)
        if c.gpus_per_node:
            params["slurm_gpus_per_node"] = c.gpus_per_node
    ex.update_parameters(**params)
    train_job = ex.submit(TrainJob(config))
    record["train_id"] = train_job.job_id
    impute_arrays, merge_job = _submit_imputation(config, opts, folder, n_windows, guard, record)
    _record(workdir, record)
    log(
        f"index array: {', '.join(record['array_ids']) or 'none (all windows cached)'} "
        f"({record['array_tasks']} task(s), {len(build)}/{n_windows} windows to build, --mem {guard.index_mem_mb}M each)"
    )
    if shared:
        log(
            f"  {len(shared)} more window(s) are being built by queued array(s) {', '.join(record['depends_on'])} "
            "of an earlier launch: training waits for them instead"
        )
    log(f"training job: {train_job.job_id} ({c.nodes} node(s) x {tasks_per_node} task(s), --mem {guard.train_mem_mb}M)")
    log(f"logs: {folder}/%A_%a_0_log.out (array), {folder}/%j_0_log.out (training)")
    if merge_job is not None:
        log(
            f"imputation array: {', '.join(record['impute_ids'])} ({record['impute_tasks']} task(s) of "
            f"{config.impute.windows_per_task} windows, --mem {guard.impute_mem_mb}M each) after training; merge job "
            f"{merge_job.job_id} -> {run_dir_of(config) / 'report' / 'imputed.vcf.gz'}"
        )
    log(f"cache: {config.paths.cache}")
    log(f"watch: python -m rag_hpc.status --workdir {shlex.quote(str(workdir))}")
    return record, [arrays, train_job, impute_arrays, merge_job]


def _submit_imputation(
    config: RagConfig, opts: LaunchOptions, folder: Path, n_windows: int, guard: GuardResult, record: dict[str, Any]
) -> tuple[list[Any], Any]:
    """With targets: the imputation array after training (afterok) and the merge after the array."""
    from rag_hpc.data.windows import window_ranges

    record.update(impute_ids=[], impute_tasks=0, merge_id=None)
    if config.data.targets_vcf is None:
        return [], None
    ranges = window_ranges(list(range(n_windows)), config.impute.windows_per_task)
    slurm = opts.cluster == "slurm"

    def executor(name: str, after: list[str]) -> submitit.AutoExecutor:
        ex = _executor(config, opts, folder, name)
        if slurm:
            params: dict[str, Any] = {
                "slurm_mem": f"{guard.impute_mem_mb}M",
                "slurm_additional_parameters": {"dependency": "afterok:" + ":".join(after), "kill_on_invalid_dep": "yes"},
            }
            if config.impute.partition:
                params["slurm_partition"] = config.impute.partition
            if config.impute.gpus:
                params["slurm_gpus_per_node"] = config.impute.gpus
            ex.update_parameters(**params)
        return ex

    ex = executor("rag_hpc-impute", [record["train_id"]])
    if slurm:
        ex.update_parameters(slurm_array_parallelism=config.cluster.array_parallelism)
    arrays = []
    for chunk in _chunks(ranges, max_array_size() if slurm else len(ranges)):
        jobs = ex.map_array(ImputeRangeJob(), [config] * len(chunk), chunk)
        arrays.append(jobs)
        record["impute_ids"].append(jobs[0].job_id.split("_")[0])
    record["impute_tasks"] = len(ranges)
    merge_job = executor("rag_hpc-merge", record["impute_ids"]).submit(merge_imputation, config, ranges)
    record["merge_id"] = merge_job.job_id
    return arrays, merge_job


def _wait(record: dict[str, Any], submitted: list[Any], opts: LaunchOptions, log: Any) -> dict[str, Any]:
    """With ``opts.wait``: block until the jobs end (outside the launch lock); raise if training failed."""
    if not opts.wait or not submitted:
        return record
    arrays, train_job, impute_arrays, merge_job = submitted
    failed = []
    for jobs in arrays:
        for j in jobs:
            try:
                j.result()
            except Exception as exc:  # noqa: BLE001 - any task error is reported, with its log
                failed.append(f"index task {j.job_id} failed ({type(exc).__name__}): see {j.paths.stderr}")
    try:
        record["checkpoint"] = train_job.results()[0]
    except Exception as exc:  # noqa: BLE001 - any failure of the job is reported with its log
        why = "; ".join(failed) or f"see {train_job.paths.stderr}"
        raise LaunchError(f"training job {train_job.job_id} did not complete ({type(exc).__name__}): {why}") from None
    log(f"training finished: {record['checkpoint']}")
    if merge_job is None:
        return record
    failed = [
        f"imputation task {j.job_id} failed ({type(exc).__name__}): see {j.paths.stderr}"
        for jobs in impute_arrays
        for j in jobs
        if (exc := j.exception()) is not None
    ]
    try:
        record["report"] = merge_job.result()
    except Exception as exc:  # noqa: BLE001 - any failure of the job is reported with its log
        why = "; ".join(failed) or f"see {merge_job.paths.stderr}"
        raise LaunchError(f"merge job {merge_job.job_id} did not complete ({type(exc).__name__}): {why}") from None
    log(f"imputed: {record['report']['imputed']}")
    return record


def run_local(config: RagConfig, log: Any = print) -> dict[str, Path]:
    """The whole pipeline on this machine: prebuild -> train -> impute -> evaluate."""
    from rag_hpc.impute import impute, load_model_predictor
    from rag_hpc.index.build import prebuild
    from rag_hpc.train import train

    t0 = time.perf_counter()
    done = prebuild(config, None, progress=True)
    built = sum(r.status == "built" for r in done.windows)
    log(
        f"index: {built} window(s) built, {len(done.windows) - built} cached; donor-table parts: "
        f"{done.donor_parts_built} built, {done.donor_parts_cached} cached; in {time.perf_counter() - t0:.1f} s"
    )
    t0 = time.perf_counter()
    checkpoint = train(config)
    log(f"training: {checkpoint} in {time.perf_counter() - t0:.1f} s")
    run_dir = run_dir_of(config)
    files: dict[str, Path] = {"checkpoint": checkpoint, "metrics_csv": run_dir / "metrics.csv"}
    if config.data.targets_vcf is None:
        log("no data.targets_vcf: skipping imputation and evaluation")
        return files
    t0 = time.perf_counter()
    predictor = load_model_predictor(checkpoint, config)
    imputed = impute(config, predictor, config.data.targets_vcf, run_dir / "report" / "imputed.vcf.gz", progress=True)
    log(f"imputation: {imputed.out} in {time.perf_counter() - t0:.1f} s")
    files.update(report(config, imputed.out, log))
    for key, path in files.items():
        log(f"{key}: {path}")
    return files


# ------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rag_hpc.launch", description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.add_argument("--cluster", choices=["slurm", "local", "debug"], help="default: slurm when sbatch is on PATH, else local")
    p.add_argument("--partition", help="SLURM partition (default: cluster.partition, else the cluster's default)")
    p.add_argument("--container", type=Path, help="Apptainer image: every job runs `apptainer exec --nv ... IMAGE python`")
    p.add_argument("--dry-run", action="store_true", help="data and guard only; submit nothing")
    p.add_argument("--windows-per-task", type=int, help="windows per index array task (index.windows_per_task)")
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--time", help="time limit of each job (SLURM format: MM, HH:MM:SS, D-HH:MM:SS)")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--mem", help="memory budget per job instead of the partition's per-node memory, e.g. 64G")
    p.add_argument("--gpu-mem", help="memory per GPU for the guard, e.g. 80G (unchecked when not given)")
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--max-timeouts", type=int, default=10, help="time-limit requeues allowed per job (default 10)")
    p.add_argument("--wait", action="store_true", help="wait for the jobs to finish")
    p.add_argument(
        "--attach",
        action="store_true",
        help="when jobs of this run are already queued (a launch refuses to submit it twice), wait for them and report",
    )
    return p


def config_for_launch(args: argparse.Namespace) -> RagConfig:
    overrides = list(args.overrides)
    for flag, key in (
        ("windows_per_task", "index.windows_per_task"),
        ("nodes", "cluster.nodes"),
        ("gpus_per_node", "cluster.gpus_per_node"),
        ("time", "cluster.time"),
        ("account", "cluster.account"),
        ("qos", "cluster.qos"),
        ("partition", "cluster.partition"),
        ("container", "cluster.container"),
    ):
        value = getattr(args, flag)
        if value is not None:
            # JSON-quoted: YAML would read --time 10 as an int and a path with ': ' as a mapping.
            overrides.append(f"{key}={json.dumps(str(value)) if isinstance(value, (str, Path)) else value}")
    config = config_from_args(argparse.Namespace(config=args.config, overrides=overrides))
    no_file = args.config is None and not os.environ.get("RAG_HPC_CONFIG")
    if no_file and config.data.panel_vcf is None and config.data.panel_h5 is None:
        config = load_config(None, [*_flatten_overrides(DEMO_OVERRIDES), *overrides])
    return config


def _flatten_overrides(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _flatten_overrides(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def main(args: argparse.Namespace) -> int:
    config = config_for_launch(args)
    kind = args.cluster or config.cluster.kind or ("slurm" if shutil.which("sbatch") else "local")
    if kind == "slurm":
        # Before any data work: a wrong partition or GPU count must not first cost a panel preparation.
        slurm_target(config.cluster.partition, config.cluster.gpus_per_node)
    if kind == "local":
        import psutil
        import torch

        config = ensure_data(config)

        todo, n_windows = uncached_windows(config)
        mem = parse_bytes(args.mem) if args.mem else psutil.virtual_memory().total
        # Sized for this machine: training runs on CPU here unless it has a GPU (run_local trains on one).
        here = config.model_copy(deep=True)
        here.cluster.gpus_per_node = min(1, torch.cuda.device_count()) if config.train.device != "cpu" else 0
        cpus = len(os.sched_getaffinity(0))
        guard = run_guard(here, n_windows - len(todo), mem, parse_bytes(args.gpu_mem) if args.gpu_mem else None, 1, cpus)
        print(guard.table)
        if not guard.ok:
            print("error: memory guard: over budget on this machine (OVER rows above); nothing was run", file=sys.stderr)
            return 1
        run_local(config)
        return 0
    opts = LaunchOptions(
        cluster=kind,
        partition=args.partition or config.cluster.partition,
        wait=args.wait or kind == "debug",
        dry_run=args.dry_run,
        mem=parse_bytes(args.mem) if args.mem else None,
        gpu_mem=parse_bytes(args.gpu_mem) if args.gpu_mem else None,
        cpus_per_task=args.cpus_per_task,
        max_timeouts=args.max_timeouts,
        attach=args.attach,
    )
    record = launch_slurm(config, opts)
    if record.get("attached") and record["train_state"] != "COMPLETED":
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
