"""Unphased targets are phased with the real Beagle 5.4 (Debian package ``beagle``, installed by tests/run.sh)
against the panel's train split, then imputed: by ``impute`` and by a launch, as real array data arrive."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from rag_hpc.config import load_config
from rag_hpc.data.vcf import is_phased, read_phased_vcf
from rag_hpc.phase import phase_targets
from tests.slurm_helpers import IN_CI, as_flags, cli, launcher, tiny_sets, train_tiny

if shutil.which("beagle") is None and not IN_CI:
    pytest.skip("Beagle 5.4 is not installed (apt-get install beagle; tests/run.sh does)", allow_module_level=True)


def unphased(src: Path, dst: Path, contig: str | None = None) -> Path:
    """``src`` with every genotype unphased ('|' -> '/'), as an array's calls arrive (optionally renamed)."""
    with gzip.open(src, "rt") as fin, gzip.open(dst, "wt") as fout:
        for line in fin:
            if line.startswith("#"):
                fout.write(line.replace("##contig=<ID=21", f"##contig=<ID={contig}") if contig else line)
                continue
            f = line.rstrip("\n").split("\t")
            f[0] = contig or f[0]
            fout.write("\t".join([*f[:9], *(g.replace("|", "/") for g in f[9:])]) + "\n")
    return dst


def dosages(vcf: Path) -> np.ndarray:
    from cyvcf2 import VCF

    return np.array([np.asarray(r.genotype.array())[:, :2].sum(axis=1) for r in VCF(str(vcf))])


def test_impute_phases_unphased_targets_with_beagle_once_and_keeps_their_genotypes(tiny_simulation: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    train_tiny(tiny_simulation, work)
    sets = tiny_sets(tiny_simulation, work)
    raw = unphased(tiny_simulation / "targets.array.vcf.gz", tmp_path / "array.unphased.vcf.gz")
    assert not is_phased(raw) and is_phased(tiny_simulation / "targets.array.vcf.gz")
    out = cli(
        "impute",
        "--checkpoint",
        str(work / "runs" / "default"),
        "--targets",
        str(raw),
        "--out",
        str(tmp_path / "o.vcf.gz"),
        *as_flags(sets),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (phased,) = (work / "cache" / "phased").glob("*/targets.phased.vcf.gz")
    assert is_phased(phased) and Path(f"{phased}.tbi").is_file() and (phased.parent / "beagle.log").is_file()
    # Phasing orders each genotype's alleles; it changes no genotype.
    assert np.array_equal(dosages(phased), dosages(raw))
    truth = read_phased_vcf(tiny_simulation / "targets.array.vcf.gz")
    assert read_phased_vcf(phased).samples == truth.samples and np.array_equal(read_phased_vcf(phased).pos, truth.pos)
    # The same targets again: the phased file is found, not made again.
    stamp = phased.stat().st_mtime_ns
    config = load_config(None, sets)
    assert phase_targets(config, raw) == phased and phased.stat().st_mtime_ns == stamp
    report = cli(
        "evaluate", "--imputed", str(tmp_path / "o.vcf.gz"), "--out", str(tmp_path / "report"), "--quiet", *as_flags(sets)
    )
    assert report.returncode == 0, report.stderr[-2000:]


def test_a_launch_phases_unphased_targets_first_and_a_map_may_spell_the_chromosome_chr21(
    tiny_simulation: Path, tmp_path: Path
) -> None:
    raw = unphased(tiny_simulation / "targets.array.vcf.gz", tmp_path / "array.unphased.vcf.gz")
    genetic_map = tmp_path / "chr21.map"
    genetic_map.write_text("chr21\t.\t0.0\t1\nchr21\t.\t0.12\t100000\n")  # the targets say 21
    work = tmp_path / "work"
    sets = tiny_sets(tiny_simulation, work, None, 1, f"data.targets_vcf={raw}", f"data.genetic_map={genetic_map}")
    out = launcher("--cluster", "local", *as_flags(sets))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "phased " in out.stdout and "with Beagle in" in out.stdout
    (phased,) = (work / "cache" / "phased").glob("*/targets.phased.vcf.gz")
    assert (phased.parent / "map-21.map").read_text().startswith("21\t")
    assert "map=" in (phased.parent / "beagle.log").read_text()
    assert (work / "runs" / "default" / "report" / "report.md").is_file()


def test_the_job_graph_phases_unphased_targets_in_a_phase_job_before_the_index_array(
    tiny_simulation: Path, tmp_path: Path
) -> None:
    import json

    raw = unphased(tiny_simulation / "targets.array.vcf.gz", tmp_path / "array.unphased.vcf.gz")
    work = tmp_path / "work"
    out = launcher("--cluster", "debug", *as_flags(tiny_sets(tiny_simulation, work, None, 1, f"data.targets_vcf={raw}")))
    assert out.returncode == 0, out.stderr[-3000:]
    (record,) = json.loads((work / "launch.json").read_text())
    assert len(record["phase_ids"]) == 1 and "phase job:" in out.stdout
    # The launch planned (guard, windows to build) with a stand-in of the same sites; the jobs read the phased file.
    (phased,) = (work / "cache" / "phased").glob("*/targets.phased.vcf.gz")
    assert record["config"]["data"]["targets_vcf"] == str(phased) and is_phased(phased)
    assert (work / "runs" / "default" / "report" / "imputed.vcf.gz").is_file()
