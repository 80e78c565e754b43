"""Targets that are reference-panel samples: found by sample ID or by genotypes at the typed sites, refused
with one line, or imputed with their own haplotypes kept out of the donors (``data.panel_overlap``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rag_hpc.config import RagConfig, load_config
from rag_hpc.data.panel import Panel
from rag_hpc.data.prepare import prepare_panel
from rag_hpc.data.targets import match_targets, panel_overlap
from rag_hpc.data.vcf import VcfWriter, read_phased_vcf
from rag_hpc.errors import InputError
from rag_hpc.impute import CopyPredictor, impute
from rag_hpc.index import donor_format
from rag_hpc.index.build import WindowCache
from rag_hpc.index.donors import read_donors, target_queries

WINDOW = 100
PANEL_SAMPLES = slice(0, 20, 2)  # ten panel samples, train and validation split alike


@pytest.fixture(scope="module")
def panel_h5(tiny_simulation: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("panel") / "panel.h5"
    return prepare_panel(tiny_simulation / "panel.vcf.gz", out, populations=tiny_simulation / "populations.tsv")


def config_for(panel_h5: Path, targets: Path, work: Path, *extra: str) -> RagConfig:
    sets = [f"data.panel_h5={panel_h5}", f"data.targets_vcf={targets}", f"paths.workdir={work}", f"windows.window_size={WINDOW}"]
    return load_config(overrides=[*sets, "model.k=8", "data.ambiguous=keep", *extra])


def panel_samples_as_targets(tiny_simulation: Path, out: Path, rename: bool) -> tuple[Path, list[str]]:
    """Ten panel samples cut to an array (what users do when they impute 1000 Genomes samples against 1000
    Genomes): every panel site of MAF >= 1 %, dense enough on the tiny panel for a genotype match to have its
    30 informative sites; ``rename`` hides who they are."""
    panel = read_phased_vcf(tiny_simulation / "panel.vcf.gz")
    af = panel.gt.reshape(panel.n_sites, -1).mean(axis=1)
    common = np.flatnonzero(np.minimum(af, 1 - af) >= 0.01)
    names = list(panel.samples[PANEL_SAMPLES])
    shown = [f"STUDY{i:03d}" for i in range(len(names))] if rename else names
    with VcfWriter(out, contig=panel.contig, samples=shown) as w:
        w.write_phased(panel.pos[common], panel.ref[common], panel.alt[common], panel.gt[common][:, PANEL_SAMPLES])
    return out, names


@pytest.mark.parametrize("rename", [False, True], ids=["same IDs", "renamed"])
def test_panel_samples_given_as_targets_are_found_and_refused_naming_them(
    tiny_simulation: Path, panel_h5: Path, tmp_path: Path, rename: bool
) -> None:
    targets, names = panel_samples_as_targets(tiny_simulation, tmp_path / "t.vcf.gz", rename)
    with Panel(panel_h5) as panel:
        overlap = panel_overlap(panel, match_targets(panel, targets, ambiguous="keep"))
        assert [p for _, p, _ in overlap.pairs] == names
        how = {h.split(" at ")[0] for _, _, h in overlap.pairs}
        assert how == ({"genotypes agree"} if rename else {"same sample ID"}), overlap.pairs
    config = config_for(panel_h5, targets, tmp_path / "work")
    with Panel(panel_h5) as panel, pytest.raises(InputError) as exc:
        impute(config, CopyPredictor.from_config(config, panel=panel), targets, tmp_path / "out.vcf.gz", panel=panel)
    message = str(exc.value)
    assert "10 target sample(s) are in the panel" in message and names[0] in message and "--exclude-panel-overlap" in message
    assert not (tmp_path / "out.vcf.gz").exists()


def test_real_targets_are_not_taken_for_panel_samples(tiny_simulation: Path, panel_h5: Path) -> None:
    with Panel(panel_h5) as panel:
        for vcf in ("targets.array.vcf.gz", "targets.truth.vcf.gz"):  # a sparse array, and every site
            assert not panel_overlap(panel, match_targets(panel, tiny_simulation / vcf)).pairs


def test_excluded_panel_samples_are_no_donors_and_their_tables_have_their_own_key(
    tiny_simulation: Path, panel_h5: Path, tmp_path: Path
) -> None:
    targets, names = panel_samples_as_targets(tiny_simulation, tmp_path / "t.vcf.gz", rename=True)
    config = config_for(panel_h5, targets, tmp_path / "work", "data.panel_overlap=exclude")
    cache = WindowCache(config)
    try:
        found = cache.targets()  # what the prebuild computes the targets' donor table for
        assert found is not None and found.exclude.size > 0
        reference = cache.panel.reference_haplotypes()
        own = set(np.flatnonzero(np.isin(cache.panel.samples, names)).tolist())
        assert {int(reference[r]) // 2 for r in found.exclude} <= own  # only theirs, only reference haplotypes
        plain = match_targets(cache.panel, targets, ambiguous="keep")  # as if nobody had looked
        assert plain.digest() != found.digest(), "the excluded set must be part of the table's cache key"

        def own_weight(table: object, targets_: object) -> float:
            """Mean copying weight the targets put on excluded reference haplotypes."""
            return float((donor_format.code_weights(table.codes) * np.isin(table.donors, found.exclude)).sum(axis=2).mean())

        inflated = read_donors(cache, target_queries(plain))
        fair = read_donors(cache, target_queries(found))
        # Left in, their own haplotypes take much of the copying weight (k = 8 donors share each gap): the
        # inflation the refusal prevents.
        assert own_weight(inflated, plain) > 0.3
        assert own_weight(fair, found) == 0.0
    finally:
        cache.panel.close()
    with Panel(panel_h5) as panel:
        done = impute(config, CopyPredictor.from_config(config, panel=panel), targets, tmp_path / "ex.vcf.gz", panel=panel)
    assert done.out.exists() and done.targets.exclude.size == found.exclude.size


def test_a_launch_with_panel_samples_as_targets_is_refused_before_anything_runs_unless_told_to_exclude_them(
    tiny_simulation: Path, tmp_path: Path
) -> None:
    from tests.slurm_helpers import as_flags, launcher, tiny_sets

    targets, names = panel_samples_as_targets(tiny_simulation, tmp_path / "t.vcf.gz", rename=False)
    work = tmp_path / "work"
    sets = tiny_sets(tiny_simulation, work, None, 1, f"data.targets_vcf={targets}", "data.truth_vcf=null", "data.ambiguous=keep")
    refused = launcher("--cluster", "local", *as_flags(sets))
    assert refused.returncode == 3, refused.stderr[-2000:]
    (line,) = [x for x in refused.stderr.splitlines() if x.startswith("error:")]
    assert "are in the panel" in line and names[0] in line and "--exclude-panel-overlap" in line
    assert not (work / "runs").exists(), "nothing may run for a refused launch"
    done = launcher("--cluster", "local", "--exclude-panel-overlap", *as_flags(sets))
    assert done.returncode == 0, done.stderr[-2000:]
    assert (work / "runs" / "default" / "report" / "imputed.vcf.gz").is_file()
    assert "left out of every target's donors" in done.stderr
