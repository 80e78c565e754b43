"""The package's one source of randomness for masks, batch orders and dropout seeds.

Counter-based: every number is a splitmix64 hash of its counters (seed, stream, window,
haplotype, epoch, site), not a draw from a stateful generator. A mask bit, a batch order or a
dropout seed is therefore a pure function of those counters: the same in any process, on any rank,
after any restart, whatever batch it is computed in and whatever was drawn before it. A resumed
run sees exactly the numbers it would have seen without the interruption, and the query and index
sides of retrieval agree on every mask.

One registry: the hash has no memory, so two stages that draw from the same stream id with the
same seed and counters get *identical* numbers — their choices are correlated, not independent.
That happened: the sampler's haplotype order reused the array mask's stream, and with
``masks.seed == train.seed == 0`` (the defaults) a haplotype's batch position was exactly its
array-sites uniform of site 0. So every stream of the package is a member of :class:`Stream`
(``enum.unique`` refuses duplicate values), and :func:`uniforms` refuses anything else.

numpy only: imported by data preparation and prediction, which do not need torch.
"""

from __future__ import annotations

import enum

import numpy as np

# Part of every cache key that depends on a mask. v2: streams moved into one registry (the sampler
# and dropout streams changed), so nothing built under the old streams is reused. v3: the simulated
# array is drawn once per site (not per haplotype and epoch), training queries by TRAIN_QUERIES.
RNG_NAME = "splitmix64-v3"


@enum.unique
class Stream(enum.IntEnum):
    """Every stream of the counter-based hash; add one here, never a bare int at a call site."""

    # 1-3 (the old per-haplotype training, validation and array-pick masks) are retired, not reused.
    ARRAY_SITES = 4  # per site: which common sites the simulated array types
    WINDOW_ORDER = 5  # per window: the epoch's window permutation
    HAPLOTYPE_ORDER = 6  # per haplotype: the (epoch, window) haplotype permutation cut into batches
    DROPOUT = 7  # per (rank, step, micro-batch): the torch seed for dropout
    TRAIN_QUERIES = 8  # per train-split sample: is it one of the run's training queries?
    # Kept at its historical value so the reference order (and models trained against it) is unchanged.
    REFERENCE_ORDER = 0xC0FFEE  # per reference haplotype: the order retrieval searches (tie-breaking)


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 with full avalanche."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _absorb(state: np.ndarray, counter: np.ndarray | int) -> np.ndarray:
    return _mix(state + (np.asarray(counter, dtype=np.uint64) + np.uint64(1)) * _GOLDEN)


def uniforms(seed: int, stream: Stream, window: int, haplotypes: np.ndarray, epoch: int, length: int) -> np.ndarray:
    """U[0, 1) of shape [len(haplotypes), length], one per (haplotype, site) counter of ``stream``."""
    if not isinstance(stream, Stream):
        raise TypeError(f"stream must be a rag_hpc.rng.Stream member, got {stream!r} ({type(stream).__name__})")
    with np.errstate(over="ignore"):
        key = np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
        for counter in (int(stream), window, epoch):
            key = _absorb(key, counter)
        per_hap = _absorb(key, np.asarray(haplotypes, dtype=np.uint64))[:, None]
        bits = _absorb(per_hap, np.arange(length, dtype=np.uint64)[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
