"""Deterministic masks from a counter-based RNG.

Every mask bit is a pure function of (seed, purpose, window, haplotype, epoch, site): a splitmix64
hash of those counters, not a draw from a stateful generator. So a mask never depends on which
process, rank, batch composition or restart produced it — the predecessor's query/index mask
mismatch and its epoch-0 mismatch cannot happen, and a resumed run sees the masks it would have
seen without the interruption.

Convention: ``True`` = masked (hidden from the model and from retrieval).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rag_hpc.config import MaskConfig

RNG_NAME = "splitmix64-v1"  # part of every cache key that depends on a mask
_TRAIN, _VAL, _ARRAY_PICK, _ARRAY_SITES = 1, 2, 3, 4  # purposes: streams that must never coincide

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


def uniforms(seed: int, purpose: int, window: int, haplotypes: np.ndarray, epoch: int, length: int) -> np.ndarray:
    """U[0, 1) of shape [len(haplotypes), length], one per (haplotype, site) counter."""
    with np.errstate(over="ignore"):
        key = np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
        for counter in (purpose, window, epoch):
            key = _absorb(key, counter)
        per_hap = _absorb(key, np.asarray(haplotypes, dtype=np.uint64))[:, None]
        bits = _absorb(per_hap, np.arange(length, dtype=np.uint64)[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def minor_allele_frequency(af: np.ndarray) -> np.ndarray:
    return np.minimum(af, 1.0 - af)


def site_rates(level_rate: float, af: np.ndarray, cfg: MaskConfig) -> np.ndarray:
    """AF-guided rates: rare sites are masked at least at ``rare_rate`` so the model must learn them."""
    rare = minor_allele_frequency(af) < cfg.af_threshold
    return np.where(rare, max(level_rate, cfg.rare_rate), level_rate)


def curriculum_rate(epoch: int, cfg: MaskConfig) -> float:
    level = min(epoch // cfg.epochs_per_level, len(cfg.levels) - 1)
    return cfg.levels[level]


def array_mask(
    cfg: MaskConfig, window: int, haplotypes: np.ndarray, epoch: int, af: np.ndarray, typed: np.ndarray | None = None
) -> np.ndarray:
    """Masks [B, L] that hide everything but an array's typed sites: ``typed`` (bool [L], the
    target array's sites in this window) when known, else a random draw of common sites at
    ``array_density`` per haplotype and epoch."""
    batch, length = len(haplotypes), len(af)
    if typed is not None:
        return np.broadcast_to(~np.asarray(typed, dtype=bool), (batch, length)).copy()
    common = minor_allele_frequency(af) >= cfg.af_threshold
    p = min(1.0, cfg.array_density * length / max(int(common.sum()), 1))
    observed = common[None, :] & (uniforms(cfg.seed, _ARRAY_SITES, window, haplotypes, epoch, length) < p)
    return ~observed


def train_mask(
    cfg: MaskConfig, window: int, haplotypes: np.ndarray, epoch: int, af: np.ndarray, typed: np.ndarray | None = None
) -> np.ndarray:
    """Per-haplotype training masks [B, L] for ``epoch``: a share ``array_share`` of haplotypes
    array-like (what imputation queries look like: ~2 % of sites observed), the rest at the
    curriculum level with AF guidance (which teaches the model the panel's LD at every density)."""
    rates = site_rates(curriculum_rate(epoch, cfg), af, cfg)
    masks = uniforms(cfg.seed, _TRAIN, window, haplotypes, epoch, len(af)) < rates[None, :]
    if cfg.array_share > 0:
        pick = uniforms(cfg.seed, _ARRAY_PICK, window, haplotypes, epoch, 1)[:, 0] < cfg.array_share
        masks[pick] = array_mask(cfg, window, haplotypes[pick], epoch, af, typed)
    return masks


def val_mask(cfg: MaskConfig, window: int, length: int) -> np.ndarray:
    """The fixed validation mask [L], shared by all validation haplotypes of the window so that one
    FAISS index over the reference serves every validation query."""
    return uniforms(cfg.seed, _VAL, window, np.zeros(1, dtype=np.uint64), 0, length)[0] < cfg.val_rate


def val_mask_spec(cfg: MaskConfig) -> dict[str, Any]:
    """What the validation mask depends on, for cache keys."""
    return {"kind": "val", "rng": RNG_NAME, "seed": cfg.seed, "rate": cfg.val_rate}
