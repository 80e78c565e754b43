"""A genome in one launch: one file per chromosome, one prebuild over all their windows, one model trained
over every chromosome, then an imputed VCF and a report per chromosome (``data.chromosomes``)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from rag_hpc.config import load_config
from rag_hpc.data.simulate import SimPreset, simulate_panel
from rag_hpc.errors import ConfigError
from tests.conftest import TINY_GENOME
from tests.slurm_helpers import as_flags, cli, launcher, tiny_genome_sets


def _contigs(vcf: Path) -> set[str]:
    with gzip.open(vcf, "rt") as fh:
        return {line.split("\t", 1)[0] for line in fh if not line.startswith("#")}


def test_a_genome_launch_trains_one_model_over_every_chromosome_and_reports_each_through_either_backend(
    tiny_genome: Path, tmp_path: Path
) -> None:
    from rag_hpc.runs import chromosomes

    local, debug = tmp_path / "local", tmp_path / "debug"
    out = launcher("--cluster", "local", *as_flags(tiny_genome_sets(tiny_genome, local)), timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    genome = chromosomes(load_config(None, tiny_genome_sets(tiny_genome, local)))
    assert [ch.name for ch in genome] == list(TINY_GENOME) and all(ch.windows >= 3 for ch in genome)
    run_dir = local / "runs" / "default"
    # One model: one run, its epochs made of the windows of both chromosomes.
    log = (run_dir / "train.log").read_text()
    assert "on 2 chromosomes" in log
    assert re.search(rf"; {sum(ch.windows for ch in genome)} windows x ", log), log
    for chrom in TINY_GENOME:
        vcf = run_dir / "report" / chrom / "imputed.vcf.gz"
        assert _contigs(vcf) == {chrom}, "each chromosome's targets in its own VCF"
        metrics = json.loads((vcf.parent / "metrics.json").read_text())
        assert metrics["overall"]["n_r2"] > 0 and (vcf.parent / "report.md").is_file()
        assert Path(metrics["truth"]).parent.name == chrom and Path(metrics["panel"]).name == f"panel.{chrom}.h5"
    assert str(run_dir / "report" / "20" / "report.md") in out.stdout

    # The job graph (submitit's debug executor: the SLURM graph in one process): one index array over the
    # windows of both chromosomes, one training, one imputation array, one merge; the same VCFs.
    out = launcher(
        "--cluster", "debug", *as_flags(tiny_genome_sets(tiny_genome, debug, "impute.windows_per_task=2")), timeout=400
    )
    assert out.returncode == 0, out.stderr[-4000:]
    (record,) = json.loads((debug / "launch.json").read_text())
    assert record["windows_todo"] == record["windows_total"] == sum(ch.windows for ch in genome)
    assert len(record["array_ids"]) == 1 and len(record["impute_ids"]) == 1 and record["merge_id"]
    per = {ch["name"]: ch for ch in record["chromosomes"]}
    assert set(per) == set(TINY_GENOME) and all(per[c]["index_tasks"] and per[c]["impute_tasks"] for c in TINY_GENOME)
    for chrom in TINY_GENOME:
        vcfs = [w / "runs" / "default" / "report" / chrom / "imputed.vcf.gz" for w in (local, debug)]
        assert per[chrom]["imputed"] == str(vcfs[1])
        assert gzip.decompress(vcfs[0].read_bytes()) == gzip.decompress(vcfs[1].read_bytes())
    status = cli("status", "--workdir", str(debug))
    for chrom, ch in per.items():
        assert f"chromosome {chrom}: windows cached {ch['windows']} / {ch['windows']}" in status.stdout, status.stdout
    assert "dosage r² by MAF" in status.stdout


def test_chromosomes_whose_panels_hold_other_samples_cannot_train_one_model(tiny_genome: Path, tmp_path: Path) -> None:
    from rag_hpc.launch import ensure_data
    from rag_hpc.train import train

    root = tmp_path / "sim"
    root.mkdir()
    (root / "20").symlink_to(tiny_genome / "20")
    simulate_panel(root / "21", SimPreset("fewer", length=100_000, n_panel=30, n_targets=6), 3, verbose=False, contig="21")
    config = ensure_data(load_config(None, tiny_genome_sets(root, tmp_path / "work")), log=lambda _m: None)
    with pytest.raises(ConfigError, match=r"chromosome 21's panel .* splits other samples than chromosome 20's"):
        train(config)


def test_a_stage_that_reads_one_chromosome_asks_which_one(tiny_genome: Path, tmp_path: Path) -> None:
    sets = as_flags(tiny_genome_sets(tiny_genome, tmp_path / "work"))
    out = cli("prepare", *sets)
    assert out.returncode != 0 and "name it with --chromosome" in out.stderr, out.stderr
    out = cli("prepare", "--chromosome", "21", *sets)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "work" / "panel.21.h5").is_file() and not (tmp_path / "work" / "panel.20.h5").exists()
