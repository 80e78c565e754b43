"""What every backend of a launch shares: the data, the guard, the job graph and the jobs themselves.

    data -> memory guard -> index prebuild array -> training -> [imputation array -> merge]

``submit`` lays the graph out through a ``Backend`` (``rag_hpc.launch.slurm``: sbatch via submitit;
``rag_hpc.launch.local``: submitit's in-process debug executor), which says where the jobs run, what
each may use and what of the queue a launch must respect; nothing here branches on the cluster kind.
Job functions hold only the config: progress lives on disk (cache, checkpoints, imputed ranges), so a
requeued or resubmitted job resumes from whatever is newest there, never from pickled state.
"""

from __future__ import annotations

# Each stage (data, index, train, impute, evaluate) is imported inside the job or step that runs it: the
# launcher on a login node imports none of them, and a job only its own (torch only training and imputing).
import json
import math
import os
import shlex
import signal
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import submitit

from rag_hpc.config import CHROM, DataConfig, RagConfig
from rag_hpc.errors import ClusterError, InputError
from rag_hpc.fsutil import atomic_write
from rag_hpc.guard import Budget, Estimate, Plan, check, estimate, genome_plan, plan_for, render
from rag_hpc.runs import (
    Chromosome,
    chromosomes,
    imputed_vcf,
    record_launch,
    run_dir_of,
    run_record,
    uncached_windows,
)

PHASE_MEM_MB = 4096  # the phase job's --mem
DEMO_SEED = 1


class LaunchError(ClusterError):
    """A launch that cannot go ahead: the message names the problem and the fix."""


@dataclass
class LaunchOptions:
    cluster: str
    partition: str | None = None
    wait: bool = False
    dry_run: bool = False
    mem: int | None = None
    gpu_mem: int | None = None
    cpus_per_task: int = 1
    # Requeues at the time limit before submitit gives up; a long training run under a short
    # partition limit legitimately needs many.
    max_timeouts: int = 10
    attach: bool = False  # jobs of this run already queued: wait for them instead of refusing


# ------------------------------------------------------------------------------------------------
# data


def ensure_data(config: RagConfig, log: Any = print, in_jobs: bool = False) -> RagConfig:
    """Fill in the demo panel when none is given, prepare each chromosome's panel HDF5 when missing, and
    phase unphased targets (here, or with ``in_jobs`` by the launch's phase job)."""
    from rag_hpc.data.prepare import prepare_panel
    from rag_hpc.data.simulate import GENOME_PRESETS, simulate_panel

    workdir = config.paths.workdir.absolute()
    config.paths.workdir = workdir
    if config.data.panel_vcf is None and config.data.panel_h5 is None:
        preset = config.data.demo_preset
        demo = simulate_panel(workdir / "demo" / preset, preset, DEMO_SEED, verbose=False)
        files: dict[str, Any] = {}
        if preset in GENOME_PRESETS:
            chromosomes = GENOME_PRESETS[preset][1]
            files = {"chromosomes": list(chromosomes), "populations": demo / chromosomes[0] / "populations.tsv"}
            demo = demo / CHROM  # one simulation per chromosome, of the same individuals
        files = {
            "panel_vcf": demo / "panel.vcf.gz",
            "populations": demo / "populations.tsv",
            "targets_vcf": config.data.targets_vcf or demo / "targets.array.vcf.gz",
            "truth_vcf": config.data.truth_vcf or demo / "targets.truth.vcf.gz",
            **files,
        }
        # At once: the data section is validated as a whole (templated paths need the chromosome list).
        config.data = DataConfig(**{**config.data.model_dump(), **files})
        log(f"demo panel: {demo}")
    for chrom, one in config.genome():
        if one.panel_h5.exists():
            continue
        if one.data.panel_vcf is None:
            raise InputError(
                f"data.panel_h5 {one.panel_h5} does not exist and data.panel_vcf is not set: "
                "set data.panel_vcf (the VCF to prepare), or point data.panel_h5 at a prepared panel"
            )
        t0 = time.perf_counter()
        prepare_panel(
            one.data.panel_vcf,
            one.panel_h5,
            one.data.populations,
            one.data.val_fraction,
            one.data.split_seed,
            one.data.skip_non_snps,
        )
        log(f"prepared {one.panel_h5}{f' (chromosome {chrom})' if chrom else ''} in {time.perf_counter() - t0:.1f} s")
    _phase_targets(config, log, in_jobs)
    return config


