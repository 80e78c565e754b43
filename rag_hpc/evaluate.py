"""Evaluation of an imputed VCF against the targets' true genotypes.

``python -m rag_hpc.evaluate --imputed imputed.vcf.gz --truth truth.vcf.gz --panel panel.h5 --out report/``

Per site: dosage r² = squared Pearson correlation, across the target samples, between the imputed DS
(the GT allele count where a record has no DS) and the true ALT allele count. Sites are binned by the
panel's minor allele frequency (train split, from panel.h5: the frequency the imputer could have known,
not the targets' own) and r² is averaged per bin, as imputation papers report it. Sites monomorphic in
the truth have no r² (zero variance) and are left out and counted; an imputed dosage that is constant
where the truth varies scores 0. Genotype concordance (hard GT vs truth) and non-reference concordance
(the same, leaving out pairs that are homozygous REF in both, which otherwise dominate) are reported per
bin too. Samples are matched by name, sites by position and alleles (a REF/ALT swap flips the dosage).

``--exclude-sites typed.vcf.gz`` leaves out the targets' typed sites: every imputer copies them, so they
measure nothing but inflate the common bins.

Outputs in --out: report.md (a markdown table), metrics.json, r2_by_maf.png (matplotlib, imported only here).
"""

from __future__ import annotations

# matplotlib and panel.h5's reader are imported where used: scoring without a plot needs neither.
import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rag_hpc.cli import add_config_args, command_parser, config_from_args, run_main
from rag_hpc.data.vcf import VcfError, match_sites, read_calls, read_vcf_sites, same_chromosome
from rag_hpc.errors import ConfigError, InputError
from rag_hpc.fsutil import atomic_write, save_figure
from rag_hpc.maf import MAF_BINS, bin_label, maf_bin

# ------------------------------------------------------------------------------------------------
# metrics


