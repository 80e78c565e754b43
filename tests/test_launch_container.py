"""The container side of the launcher: the Apptainer definition, and the command jobs run through it."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from rag_hpc.config import load_config
from rag_hpc.launch import APPTAINER_ENV, LaunchOptions, SlurmBackend, container_python
from rag_hpc.launch.core import JobSpec
from rag_hpc.launch.slurm import _requeue_trap

REPO = Path(__file__).resolve().parents[1]
DEF = REPO / "containers" / "rag_hpc.def"


def parse_definition(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Apptainer definition -> (header keywords, {section: body}); sections start with '%name' at column 0."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        m = re.match(r"^%(\w+)\s*$", line)
        if m:
            current = sections.setdefault(m.group(1), [])
        elif current is not None:
            current.append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition(":")
            header[key.strip()] = value.strip()
    return header, {k: "\n".join(v) for k, v in sections.items()}


def test_the_definition_builds_from_cuda_pytorch_and_a_read_only_install() -> None:
    header, sections = parse_definition(DEF.read_text())
    assert header["Bootstrap"] == "docker" and header["From"].startswith("pytorch/pytorch:")
    assert "cuda" in sections["arguments"] and "TORCH_TAG" in header["From"]
    assert {"arguments", "files", "post", "environment", "runscript", "test", "labels", "help"} <= set(sections)
    post = "\n".join(line for line in sections["post"].splitlines() if not line.lstrip().startswith("#"))
    # No job imports faiss (only bench/yardstick does), so the image carries none.
    assert "faiss" not in post and "faiss" not in sections["test"]
    # A real install (not editable), compiled at build time, no bytecode writes later.
    assert re.search(r"pip install --no-deps /opt/rag_hpc/src", post) and "-e " not in post and "compileall" in post
    assert "PYTHONDONTWRITEBYTECODE=1" in sections["environment"]
    for src, _ in (line.split() for line in sections["files"].strip().splitlines()):
        assert (REPO / src).exists(), f"%files copies {src}, which is not in the repository"
    assert "rag_hpc.launch" in sections["runscript"]
    assert "--cleanenv" not in DEF.read_text().replace("never --cleanenv", "")


def test_the_image_installs_exactly_the_packages_dependencies_but_torch() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {d for d in project["dependencies"] if not d.startswith("torch")} | set(
        project["optional-dependencies"]["tensorboard"]
    )
    _, sections = parse_definition(DEF.read_text())
    installed = set(re.findall(r'"([A-Za-z0-9_.-]+[<>=!~][^"]*)"', sections["post"]))
    assert installed == wanted


def test_the_build_script_is_valid_bash() -> None:
    assert subprocess.run(["bash", "-n", str(REPO / "containers" / "build.sh")], check=False).returncode == 0


NASTY = Path("/data/my runs;touch /tmp/pwned")


def test_the_container_command_quotes_paths_with_spaces_and_semicolons() -> None:
    cmd = container_python(NASTY / "img one.sif", [NASTY / "cache", Path("/plain"), NASTY / "cache"], apptainer="apptainer")
    args = shlex.split(cmd)
    assert args[:3] == ["apptainer", "exec", "--nv"]
    assert args[3:7] == ["--bind", f"{NASTY}/cache:{NASTY}/cache", "--bind", "/plain:/plain"], "binds: same path, once each"
    assert args[-2:] == [f"{NASTY}/img one.sif", "python"]
    assert "--cleanenv" not in args and "--containall" not in args


def test_the_quoted_command_runs_no_injected_command_in_a_shell(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / f"x;touch {marker}" / "img.sif"
    # `echo` stands in for apptainer: the shell must hand it every path as one argument.
    cmd = container_python(evil, [tmp_path / f"a b;touch {marker}"], apptainer="echo")
    out = subprocess.run(["bash", "-c", f"{cmd} -u -m submitit.core._submit /x"], capture_output=True, text=True, check=True)
    assert not marker.exists()
    assert f"{evil} python -u -m submitit.core._submit /x" in out.stdout


def test_jobs_in_a_container_run_its_python_and_requeue_from_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(APPTAINER_ENV, "/opt/apptainer/bin/apptainer")
    folder = tmp_path / "sub mit;x"
    config = load_config(None, [f"paths.workdir={tmp_path / 'work dir'}", f"cluster.container={tmp_path / 'i.sif'}"])
    ex = SlurmBackend().executor(config, LaunchOptions(cluster="slurm", partition="gpu"), folder, JobSpec("t", 100))
    python = ex._executor.python  # what submitit puts in front of `-u -m submitit.core._submit`
    assert shlex.split(python)[0] == "/opt/apptainer/bin/apptainer" and shlex.split(python)[-1] == "python"
    assert f"{tmp_path / 'work dir'}:{tmp_path / 'work dir'}" in shlex.split(python)
    assert f"{folder}:{folder}" in shlex.split(python)
    setup = ex._executor.parameters["setup"]
    assert setup[-2:] == _requeue_trap(folder) and "PYTHONPATH" not in " ".join(setup)
    # The trap line is valid bash and keeps the folder one word.
    script = "\n".join([*setup, 'echo "$RAG_HPC_REQUEUE_FILE"'])
    out = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env={"SLURM_JOB_ID": "7", "PATH": "/usr/bin:/bin"}, check=True
    )
    assert out.stdout.strip() == f"{folder}/requeue-7"


def test_inside_a_container_without_scontrol_a_job_requeues_by_asking_the_host(tmp_path, monkeypatch) -> None:
    """The job environment submitit picks in a SLURM job is rag_hpc's plugin (installed with the package),
    and without scontrol its requeue writes the request the batch script's EXIT trap acts on."""
    import submitit.slurm.slurm
    from submitit.core import plugins

    from rag_hpc.slurm_env import REQUEUE_ENV, SlurmJobEnvironment

    request = tmp_path / "requeue-123"
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv(REQUEUE_ENV, str(request))
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol here
    env = plugins.get_job_environment()
    assert type(env) is SlurmJobEnvironment
    env._requeue(7)
    assert request.read_text().split()[:2] == ["123", "7"]
    # submitit's own class is left as it is: nothing is patched.
    assert submitit.slurm.slurm.SlurmJobEnvironment._requeue.__module__ == "submitit.slurm.slurm"