def _phase_targets(config: RagConfig, log: Any, in_jobs: bool) -> None:
    """Unphased targets are phased with Beagle (``rag_hpc.phase``) before anything reads them, and the run
    reads the phased files from then on: for one chromosome the content-addressed file itself, for a genome
    <workdir>/phased/<chromosome>.vcf.gz, a link to each chromosome's (one path template for all). With
    ``in_jobs`` (a queued launch) nothing is phased here: the phased files are where the launch's phase job
    will write them (``phased_path``), and ``PLANNING`` stand-ins beside them let the launch plan first."""
    from rag_hpc.data.vcf import is_phased
    from rag_hpc.phase import is_done, phase_targets, phased_path

    genome = config.genome()
    unphased = {c for c, one in genome if one.data.targets_vcf is not None and not is_phased(one.data.targets_vcf)}
    if not unphased:
        return
    phased: dict[str | None, Path] = {}
    for chrom, one in genome:
        assert one.data.targets_vcf is not None
        if chrom not in unphased:
            phased[chrom] = one.data.targets_vcf.absolute()
        elif in_jobs:
            phased[chrom] = phased_path(one, one.data.targets_vcf)
            if not is_done(phased[chrom]):
                _planning_stand_in(one.data.targets_vcf, phased[chrom])
                log(f"{one.data.targets_vcf} is unphased: a phase job (Beagle) writes {phased[chrom]} first")
        else:
            t0 = time.perf_counter()
            phased[chrom] = phase_targets(one, one.data.targets_vcf)
            log(f"phased {one.data.targets_vcf} with Beagle in {time.perf_counter() - t0:.1f} s: {phased[chrom]}")
    config.data.targets_vcf = _one_template(config, phased, "phased")


