"""Evaluation on a hand-made truth / imputed VCF pair whose r² and concordances are worked out by hand below."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rag_hpc.cli import run_main
from rag_hpc.data.panel import Panel
from rag_hpc.data.prepare import prepare_panel
from rag_hpc.data.vcf import VcfWriter
from rag_hpc.errors import InputError
from rag_hpc.evaluate import Evaluation, _calibration, build_parser, dosage_r2, evaluate, main
from rag_hpc.maf import MAF_BINS, maf_bin

N_PANEL = 1000  # samples: 2,000 haplotypes, 1,800 in the train split (val_fraction 0.1)

# pos: (panel ALT haplotypes, bin the panel MAF must fall in). Carrier counts leave wide margins around the bin
# edges whichever 100 samples the split holds out; the fixture checks the bins before any test relies on them.
PANEL_SITES = {
    100: (2, 0),  # AF <= 2/1800
    200: (14, 1),  # ~0.0078
    300: (60, 2),  # ~0.03
    400: (500, 3),  # ~0.25
    500: (1600, 3),  # AF ~0.8: MAF ~0.2
    600: (60, 2),
    700: (500, 3),
    800: (500, 3),
    900: (500, 3),  # typed: excluded
}

# Samples in the truth: A B C D E; in the imputed file: D C B A X (other order, E missing, X extra).
# Rows: pos, REF, ALT, truth allele counts (A, B, C, D, E), imputed (GT, DS) for (A, B, C, D, X).
SITES = [
    # r² 1: DS equals the truth
    (100, "A", "C", [0, 1, 2, 1, 0], [("0|0", 0.0), ("0|1", 1.0), ("1|1", 2.0), ("1|0", 1.0), ("0|0", 0)]),
    # x = (0, 1, 1, 0) vs y = (0, 1, 2, 1): cov 1, Sxx 1, Syy 2 -> r² = 1 / 2
    (200, "A", "C", [0, 1, 2, 1, 0], [("0|0", 0.0), ("0|1", 1.0), ("0|1", 1.0), ("0|0", 0.0), ("0|0", 0)]),
    # constant DS where the truth varies: r² 0
    (300, "A", "C", [0, 0, 1, 1, 2], [("0|0", 0.5), ("0|0", 0.5), ("0|0", 0.5), ("0|0", 0.5), ("0|0", 0)]),
    # x = (.2, .9, 1.1, 1.8) vs y = (0, 1, 1, 2): Sxy 1.6, Sxx 1.3, Syy 2 -> r² = 2.56 / 2.6
    (400, "A", "C", [0, 1, 1, 2, 0], [("0|0", 0.2), ("0|1", 0.9), ("1|0", 1.1), ("1|1", 1.8), ("0|0", 0)]),
    # x = (1.5, 2, 1, .5) vs y = (2, 2, 1, 0): Sxy 1.75, Sxx 1.25, Syy 2.75 -> r² = 3.0625 / 3.4375 = 49 / 55
    (500, "A", "C", [2, 2, 1, 0, 1], [("0|1", 1.5), ("1|1", 2.0), ("1|0", 1.0), ("0|1", 0.5), ("0|0", 0)]),
    (600, "A", "C", [1, 0, 0, 0, 0], [("1|0", 1.0), ("0|0", 0.0), ("0|0", 0.0), ("0|0", 0.0), ("0|0", 0)]),
    # monomorphic in the truth over A-D (E is not compared): no r²
    (700, "A", "C", [0, 0, 0, 0, 1], [("0|0", 0.1), ("0|0", 0.0), ("0|0", 0.0), ("0|0", 0.0), ("0|0", 0)]),
    # imputed with REF/ALT swapped (written below as REF C, ALT A): its counts flip to (0, 1, 2, 0)
    (800, "A", "C", [0, 1, 2, 0, 0], [("1|1", 2.0), ("0|1", 1.0), ("0|0", 0.0), ("1|1", 2.0), ("0|0", 0)]),
    # typed: excluded, though it would score 0
    (900, "A", "C", [0, 1, 0, 1, 0], [("1|1", 2.0), ("1|1", 2.0), ("1|1", 2.0), ("1|1", 2.0), ("0|0", 0)]),
]
SWAPPED_IN_IMPUTED = {800}
TRUTH_ONLY = (1100, "G", "T", [0, 1, 0, 1, 0])
IMPUTED_ONLY = (1000, "G", "T", [("0|1", 1.0)] * 5)

R2 = {100: 1.0, 200: 0.5, 300: 0.0, 400: 2.56 / 2.6, 500: 49 / 55, 600: 1.0, 800: 1.0}
# Hard-call agreement over A-D per site (matches, and matches / pairs where truth or call is non-REF).
CONC = {
    100: (4, 3, 3),
    200: (2, 1, 3),
    300: (2, 0, 2),
    400: (4, 3, 3),
    500: (2, 2, 4),
    600: (4, 1, 1),
    700: (4, 0, 0),
    800: (4, 2, 2),
}
BIN_OF = {100: 0, 200: 1, 300: 2, 600: 2, 400: 3, 500: 3, 700: 3, 800: 3}


def _genotype(count: int) -> str:
    return {0: "0/0", 1: "0/1", 2: "1/1"}[count]


def write_vcf(path: Path, samples: list[str], rows: list[tuple[int, str, str, str, list[str]]]) -> Path:
    """A plain-text VCF: (pos, ref, alt, FORMAT, per-sample fields)."""
    fmt = {r[3] for r in rows}
    lines = ["##fileformat=VCFv4.2", "##contig=<ID=21>", '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">']
    if any("DS" in f for f in fmt):
        lines.append('##FORMAT=<ID=DS,Number=A,Type=Float,Description="ALT dose">')
    lines.append("\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT", *samples]))
    for pos, ref, alt, f, fields in rows:
        lines.append("\t".join(["21", str(pos), ".", ref, alt, ".", "PASS", ".", f, *fields]))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def panel_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("eval_panel")
    positions = sorted(PANEL_SITES)
    gt = np.zeros((len(positions), N_PANEL, 2), np.int8)
    for i, p in enumerate(positions):
        n_alt = PANEL_SITES[p][0]
        haps = gt[i].reshape(-1)  # view: haplotype h = sample h // 2, allele h % 2
        # spread carriers over samples (every 7th haplotype) so no block of samples holds them all
        haps[(np.arange(n_alt) * 7) % (2 * N_PANEL) if n_alt * 7 <= 2 * N_PANEL else np.arange(n_alt)] = 1
    with VcfWriter(d / "panel.vcf.gz", contig="21", samples=[f"P{i:04d}" for i in range(N_PANEL)]) as w:
        w.write_phased(np.array(positions), np.array(["A"] * len(positions)), np.array(["C"] * len(positions)), gt)
    out = prepare_panel(d / "panel.vcf.gz", d / "panel.h5", val_fraction=0.1, split_seed=0)
    with Panel(out) as panel:
        af = panel.af.astype(np.float64)
        bins = maf_bin(np.minimum(af, 1 - af))
        assert bins.tolist() == [PANEL_SITES[p][1] for p in positions], f"fixture panel MAFs {af} moved bins"
    return out


@pytest.fixture(scope="module")
def vcfs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("eval_vcfs")
    truth_rows = [(p, r, a, "GT", [_genotype(c) for c in counts]) for p, r, a, counts, _ in SITES]
    truth_rows.append((TRUTH_ONLY[0], TRUTH_ONLY[1], TRUTH_ONLY[2], "GT", [_genotype(c) for c in TRUTH_ONLY[3]]))
    truth_rows.sort()
    # The truth is unphased: evaluation needs allele counts only.
    truth = write_vcf(d / "truth.vcf", ["A", "B", "C", "D", "E"], truth_rows)

    order = [3, 2, 1, 0, 4]  # imputed columns D C B A X from the per-site (A, B, C, D, X) tuples
    imputed_rows = []
    for p, r, a, _, calls in [*SITES, (IMPUTED_ONLY[0], IMPUTED_ONLY[1], IMPUTED_ONLY[2], None, IMPUTED_ONLY[3])]:
        fields = [f"{calls[j][0]}:{calls[j][1]:.3f}" for j in order]
        if p in SWAPPED_IN_IMPUTED:
            r, a = a, r
        imputed_rows.append((p, r, a, "GT:DS", fields))
    imputed = write_vcf(d / "imputed.vcf", ["D", "C", "B", "A", "X"], sorted(imputed_rows))
    typed = write_vcf(d / "typed.vcf", ["A"], [(900, "A", "C", "GT", ["0/1"])])
    return {"truth": truth, "imputed": imputed, "typed": typed}


def test_dosage_r2_is_the_squared_pearson_correlation_with_nan_for_constant_truth() -> None:
    x = np.array([[0, 1, 1, 0], [0.5, 0.5, 0.5, 0.5], [1, 2, 3, 4], [0.3, 0, 0, 0]], float)
    y = np.array([[0, 1, 2, 1], [0, 0, 1, 1], [1, 2, 3, 4], [0, 0, 0, 0]], float)
    r2 = dosage_r2(x, y)
    assert r2[:3] == pytest.approx([0.5, 0.0, 1.0])
    assert np.isnan(r2[3])


def test_per_site_r2_and_maf_bin_means_match_the_hand_computed_values(panel_h5: Path, vcfs: dict[str, Path]) -> None:
    ev = evaluate(vcfs["imputed"], vcfs["truth"], panel_h5, exclude_sites_vcf=vcfs["typed"])
    got = dict(zip(ev.site_pos.tolist(), ev.site_r2.tolist()))
    assert set(got) == set(BIN_OF)
    assert np.isnan(got.pop(700))
    assert got == pytest.approx(R2)
    for b, metrics in enumerate(ev.bins):
        sites = [p for p, pb in BIN_OF.items() if pb == b]
        with_r2 = [p for p in sites if p in R2]
        assert (metrics.lo, metrics.hi) == MAF_BINS[b]
        assert metrics.n_sites == len(sites)
        assert metrics.n_r2 == len(with_r2)
        assert metrics.n_monomorphic == len(sites) - len(with_r2)
        assert metrics.r2 == pytest.approx(np.mean([R2[p] for p in with_r2]))
    assert [b.r2 for b in ev.bins] == pytest.approx([1.0, 0.5, 0.5, (2.56 / 2.6 + 49 / 55 + 1.0) / 3])
    assert ev.overall.r2 == pytest.approx(np.mean(list(R2.values())))
    assert ev.bins[3].n_monomorphic == 1 and ev.sites["monomorphic_in_truth"] == 1


def test_dosage_calibration_is_zero_for_exact_frequencies_and_the_bias_for_a_shifted_dose() -> None:
    truth = np.array([[0.0, 1.0, 2.0, np.nan]] * 3)
    exact = Evaluation.__new__(Evaluation)
    exact.calibration = _calibration(truth.copy(), truth)
    assert exact.ece == pytest.approx(0.0)
    assert [n for n, _, _ in exact.calibration] == [3, 0, 0, 0, 0, 3, 0, 0, 0, 3]  # NaN truth left out
    # 0.95 instead of 1 (DS/2 0.475, bin 4) and 0.1 instead of 0: two thirds of the genotypes off by 0.05 / 2 and 0.1 / 2.
    shifted = Evaluation.__new__(Evaluation)
    shifted.calibration = _calibration(np.array([[0.1, 0.95, 2.0, 1.0]] * 3), truth)
    assert shifted.ece == pytest.approx((0.05 + 0.025) / 3)


def test_genotype_and_non_reference_concordance_match_the_hand_counts(panel_h5: Path, vcfs: dict[str, Path]) -> None:
    ev = evaluate(vcfs["imputed"], vcfs["truth"], panel_h5, exclude_sites_vcf=vcfs["typed"])
    for b, metrics in enumerate(ev.bins):
        sites = [p for p, pb in BIN_OF.items() if pb == b]
        match = sum(CONC[p][0] for p in sites)
        nr_match, nr_total = sum(CONC[p][1] for p in sites), sum(CONC[p][2] for p in sites)
        assert metrics.concordance == pytest.approx(match / (4 * len(sites)))
        assert metrics.nonref_concordance == pytest.approx(nr_match / nr_total)
    # by hand: bin 3 = sites 400, 500, 700, 800: 14 of 16 calls agree; non-REF 7 of 9
    assert ev.bins[3].concordance == pytest.approx(14 / 16)
    assert ev.bins[3].nonref_concordance == pytest.approx(7 / 9)


def test_samples_match_by_name_and_site_bookkeeping_is_reported(panel_h5: Path, vcfs: dict[str, Path]) -> None:
    ev = evaluate(vcfs["imputed"], vcfs["truth"], panel_h5, exclude_sites_vcf=vcfs["typed"])
    assert ev.samples == {"imputed": 5, "truth": 5, "matched": 4}
    assert ev.sites["compared"] == 8
    assert ev.sites["typed_excluded"] == 1
    assert ev.sites["truth_not_imputed"] == 1
    assert ev.sites["imputed_not_in_truth"] == 1
    without_exclusion = evaluate(vcfs["imputed"], vcfs["truth"], panel_h5)
    assert without_exclusion.sites["compared"] == 9
    assert without_exclusion.bins[3].r2 < ev.bins[3].r2  # the typed site scores 0 here


def test_evaluate_cli_writes_markdown_json_and_png(
    panel_h5: Path, vcfs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    argv = [
        "--imputed",
        str(vcfs["imputed"]),
        "--truth",
        str(vcfs["truth"]),
        "--panel",
        str(panel_h5),
        "--out",
        str(out),
        "--exclude-sites",
        str(vcfs["typed"]),
    ]
    assert run_main(main, build_parser(), argv) == 0
    assert "| [0.05, 0.5] | 4 | 1 | 3 |" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert [b["r2"] for b in metrics["bins"]] == pytest.approx([1.0, 0.5, 0.5, (2.56 / 2.6 + 49 / 55 + 1.0) / 3])
    assert "| [0, 0.005) | 1 | 0 | 1 | 1.0000 |" in (out / "report.md").read_text()
    assert (out / "r2_by_maf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("case", "message"), [("no_common_sample", "matched by name"), ("missing_truth", "does not exist"), ("no_panel", "prepare")]
)
def test_evaluate_cli_exits_3_with_one_error_line_on_bad_input(
    case: str, message: str, panel_h5: Path, vcfs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truth, panel = vcfs["truth"], panel_h5
    if case == "no_common_sample":
        truth = write_vcf(tmp_path / "others.vcf", ["Q"], [(100, "A", "C", "GT", ["0/1"])])
    elif case == "missing_truth":
        truth = tmp_path / "nope.vcf.gz"
    else:
        panel = tmp_path / "nope.h5"
    argv = ["--imputed", str(vcfs["imputed"]), "--truth", str(truth), "--panel", str(panel), "--out", str(tmp_path / "r")]
    assert run_main(main, build_parser(), argv) == InputError.exit_code  # all three are input problems
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not (tmp_path / "r").exists()
