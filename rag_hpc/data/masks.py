"""What training and validation queries see: the typed sites of one genotyping array.

Imputation targets come typed on an array, ~1 site in 40 of a panel's, the same sites for every
target. The model learns and is validated on exactly that task (DESIGN.md §7): every training and
validation haplotype is hidden everywhere but the array's sites — the target VCF's sites when the
config names one, else a simulated array of common sites drawn once per chromosome. One fixed site
set per run is also what lets the Li–Stephens donors of every query be computed once and cached
(``rag_hpc.index.donors``) instead of on every step or restart.

The simulated array is a pure function of (masks.seed, site index) through the counter-based hash
(``rag_hpc.rng``): the same in every process, rank and restart.
"""

from __future__ import annotations

import hashlib

import numpy as np

from rag_hpc.config import MaskConfig
from rag_hpc.rng import Stream, uniforms


def minor_allele_frequency(af: np.ndarray) -> np.ndarray:
    return np.minimum(af, 1.0 - af)


def simulated_array(cfg: MaskConfig, af: np.ndarray) -> np.ndarray:
    """Panel site indices (int64, increasing) a simulated array types: common sites (MAF >= af_threshold),
    each kept with the probability that makes ``array_density`` of all sites typed. Arrays are designed
    on common variants, so rare sites are never typed."""
    common = minor_allele_frequency(np.asarray(af)) >= cfg.af_threshold
    p = min(1.0, cfg.array_density * af.size / max(int(common.sum()), 1))
    draw = uniforms(cfg.seed, Stream.ARRAY_SITES, 0, np.zeros(1, np.uint64), 0, af.size)[0]
    return np.flatnonzero(common & (draw < p)).astype(np.int64)


def sites_digest(typed: np.ndarray) -> str:
    """Content id of a typed-site set, for cache keys and checkpoints."""
    return hashlib.sha256(np.ascontiguousarray(typed, np.int64).tobytes()).hexdigest()
