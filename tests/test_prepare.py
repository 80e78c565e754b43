from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pysam
import pytest

from rag_hpc.data.panel import PANEL_FORMAT_VERSION, SPLIT_TRAIN, SPLIT_VAL, Panel
from rag_hpc.data.prepare import PopulationsError, prepare_panel, stratified_split
from rag_hpc.data.targets import match_targets
from rag_hpc.data.vcf import match_sites, read_phased_vcf

REPO = Path(__file__).resolve().parents[1]
SAMPLES = ("S1", "S2", "S3")


def vcf_text(records: list[str], samples: tuple[str, ...] = SAMPLES, contigs: tuple[str, ...] = ("21",)) -> str:
    header = [
        "##fileformat=VCFv4.2",
        *(f"##contig=<ID={c}>" for c in contigs),
        '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
        "\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", *(("FORMAT", *samples) if samples else ())]),
    ]
    return "\n".join(header + records) + "\n"


def rec(pos: int, gts: str = "0|1\t1|0\t0|0", ref: str = "A", alt: str = "G", chrom: str = "21") -> str:
    return f"{chrom}\t{pos}\t.\t{ref}\t{alt}\t.\tPASS\t.\tGT\t{gts}"


def write_vcf(directory: Path, text: str, name: str = "in.vcf.gz") -> Path:
    plain = directory / "plain.vcf"
    plain.write_text(text)
    out = directory / name
    pysam.tabix_compress(str(plain), str(out), force=True)
    plain.unlink()
    return out


# -- a good panel ------------------------------------------------------------------------------------------


def test_prepared_panel_round_trips_the_vcf(tiny_simulation: Path, tiny_panel: Path) -> None:
    vcf = read_phased_vcf(tiny_simulation / "panel.vcf.gz")
    with Panel(tiny_panel) as panel:
        assert panel.n_sites == vcf.n_sites and panel.n_samples == len(vcf.samples)
        np.testing.assert_array_equal(panel.positions, vcf.pos)
        np.testing.assert_array_equal(panel.ref, vcf.ref)
        np.testing.assert_array_equal(panel.alt, vcf.alt)
        assert list(panel.samples) == vcf.samples
        np.testing.assert_array_equal(panel.haplotypes(0, panel.n_sites), vcf.haplotypes())
        assert panel.info.contig == "21"
        assert panel.info.source_sha256 == hashlib.sha256((tiny_simulation / "panel.vcf.gz").read_bytes()).hexdigest()
    with h5py.File(tiny_panel, "r") as h5:
        gt = h5["calldata/GT"]
        assert gt.dtype == np.int8 and gt.compression == "lzf" and gt.chunks[1:] == (vcf.gt.shape[1], 2)
        assert h5.attrs["format_version"] == PANEL_FORMAT_VERSION
        assert h5.attrs["n_skipped_non_snps"] == 0
        assert set(h5["variants/CHROM"][:]) == {b"21"}


def test_af_is_the_alt_frequency_over_train_haplotypes_overall_and_per_population(
    tiny_simulation: Path, tiny_panel: Path
) -> None:
    vcf = read_phased_vcf(tiny_simulation / "panel.vcf.gz")
    with Panel(tiny_panel) as panel, h5py.File(tiny_panel, "r") as h5:
        train = panel.split == SPLIT_TRAIN
        assert h5["variants/AF"].dtype == np.float32
        np.testing.assert_allclose(panel.af, vcf.gt[:, train].mean(axis=(1, 2)), rtol=1e-6)
        for pop in ("YRI", "CEU", "CHB"):
            members = train & (panel.populations == pop)
            np.testing.assert_allclose(h5[f"variants/AF_{pop}"][:], vcf.gt[:, members].mean(axis=(1, 2)), rtol=1e-6)


def test_split_is_stratified_by_population_and_deterministic_for_a_seed(
    tiny_simulation: Path, tiny_panel: Path, tmp_path: Path
) -> None:
    with Panel(tiny_panel) as panel:
        split, pops = panel.split, panel.populations
    for pop in set(pops):
        members = pops == pop
        assert (split[members] == SPLIT_VAL).sum() == int(np.floor(0.1 * members.sum() + 0.5))
    again = prepare_panel(
        tiny_simulation / "panel.vcf.gz", tmp_path / "again.h5", populations=tiny_simulation / "populations.tsv"
    )
    other = prepare_panel(
        tiny_simulation / "panel.vcf.gz", tmp_path / "other.h5", populations=tiny_simulation / "populations.tsv", split_seed=1
    )
    with Panel(again) as a, Panel(other) as b:
        np.testing.assert_array_equal(a.split, split)
        assert not np.array_equal(b.split, split)


def test_split_keeps_a_training_sample_in_every_population_and_holds_one_out() -> None:
    split = stratified_split(["A", "B", "B", "C", "C", "C"], 0.9, seed=0)
    for members in ([0], [1, 2], [3, 4, 5]):
        assert (split[members] == SPLIT_TRAIN).any()
    assert (stratified_split(["x", "x", "x"], 0.01, seed=0) == SPLIT_VAL).sum() == 1


