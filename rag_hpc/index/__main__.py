"""``python -m rag_hpc.index``: build (or verify) window shards and their donor-table parts — what one array task runs."""

from __future__ import annotations

# The builder is imported in main(): --help and argument errors stay light.
import argparse
import sys
import time

from rag_hpc.cli import add_config_args, command_parser, config_from_args, run_main
from rag_hpc.errors import ConfigError


def parse_window_ids(spec: str) -> list[int]:
    """'0-9,12,20-21' -> [0..9, 12, 20, 21]."""
    ids: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            ids.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            raise ConfigError(f"--windows {spec!r}: expected ids and ranges like 0-9,12") from None
    return ids


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "index",
        "Build the per-window panel shards, and the donor-table parts of those "
        "windows' prebuild task (the Li-Stephens donors training and validation read), into the content-addressed "
        "cache. Artifacts already complete and valid are skipped.",
    )
    add_config_args(parser, per_chromosome=True)
    parser.add_argument("--windows", metavar="IDS", help="window ids, e.g. 0-15 or 3,7 (default: all)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(args: argparse.Namespace) -> int:
    from rag_hpc.index.build import prebuild

    config = config_from_args(args)
    ids = parse_window_ids(args.windows) if args.windows else None
    t0 = time.perf_counter()
    done = prebuild(config, ids, progress=not args.quiet)
    built = sum(r.status == "built" for r in done.windows)
    print(
        f"{len(done.windows)} windows: {built} built, {len(done.windows) - built} cached; donor-table parts: "
        f"{done.donor_parts_built} built, {done.donor_parts_cached} cached; in {time.perf_counter() - t0:.1f} s; "
        f"cache: {config.paths.cache}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
