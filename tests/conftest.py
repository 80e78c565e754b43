"""Shared fixtures. Keep each fixture specific and named for what it provides."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rag_hpc.data.simulate import SimPreset, simulate_genome, simulate_panel

# 100 kb x 46 individuals: a real coalescent panel with LD and ~25 array bins, simulated in well under a second.
TINY_SIM_PRESET = SimPreset("tiny", length=100_000, n_panel=40, n_targets=6)
TINY_SIM_SEED = 7
TINY_GENOME = ("20", "21")


@pytest.fixture(scope="session")
def tiny_simulation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a complete tiny simulation (panel, targets, truth, populations, manifest). Read-only: copy to modify."""
    return simulate_panel(tmp_path_factory.mktemp("sim") / "tiny", TINY_SIM_PRESET, TINY_SIM_SEED, verbose=False)


@pytest.fixture(scope="session")
def tiny_genome(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny chromosomes of the same individuals, DIR/20/ and DIR/21/, as a genome config names them. Read-only."""
    return simulate_genome(tmp_path_factory.mktemp("genome"), TINY_SIM_PRESET, TINY_GENOME, TINY_SIM_SEED, verbose=False)


@pytest.fixture(scope="session")
def tiny_panel(tiny_simulation: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny simulation prepared into an HDF5 panel (tests/train_helpers.py trains on it). Read-only."""
    from rag_hpc.data.prepare import prepare_panel

    out = tmp_path_factory.mktemp("panel") / "panel.h5"
    return prepare_panel(tiny_simulation / "panel.vcf.gz", out, populations=tiny_simulation / "populations.tsv")


@pytest.fixture(scope="session")
def cluster() -> dict[str, int]:
    """The single-node SLURM test cluster (slurm/up.sh), started when it is not answering: {"cpus": N}."""
    from tests.slurm_helpers import ensure_cluster

    return ensure_cluster()


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[dict[str, Any]]:
    """The two-node SLURM test cluster (slurm/up.sh --nodes 2), started when it is not answering. For the
    module, SLURM_CONF points this process at it: sbatch, squeue, sacct, sinfo, scontrol, and through
    sbatch's environment the jobs they submit."""
    from tests.slurm_helpers import ensure_two_nodes

    info = ensure_two_nodes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(info["conf"]))
        yield info


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests import reliability

    if reliability.ROWS:
        path = reliability.write(reliability.ROWS)
        terminalreporter.write_sep("=", f"reliability (fault-injection tests of this run; also {path})")
        terminalreporter.write_line(reliability.table(reliability.ROWS))
