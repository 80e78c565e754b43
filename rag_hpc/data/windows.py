"""Fixed windows of ``window_size`` consecutive panel sites; the last window is shorter.

Window ids are stable for a given (n_sites, window_size): they name cache artifacts, array tasks
and training batches alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    id: int
    start: int  # first site index (inclusive)
    stop: int  # last site index (exclusive)

    @property
    def length(self) -> int:
        return self.stop - self.start

    def observed(self, typed: np.ndarray) -> np.ndarray:
        """bool [L]: which of this window's sites are in ``typed`` (panel site indices, increasing)."""
        out = np.zeros(self.length, bool)
        lo, hi = np.searchsorted(typed, [self.start, self.stop])
        out[typed[lo:hi] - self.start] = True
        return out


def make_windows(n_sites: int, window_size: int) -> list[Window]:
    if n_sites <= 0:
        raise ValueError(f"a panel needs at least one site, got n_sites={n_sites}")
    if window_size <= 0:
        raise ValueError(f"window_size must be positive, got {window_size}")
    return [Window(i, start, min(start + window_size, n_sites)) for i, start in enumerate(range(0, n_sites, window_size))]


def window_ranges(window_ids: list[int], per_task: int) -> list[list[int]]:
    """Group window ids into consecutive chunks of at most ``per_task`` (one array task each)."""
    if per_task <= 0:
        raise ValueError(f"windows per task must be positive, got {per_task}")
    ids = sorted(window_ids)
    return [ids[i : i + per_task] for i in range(0, len(ids), per_task)]