def _one_template(config: RagConfig, files: dict[str | None, Path], name: str) -> Path:
    """The path data.targets_vcf takes for ``files`` (chromosome -> targets): the file itself for one
    chromosome, for a genome <workdir>/<name>/{chrom}.vcf.gz with a link per chromosome."""
    if config.data.chromosomes is None:
        return files[None]
    links = config.paths.workdir / name
    links.mkdir(parents=True, exist_ok=True)
    for chrom, path in files.items():
        for suffix in ("", ".tbi"):
            link = links / f"{chrom}.vcf.gz{suffix}"
            tmp = link.with_name(f".{link.name}.tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(f"{path}{suffix}")
            os.replace(tmp, link)
    return links / f"{CHROM}.vcf.gz"


PLANNING = ".planning.vcf.gz"  # beside <key>/: the unphased targets read as if phased, for planning only
_REQUEST = ".request.json"  # beside <key>/: what the phase job phases


def _planning_stand_in(unphased: Path, phased: Path) -> None:
    """The unphased targets with every genotype read as phased: the same sites, samples and genotypes, so
    the guard, the panel-overlap check and the list of windows to build can be made before the phase job
    has run. Nothing a job reads: the jobs wait for the phased file."""
    import gzip

    import pysam

    stand_in = phased.parent.with_name(phased.parent.name + PLANNING)
    stand_in.parent.mkdir(parents=True, exist_ok=True)
    text = stand_in.with_suffix(".tmp")
    with gzip.open(unphased, "rt") if unphased.suffix == ".gz" else open(unphased) as fin, open(text, "w") as fout:
        for line in fin:
            if not line.startswith("#"):
                f = line.rstrip("\n").split("\t")
                line = "\t".join([*f[:9], *(g.replace("/", "|") for g in f[9:])]) + "\n"
            fout.write(line)
    pysam.tabix_compress(str(text), str(stand_in), force=True)
    text.unlink()
    pysam.tabix_index(str(stand_in), preset="vcf", force=True)
    atomic_write(stand_in.with_name(phased.parent.name + _REQUEST), json.dumps({"targets": str(unphased.absolute())}).encode())


def phase_requests(config: RagConfig) -> list[tuple[str | None, RagConfig, Path]]:
    """(chromosome, its config, the unphased targets) for each chromosome whose phased targets a job must
    still write (``_phase_targets`` with ``in_jobs``)."""
    out = []
    for chrom, one in config.genome():
        phased = one.data.targets_vcf
        if phased is None or phased.exists():
            continue
        request = phased.resolve().parent.with_name(phased.resolve().parent.name + _REQUEST)
        if request.is_file():
            out.append((chrom, one, Path(json.loads(request.read_text())["targets"])))
    return out


def planning_config(config: RagConfig) -> RagConfig:
    """``config`` with the planning stand-in for each targets file a phase job has yet to write: what the
    launch plans with (guard, windows to build) before submitting; ``config`` itself when none waits."""
    waiting = {chrom for chrom, _, _ in phase_requests(config)}
    if not waiting:
        return config
    plan = config.model_copy(deep=True)
    files = {}
    for chrom, one in config.genome():
        assert one.data.targets_vcf is not None
        phased = one.data.targets_vcf.resolve()
        files[chrom] = phased.parent.with_name(phased.parent.name + PLANNING) if chrom in waiting else phased
    plan.data.targets_vcf = _one_template(plan, files, "phased-planning")
    return plan


def phase_job(config: RagConfig, unphased: str) -> str:
    """The phase job: one chromosome's targets phased by Beagle to where the launch's jobs read them."""
    from rag_hpc.phase import phase_targets

    return str(phase_targets(config, unphased, threads=len(os.sched_getaffinity(0))))


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
    config: RagConfig,
    uncached: Collection[int],
    mem: int | None,
    gpu_mem: int | None,
    tasks_per_node: int,
    cpus_per_task: int = 1,
) -> GuardResult:
    """The guard over every chromosome of the launch at once; ``uncached``: the windows to build (global ids)."""
    from rag_hpc.data.panel import Panel

    plans = []
    for chrom in chromosomes(config):
        cached = chrom.windows - sum(w in uncached for w in chrom.ids)
        with Panel(chrom.config.panel_h5) as panel:
            plans.append(plan_for(chrom.config, panel, cached, tasks_per_node, cpus_per_task))
    plan = genome_plan(plans, config.train.max_steps)
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
    """The merge job: the imputation array's ranges (window ids over the launch's chromosomes) into each
    chromosome's ``imputed_vcf`` (+ .tbi), then its report when the config names the truth. It writes the
    run's reports as the run's one writer (a trainer started on the run meanwhile is refused, and this job is
    refused while one trains); the array's tasks write only their content-addressed ranges, each under its
    own lock, so they run side by side."""
    from rag_hpc.impute import load_model_predictor, merge_ranges
    from rag_hpc.locks import one_writer

    assert config.data.targets_vcf is not None
    run_dir = run_dir_of(config)
    files: dict[str, str] = {}
    with one_writer(run_dir, "the imputation merge"):
        for ch in chromosomes(config):
            own = [[w - ch.offset for w in r] for r in ranges if r[0] in ch.ids]
            assert ch.config.data.targets_vcf is not None
            out = imputed_vcf(config, ch.name)
            merge_ranges(ch.config, load_model_predictor(run_dir, ch.config), ch.config.data.targets_vcf, out, own)
            prefix = "" if ch.name is None else f"{ch.name}:"
            files.update({prefix + key: str(path) for key, path in report(ch.config, out).items()})
    return files


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
# the job graph


