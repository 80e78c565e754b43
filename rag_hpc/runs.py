"""What a launch records and where its outputs go: the run record (``RUN_RECORD``), the launch's
chromosomes and their windows, the run directory and the imputed VCFs' paths.

Both the launcher and ``python -m rag_hpc.status`` read these, and status must start on a login node in a
blink: nothing here imports torch or submitit (``tests/test_launch_local.py`` checks status does not).
"""

from __future__ import annotations

# panel.h5's reader and the window cache are imported by the functions that open them.
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rag_hpc.config import RagConfig
from rag_hpc.fsutil import atomic_write

RUN_RECORD = "launch.json"  # in the workdir: every launch, newest last


@dataclass(frozen=True)
class Chromosome:
    """One chromosome of a launch: its own config (``RagConfig.genome``) and where its windows sit among the
    launch's. A launch numbers the windows of all its chromosomes in one sequence (``offset`` + the
    chromosome's own window id), so the job graph, the run record and ``status`` count windows the same way
    for one chromosome or 22."""

    name: str | None
    config: RagConfig
    offset: int
    windows: int

    @property
    def ids(self) -> range:
        return range(self.offset, self.offset + self.windows)


def chromosomes(config: RagConfig) -> list[Chromosome]:
    """The launch's chromosomes (one, unnamed, without data.chromosomes), their panels prepared."""
    from rag_hpc.data.panel import Panel

    out, offset = [], 0
    for name, one in config.genome():
        with Panel(one.panel_h5) as panel:
            n = math.ceil(panel.n_sites / one.windows.window_size)
        out.append(Chromosome(name, one, offset, n))
        offset += n
    return out


def imputed_vcf(config: RagConfig, chromosome: str | None) -> Path:
    """Where a run's imputed VCF (and its report, beside it) goes: <run>/report/[<chromosome>/]imputed.vcf.gz."""
    report_dir = run_dir_of(config) / "report"
    return (report_dir if chromosome is None else report_dir / chromosome) / "imputed.vcf.gz"


def uncached_windows(config: RagConfig) -> tuple[dict[int, str], int]:
    """({window id: digest of its artifact keys} for windows with any invalid or missing artifact,
    number of windows), window ids counted over all chromosomes (``Chromosome``). The digest tells whether
    another launch builds exactly these artifacts. A donor-table part counts as an artifact of the first
    window of its prebuild task, so a launch whose windows are cached but whose tables are not (another
    array, more training samples) still submits the tasks that compute them, and training only reads."""
    from rag_hpc.index.build import WindowCache
    from rag_hpc.index.donors import part_artifacts

    todo, total = {}, 0
    for chrom in chromosomes(config):
        cache = WindowCache(chrom.config)
        try:
            per_task = config.index.windows_per_task
            parts = part_artifacts(cache)
            for w in cache.windows:
                artifacts = list(cache.artifacts(w).values()) + (parts[w.id // per_task] if w.id % per_task == 0 else [])
                if any(cache.store.problem(a) is not None for a in artifacts):
                    keys = "".join(sorted(a.key for a in artifacts))
                    todo[chrom.offset + w.id] = hashlib.sha256(keys.encode()).hexdigest()[:16]
        finally:
            cache.panel.close()
        total += chrom.windows
    return todo, total


def run_dir_of(config: RagConfig) -> Path:
    return config.train.resolved_run_dir(config.paths.workdir)


def run_record(config: RagConfig, cluster: str, genome: list[Chromosome], windows_todo: int) -> dict[str, Any]:
    """What every launch records (``RUN_RECORD``), local or queued: the run, its cache, its windows and,
    per chromosome, where its windows sit, its tasks (queued launches fill them in) and its imputed VCF."""
    return {
        "time": time.strftime("%Y%m%d-%H%M%S"),
        "cluster": cluster,
        "run_dir": str(run_dir_of(config)),
        "cache": str(config.paths.cache),
        "windows_total": sum(ch.windows for ch in genome),
        "windows_todo": windows_todo,
        "chromosomes": [
            {
                "name": ch.name,
                "offset": ch.offset,
                "windows": ch.windows,
                "index_tasks": [],
                "impute_tasks": [],
                "imputed": str(imputed_vcf(config, ch.name)) if config.data.targets_vcf is not None else None,
            }
            for ch in genome
        ],
        "config": config.model_dump(mode="json"),
    }


def read_records(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / RUN_RECORD
    return json.loads(path.read_text()) if path.exists() else []


def record_launch(workdir: Path, record: dict[str, Any]) -> Path:
    path = workdir / RUN_RECORD
    atomic_write(path, (json.dumps([*read_records(workdir), record], indent=2) + "\n").encode())
    return path
