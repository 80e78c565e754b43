"""``--cluster local``: the whole pipeline on this machine, ending in an accuracy report."""

from __future__ import annotations

import csv
from pathlib import Path

from tests.imports import run_and_list_heavy_imports
from tests.slurm_helpers import as_flags, cli, launcher, tiny_sets


def test_local_launch_prepares_builds_trains_imputes_and_reports(tiny_simulation: Path, tmp_path: Path) -> None:
    out = launcher("--cluster", "local", *as_flags(tiny_sets(tiny_simulation, tmp_path / "work")), timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    run_dir = tmp_path / "work" / "runs" / "default"
    report = run_dir / "report"
    for path in (
        report / "report.md",
        report / "metrics.json",
        report / "r2_by_maf.png",
        report / "loss_curve.png",
        run_dir / "metrics.csv",
        run_dir / "steps.csv",
    ):
        assert path.exists() and path.stat().st_size > 0, path
    assert list(csv.DictReader((run_dir / "metrics.csv").open())), "no epoch row in metrics.csv"
    assert "index: 3 window(s) built" in out.stdout
    assert str(report / "report.md") in out.stdout, "the launcher must say where the report is"
    # status reads a local run too: windows, the checkpoint a resume would use, validation and the report.
    status = cli("status", "--workdir", str(tmp_path / "work"))
    assert status.returncode == 0, status.stderr
    step = max(int(p.stem.removeprefix("step_")) for p in (run_dir / "checkpoints").glob("step_*.pt"))
    for line in (
        "(local, in one process)",
        "windows cached: 3 / 3",
        f"imputed: {report / 'imputed.vcf.gz'}",
        "dosage r² by MAF (report): [0, 0.005)",
        f"newest valid checkpoint: step {step}",
        "last validation (epoch 0) r² by MAF: 0.000-0.005",
    ):
        assert line in status.stdout, status.stdout
    # ... and does it without torch or submitit, which take seconds to import on a busy login node.
    quiet, heavy = run_and_list_heavy_imports("rag_hpc.status", "--workdir", str(tmp_path / "work"))
    assert quiet.returncode == 0 and "windows cached: 3 / 3" in quiet.stdout, quiet.stderr
    assert heavy == [], heavy


def test_debug_launch_runs_the_job_graph_in_process_and_writes_the_vcf_the_local_pipeline_writes(
    tiny_simulation: Path, tmp_path: Path
) -> None:
    import gzip
    import json

    local, debug = tmp_path / "local", tmp_path / "debug"
    assert launcher("--cluster", "local", *as_flags(tiny_sets(tiny_simulation, local)), timeout=400).returncode == 0
    out = launcher(
        "--cluster", "debug", *as_flags(tiny_sets(tiny_simulation, debug, None, 1, "impute.windows_per_task=2")), timeout=400
    )
    assert out.returncode == 0, out.stderr[-4000:]
    (record,) = json.loads((debug / "launch.json").read_text())
    assert record["cluster"] == "debug" and record["array_tasks"] == 1 and record["impute_tasks"] == 2
    assert record["train_id"] and record["merge_id"], record
    imputed = [w / "runs" / "default" / "report" / "imputed.vcf.gz" for w in (local, debug)]
    # Same data, seeds and single-process training: the same model, so the same VCF through either backend.
    assert gzip.decompress(imputed[0].read_bytes()) == gzip.decompress(imputed[1].read_bytes())
    assert (debug / "runs" / "default" / "report" / "report.md").is_file()
