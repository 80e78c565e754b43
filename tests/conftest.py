"""Shared fixtures. Keep each fixture specific and named for what it provides."""

from __future__ import annotations

from pathlib import Path

import pytest

from rag_hpc.data.simulate import SimPreset, simulate_panel

# 100 kb x 46 individuals: a real coalescent panel with LD and ~25 array bins, simulated in well under a second.
TINY_SIM_PRESET = SimPreset("tiny", length=100_000, n_panel=40, n_targets=6)
TINY_SIM_SEED = 7


@pytest.fixture(scope="session")
def tiny_simulation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a complete tiny simulation (panel, targets, truth, populations, manifest). Read-only: copy to modify."""
    return simulate_panel(tmp_path_factory.mktemp("sim") / "tiny", TINY_SIM_PRESET, TINY_SIM_SEED, verbose=False)
