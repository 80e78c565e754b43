from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cyvcf2
import numpy as np
import pytest

from rag_hpc.data.simulate import POPULATIONS, PRESETS, SimPreset, choose_array_sites, simulate_panel
from rag_hpc.data.vcf import read_phased_vcf
from rag_hpc.errors import ConfigError, InputError
from tests import kill_points
from tests.conftest import TINY_SIM_PRESET, TINY_SIM_SEED

REPO = Path(__file__).resolve().parents[1]


def _records(path: Path) -> list[cyvcf2.Variant]:
    return list(cyvcf2.VCF(str(path)))


def test_outputs_are_bgzipped_tabix_indexed_phased_biallelic_snps_in_increasing_order(tiny_simulation: Path) -> None:
    for name in ("panel.vcf.gz", "targets.array.vcf.gz", "targets.truth.vcf.gz"):
        path = tiny_simulation / name
        assert (tiny_simulation / f"{name}.tbi").is_file()
        records = _records(path)
        assert records, name
        pos = np.array([r.POS for r in records])
        assert (np.diff(pos) > 0).all(), f"{name}: positions not strictly increasing"
        assert {r.CHROM for r in records} == {"21"}
        for r in records:
            assert len(r.ALT) == 1 and r.REF in "ACGT" and r.ALT[0] in "ACGT" and r.ALT[0] != r.REF
            g = r.genotype.array()
            assert g.shape[1] == 3 and (g[:, 2] == 1).all() and set(np.unique(g[:, :2])) <= {0, 1}
        # The index works: a region query returns exactly the records inside it.
        lo, hi = int(pos[len(pos) // 4]), int(pos[len(pos) // 2])
        region = [r.POS for r in cyvcf2.VCF(str(path))(f"21:{lo}-{hi}")]
        assert region == [int(p) for p in pos if lo <= p <= hi]


def test_panel_has_the_panel_individuals_and_targets_are_held_out(tiny_simulation: Path) -> None:
    panel = cyvcf2.VCF(str(tiny_simulation / "panel.vcf.gz")).samples
    array = cyvcf2.VCF(str(tiny_simulation / "targets.array.vcf.gz")).samples
    truth = cyvcf2.VCF(str(tiny_simulation / "targets.truth.vcf.gz")).samples
    assert len(panel) == TINY_SIM_PRESET.n_panel and len(array) == TINY_SIM_PRESET.n_targets
    assert array == truth and not set(panel) & set(array)
    lines = (tiny_simulation / "populations.tsv").read_text().splitlines()
    assert lines[0] == "sample\tpopulation"
    pops = dict(line.split("\t") for line in lines[1:])
    assert set(pops) == set(panel) | set(array)
    assert set(pops.values()) == set(POPULATIONS)
    assert all(name.startswith(pop + "_") for name, pop in pops.items())
    counts = {p: sum(pops[s] == p for s in panel) for p in POPULATIONS}
    assert max(counts.values()) - min(counts.values()) <= 1


def test_panel_sites_vary_within_the_panel_and_truth_covers_every_panel_site(tiny_simulation: Path) -> None:
    panel = read_phased_vcf(tiny_simulation / "panel.vcf.gz")
    truth = read_phased_vcf(tiny_simulation / "targets.truth.vcf.gz")
    ac = panel.gt.sum(axis=(1, 2))
    assert ((ac > 0) & (ac < 2 * len(panel.samples))).all()
    np.testing.assert_array_equal(truth.pos, panel.pos)
    np.testing.assert_array_equal(truth.ref, panel.ref)
    np.testing.assert_array_equal(truth.alt, panel.alt)


def test_array_sites_are_common_one_per_4kb_bin_and_agree_with_the_truth(tiny_simulation: Path) -> None:
    panel = read_phased_vcf(tiny_simulation / "panel.vcf.gz")
    truth = read_phased_vcf(tiny_simulation / "targets.truth.vcf.gz")
    array = read_phased_vcf(tiny_simulation / "targets.array.vcf.gz")
    af = panel.gt.mean(axis=(1, 2))
    maf = np.minimum(af, 1 - af)
    idx = np.searchsorted(panel.pos, array.pos)
    assert (panel.pos[idx] == array.pos).all()
    assert (maf[idx] >= 0.05).all()
    bins = (array.pos - 1) // TINY_SIM_PRESET.array_spacing
    assert len(set(bins.tolist())) == len(bins), "two array sites in one bin"
    bins_with_common = set(((panel.pos[maf >= 0.05] - 1) // TINY_SIM_PRESET.array_spacing).tolist())
    assert set(bins.tolist()) == bins_with_common
    assert len(bins) >= 0.8 * TINY_SIM_PRESET.length / TINY_SIM_PRESET.array_spacing
    np.testing.assert_array_equal(array.gt, truth.gt[idx])


def test_array_site_choice_is_deterministic_for_a_seed_and_varies_with_it() -> None:
    rng = np.random.default_rng(0)
    pos = np.sort(rng.choice(np.arange(1, 200_000), 3000, replace=False))
    maf = rng.random(3000) * 0.5
    a = choose_array_sites(pos, maf, 4000, 0.05, seed=1)
    np.testing.assert_array_equal(a, choose_array_sites(pos, maf, 4000, 0.05, seed=1))
    assert not np.array_equal(a, choose_array_sites(pos, maf, 4000, 0.05, seed=2))


def test_manifest_records_preset_seed_counts_and_versions(tiny_simulation: Path) -> None:
    manifest = json.loads((tiny_simulation / "manifest.json").read_text())
    assert manifest["preset"]["name"] == "tiny" and manifest["seed"] == TINY_SIM_SEED
    counts = manifest["counts"]
    assert counts["sites"] == len(_records(tiny_simulation / "panel.vcf.gz"))
    assert counts["array_sites"] == len(_records(tiny_simulation / "targets.array.vcf.gz"))
    assert (counts["panel_samples"], counts["target_samples"]) == (40, 6)
    assert set(manifest["versions"]) >= {"msprime", "stdpopsim"}


def test_same_seed_gives_identical_files_and_a_complete_dir_is_reused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    preset = SimPreset("mini", length=20_000, n_panel=9, n_targets=3)
    a = simulate_panel(tmp_path / "a", preset, 3, verbose=False)
    b = simulate_panel(tmp_path / "b", preset, 3, verbose=False)
    for name in ("panel.vcf.gz", "targets.array.vcf.gz", "targets.truth.vcf.gz", "populations.tsv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    mtime = (a / "panel.vcf.gz").stat().st_mtime_ns
    simulate_panel(a, preset, 3)
    assert "cached" in capsys.readouterr().out
    assert (a / "panel.vcf.gz").stat().st_mtime_ns == mtime


def test_a_different_simulation_in_the_dir_is_refused_unless_overwrite(tmp_path: Path) -> None:
    preset = SimPreset("mini", length=20_000, n_panel=9, n_targets=3)
    out = simulate_panel(tmp_path / "sim", preset, 3, verbose=False)
    with pytest.raises(InputError, match="--force"):
        simulate_panel(out, preset, 4, verbose=False)
    assert json.loads((out / "manifest.json").read_text())["seed"] == 3
    simulate_panel(out, preset, 4, overwrite=True, verbose=False)
    assert json.loads((out / "manifest.json").read_text())["seed"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim"], "temp or old dirs left behind"


def test_an_interrupted_simulation_leaves_no_output_dir_and_no_temp_dir(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    # Ctrl-C while the outputs are being made durable in the temp dir, by construction (tests/kill_points.py):
    # the simulation interrupts itself at its first fsync of panel.vcf.gz, whatever this machine's speed.
    argv = kill_points.command(
        "fsync",
        r"panel\.vcf\.gz",
        1,
        "before",
        "rag_hpc.simulate",
        "--out",
        str(out),
        "--preset",
        "demo",
        "--seed",
        "5",
        sig="INT",
    )
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 130 and "interrupted" in proc.stderr, proc.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


def test_unknown_preset_and_negative_seed_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="demo"):
        simulate_panel(tmp_path / "x", "chr1-full", 1)
    with pytest.raises(ConfigError, match="seed"):
        simulate_panel(tmp_path / "x", "demo", -1)
    assert not (tmp_path / "x").exists()


def test_cli_help_lists_the_presets() -> None:
    res = subprocess.run([sys.executable, "-m", "rag_hpc.simulate", "--help"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0
    for name in PRESETS:
        assert name in res.stdout
    assert "--seed" in res.stdout and "--out" in res.stdout


def test_presets_have_the_documented_sizes() -> None:
    assert (PRESETS["kgp-like"].n_panel, PRESETS["kgp-like"].n_targets, PRESETS["kgp-like"].length) == (2504, 100, 5_000_000)
    assert PRESETS["demo"].length == 1_000_000 and PRESETS["demo"].n_panel == 300 and PRESETS["demo"].n_targets == 30
