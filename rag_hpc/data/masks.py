"""Deterministic masks from a counter-based RNG.

Every mask bit is a pure function of (seed, stream, window, haplotype, epoch, site): a splitmix64
hash of those counters (``rag_hpc.rng.uniforms``, streams from ``rag_hpc.rng.Stream``), not a draw
from a stateful generator. So a mask never depends on which process, rank, batch composition or
restart produced it — the predecessor's query/index mask mismatch and its epoch-0 mismatch cannot
happen, and a resumed run sees the masks it would have seen without the interruption.

Convention: ``True`` = masked (hidden from the model and from retrieval).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rag_hpc.config import MaskConfig
from rag_hpc.rng import RNG_NAME, Stream, uniforms


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
    observed = common[None, :] & (uniforms(cfg.seed, Stream.ARRAY_SITES, window, haplotypes, epoch, length) < p)
    return ~observed


def train_mask(
    cfg: MaskConfig, window: int, haplotypes: np.ndarray, epoch: int, af: np.ndarray, typed: np.ndarray | None = None
) -> np.ndarray:
    """Per-haplotype training masks [B, L] for ``epoch``: a share ``array_share`` of haplotypes
    array-like (what imputation queries look like: ~2 % of sites observed), the rest at the
    curriculum level with AF guidance (which teaches the model the panel's LD at every density)."""
    rates = site_rates(curriculum_rate(epoch, cfg), af, cfg)
    masks = uniforms(cfg.seed, Stream.TRAIN_MASK, window, haplotypes, epoch, len(af)) < rates[None, :]
    if cfg.array_share > 0:
        pick = uniforms(cfg.seed, Stream.ARRAY_PICK, window, haplotypes, epoch, 1)[:, 0] < cfg.array_share
        masks[pick] = array_mask(cfg, window, haplotypes[pick], epoch, af, typed)
    return masks


def val_mask(cfg: MaskConfig, window: int, length: int) -> np.ndarray:
    """The fixed validation mask [L], shared by all validation haplotypes of the window so that one
    FAISS index over the reference serves every validation query."""
    return uniforms(cfg.seed, Stream.VAL_MASK, window, np.zeros(1, dtype=np.uint64), 0, length)[0] < cfg.val_rate


def val_mask_spec(cfg: MaskConfig) -> dict[str, Any]:
    """What the validation mask depends on, for cache keys."""
    return {"kind": "val", "rng": RNG_NAME, "seed": cfg.seed, "rate": cfg.val_rate}
