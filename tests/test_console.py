"""``rag-hpc <command>``: each command is ``python -m rag_hpc.<command>``, output and exit code alike."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

GUARD = ["--haplotypes", "100", "--sites", "10000", "--mem", "1G", "--disk-free", "1G"]


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)


def test_rag_hpc_runs_a_stage_as_its_python_dash_m_form_does():
    script = Path(sys.executable).parent / "rag-hpc"  # what `pip install -e .` put beside this Python
    assert script.is_file(), "the rag-hpc console script is not installed: pip install -e ."
    direct = _run(sys.executable, "-m", "rag_hpc.guard", *GUARD)
    for form in ([str(script)], [sys.executable, "-m", "rag_hpc"]):
        got = _run(*form, "guard", *GUARD)
        assert (got.returncode, got.stdout) == (direct.returncode, direct.stdout)
    assert direct.returncode == 1 and "REFUSED" in direct.stdout  # a plan over budget: a real answer, not usage
    helped = _run(str(script), "status", "--help")
    assert helped.returncode == 0 and "--workdir" in helped.stdout


def test_an_unknown_command_is_refused_naming_the_commands():
    got = _run(sys.executable, "-m", "rag_hpc", "imputee")
    assert got.returncode == 2 and "unknown command 'imputee'" in got.stderr and "impute" in got.stderr
    listed = _run(sys.executable, "-m", "rag_hpc", "--help")
    assert listed.returncode == 0 and all(c in listed.stdout for c in ("launch", "status", "train", "evaluate"))
