"""What every ``python -m rag_hpc.<stage>`` shares: config flags and one-line errors."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from rag_hpc.config import ConfigError, RagConfig, load_config

# Errors a user can fix from the message alone: printed as one line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ValueError, FileNotFoundError, PermissionError, RuntimeError)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="config file (default: $RAG_HPC_CONFIG, else built-in defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set windows.window_size=255 (repeatable; beats env and YAML)",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


def config_from_args(args: argparse.Namespace) -> RagConfig:
    return load_config(args.config, args.overrides)


def run_main(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    args = parser.parse_args(argv)
    try:
        return main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if getattr(args, "debug", False):
            raise
        message = str(exc).strip() or type(exc).__name__
        if message.startswith("config error"):
            print(message, file=sys.stderr)
        else:
            print(f"error: {message}", file=sys.stderr)
        return 2
