"""Window-grouped batches, addressable by position.

Every micro-batch holds query haplotypes of ONE window, so its shard is loaded once and its length
L is constant. An epoch's order is a pure function of (seed, epoch) drawn from the same counter-based
hash as the masks (``rag_hpc.rng.uniforms``, on its own ``Stream.WINDOW_ORDER`` and
``Stream.HAPLOTYPE_ORDER``): a permutation of the windows, and per window a
permutation of the train-split haplotypes cut into ``batch_size`` chunks (the remainder, different
each epoch, is dropped so every rank always gets the same number of queries).

Consecutive batches of one window would make ~(n_haplotypes / batch_size) optimizer steps in a row
see the same 511 sites; ``mix_windows`` interleaves the batches of that many consecutive windows of
the permutation instead (round-robin), so only those few shards need to be resident at once.

Position = (epoch, micro-batch index in the epoch). ``batch(epoch, index)`` costs one argsort of the
window count and one of the haplotype count, whatever the position: a resumed run jumps straight
to its next batch without replaying the epoch, and nothing is precomputed over all samples.

The global batch does not depend on the world size: rank r of W takes the r-th of W equal slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from rag_hpc.errors import ConfigError
from rag_hpc.rng import Stream, uniforms


@dataclass(frozen=True)
class MicroBatch:
    epoch: int
    index: int  # micro-batch index within the epoch
    window: int
    haplotypes: np.ndarray  # panel haplotype ids of the whole (global) batch, int64 [batch_size]

    def local(self, rank: int, world_size: int) -> np.ndarray:
        """This rank's slice of the global batch."""
        per = len(self.haplotypes) // world_size
        return self.haplotypes[rank * per : (rank + 1) * per]


def _permutation(seed: int, stream: Stream, window: int, n: int, epoch: int) -> np.ndarray:
    keys = uniforms(seed, stream, window, np.arange(n, dtype=np.uint64), epoch, 1)[:, 0]
    return np.argsort(keys, kind="stable")


class WindowBatchSampler:
    """Deterministic window-grouped micro-batches of train-split haplotypes."""

    def __init__(
        self,
        n_windows: int,
        train_haplotypes: np.ndarray,
        batch_size: int,
        seed: int,
        mix_windows: int = 1,
        world_size: int = 1,
    ):
        if n_windows < 1:
            raise ValueError(f"need at least one window, got {n_windows}")
        if batch_size % world_size:
            raise ConfigError(
                f"train.batch_size={batch_size} is the batch over all {world_size} ranks and must divide evenly among them"
            )
        if len(train_haplotypes) < batch_size:
            raise ConfigError(
                f"train.batch_size={batch_size} but the panel has only {len(train_haplotypes)} train-split haplotypes: "
                "lower train.batch_size"
            )
        self.n_windows = n_windows
        self.train_haplotypes = np.asarray(train_haplotypes, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.mix_windows = max(1, min(mix_windows, n_windows))
        self.world_size = world_size
        self.batches_per_window = len(self.train_haplotypes) // batch_size
        self.batches_per_epoch = n_windows * self.batches_per_window
        # Bounded caches: one epoch's window order, the haplotype orders of the windows in flight.
        self._window_order = lru_cache(maxsize=2)(self._compute_window_order)
        self._haplotype_order = lru_cache(maxsize=4 * self.mix_windows)(self._compute_haplotype_order)

    def _compute_window_order(self, epoch: int) -> np.ndarray:
        return _permutation(self.seed, Stream.WINDOW_ORDER, 0, self.n_windows, epoch)

    def _compute_haplotype_order(self, epoch: int, window: int) -> np.ndarray:
        return self.train_haplotypes[_permutation(self.seed, Stream.HAPLOTYPE_ORDER, window, len(self.train_haplotypes), epoch)]

    def window_order(self, epoch: int) -> np.ndarray:
        return self._window_order(epoch)

    def locate(self, index: int) -> tuple[int, int]:
        """Micro-batch index in the epoch -> (slot in the epoch's window order, batch number within that window)."""
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"micro-batch {index} outside the epoch (0..{self.batches_per_epoch - 1})")
        per_group = self.mix_windows * self.batches_per_window
        group, offset = divmod(index, per_group)
        first = group * self.mix_windows
        in_group = min(self.mix_windows, self.n_windows - first)  # the last group may be smaller
        return first + offset % in_group, offset // in_group

    def batch(self, epoch: int, index: int) -> MicroBatch:
        slot, number = self.locate(index)
        window = int(self.window_order(epoch)[slot])
        order = self._haplotype_order(epoch, window)
        haps = order[number * self.batch_size : (number + 1) * self.batch_size]
        return MicroBatch(epoch, index, window, haps)