@dataclass(frozen=True)
class JobSpec:
    """What one kind of job of the graph asks of a backend."""

    name: str
    mem_mb: int
    after: Sequence[str] = ()  # job ids that must succeed first
    partition: str | None = None  # None: the launch's
    gpus: int = 0
    nodes: int = 1
    tasks_per_node: int = 1
    array_parallelism: int | None = None


class Backend:
    """Where a launch's jobs run: what each job may use, its submitit executor, the queue's limits."""

    cluster: ClassVar[str]  # submitit's cluster kind

    def target(self, config: RagConfig, opts: LaunchOptions) -> tuple[str | None, int | None]:
        """(partition, memory a job may use in bytes): where the jobs go, what the guard checks against."""
        raise NotImplementedError

    def executor(self, config: RagConfig, opts: LaunchOptions, folder: Path, job: JobSpec) -> submitit.AutoExecutor:
        """An executor for ``job``: its name, memory and placement, after every job of ``job.after`` succeeded."""
        raise NotImplementedError

    def max_array_size(self) -> int:
        return 2**31

    def in_flight(self, records: list[dict[str, Any]], cache: Path) -> dict[tuple[int, str], str]:
        """(window, artifact-key digest) -> a still-queued array of an earlier launch that builds it."""
        return {}

    def base_executor(
        self, config: RagConfig, opts: LaunchOptions, folder: Path, name: str, **kwargs: Any
    ) -> submitit.AutoExecutor:
        executor = submitit.AutoExecutor(folder=folder, cluster=self.cluster, **kwargs)
        executor.update_parameters(name=name, timeout_min=_timeout_min(config.cluster.time), cpus_per_task=opts.cpus_per_task)
        return executor


def task_ranges(genome: list[Chromosome], window_ids: Collection[int], per_task: int) -> list[tuple[Chromosome, list[int]]]:
    """The launch's windows ``window_ids`` (global) as array tasks: runs of at most ``per_task`` windows of one
    chromosome each, as that chromosome's own window ids (what its jobs read)."""
    from rag_hpc.data.windows import window_ranges

    wanted = set(window_ids)
    return [(ch, ids) for ch in genome for ids in window_ranges([w - ch.offset for w in ch.ids if w in wanted], per_task)]


def _note_tasks(
    record: dict[str, Any], genome: list[Chromosome], items: list[tuple[Chromosome, list[int]]], jobs: list[Any], key: str
) -> None:
    for (ch, _), job in zip(items, jobs):
        record["chromosomes"][genome.index(ch)][key].append(job.job_id)


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


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


