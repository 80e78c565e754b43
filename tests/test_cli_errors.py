"""Bugs are not user errors: a user error exits with its kind's code and one line; a bug exits 70 with one
line naming a crash log that holds the traceback; ``--debug`` shows the traceback instead."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rag_hpc import errors
from rag_hpc.cli import user_error
from rag_hpc.errors import BUG_EXIT_CODE, CheckpointError, ClusterError, ConfigError, DiskSpaceError, InputError, UserError

REPO = Path(__file__).resolve().parents[1]
BUG_LINE = re.compile(
    r"^internal error \(a bug in rag_hpc, not in your input\): ZeroDivisionError: division by zero; "
    r"full traceback in (?P<log>\S+/crash-\d{8}-\d{6}-\d+\.log); rerun with --debug to see it here, and please report it$"
)


def _env(tmp_path: Path) -> dict[str, str]:
    tmp = tmp_path / "systemp"
    tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_HPC_")}
    return {**env, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp)}


def _run(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    # From tmp_path, so that nothing (a default rag_hpc_work/) can land in the repository.
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=tmp_path, env=_env(tmp_path), timeout=120)


# A CLI whose main has a bug, run through run_main like every rag_hpc entry point.
BUGGY = textwrap.dedent(
    """
    import argparse, sys
    from rag_hpc.cli import add_config_args, run_main

    def main(args):
        return 1 / 0

    parser = argparse.ArgumentParser()
    if sys.argv[1] == "workdir":
        parser.add_argument("--workdir")
        parser.add_argument("--debug", action="store_true")
    else:
        add_config_args(parser)
    sys.exit(run_main(main, parser, sys.argv[2:]))
    """
)


def _buggy(tmp_path: Path, how: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return _run(tmp_path, "-c", BUGGY, how, *argv)


def test_every_kind_has_its_own_documented_exit_code() -> None:
    codes = {kind: kind.exit_code for kind in errors.USER_ERROR_KINDS}
    assert codes == {ConfigError: 2, InputError: 3, ClusterError: 4, DiskSpaceError: 5, CheckpointError: 6}
    assert BUG_EXIT_CODE == 70 and BUG_EXIT_CODE not in codes.values()
    assert all(issubclass(kind, UserError) and not issubclass(kind, (ValueError, RuntimeError)) for kind in codes)
    for kind, code in codes.items():
        assert re.search(rf"``{kind.__name__}``\s+{code}\s", errors.__doc__ or ""), f"{kind.__name__} missing from the table"


def test_the_old_error_classes_are_kinds() -> None:
    from rag_hpc.config import ConfigError as FromConfig
    from rag_hpc.data.panel import PanelError
    from rag_hpc.data.prepare import PopulationsError
    from rag_hpc.data.vcf import VcfError
    from rag_hpc.fsutil import DiskFullError
    from rag_hpc.index.cache import CacheError

    assert FromConfig is ConfigError
    assert all(issubclass(c, InputError) for c in (PanelError, PopulationsError, VcfError, CacheError))
    assert issubclass(DiskFullError, DiskSpaceError)


def test_os_errors_map_to_kinds_and_everything_else_is_a_bug(tmp_path: Path) -> None:
    code, message = user_error(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f")))
    assert code == DiskSpaceError.exit_code and "free space" in message
    assert user_error(OSError(errno.EDQUOT, "Disk quota exceeded"))[0] == DiskSpaceError.exit_code
    code, message = user_error(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "f")))
    assert code == InputError.exit_code and message.startswith(f"{tmp_path / 'f'}: Permission denied; check that path")
    assert user_error(CheckpointError("step_1.pt fails its sha256")) == (6, "step_1.pt fails its sha256")
    for bug in (ValueError("x"), RuntimeError("x"), TypeError("x"), AssertionError(), KeyError("x"), OSError("no path")):
        assert user_error(bug) is None, bug


def test_a_config_error_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = _run(tmp_path, "-m", "rag_hpc.index", "--set", "windows.window_size=0")
    assert proc.returncode == ConfigError.exit_code, proc.stderr
    assert proc.stderr.strip().splitlines() == ["config error: windows.window_size: Input should be greater than 0"]
    assert not list(tmp_path.glob("**/crash-*.log"))


def test_an_input_error_exits_3_with_one_line(tmp_path: Path) -> None:
    absent = tmp_path / "absent.vcf.gz"
    proc = _run(tmp_path, "-m", "rag_hpc.prepare", "--vcf", str(absent), "--out", str(tmp_path / "panel.h5"), "--quiet")
    assert proc.returncode == InputError.exit_code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"error: {absent} does not exist" and "Traceback" not in proc.stderr
    assert not (tmp_path / "panel.h5").exists()


def test_a_bug_exits_70_with_one_line_naming_the_crash_log_in_the_workdir(tmp_path: Path) -> None:
    work = tmp_path / "work"
    proc = _buggy(tmp_path, "workdir", "--workdir", str(work))
    assert proc.returncode == BUG_EXIT_CODE, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    match = BUG_LINE.match(lines[0])
    assert match, lines[0]
    log = Path(match["log"])
    assert log.parent == work / "logs" and log.is_file()
    text = log.read_text()
    assert "Traceback (most recent call last):" in text and ", in main" in text and "ZeroDivisionError: division by zero" in text
    assert "--workdir" in text and "rag_hpc: " in text and "python: " in text
    assert "torch:" not in text, "torch was never imported, so the report must not name (or import) it"


def test_a_bug_logs_into_the_configs_workdir_else_the_temp_dir(tmp_path: Path) -> None:
    proc = _buggy(tmp_path, "config", "--set", f"paths.workdir={tmp_path / 'w'}")
    assert proc.returncode == BUG_EXIT_CODE
    match = BUG_LINE.match(proc.stderr.strip())
    assert match and Path(match["log"]).parent == tmp_path / "w" / "logs", proc.stderr

    (tmp_path / "file").write_text("a regular file: no logs/ under it")
    proc = _buggy(tmp_path, "config", "--set", f"paths.workdir={tmp_path / 'file'}")
    assert proc.returncode == BUG_EXIT_CODE
    match = BUG_LINE.match(proc.stderr.strip())
    assert match and Path(match["log"]).parent == tmp_path / "systemp", proc.stderr
    assert "ZeroDivisionError" in Path(match["log"]).read_text()


def test_debug_shows_the_traceback_and_writes_no_crash_log(tmp_path: Path) -> None:
    work = tmp_path / "work"
    proc = _buggy(tmp_path, "workdir", "--workdir", str(work), "--debug")
    assert proc.returncode == 1  # the interpreter's own exit for an uncaught exception
    assert "Traceback (most recent call last):" in proc.stderr and "ZeroDivisionError: division by zero" in proc.stderr
    assert "internal error" not in proc.stderr and not work.exists()


def test_a_user_error_in_process_returns_its_code(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from rag_hpc.cli import run_main

    def main(args: argparse.Namespace) -> int:
        raise ClusterError("partition 'x' does not exist: pass one with --partition")

    assert run_main(main, argparse.ArgumentParser(), []) == ClusterError.exit_code
    assert capsys.readouterr().err == "error: partition 'x' does not exist: pass one with --partition\n"


def test_a_reader_that_leaves_early_is_no_bug(tmp_path):
    # `python -m rag_hpc.guard ... | head -1`, made certain: the pipe's reading end is closed before the
    # command writes anything, so its first write fails with EPIPE.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "rag_hpc.guard", "--haplotypes", "100", "--sites", "10000"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=_env(tmp_path),
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr
    assert not list(tmp_path.rglob("crash-*.log"))
