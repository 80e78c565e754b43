"""The MAF bins every r² table uses: training's validation, ``evaluate``'s reports, status and the benches.

[lo, hi) except the last, which is closed: MAF is at most 0.5. Two spellings of a bin, each with one use:
``bin_label`` for people ("[0.005, 0.01)"), ``bin_key`` for column names in metrics.csv and
TensorBoard ("0.005-0.010", fixed width so the columns sort).
"""

from __future__ import annotations

import itertools

import numpy as np

MAF_EDGES = (0.0, 0.005, 0.01, 0.05, 0.5)
MAF_BINS: tuple[tuple[float, float], ...] = tuple(itertools.pairwise(MAF_EDGES))


def bin_label(lo: float, hi: float) -> str:
    return f"[{lo:g}, {hi:g}{']' if hi >= 0.5 else ')'}"


def bin_key(lo: float, hi: float) -> str:
    return f"{lo:.3f}-{hi:.3f}"


def maf_bin(maf: np.ndarray) -> np.ndarray:
    """Bin index per MAF value (0..len(MAF_BINS) - 1)."""
    return np.searchsorted(np.array(MAF_EDGES[1:-1]), np.asarray(maf), side="right")