def submit(
    config: RagConfig, opts: LaunchOptions, backend: Backend, log: Any, records: list[dict[str, Any]]
) -> tuple[dict[str, Any], list[Any]]:
    """Guard, then lay out the job graph through ``backend``; returns the run record and the jobs."""
    c = config.cluster
    opts.partition, mem = backend.target(config, opts)
    tasks_per_node = max(1, c.gpus_per_node)
    # Planned with the stand-ins of targets a phase job has yet to phase (same sites and genotypes).
    plan = planning_config(config)
    genome = chromosomes(config)
    todo, n_windows = uncached_windows(plan)
    guard = run_guard(plan, todo, mem, opts.gpu_mem, tasks_per_node, opts.cpus_per_task)
    log(guard.table)
    if not guard.ok:
        raise LaunchError("memory guard: over budget (OVER rows above); nothing was submitted")

    workdir = config.paths.workdir
    in_flight = backend.in_flight(records, config.paths.cache)
    shared = {w: in_flight[(w, digest)] for w, digest in todo.items() if (w, digest) in in_flight}
    build = [w for w in todo if w not in shared]
    record = run_record(config, opts.cluster, genome, len(build))
    folder = workdir / "submitit" / record["time"]
    groups = task_ranges(genome, build, config.index.windows_per_task)
    record.update(
        {
            "partition": opts.partition,
            "folder": str(folder),
            "array_ids": [],
            "array_tasks": 0,
            "array_windows": {},
            "depends_on": sorted(set(shared.values())),
            "train_id": None,
            "impute_ids": [],
            "impute_tasks": 0,
            "merge_id": None,
            "index_mem_mb": guard.index_mem_mb,
            "train_mem_mb": guard.train_mem_mb,
            "phase_ids": [],
        }
    )
    if opts.dry_run:
        log(
            f"dry run: would submit {len(groups)} array task(s) over {len(build)} uncached window(s) of {n_windows}, then training"
            + (", then imputation and its merge" if config.data.targets_vcf is not None else "")
        )
        return record, []

    requests, phase_jobs = phase_requests(config), []
    if requests:
        # Beagle's heap defaults to a quarter of the memory it sees; phasing array-scale targets took ~1 GB.
        ex = backend.executor(config, opts, folder, JobSpec("rag_hpc-phase", PHASE_MEM_MB))
        phase_jobs = ex.map_array(phase_job, [one for _, one, _ in requests], [str(t) for _, _, t in requests])
        record["phase_ids"].append(phase_jobs[0].job_id.split("_")[0])
    arrays = []
    if groups:
        index = JobSpec("rag_hpc-index", guard.index_mem_mb, record["phase_ids"], array_parallelism=c.array_parallelism)
        ex = backend.executor(config, opts, folder, index)
        for chunk in _chunks(groups, backend.max_array_size()):
            jobs = ex.map_array(build_window_range, [ch.config for ch, _ in chunk], [ids for _, ids in chunk])
            arrays.append(jobs)
            array_id = jobs[0].job_id.split("_")[0]
            record["array_ids"].append(array_id)
            record["array_windows"][array_id] = {str(ch.offset + w): todo[ch.offset + w] for ch, ids in chunk for w in ids}
            _note_tasks(record, genome, chunk, jobs, "index_tasks")
        record["array_tasks"] = len(groups)
    after = [*record["phase_ids"], *record["array_ids"], *record["depends_on"]]
    train = JobSpec(
        "rag_hpc-train", guard.train_mem_mb, after, gpus=c.gpus_per_node, nodes=c.nodes, tasks_per_node=tasks_per_node
    )
    ex = backend.executor(config, opts, folder, train)
    train_job = ex.submit(TrainJob(config))
    record["train_id"] = train_job.job_id
    impute_arrays, merge_job = _submit_imputation(config, opts, backend, folder, genome, guard, record)
    record_launch(workdir, record)
    log(
        f"index array: {', '.join(record['array_ids']) or 'none (all windows cached)'} "
        f"({record['array_tasks']} task(s), {len(build)}/{n_windows} windows to build, --mem {guard.index_mem_mb}M each)"
    )
    if shared:
        log(
            f"  {len(shared)} more window(s) are being built by queued array(s) {', '.join(record['depends_on'])} "
            "of an earlier launch: training waits for them instead"
        )
    if record["phase_ids"]:
        log(f"phase job: {record['phase_ids'][0]} ({len(requests)} task(s): Beagle phases the targets first)")
    log(f"training job: {train_job.job_id} ({c.nodes} node(s) x {tasks_per_node} task(s), --mem {guard.train_mem_mb}M)")
    log(f"logs: {folder}/%A_%a_0_log.out (array), {folder}/%j_0_log.out (training)")
    if merge_job is not None:
        log(
            f"imputation array: {', '.join(record['impute_ids'])} ({record['impute_tasks']} task(s) of "
            f"{config.impute.windows_per_task} windows, --mem {guard.impute_mem_mb}M each) after training; merge job "
            f"{merge_job.job_id} -> {', '.join(ch['imputed'] for ch in record['chromosomes'])}"
        )
    log(f"cache: {config.paths.cache}")
    log(f"watch: python -m rag_hpc.status --workdir {shlex.quote(str(workdir))}")
    return record, [phase_jobs, arrays, train_job, impute_arrays, merge_job]


