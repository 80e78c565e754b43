"""``python -m rag_hpc.prepare``: phased VCF -> HDF5 panel (alleles, AF over the train split, the split)."""

from __future__ import annotations

# h5py and the stage's library are imported in main(): --help and argument errors stay instant.
import argparse
import sys
import time
from pathlib import Path

from rag_hpc.cli import add_config_args, command_parser, config_from_args, run_main


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "prepare",
        "Convert a phased, biallelic-SNP, single-contig VCF into the HDF5 panel every later stage reads. "
        "Bad input (unphased, missing or non-diploid calls, indels, unsorted or duplicate positions, several "
        "contigs, truncated files) stops with one 'error:' line naming the record and the fix; no output is left.",
        epilog="Flags left out are taken from the config's data section (--config / --set / RAG_HPC_DATA__*).",
    )
    parser.add_argument("--vcf", type=Path, help="phased panel VCF (.vcf.gz); default: data.panel_vcf")
    parser.add_argument("--out", type=Path, help="panel HDF5 to write; default: data.panel_h5 (else <workdir>/panel.h5)")
    parser.add_argument("--populations", type=Path, help="TSV 'sample<TAB>population': per-population AF and a stratified split")
    parser.add_argument("--val-fraction", type=float, help="share of samples held out for validation (default 0.1)")
    parser.add_argument("--split-seed", type=int, help="seed of the train/val split (default 0)")
    parser.add_argument(
        "--skip-non-snps",
        action="store_true",
        default=None,
        help="skip multi-allelic and indel records (counted) instead of failing",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    add_config_args(parser, per_chromosome=True)
    return parser


def main(args: argparse.Namespace) -> int:
    import h5py

    from rag_hpc.data.panel import SPLIT_LABELS, Panel
    from rag_hpc.data.prepare import prepare_panel
    from rag_hpc.errors import ConfigError

    # Flags win; what a flag leaves out comes from the config's data section (defaults, env, --config, --set).
    config = config_from_args(args)
    data = config.data

    def pick(flag, default):
        return flag if flag is not None else default

    vcf = pick(args.vcf, data.panel_vcf)
    if vcf is None:
        raise ConfigError(
            "no input VCF: pass --vcf PANEL.vcf.gz (or set data.panel_vcf); `python -m rag_hpc.simulate` makes a demo panel"
        )
    out = pick(args.out, config.panel_h5)

    t0 = time.perf_counter()
    prepare_panel(
        vcf,
        out,
        populations=pick(args.populations, data.populations),
        val_fraction=pick(args.val_fraction, data.val_fraction),
        split_seed=pick(args.split_seed, data.split_seed),
        skip_non_snps=pick(args.skip_non_snps, data.skip_non_snps),
        progress=not args.quiet and sys.stderr.isatty(),
    )
    if not args.quiet:
        with Panel(out) as panel, h5py.File(out, "r") as h5:
            counts = ", ".join(f"{(panel.split == i).sum()} {label}" for i, label in enumerate(SPLIT_LABELS))
            skipped = int(h5.attrs["n_skipped_non_snps"])
            note = f", {skipped:,} non-SNP records skipped" if skipped else ""
            print(
                f"{out}: {panel.n_sites:,} sites x {panel.n_samples:,} samples ({counts}) on contig "
                f"{panel.info.contig}{note} in {time.perf_counter() - t0:.1f} s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
