"""Imputation driver, VCF output and the nearest-haplotype baseline, on the tiny coalescent simulation."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import cyvcf2
import numpy as np
import pytest

from rag_hpc.cli import run_main
from rag_hpc.config import RagConfig, load_config
from rag_hpc.data.panel import Panel
from rag_hpc.data.prepare import prepare_panel
from rag_hpc.data.vcf import VcfWriter, read_phased_vcf
from rag_hpc.data.windows import make_windows
from rag_hpc.errors import ConfigError, InputError
from rag_hpc.impute import NearestHaplotypePredictor, build_parser, impute, main

WINDOW = 64  # several windows over the tiny panel's ~260 sites, the last one short
COMPLEMENT = {b"A": b"T", b"T": b"A", b"C": b"G", b"G": b"C"}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def panel_h5(tiny_simulation: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_panel(
        tiny_simulation / "panel.vcf.gz",
        tmp_path_factory.mktemp("panel") / "panel.h5",
        populations=tiny_simulation / "populations.tsv",
    )


@pytest.fixture
def config(panel_h5: Path, tmp_path: Path) -> RagConfig:
    return load_config(
        overrides=[f"data.panel_h5={panel_h5}", f"paths.workdir={tmp_path / 'work'}", f"windows.window_size={WINDOW}"]
    )


def run_impute(config: RagConfig, targets: Path, out: Path, k: int = 1, **kwargs):
    with Panel(config.panel_h5) as panel:
        predictor = NearestHaplotypePredictor.from_config(config, k=k, panel=panel)
        return impute(config, predictor, targets, out, panel=panel, **kwargs)


def records(path: Path) -> list[bytes]:
    """Data lines of a VCF (header left out)."""
    with gzip.open(path, "rb") as fh:
        return [line for line in fh if not line.startswith(b"#")]


def is_ambiguous(ref: bytes, alt: bytes) -> bool:
    return COMPLEMENT[ref] == alt


def write_targets(
    src: Path,
    dst: Path,
    *,
    pos_shift: int = 0,
    swap: np.ndarray | None = None,
    flip: np.ndarray | None = None,
    contig: str | None = None,
) -> Path:
    """Rewrite a phased target VCF: shift positions, swap REF/ALT (flipping the alleles), complement the
    alleles or rename the contig."""
    t = read_phased_vcf(src)
    ref, alt, gt = t.ref.copy(), t.alt.copy(), t.gt.copy()
    if swap is not None:
        ref[swap], alt[swap] = t.alt[swap], t.ref[swap]
        gt[swap] = 1 - gt[swap]
    if flip is not None:
        ref[flip] = [COMPLEMENT[a] for a in ref[flip]]
        alt[flip] = [COMPLEMENT[a] for a in alt[flip]]
    with VcfWriter(dst, contig=contig or t.contig, samples=t.samples) as w:
        w.write_phased(t.pos + pos_shift, ref, alt, gt)
    return dst


# ------------------------------------------------------------------------------------------------


def test_imputed_vcf_has_every_panel_site_dosages_in_range_and_gp_summing_to_one(
    config: RagConfig, tiny_simulation: Path, tmp_path: Path
) -> None:
    out = tmp_path / "imputed.vcf.gz"
    summary = run_impute(config, tiny_simulation / "targets.array.vcf.gz", out, k=5)  # k > 1: fractional dosages
    with Panel(config.panel_h5) as panel:
        positions = panel.positions.copy()
    vcf = cyvcf2.VCF(str(out))
    assert vcf.samples == read_phased_vcf(tiny_simulation / "targets.array.vcf.gz").samples
    n, fractional = 0, 0
    for rec in vcf:
        assert positions[n] == rec.POS
        ds = rec.format("DS")[:, 0]
        gp = rec.format("GP")
        gt = rec.genotype.array()
        assert ((ds >= 0) & (ds <= 2)).all()
        assert np.abs(gp.sum(axis=1) - 1).max() <= 1e-3
        assert (gp >= 0).all()
        assert np.abs(ds - (gp[:, 1] + 2 * gp[:, 2])).max() <= 2e-3
        assert gt[:, 2].all()  # phased
        # each haplotype's call is its more probable allele, so the call is within 1 of the dosage
        assert np.abs(ds - gt[:, :2].sum(axis=1)).max() <= 1.0 + 1e-3
        assert rec.INFO["AF"] == pytest.approx(ds.mean() / 2, abs=1e-3)
        p = ds.mean() / 2
        expected_dr2 = ds.var() / (2 * p * (1 - p)) if 0 < p < 1 else 0.0
        assert rec.INFO["DR2"] == pytest.approx(expected_dr2, abs=0.01)
        fractional += int(((ds > 0) & (ds < 2) & (np.abs(ds - np.round(ds)) > 0.01)).any())
        n += 1
    vcf.close()
    assert n == positions.size == summary.n_panel_sites
    assert fractional > 0
    assert summary.n_windows == len(make_windows(n, WINDOW))


def test_imputed_vcf_is_tabix_indexed_for_region_queries(config: RagConfig, tiny_simulation: Path, tmp_path: Path) -> None:
    out = tmp_path / "imputed.vcf.gz"
    run_impute(config, tiny_simulation / "targets.array.vcf.gz", out)
    assert Path(f"{out}.tbi").is_file()
    with Panel(config.panel_h5) as panel:
        pos = panel.positions
        lo, hi = int(pos[40]), int(pos[90])
        expected = pos[(pos >= lo) & (pos <= hi)].tolist()
        contig = panel.info.contig
    vcf = cyvcf2.VCF(str(out))
    assert [rec.POS for rec in vcf(f"{contig}:{lo}-{hi}")] == expected
    vcf.close()


def test_typed_sites_keep_the_target_alleles_and_ambiguous_ones_are_imputed(
    config: RagConfig, tiny_simulation: Path, tmp_path: Path
) -> None:
    targets = read_phased_vcf(tiny_simulation / "targets.array.vcf.gz")
    ambiguous = np.array([is_ambiguous(r, a) for r, a in zip(targets.ref, targets.alt)])
    assert ambiguous.any() and (~ambiguous).any()
    out = tmp_path / "imputed.vcf.gz"
    summary = run_impute(config, tiny_simulation / "targets.array.vcf.gz", out, k=5)
    assert summary.targets.counts["ambiguous_skipped"] == int(ambiguous.sum())
    assert summary.targets.counts["used"] == int((~ambiguous).sum())
    by_pos = {int(p): i for i, p in enumerate(targets.pos)}
    seen = 0
    for rec in cyvcf2.VCF(str(out)):
        i = by_pos.get(rec.POS)
        if i is None:
            assert rec.INFO.get("IMP") and rec.INFO.get("TYPED") is None
            continue
        if ambiguous[i]:
            assert rec.INFO.get("IMP")  # skipped as typed: imputed like any other site
            continue
        seen += 1
        assert rec.INFO.get("TYPED")
        gt = rec.genotype.array()[:, :2]
        np.testing.assert_array_equal(gt, targets.gt[i])
        np.testing.assert_array_equal(rec.format("DS")[:, 0], targets.gt[i].sum(axis=1))
        gp = rec.format("GP")
        np.testing.assert_array_equal(gp.argmax(axis=1), targets.gt[i].sum(axis=1))
        assert set(np.unique(gp)) <= {0.0, 1.0}
    assert seen == int((~ambiguous).sum())


def test_swapped_and_strand_flipped_targets_give_the_same_imputation(
    config: RagConfig, tiny_simulation: Path, tmp_path: Path
) -> None:
    src = tiny_simulation / "targets.array.vcf.gz"
    t = read_phased_vcf(src)
    unambiguous = np.flatnonzero([not is_ambiguous(r, a) for r, a in zip(t.ref, t.alt)])
    swap = np.zeros(t.n_sites, bool)
    flip = np.zeros(t.n_sites, bool)
    swap[unambiguous[0::3]] = True
    flip[unambiguous[1::3]] = True
    swap[unambiguous[2::6]] = flip[unambiguous[2::6]] = True  # both: other strand and REF/ALT swapped
    changed = write_targets(src, tmp_path / "changed.vcf.gz", swap=swap, flip=flip)

    plain = run_impute(config, src, tmp_path / "plain.vcf.gz", k=3)
    other = run_impute(config, changed, tmp_path / "changed.imputed.vcf.gz", k=3)
    assert other.targets.counts["swapped"] == int(swap.sum())
    assert other.targets.counts["strand_flipped"] == int(flip.sum())
    assert other.targets.counts["used"] == plain.targets.counts["used"]
    assert records(tmp_path / "changed.imputed.vcf.gz") == records(tmp_path / "plain.vcf.gz")


def test_chr21_and_21_name_one_chromosome_said_once_and_another_chromosome_is_refused(
    config: RagConfig, tiny_simulation: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from rag_hpc.data.vcf import VcfError
    from rag_hpc.evaluate import evaluate

    src = tiny_simulation / "targets.array.vcf.gz"  # the panel and these targets name the chromosome 21
    plain = run_impute(config, src, tmp_path / "plain.vcf.gz", k=3)
    chr21 = write_targets(src, tmp_path / "chr21.vcf.gz", contig="chr21")
    with caplog.at_level("WARNING", logger="rag_hpc.data"):
        renamed = run_impute(config, chr21, tmp_path / "chr21.imputed.vcf.gz", k=3)
        run_impute(config, chr21, tmp_path / "again.vcf.gz", k=3)
    assert renamed.targets.counts["used"] == plain.targets.counts["used"]
    assert records(tmp_path / "chr21.imputed.vcf.gz") == records(tmp_path / "plain.vcf.gz")
    said = [r.getMessage() for r in caplog.records if "read as one chromosome" in r.getMessage()]
    assert len(said) == 1 and "chr21" in said[0], said
    # The truth may spell it either way too.
    truth = tmp_path / "truth.chr21.vcf.gz"
    t = read_phased_vcf(tiny_simulation / "targets.truth.vcf.gz")
    with VcfWriter(truth, contig="chr21", samples=t.samples) as w:
        w.write_phased(t.pos, t.ref, t.alt, t.gt)
    assert evaluate(tmp_path / "plain.vcf.gz", truth, config.panel_h5).overall.n_r2 > 0
    with pytest.raises(VcfError, match="contig chr22 but the panel"):
        run_impute(config, write_targets(src, tmp_path / "chr22.vcf.gz", contig="chr22"), tmp_path / "no.vcf.gz")


class _FailingPredictor(NearestHaplotypePredictor):
    """A predictor whose third window returns probabilities outside [0, 1]."""

    def predict_window(self, window_id: int, query: np.ndarray, observed: np.ndarray) -> np.ndarray:
        p = super().predict_window(window_id, query, observed)
        return p + 2.0 if window_id == 2 else p


def test_a_failure_mid_write_leaves_no_partial_output_and_the_old_file_untouched(
    config: RagConfig, tiny_simulation: Path, tmp_path: Path
) -> None:
    out = tmp_path / "imputed.vcf.gz"
    run_impute(config, tiny_simulation / "targets.array.vcf.gz", out)
    before = out.read_bytes(), Path(f"{out}.tbi").read_bytes()
    with Panel(config.panel_h5) as panel:
        failing = _FailingPredictor.from_config(config, panel=panel)
        with pytest.raises(ValueError, match=r"predict_window\(2\).*\[0, 1\]"):
            impute(config, failing, tiny_simulation / "targets.array.vcf.gz", out, panel=panel)
    assert (out.read_bytes(), Path(f"{out}.tbi").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".imputed", "imputed"))) == [
        "imputed.vcf.gz",
        "imputed.vcf.gz.tbi",
    ]


def brute_force_nearest(reference: np.ndarray, query: np.ndarray, observed: np.ndarray, k: int) -> np.ndarray:
    """Mean of the k references with the fewest mismatches on the observed sites, ties to the lower index."""
    out = np.empty(query.shape, np.float64)
    for b in range(query.shape[0]):
        dist = [int((reference[r, observed] != query[b, observed]).sum()) for r in range(reference.shape[0])]
        order = sorted(range(reference.shape[0]), key=lambda r: (dist[r], r))[:k]
        out[b] = reference[order].mean(axis=0)
    return out


def test_nearest_copy_equals_a_brute_force_hamming_copy_from_the_train_split(
    config: RagConfig, tiny_simulation: Path, tmp_path: Path
) -> None:
    out = tmp_path / "imputed.vcf.gz"
    summary = run_impute(config, tiny_simulation / "targets.array.vcf.gz", out, k=1)
    typed = np.zeros(summary.n_panel_sites, bool)
    typed[summary.targets.panel_index] = True
    query = np.zeros((summary.targets.haplotypes.shape[0], summary.n_panel_sites), np.uint8)
    query[:, summary.targets.panel_index] = summary.targets.haplotypes
    with Panel(config.panel_h5) as panel:
        # in the search order: exact ties go to the reference searched first
        reference = panel.haplotypes(0, panel.n_sites)[panel.reference_haplotypes()]
        predictor = NearestHaplotypePredictor.from_config(config, k=3, panel=panel)
        expected = np.empty(query.shape)
        for w in make_windows(panel.n_sites, WINDOW):
            sl = slice(w.start, w.stop)
            if not typed[sl].any():
                # nothing to match on: every reference ties, and the baseline predicts their mean (the train AF)
                expected[:, sl] = reference[:, sl].mean(axis=0)
                continue
            expected[:, sl] = brute_force_nearest(reference[:, sl], query[:, sl], typed[sl], 1)
            np.testing.assert_allclose(
                predictor.predict_window(w.id, query[:, sl], typed[sl]),
                brute_force_nearest(reference[:, sl], query[:, sl], typed[sl], 3),
                atol=1e-6,
            )
    imputed = np.stack([rec.genotype.array()[:, :2].reshape(-1) for rec in cyvcf2.VCF(str(out))], axis=1)  # [2S, n_sites]
    expected[:, typed] = query[:, typed]
    assert typed.any() and (~typed).any()
    np.testing.assert_array_equal(imputed, expected > 0.5)


def test_impute_cli_writes_the_vcf_with_the_nearest_baseline(
    panel_h5: Path, tiny_simulation: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli.vcf.gz"
    argv = [
        "--baseline",
        "nearest",
        "--k",
        "2",
        "--targets",
        str(tiny_simulation / "targets.array.vcf.gz"),
        "--out",
        str(out),
        "--panel",
        str(panel_h5),
        "--set",
        f"paths.workdir={tmp_path / 'work'}",
        "--set",
        f"windows.window_size={WINDOW}",
    ]
    assert run_main(main, build_parser(), argv) == 0
    assert "strand-ambiguous" in capsys.readouterr().out
    assert len(records(out)) == Panel(panel_h5).n_sites


@pytest.mark.parametrize(
    ("case", "message", "kind"),
    [
        ("missing_targets", "does not exist", InputError),
        ("no_method", "--checkpoint CKPT", ConfigError),
        ("missing_checkpoint", "--checkpoint", InputError),
        ("bad_out_name", "*.vcf.gz", InputError),
    ],
)
def test_impute_cli_exits_with_the_kinds_code_and_one_error_line_on_bad_input(
    case: str, message: str, kind: type, panel_h5: Path, tiny_simulation: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    targets = tiny_simulation / "targets.array.vcf.gz"
    out = tmp_path / "out.vcf.gz"
    method = ["--baseline", "nearest"]
    if case == "missing_targets":
        targets = tmp_path / "nope.vcf.gz"
    elif case == "no_method":
        method = []
    elif case == "missing_checkpoint":
        method = ["--checkpoint", str(tmp_path / "nope.pt")]
    elif case == "bad_out_name":
        out = tmp_path / "out.vcf"
    argv = [
        *method,
        "--targets",
        str(targets),
        "--out",
        str(out),
        "--panel",
        str(panel_h5),
        "--set",
        f"paths.workdir={tmp_path / 'w'}",
    ]
    assert run_main(main, build_parser(), argv) == kind.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not out.exists()


def test_impute_cli_as_a_process_exits_3_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rag_hpc.impute",
            "--baseline",
            "nearest",
            "--targets",
            str(tmp_path / "t.vcf.gz"),
            "--out",
            str(tmp_path / "o.vcf.gz"),
            "--panel",
            str(tmp_path / "missing.h5"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == InputError.exit_code  # the panel does not exist
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "prepare" in lines[0]


def test_ranges_imputed_by_separate_tasks_merge_into_the_vcf_one_process_writes(
    config: RagConfig, tiny_simulation: Path, tmp_path: Path
) -> None:
    from rag_hpc.data.windows import window_ranges
    from rag_hpc.impute import CopyPredictor, impute_range, merge_ranges, parts_store

    targets = tiny_simulation / "targets.array.vcf.gz"
    whole = impute(config, CopyPredictor.from_config(config, ne=20_000), targets, tmp_path / "whole.vcf.gz").out
    n_windows = len(make_windows(Panel(config.panel_h5).n_sites, WINDOW))
    ranges = window_ranges(list(range(n_windows)), 2)
    assert len(ranges) >= 2
    # Each range in its own predictor, as separate array tasks would run them.
    assert [impute_range(config, CopyPredictor.from_config(config, ne=20_000), targets, r) for r in ranges] == ["built"] * len(
        ranges
    )
    assert impute_range(config, CopyPredictor.from_config(config, ne=20_000), targets, ranges[0]) == "cached"
    merged = merge_ranges(config, CopyPredictor.from_config(config, ne=20_000), targets, tmp_path / "merged.vcf.gz", ranges)
    assert gzip.decompress(merged.out.read_bytes()) == gzip.decompress(whole.read_bytes())
    assert Path(f"{merged.out}.tbi").is_file()

    # A range whose bytes no longer match its manifest: the merge names it and writes nothing; rerunning
    # the array redoes that range alone.
    parts = sorted(parts_store(config).root.glob("imputed/*/*/records.gz"))
    assert len(parts) == len(ranges)
    parts[0].write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"1 imputed range\(s\) missing or invalid"):
        merge_ranges(config, CopyPredictor.from_config(config, ne=20_000), targets, tmp_path / "again.vcf.gz", ranges)
    assert not (tmp_path / "again.vcf.gz").exists()
    redone = [impute_range(config, CopyPredictor.from_config(config, ne=20_000), targets, r) for r in ranges]
    assert redone.count("built") == 1
    # Another predictor's ranges are other parts: never merged into this one's VCF.
    with pytest.raises(InputError, match="missing or invalid"):
        merge_ranges(config, CopyPredictor.from_config(config, ne=30_000), targets, tmp_path / "other.vcf.gz", ranges)


def test_impute_with_a_checkpoint_takes_its_settings_and_its_runs_data_from_any_directory(
    tiny_simulation: Path, tmp_path: Path
) -> None:
    import gzip
    import subprocess
    import sys

    from tests.slurm_helpers import as_flags, cli, plain_env, tiny_sets, train_tiny

    work = tmp_path / "work"
    train_tiny(tiny_simulation, work)
    run = work / "runs" / "default"
    full = cli(
        "impute", "--checkpoint", str(run), "--out", str(tmp_path / "full.vcf.gz"), *as_flags(tiny_sets(tiny_simulation, work))
    )
    assert full.returncode == 0, full.stderr[-2000:]
    # The shortest command, from another directory, with no config: the window size (100, not the default
    # 511), the model, the HMM and the run's panel, targets and cache all come from the checkpoint.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    short = subprocess.run(
        [sys.executable, "-m", "rag_hpc.impute", "--checkpoint", str(run), "--out", "short.vcf.gz", "--quiet"],
        cwd=elsewhere,
        env=plain_env(1),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert short.returncode == 0, short.stderr[-2000:]
    assert gzip.decompress((elsewhere / "short.vcf.gz").read_bytes()) == gzip.decompress((tmp_path / "full.vcf.gz").read_bytes())
    assert not (elsewhere / "rag_hpc_work").exists(), "nothing is written outside the run's own directories"
    # A setting that contradicts the model is refused, naming both values; one that agrees is fine.
    bad = cli(
        "impute",
        "--checkpoint",
        str(run),
        "--out",
        str(tmp_path / "x.vcf.gz"),
        "--set",
        "windows.window_size=511",
        "--set",
        "model.k=4",
    )
    assert bad.returncode == 2 and not (tmp_path / "x.vcf.gz").exists()
    assert "windows.window_size=511 (the checkpoint's: 100); model.k=4 (the checkpoint's: 8)" in bad.stderr, bad.stderr
    same = cli("impute", "--checkpoint", str(run), "--out", str(tmp_path / "y.vcf.gz"), "--set", "windows.window_size=100")
    assert same.returncode == 0, same.stderr[-2000:]