def _submit_imputation(
    config: RagConfig,
    opts: LaunchOptions,
    backend: Backend,
    folder: Path,
    genome: list[Chromosome],
    guard: GuardResult,
    record: dict[str, Any],
) -> tuple[list[Any], Any]:
    """With targets: the imputation array after training (afterok) over the windows of every chromosome,
    and one merge after the array that writes each chromosome's VCF (one job: it is the run's one writer)."""
    if config.data.targets_vcf is None:
        return [], None
    ranges = task_ranges(genome, [w for ch in genome for w in ch.ids], config.impute.windows_per_task)
    where = {"partition": config.impute.partition, "gpus": config.impute.gpus}
    array = JobSpec(
        "rag_hpc-impute", guard.impute_mem_mb, [record["train_id"]], array_parallelism=config.cluster.array_parallelism, **where
    )
    ex = backend.executor(config, opts, folder, array)
    arrays = []
    for chunk in _chunks(ranges, backend.max_array_size()):
        jobs = ex.map_array(ImputeRangeJob(), [ch.config for ch, _ in chunk], [ids for _, ids in chunk])
        arrays.append(jobs)
        record["impute_ids"].append(jobs[0].job_id.split("_")[0])
        _note_tasks(record, genome, chunk, jobs, "impute_tasks")
    record["impute_tasks"] = len(ranges)
    merge = backend.executor(config, opts, folder, JobSpec("rag_hpc-merge", guard.impute_mem_mb, record["impute_ids"], **where))
    merge_job = merge.submit(merge_imputation, config, [[ch.offset + w for w in ids] for ch, ids in ranges])
    record["merge_id"] = merge_job.job_id
    return arrays, merge_job


def wait(record: dict[str, Any], submitted: list[Any], opts: LaunchOptions, log: Any) -> dict[str, Any]:
    """With ``opts.wait``: block until the jobs end (outside the launch lock); raise if training or the
    merge failed, naming the failed tasks' logs."""
    if not opts.wait or not submitted:
        return record
    phase_jobs, arrays, train_job, impute_arrays, merge_job = submitted
    # In graph order (the debug backend runs each job when its result is asked for).
    failed = _failed([phase_jobs], "phase task") + _failed(arrays, "index task")
    try:
        record["checkpoint"] = train_job.results()[0]
    except Exception as exc:  # noqa: BLE001 - any failure of the job is reported with its log
        why = "; ".join(failed) or f"see {train_job.paths.stderr}"
        raise LaunchError(f"training job {train_job.job_id} did not complete ({type(exc).__name__}): {why}") from None
    log(f"training finished: {record['checkpoint']}")
    if merge_job is None:
        return record
    failed = _failed(impute_arrays, "imputation task")
    try:
        record["report"] = merge_job.result()
    except Exception as exc:  # noqa: BLE001 - any failure of the job is reported with its log
        why = "; ".join(failed) or f"see {merge_job.paths.stderr}"
        raise LaunchError(f"merge job {merge_job.job_id} did not complete ({type(exc).__name__}): {why}") from None
    log("imputed: " + ", ".join(path for key, path in record["report"].items() if key.split(":")[-1] == "imputed"))
    return record


def _failed(arrays: list[Any], what: str) -> list[str]:
    """One line per failed task of ``arrays``, waiting for each to end (debug jobs run here, in order)."""
    failed = []
    for jobs in arrays:
        for j in jobs:
            try:
                j.result()
            except Exception as exc:  # noqa: BLE001 - any task error is reported, with its log
                failed.append(f"{what} {j.job_id} failed ({type(exc).__name__}): see {j.paths.stderr}")
    return failed