def dosage_r2(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per row: squared Pearson correlation of x and y [n, S] over the columns where both are finite.

    NaN where y has no variance (monomorphic in the truth, or fewer than 2 pairs); 0 where only x is constant.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    valid = np.isfinite(x) & np.isfinite(y)
    n = valid.sum(axis=1)
    x0 = np.where(valid, x, 0.0)
    y0 = np.where(valid, y, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = x0.sum(1) / n
        my = y0.sum(1) / n
        dx = np.where(valid, x0 - mx[:, None], 0.0)
        dy = np.where(valid, y0 - my[:, None], 0.0)
        sxy = (dx * dy).sum(1)
        sxx = (dx * dx).sum(1)
        syy = (dy * dy).sum(1)
        r2 = np.where(sxx > 1e-12, sxy * sxy / (sxx * syy), 0.0)
    return np.where((n >= 2) & (syy > 1e-12), np.minimum(r2, 1.0), np.nan)


@dataclass
class BinMetrics:
    label: str
    lo: float
    hi: float
    n_sites: int  # compared sites in the bin
    n_monomorphic: int  # of which monomorphic in the truth: no r²
    n_r2: int  # sites with an r²
    r2: float | None  # mean per-site r²
    concordance: float | None
    nonref_concordance: float | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Evaluation:
    imputed: Path
    truth: Path
    panel: Path
    samples: dict[str, int]
    sites: dict[str, int]
    bins: list[BinMetrics]
    overall: BinMetrics
    # per compared site, for plots and further analysis
    site_pos: np.ndarray = field(repr=False)
    site_maf: np.ndarray = field(repr=False)
    site_r2: np.ndarray = field(repr=False)  # NaN = monomorphic in the truth
    # Reliability of the ALT dose: per decile of DS / 2, (genotypes, mean DS / 2, mean true count / 2).
    calibration: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def ece(self) -> float | None:
        """Expected calibration error of DS / 2 over the deciles: sum of |predicted - observed|, weighted
        by the deciles' share of genotypes."""
        n = sum(c[0] for c in self.calibration)
        return sum(c[0] * abs(c[1] - c[2]) for c in self.calibration) / n if n else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "imputed": str(self.imputed),
            "truth": str(self.truth),
            "panel": str(self.panel),
            "samples": self.samples,
            "sites": self.sites,
            "maf_source": "panel train-split AF (panel.h5 variants/AF)",
            "bins": [b.to_dict() for b in self.bins],
            "overall": self.overall.to_dict(),
            "dosage_ece": self.ece,
            "calibration": [{"genotypes": n, "mean_ds_half": p, "mean_true_half": o} for n, p, o in self.calibration],
        }

    def r2_by_bin(self) -> dict[str, float | None]:
        return {b.label: b.r2 for b in self.bins}

    def markdown(self, title: str = "Imputation accuracy") -> str:
        def fmt(v: float | None) -> str:
            return "–" if v is None else f"{v:.4f}"

        rows = [
            f"# {title}",
            "",
            f"- imputed: `{self.imputed}`",
            f"- truth: `{self.truth}`",
            f"- panel (MAF = train-split AF): `{self.panel}`",
            f"- samples compared: {self.samples['matched']:,} (imputed {self.samples['imputed']:,}, truth {self.samples['truth']:,})",
            "- sites: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in self.sites.items()),
            "",
            "| MAF bin | sites | monomorphic in truth (left out) | sites with r² | mean dosage r² | genotype concordance | non-ref concordance |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for b in [*self.bins, self.overall]:
            rows.append(
                f"| {b.label} | {b.n_sites:,} | {b.n_monomorphic:,} | {b.n_r2:,} | {fmt(b.r2)} | {fmt(b.concordance)} | {fmt(b.nonref_concordance)} |"
            )
        if self.calibration:
            rows += [
                "",
                f"Dosage calibration (reliability of DS / 2 by decile; ECE {fmt(self.ece)}):",
                "",
                "| DS / 2 | genotypes | mean DS / 2 | observed ALT share |",
                "|---|---:|---:|---:|",
            ]
            for i, (n, p, o) in enumerate(self.calibration):
                if n:
                    rows.append(f"| [{i / 10:.1f}, {(i + 1) / 10:.1f}) | {n:,} | {p:.4f} | {o:.4f} |")
        return "\n".join(rows) + "\n"


def _bin_metrics(
    label: str,
    lo: float,
    hi: float,
    r2: np.ndarray,
    match: np.ndarray,
    total: np.ndarray,
    nr_match: np.ndarray,
    nr_total: np.ndarray,
) -> BinMetrics:
    has = np.isfinite(r2)
    t, nt = int(total.sum()), int(nr_total.sum())
    return BinMetrics(
        label=label,
        lo=lo,
        hi=hi,
        n_sites=int(r2.size),
        n_monomorphic=int((~has).sum()),
        n_r2=int(has.sum()),
        r2=float(r2[has].mean()) if has.any() else None,
        concordance=float(match.sum()) / t if t else None,
        nonref_concordance=float(nr_match.sum()) / nt if nt else None,
    )


def evaluate(
    imputed_vcf: str | os.PathLike[str],
    truth_vcf: str | os.PathLike[str],
    panel_h5: str | os.PathLike[str],
    *,
    exclude_sites_vcf: str | os.PathLike[str] | None = None,
) -> Evaluation:
    """Score ``imputed_vcf`` against ``truth_vcf`` (see the module doc). Raises VcfError / InputError on inputs
    that cannot be compared: no common sample, no common site, another contig than the panel's."""
    from rag_hpc.data.panel import Panel

    imp = read_calls(imputed_vcf, dosage_field="DS")
    truth = read_calls(truth_vcf, dosage_field=None)
    if not same_chromosome(imp.contig, truth.contig):
        raise VcfError(f"{imp.path} is contig {imp.contig} but {truth.path} is contig {truth.contig}: nothing to compare")

    truth_index = {s: i for i, s in enumerate(truth.samples)}
    imp_cols = [i for i, s in enumerate(imp.samples) if s in truth_index]
    if not imp_cols:
        raise InputError(
            f"no sample of {imp.path} ({', '.join(imp.samples[:3])}{', ...' if len(imp.samples) > 3 else ''}) is in "
            f"{truth.path} ({', '.join(truth.samples[:3])}{', ...' if len(truth.samples) > 3 else ''}): samples are matched by name"
        )
    truth_cols = [truth_index[imp.samples[i]] for i in imp_cols]

    # Sites: imputed -> truth by position and alleles; a swapped record reports the other allele's dose.
    m = match_sites(truth.pos, truth.ref, truth.alt, imp.pos, imp.ref, imp.alt)
    keep = m.matched.copy()
    n_typed_excluded = 0
    if exclude_sites_vcf is not None:
        _, xpos, _, _ = read_vcf_sites(exclude_sites_vcf, skip_non_snps=True)
        typed = np.isin(imp.pos, xpos) & keep
        n_typed_excluded = int(typed.sum())
        keep &= ~typed

    with Panel(panel_h5) as panel:
        if not same_chromosome(panel.info.contig, truth.contig):
            raise VcfError(f"{truth.path} is contig {truth.contig} but the panel {panel.path} is contig {panel.info.contig}")
        pm = match_sites(panel.positions, panel.ref, panel.alt, imp.pos, imp.ref, imp.alt)
        panel_af = panel.af
        panel_path = panel.path
    in_panel = pm.matched
    n_not_in_panel = int((keep & ~in_panel).sum())
    keep &= in_panel
    if not keep.any():
        raise InputError(
            f"{imp.path} and {truth.path} share no site that is also in the panel {panel_path} "
            f"({int(m.matched.sum()):,} sites in common, {n_typed_excluded:,} of them excluded as typed)"
        )

    rows = np.flatnonzero(keep)
    x = imp.dosage[rows][:, imp_cols].astype(np.float64)
    c = imp.count[rows][:, imp_cols].astype(np.float64)
    swapped = m.swapped[rows]
    x[swapped] = 2.0 - x[swapped]
    c[swapped] = 2.0 - c[swapped]
    y = truth.count[m.index[rows]][:, truth_cols].astype(np.float64)
    af = panel_af[pm.index[rows]].astype(np.float64)
    maf = np.minimum(af, 1.0 - af)

    r2 = dosage_r2(x, y)
    present = np.isfinite(y)
    # A missing imputed call where the truth is known counts against the imputer.
    agree = present & (c == y)
    match = agree.sum(1)
    total = present.sum(1)
    nonref = present & ((y != 0) | ~(c == 0))
    nr_match = (agree & nonref).sum(1)
    nr_total = nonref.sum(1)

    calibration = _calibration(x, y)
    which = maf_bin(maf)
    bins = [
        _bin_metrics(
            bin_label(lo, hi),
            lo,
            hi,
            r2[which == b],
            match[which == b],
            total[which == b],
            nr_match[which == b],
            nr_total[which == b],
        )
        for b, (lo, hi) in enumerate(MAF_BINS)
    ]
    overall = _bin_metrics("all", 0.0, 0.5, r2, match, total, nr_match, nr_total)
    return Evaluation(
        imputed=imp.path,
        truth=truth.path,
        panel=panel_path,
        samples={"imputed": len(imp.samples), "truth": len(truth.samples), "matched": len(imp_cols)},
        sites={
            "imputed": int(imp.pos.size),
            "truth": int(truth.pos.size),
            "compared": int(rows.size),
            "monomorphic_in_truth": int(np.isnan(r2).sum()),
            "typed_excluded": n_typed_excluded,
            "not_in_panel": n_not_in_panel,
            "truth_not_imputed": int(truth.pos.size - m.matched.sum()),
            "imputed_not_in_truth": int((~m.matched).sum()),
            "non_snp_records_skipped": imp.n_skipped + truth.n_skipped,
        },
        bins=bins,
        overall=overall,
        site_pos=imp.pos[rows],
        site_maf=maf,
        site_r2=r2,
        calibration=calibration,
    )


def _calibration(dose: np.ndarray, truth: np.ndarray, n_bins: int = 10) -> list[tuple[int, float, float]]:
    """Per bin of the imputed ALT share DS / 2: genotypes, their mean DS / 2 and mean true count / 2."""
    known = np.isfinite(truth) & np.isfinite(dose)
    p, o = dose[known] / 2.0, truth[known] / 2.0
    idx = np.clip((p * n_bins).astype(np.int64), 0, n_bins - 1)
    n = np.bincount(idx, minlength=n_bins)
    sp, so = np.bincount(idx, p, n_bins), np.bincount(idx, o, n_bins)
    return [(int(n[i]), float(sp[i] / n[i]) if n[i] else 0.0, float(so[i] / n[i]) if n[i] else 0.0) for i in range(n_bins)]


# ------------------------------------------------------------------------------------------------
# report


def plot_r2_by_maf(evaluations: dict[str, Evaluation], out_png: Path) -> Path:
    """Mean r² per MAF bin (lines, one per method) over the per-site r² (dots) on a log MAF axis."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("the r² plot needs matplotlib: `pip install matplotlib`, or pass --no-plot") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    floor = 1e-4  # MAF 0 (absent from the train split) cannot sit on a log axis
    for i, (name, ev) in enumerate(evaluations.items()):
        color = f"C{i}"
        has = np.isfinite(ev.site_r2)
        if len(evaluations) == 1:
            alpha = float(np.clip(300.0 / max(1, int(has.sum())), 0.05, 0.6))  # visible whether 30 or 50k sites
            ax.scatter(np.maximum(ev.site_maf[has], floor), ev.site_r2[has], s=4, alpha=alpha, color=color, linewidths=0)
        centers = [max(math.sqrt(max(b.lo, floor) * b.hi), floor) for b in ev.bins]
        means = [np.nan if b.r2 is None else b.r2 for b in ev.bins]
        ax.plot(centers, means, "o-", color=color, label=f"{name} (mean per MAF bin)")
    for lo, _ in MAF_BINS[1:]:
        ax.axvline(lo, color="0.8", linewidth=0.8, zorder=0)
    ax.set_xscale("log")
    ax.set_xlim(floor, 0.5)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("minor allele frequency in the panel (train split)")
    ax.set_ylabel("dosage r²")
    ax.set_title("Imputation accuracy by MAF")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    try:
        return save_figure(fig, out_png)
    finally:
        plt.close(fig)


def write_report(
    evaluation: Evaluation, out_dir: str | os.PathLike[str], *, plot: bool = True, title: str = "Imputation accuracy"
) -> dict[str, Path]:
    """Write report.md, metrics.json and (with ``plot``) r2_by_maf.png into out_dir; return their paths."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory: give a directory for the report")
    out.mkdir(parents=True, exist_ok=True)
    files = {"report": out / "report.md", "metrics": out / "metrics.json"}
    atomic_write(files["report"], evaluation.markdown(title).encode())
    atomic_write(files["metrics"], (json.dumps(evaluation.to_dict(), indent=2) + "\n").encode())
    if plot:
        files["plot"] = plot_r2_by_maf({title: evaluation}, out / "r2_by_maf.png")
    return files


# ------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "evaluate",
        "Score an imputed VCF against the true genotypes: mean dosage r² per panel-MAF bin, genotype and "
        "non-reference concordance. Writes report.md, metrics.json and r2_by_maf.png into --out.",
    )
    parser.add_argument("--imputed", type=Path, required=True, help="imputed VCF (DS used when present, else GT)")
    parser.add_argument("--truth", type=Path, help="true genotypes of the same samples (phased or not); default: data.truth_vcf")
    parser.add_argument(
        "--panel", type=Path, help="prepared panel HDF5 (MAF source); default: data.panel_h5, else <workdir>/panel.h5"
    )
    parser.add_argument("--checkpoint", type=Path, help="a trained run (or checkpoint): its panel and truth are the defaults")
    parser.add_argument("--out", type=Path, required=True, help="report directory")
    parser.add_argument("--exclude-sites", type=Path, metavar="VCF", help="leave out these sites (e.g. the typed array sites)")
    parser.add_argument("--no-plot", action="store_true", help="skip r2_by_maf.png")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    add_config_args(parser, per_chromosome=True)
    return parser


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args, args.checkpoint)
    truth = args.truth if args.truth is not None else config.data.truth_vcf
    if truth is None:
        raise ConfigError("no truth: pass --truth TRUTH.vcf.gz (or set data.truth_vcf)")
    panel = args.panel if args.panel is not None else config.panel_h5
    evaluation = evaluate(args.imputed, truth, panel, exclude_sites_vcf=args.exclude_sites)
    write_report(evaluation, args.out, plot=not args.no_plot)
    if not args.quiet:
        print(evaluation.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
