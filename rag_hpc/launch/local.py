"""Without SLURM: ``--cluster local`` runs every stage in this process (``run_local``); ``--cluster
debug`` lays out the same job graph as SLURM through submitit's in-process debug executor
(``DebugBackend``: each job runs when its result is asked for, in the graph's order), for stepping
through a job in a debugger."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import submitit

from rag_hpc.config import RagConfig
from rag_hpc.launch.core import Backend, JobSpec, LaunchOptions, ensure_data, report, run_dir_of, submit, wait


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
    record, submitted = submit(ensure_data(config, log), opts, DebugBackend(), log, [])
    return wait(record, submitted, opts, log)


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
