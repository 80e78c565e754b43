"""``python -m rag_hpc.simulate``: make the simulated demo panel, targets and truth (msprime + stdpopsim)."""

from __future__ import annotations

# The simulation library (msprime, stdpopsim) is imported where used: --help stays instant.
import argparse
import sys
from pathlib import Path

from rag_hpc.cli import command_parser, run_main


def build_parser() -> argparse.ArgumentParser:
    from rag_hpc.data.simulate import GENOME_PRESETS, PRESETS

    presets = "; ".join(
        [f"{p.name}: {p.n_panel:,} panel + {p.n_targets} target individuals over {p.length / 1e6:g} Mb" for p in PRESETS.values()]
        + [
            f"{name}: chromosomes {', '.join(chroms)}, each a {base} simulation in DIR/<chromosome>/"
            for name, (base, chroms) in GENOME_PRESETS.items()
        ]
    )
    parser = command_parser(
        "simulate",
        "Simulate a phased reference panel and held-out targets (YRI/CEU/CHB, stdpopsim HomSap "
        "OutOfAfrica_3G09, msprime; no download). Writes into DIR: panel.vcf.gz, targets.array.vcf.gz "
        "(targets at one common SNP per ~4 kb), targets.truth.vcf.gz (targets at every panel site), each with a "
        "tabix index, populations.tsv and manifest.json. A complete simulation with the same preset and seed in "
        "DIR is reused.",
        epilog=f"presets: {presets}",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory (created atomically)")
    parser.add_argument(
        "--preset", default="demo", choices=sorted([*PRESETS, *GENOME_PRESETS]), help="simulation size (default: demo)"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed, >= 0 (default: 1); same seed, same files")
    parser.add_argument("--force", action="store_true", help="replace DIR if it holds anything else")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def main(args: argparse.Namespace) -> int:
    from rag_hpc.data.simulate import simulate_panel

    simulate_panel(args.out, args.preset, args.seed, overwrite=args.force, verbose=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
