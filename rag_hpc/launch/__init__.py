"""``python -m rag_hpc.launch``: the whole pipeline as SLURM jobs (or on this machine).

    data (demo panel when none is given) -> memory guard -> index prebuild array -> training job
      -> with targets: imputation array -> merge job (the imputed VCF and its report)

The prebuild array holds only windows whose cached artifacts are not all valid; every job depends on
the one before with ``afterok`` and ``kill_on_invalid_dep``, so a failed task cancels what follows
instead of leaving it pending forever. Training is a submitit ``Checkpointable``: preemption (SIGUSR2)
and the time limit checkpoint to disk and requeue; the requeued job resumes from the newest checkpoint
in the run dir, never from pickled state.

The job graph and the jobs are ``rag_hpc.launch.core``; where they run is a backend:
``rag_hpc.launch.slurm`` (sbatch through submitit, optionally in an Apptainer image) and
``rag_hpc.launch.local`` (this process: ``--cluster local`` runs the stages directly, ``--cluster
debug`` runs the job graph through submitit's debug executor).
"""

from __future__ import annotations

# torch is imported only to check the GPUs a local launch asks for.
import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from rag_hpc.cli import add_config_args, command_parser, config_from_args
from rag_hpc.config import RagConfig, load_config
from rag_hpc.guard import parse_bytes
from rag_hpc.launch.core import (
    ImputeRangeJob,
    LaunchError,
    LaunchOptions,
    TrainJob,
    build_window_range,
    ensure_data,
    merge_imputation,
    run_guard,
)
from rag_hpc.launch.local import launch_debug, run_local
from rag_hpc.launch.slurm import APPTAINER_ENV, SlurmBackend, container_python, launch_slurm, queued_jobs, slurm_target
from rag_hpc.runs import RUN_RECORD, chromosomes, read_records, record_launch, run_dir_of, run_record, uncached_windows

__all__ = [
    "APPTAINER_ENV",
    "RUN_RECORD",
    "ImputeRangeJob",
    "LaunchError",
    "LaunchOptions",
    "SlurmBackend",
    "TrainJob",
    "build_window_range",
    "container_python",
    "ensure_data",
    "launch_debug",
    "launch_slurm",
    "main",
    "merge_imputation",
    "queued_jobs",
    "read_records",
    "run_dir_of",
    "run_guard",
    "run_local",
    "uncached_windows",
]

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


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("launch", __doc__.split("\n\n")[0])
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
        "--exclude-panel-overlap",
        action="store_true",
        help="target samples that are panel samples are imputed without their own haplotypes among the donors "
        "(default: the launch is refused, naming them; data.panel_overlap)",
    )
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
    if args.exclude_panel_overlap:
        overrides.append("data.panel_overlap=exclude")
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

        todo, _ = uncached_windows(config)
        mem = parse_bytes(args.mem) if args.mem else psutil.virtual_memory().total
        # Sized for this machine: training runs on CPU here unless it has a GPU (run_local trains on one).
        here = config.model_copy(deep=True)
        here.cluster.gpus_per_node = min(1, torch.cuda.device_count()) if config.train.device != "cpu" else 0
        cpus = len(os.sched_getaffinity(0))
        guard = run_guard(here, todo, mem, parse_bytes(args.gpu_mem) if args.gpu_mem else None, 1, cpus)
        print(guard.table)
        if not guard.ok:
            print("error: memory guard: over budget on this machine (OVER rows above); nothing was run", file=sys.stderr)
            return 1
        # Recorded before it runs, so `status` reads a local run as it goes and after it ends.
        record_launch(config.paths.workdir, run_record(config, "local", chromosomes(config), len(todo)))
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
    record = launch_slurm(config, opts) if kind == "slurm" else launch_debug(config, opts)
    if record.get("attached") and record["train_state"] != "COMPLETED":
        return 1
    return 0
