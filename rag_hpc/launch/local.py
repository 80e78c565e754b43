"""Without SLURM: ``--cluster local`` runs every stage in this process (``run_local``); ``--cluster
debug`` lays out the same job graph as SLURM through submitit's in-process debug executor
(``DebugBackend``: each job runs when its result is asked for, in the graph's order), for stepping
through a job in a debugger."""

from __future__ import annotations

# The stages (index, train with torch, impute) are imported when the local pipeline runs them.
import time
from pathlib import Path
from typing import Any

import submitit

from rag_hpc.config import RagConfig
from rag_hpc.launch.core import Backend, JobSpec, LaunchOptions, ensure_data, report, submit, wait
from rag_hpc.runs import imputed_vcf, run_dir_of


class DebugBackend(Backend):
    """submitit's debug executor: jobs run in this process, one after the other; nothing is queued."""

    cluster = "debug"

    def target(self, config: RagConfig, opts: LaunchOptions) -> tuple[str | None, int | None]:
        import psutil

        return opts.partition or config.cluster.partition, opts.mem or psutil.virtual_memory().total

    def executor(self, config: RagConfig, opts: LaunchOptions, folder: Path, job: JobSpec) -> submitit.AutoExecutor:
        # Memory, partition and dependencies mean nothing in one process: the graph's order is the wait order.
        executor = self.base_executor(config, opts, folder, job.name)
        executor.update_parameters(nodes=job.nodes, tasks_per_node=job.tasks_per_node)
        return executor


def launch_debug(config: RagConfig, opts: LaunchOptions, log: Any = print) -> dict[str, Any]:
    """The job graph through the debug executor; waits for it (the jobs run while waiting)."""
    record, submitted = submit(ensure_data(config, log, in_jobs=True), opts, DebugBackend(), log, [])
    return wait(record, submitted, opts, log)


def run_local(config: RagConfig, log: Any = print) -> dict[str, Path]:
    """The whole pipeline on this machine: prebuild -> train -> impute -> evaluate, each chromosome's
    prebuild, imputation and report in turn around the one training."""
    from rag_hpc.impute import impute, load_model_predictor
    from rag_hpc.index.build import prebuild
    from rag_hpc.train import train

    genome = config.genome()
    for chrom, one in genome:
        t0 = time.perf_counter()
        done = prebuild(one, None, progress=True)
        built = sum(r.status == "built" for r in done.windows)
        log(
            f"index{f' (chromosome {chrom})' if chrom else ''}: {built} window(s) built, {len(done.windows) - built} cached; "
            f"donor-table parts: {done.donor_parts_built} built, {done.donor_parts_cached} cached; in {time.perf_counter() - t0:.1f} s"
        )
    t0 = time.perf_counter()
    checkpoint = train(config)
    log(f"training: {checkpoint} in {time.perf_counter() - t0:.1f} s")
    files: dict[str, Path] = {"checkpoint": checkpoint, "metrics_csv": run_dir_of(config) / "metrics.csv"}
    if config.data.targets_vcf is None:
        log("no data.targets_vcf: skipping imputation and evaluation")
        return files
    for chrom, one in genome:
        assert one.data.targets_vcf is not None
        t0 = time.perf_counter()
        predictor = load_model_predictor(checkpoint, one)
        imputed = impute(one, predictor, one.data.targets_vcf, imputed_vcf(config, chrom), progress=True)
        log(f"imputation: {imputed.out} in {time.perf_counter() - t0:.1f} s")
        prefix = "" if chrom is None else f"{chrom}:"
        files.update({prefix + key: path for key, path in report(one, imputed.out, log).items()})
    for key, path in files.items():
        log(f"{key}: {path}")
    return files