def test_panel_without_population_file_has_empty_populations_and_no_per_population_af(
    tiny_simulation: Path, tmp_path: Path
) -> None:
    out = prepare_panel(tiny_simulation / "panel.vcf.gz", tmp_path / "p.h5", val_fraction=0.25)
    with Panel(out) as panel, h5py.File(out, "r") as h5:
        assert set(panel.populations) == {""}
        assert not [k for k in h5["variants"] if k.startswith("AF_")]
        assert (panel.split == SPLIT_VAL).sum() == 10


def test_target_array_sites_are_found_in_the_panel(tiny_simulation: Path, tiny_panel: Path) -> None:
    array = read_phased_vcf(tiny_simulation / "targets.array.vcf.gz")
    with Panel(tiny_panel) as panel:
        targets = match_targets(panel, tiny_simulation / "targets.array.vcf.gz", ambiguous="keep")
        np.testing.assert_array_equal(panel.positions[targets.panel_index], array.pos)


def test_skip_non_snps_drops_indels_and_multiallelics_and_records_the_count(tmp_path: Path) -> None:
    text = vcf_text([rec(10), rec(20, ref="AT", alt="A"), rec(30, alt="G,T", gts="0|2\t1|0\t0|0"), rec(40, ref="C", alt="T")])
    vcf = write_vcf(tmp_path, text)
    out = prepare_panel(vcf, tmp_path / "p.h5", skip_non_snps=True)
    with Panel(out) as panel, h5py.File(out, "r") as h5:
        np.testing.assert_array_equal(panel.positions, [10, 40])
        assert h5.attrs["n_skipped_non_snps"] == 2


# -- populations ---------------------------------------------------------------------------------------


def test_population_file_missing_a_vcf_sample_is_refused(tiny_simulation: Path, tmp_path: Path) -> None:
    pops = tmp_path / "pops.tsv"
    lines = (tiny_simulation / "populations.tsv").read_text().splitlines()
    pops.write_text("\n".join(line for line in lines if not line.startswith("CEU_0002")) + "\n")
    with pytest.raises(PopulationsError, match="CEU_0002"):
        prepare_panel(tiny_simulation / "panel.vcf.gz", tmp_path / "p.h5", populations=pops)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pops.tsv"]


# -- the CLI ----------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rag_hpc.prepare", *map(str, args)], cwd=REPO, capture_output=True, text=True)


def test_cli_prints_a_summary_on_success(tiny_simulation: Path, tmp_path: Path) -> None:
    vcf = tmp_path / "panel.vcf.gz"
    shutil.copy(tiny_simulation / "panel.vcf.gz", vcf)
    res = _cli(
        "--vcf",
        vcf,
        "--out",
        tmp_path / "panel.h5",
        "--populations",
        tiny_simulation / "populations.tsv",
        "--val-fraction",
        "0.2",
    )
    assert res.returncode == 0, res.stderr
    with Panel(tmp_path / "panel.h5") as panel:
        n_val = int((panel.split == SPLIT_VAL).sum())
        assert n_val == 9  # 14/13/13 per population, 20 % each rounds to 3
        assert f"{panel.n_sites:,} sites x 40 samples ({40 - n_val} train, {n_val} val)" in res.stdout


# -- matching target sites ---------------------------------------------------------------------------------


def test_match_sites_handles_swaps_strand_flips_ambiguous_and_unknown_sites() -> None:
    panel_pos = np.array([100, 200, 300, 400, 500])
    panel_ref = np.array([b"A", b"C", b"A", b"G", b"C"])
    panel_alt = np.array([b"G", b"T", b"T", b"A", b"A"])
    pos = [100, 200, 300, 400, 150, 500, 600]
    ref = ["A", "T", "A", "C", "A", "C", "A"]
    alt = ["G", "C", "T", "T", "G", "G", "G"]
    # same | REF/ALT swap | A/T ambiguous | other strand (G/A -> C/T) | unknown pos | C/A vs C/G mismatch | past the end
    m = match_sites(panel_pos, panel_ref, panel_alt, pos, ref, alt)
    np.testing.assert_array_equal(m.index, [0, 1, 2, 3, -1, -1, -1])
    np.testing.assert_array_equal(m.swapped, [False, True, False, False, False, False, False])
    np.testing.assert_array_equal(m.flipped, [False, False, False, True, False, False, False])
    np.testing.assert_array_equal(m.ambiguous, [False, False, True, False, False, False, False])
    swapped_ambiguous = match_sites(panel_pos, panel_ref, panel_alt, [300], ["T"], ["A"])
    assert swapped_ambiguous.index[0] == 2 and swapped_ambiguous.swapped[0] and swapped_ambiguous.ambiguous[0]
