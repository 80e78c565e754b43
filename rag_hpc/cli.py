"""What every ``python -m rag_hpc.<stage>`` shares: config flags and one-line errors."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path
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
    except (*USER_ERRORS, OSError) as exc:
        if getattr(args, "debug", False):
            raise
        if isinstance(exc, OSError) and exc.filename is not None:
            message = path_error(exc)
        elif isinstance(exc, USER_ERRORS):
            message = str(exc).strip() or type(exc).__name__
        else:
            raise
        if message.startswith("config error"):
            print(message, file=sys.stderr)
        else:
            print(f"error: {message}", file=sys.stderr)
        return 2


def path_error(exc: OSError) -> str:
    """An operating-system error on a path the user chose (a flag, paths.* or data.* in the config), as one line."""
    path = Path(exc.filename)
    fix = "check that path (the flag, or paths.* / data.* in the config): inputs must exist, outputs need a writable directory"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        # mkdir -p under a regular file: name the file in the way, not the directory that could not be made.
        blocker = next((p for p in (path, *path.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            needed = "" if blocker == path else f" (needed for {path})"
            return f"{blocker} is a file, not a directory{needed}; {fix}"
    return f"{path}: {exc.strerror or type(exc).__name__}; {fix}"
