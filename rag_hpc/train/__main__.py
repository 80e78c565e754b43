"""``python -m rag_hpc.train``: train on the prepared panel, or resume the run in the run directory."""

from __future__ import annotations

# The trainer (torch) is imported in main(): --help and argument errors stay light.
import argparse
import sys

from rag_hpc.cli import add_config_args, command_parser, config_from_args, run_main
from rag_hpc.errors import ConfigError

# EX_TEMPFAIL: stopped on request with a checkpoint written; rerunning the command continues the run.
EXIT_INTERRUPTED = 75


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "train",
        "Train the donor imputer on the prepared panel (data.panel_h5). Rerunning with the "
        "same config resumes from the newest valid checkpoint in the run directory (<workdir>/runs/<train.name>) "
        "at the exact next batch. Under torchrun or a submitit multi-task job (RANK/WORLD_SIZE/MASTER_ADDR/"
        "MASTER_PORT set) each process is one DDP rank. SIGUSR2 or SIGTERM: checkpoint at the next step, "
        f"then exit {EXIT_INTERRUPTED}.",
        epilog="All training settings live in the config's train section, e.g. --set train.batch_size=64 "
        "--set train.epochs=4 --set model.dims=64. Prints the final checkpoint's path on stdout.",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        metavar="N",
        help="stop with a checkpoint at global step N (same as --set train.max_steps=N): the run is a prefix of the full one",
    )
    add_config_args(parser)
    return parser


def main(args: argparse.Namespace) -> int:
    from rag_hpc.train import TrainingInterrupted, train

    if args.max_steps is not None:
        if args.max_steps < 1:
            raise ConfigError(f"--max-steps must be >= 1, got {args.max_steps}")
        args.overrides = [*args.overrides, f"train.max_steps={args.max_steps}"]
    config = config_from_args(args)
    try:
        path = train(config)
    except TrainingInterrupted as stop:
        print(f"interrupted ({stop.reason}) at step {stop.step}; checkpoint {stop.checkpoint}; rerun to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
