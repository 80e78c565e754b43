"""What every ``python -m rag_hpc.<stage>`` shares: config flags, and errors as one line with an exit code.

A ``rag_hpc.errors.UserError`` (and an OS error on a path the user chose, or a full disk) is printed as
one line and exits with its kind's code. Anything else is a bug in rag_hpc: its traceback goes to
``<workdir>/logs/crash-<time>-<pid>.log``, one line names that file, and the exit is ``BUG_EXIT_CODE``.
``--debug`` shows every traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path

from rag_hpc.checkpoint import load_checkpoint
from rag_hpc.config import RagConfig, load_config
from rag_hpc.errors import BUG_EXIT_CODE, DiskSpaceError, InputError, UserError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def command_parser(command: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``python -m rag_hpc.<command>`` (also ``rag-hpc <command>``: ``rag_hpc/__main__.py``)."""
    return argparse.ArgumentParser(prog=f"python -m rag_hpc.{command}", description=description, epilog=epilog)


def add_config_args(parser: argparse.ArgumentParser, per_chromosome: bool = False) -> None:
    """--config, --set, --debug; with ``per_chromosome`` (a stage that reads one chromosome's files) also
    --chromosome, which ``config_from_args`` applies."""
    parser.add_argument("--config", metavar="YAML", help="config file (default: $RAG_HPC_CONFIG, else built-in defaults)")
    if per_chromosome:
        parser.add_argument(
            "--chromosome", metavar="NAME", help="with data.chromosomes (a genome config): the chromosome to work on"
        )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set windows.window_size=255 (repeatable; beats env and YAML)",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


def config_from_args(args: argparse.Namespace, checkpoint: Path | None = None) -> RagConfig:
    """The config of --config/--set (and --chromosome); with ``checkpoint`` (a checkpoint file or run
    directory), what shaped that model and where its run's data are come from it (``RagConfig.for_checkpoint``)."""
    config = load_config(args.config, args.overrides)
    if checkpoint is not None:
        if not checkpoint.exists():
            raise InputError(f"--checkpoint {checkpoint} does not exist: pass a step_<N>.pt file or a run directory")
        config = config.for_checkpoint(load_checkpoint(checkpoint)["config"])
    return config.chromosome(args.chromosome) if hasattr(args, "chromosome") else config


def run_main(
    main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> int:
    """``main(parser.parse_args(argv))``; a user error -> one stderr line and its kind's exit code, a bug ->
    a crash log, one stderr line naming it and ``BUG_EXIT_CODE``. With ``--debug`` every exception propagates."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `rag-hpc status | head`: the reader left, which is no bug. Point stdout at /dev/null so the
        # interpreter's own flush at exit does not raise again, and exit as a shell does on SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        known = user_error(exc)
        if known is None:
            return report_bug(exc, args, argv)
        code, message = known
        print(message if message.startswith("config error") else f"error: {message}", file=sys.stderr)
        return code


def user_error(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, message) of an error the user can fix; None for a bug."""
    if isinstance(exc, UserError):
        return exc.exit_code, str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return DiskSpaceError.exit_code, (
            f"{where}{exc.strerror or 'no space left'}; free space there or point the config at a larger filesystem"
        )
    if isinstance(exc, OSError) and exc.filename is not None:
        return InputError.exit_code, path_error(exc)
    return None


def report_bug(exc: BaseException, args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Write ``exc``'s traceback to a crash log and say so in one stderr line; returns ``BUG_EXIT_CODE``."""
    log = write_crash_log(exc, args, argv)
    where = f"full traceback in {log}" if log is not None else "no crash log could be written"
    what = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    what = what if len(what) <= 300 else what[:297] + "..."  # the log has all of it
    print(
        f"internal error (a bug in rag_hpc, not in your input): {type(exc).__name__}{': ' + what if what else ''}; "
        f"{where}; rerun with --debug to see it here, and please report it",
        file=sys.stderr,
    )
    return BUG_EXIT_CODE


def _crash_dirs(args: argparse.Namespace) -> list[Path]:
    """Where a crash log may go, best first: <workdir>/logs (the --workdir flag, else the config's
    paths.workdir), then the system temp directory."""
    workdir = getattr(args, "workdir", None)
    if workdir is None:
        try:
            workdir = load_config(getattr(args, "config", None), getattr(args, "overrides", None) or ()).paths.workdir
        except Exception:  # noqa: BLE001 - the config may be what is broken; the temp dir still takes the log
            workdir = None
    dirs = [Path(workdir) / "logs"] if workdir is not None else []
    return [*dirs, Path(tempfile.gettempdir())]


def _crash_report(exc: BaseException, args: argparse.Namespace, argv: Sequence[str] | None) -> str:
    try:
        ours = version("rag_hpc")
    except Exception:  # noqa: BLE001 - not installed (run from a checkout)
        ours = "unknown (not installed)"
    lines = [
        "rag_hpc internal error (a bug in rag_hpc): please report it with this file",
        f"time: {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        f"argv: {sys.argv}" + (f" (run_main parsed {list(argv)})" if argv is not None else ""),
        f"cwd: {os.getcwd()}",
        f"host: {platform.node()} (pid {os.getpid()})",
        f"rag_hpc: {ours}",
        f"python: {sys.version.split()[0]} ({sys.executable}) on {platform.platform()}",
    ]
    torch = sys.modules.get("torch")  # only when already imported: a crash report must not load torch
    if torch is not None:
        cuda = getattr(getattr(torch, "version", None), "cuda", None)
        lines.append(f"torch: {getattr(torch, '__version__', '?')} (CUDA {cuda or 'none'})")
    lines += [f"args: {vars(args)}", "", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))]
    return "\n".join(lines)


def write_crash_log(exc: BaseException, args: argparse.Namespace, argv: Sequence[str] | None = None) -> Path | None:
    """``<dir>/crash-<YYYYmmdd-HHMMSS>-<pid>.log`` in the first of ``_crash_dirs`` that takes it; None if none does."""
    try:
        text = _crash_report(exc, args, argv)
    except Exception:  # noqa: BLE001 - the traceback is what matters; never fail while reporting a failure
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    stem = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for directory in _crash_dirs(args):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for n in range(100):
                path = directory / (f"{stem}.log" if n == 0 else f"{stem}-{n}.log")
                try:
                    with open(path, "x", encoding="utf-8") as fh:
                        fh.write(text)
                    return path.absolute()
                except FileExistsError:
                    continue
        except OSError:
            continue
    return None


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
