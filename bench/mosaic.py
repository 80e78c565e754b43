"""Mosaic haplotypes: copies of a few founders with recombination switches and rare allele flips.

The panels bench/index_bench.py and bench/train_bench.py time and tests/test_retrieval.py checks ties on;
each chooses its rates.
"""

from __future__ import annotations

import numpy as np


def mosaic_haplotypes(rng: np.random.Generator, n: int, sites: int, founders: int, switch: float, mutation: float) -> np.ndarray:
    """uint8 [n, sites]: each haplotype copies a founder, switching to a random one with probability
    ``switch`` per site, and flips each allele with probability ``mutation``."""
    founder_alleles = (rng.random((founders, sites)) < rng.uniform(0.05, 0.5, sites)).astype(np.uint8)
    starts = rng.random((n, sites)) < switch
    starts[:, 0] = True
    pick = rng.integers(founders, size=(n, sites))
    last_start = np.maximum.accumulate(np.where(starts, np.arange(sites), 0), axis=1)
    source = np.take_along_axis(pick, last_start, axis=1)
    alleles = founder_alleles[source, np.arange(sites)]
    return alleles ^ (rng.random((n, sites)) < mutation).astype(np.uint8)
