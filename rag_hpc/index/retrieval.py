"""Exact k-nearest-haplotype search on alleles: a weighted Hamming distance under per-query masks,

    D(q, r) = sum_i m_i w_i (q_i + r_i - 2 q_i r_i),

computed by ``masked_topk`` as a [B, L] x [L, N] product in torch (CPU or CUDA), chunked over the
references. The nearest-haplotype baseline (``rag_hpc.impute``) ranks by it with uniform weights. With
w_i = ||e(ALT, i) - e(REF, i)||^2 of a per-position embedding it is exactly the squared L2 distance of the
predecessor's flattened L×D embeddings (DESIGN.md §2): ``bench/yardstick`` keeps that definition and the
predecessor-style FAISS index, and tests/test_retrieval.py proves all three return the same top-k.

Exactness and ties. Real panels are full of haplotypes that are identical on the observed sites,
so exact ties are the common case, not the corner case, and float rounding in a GEMM would break
them arbitrarily (differently on CPU and GPU, or between BLAS builds). Weights are therefore
snapped to a fixed-point grid (``fixed_point_weights``: a power-of-two quantum, 2^-50 of the
largest possible distance) and distances are computed in float64: every partial sum is then an
integer multiple of the quantum below 2^53, so it is exact in any summation order, and equal
distances are bitwise equal. Ties are broken by the lower reference index.
The snap moves a weight by at most ~2^-51 of the total, far below float32 resolution of the
embeddings the weights come from.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["fixed_point_weights", "masked_topk"]

# Distances in units of the quantum stay below 2^50 (+ L/2 from rounding): 3 bits of headroom under
# float64's 2^53 exact-integer limit for the signed partial sums of the GEMM.
_FIXED_POINT_BITS = 50
# References per GEMM chunk: bounds the [B, chunk] distance block and the float64 copy of the chunk.
_GEMM_CHUNK = 16384


# ----------------------------------------------------------------------------------------------
# weights


def fixed_point_weights(weights: Tensor | np.ndarray) -> Tensor:
    """Snap weights [L] (>= 0, finite) to the exact-summation grid; returns float64 [L].

    The quantum is a power of two set by max(w) * L (an order-independent bound on any distance),
    so the same weights give the same grid on every device.
    """
    w = torch.as_tensor(weights).detach().to(torch.float64)
    if w.dim() != 1:
        raise ValueError(f"weights must be [L], got {tuple(w.shape)}")
    if w.numel() == 0:
        return w
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("weights must be finite and >= 0 (they are squared norms)")
    bound = float(w.max()) * w.numel()
    if bound == 0.0:
        return w.clone()
    quantum = 2.0 ** (math.ceil(math.log2(bound)) - _FIXED_POINT_BITS)
    return torch.round(w / quantum) * quantum


# ----------------------------------------------------------------------------------------------
# exact masked retrieval (torch)


def _smallest_k(dist: Tensor, k: int) -> Tensor:
    """Column positions [B, k] of the k smallest entries per row, ordered by (distance, column).

    topk alone is not stable under ties; this keeps everything strictly below the k-th value and
    fills the rest with the earliest columns equal to it, then sorts the k survivors stably.
    """
    rows = dist.shape[0]
    kth = torch.topk(dist, k, dim=1, largest=False, sorted=True).values[:, -1:]
    below = dist < kth
    at = dist == kth
    need = k - below.sum(1, keepdim=True)
    chosen = below | (at & (torch.cumsum(at, dim=1) <= need))
    cols = chosen.nonzero()[:, 1].view(rows, k)  # row-major, so ascending columns within a row
    order = torch.sort(dist.gather(1, cols), dim=1, stable=True).indices
    return cols.gather(1, order)


def _check_alleles(x: Tensor, name: str) -> None:
    if x.numel() and (bool((x < 0).any()) or bool((x > 1).any())):
        raise ValueError(
            f"{name} must hold alleles 0 (REF) / 1 (ALT); got values in [{x.min().item()}, {x.max().item()}] "
            "(token ids REF=5/ALT=6 are not alleles)"
        )


@torch.no_grad()
def _masked_topk_fixed(
    query: Tensor,
    observed: Tensor,
    reference: Tensor,
    wq: Tensor,
    k: int,
    exclude: Tensor | None,
    chunk_size: int = _GEMM_CHUNK,
) -> tuple[Tensor, Tensor]:
    """``masked_topk`` with weights already on the fixed-point grid (float64, on query's device); the yardstick's
    ``FixedMaskIndex`` scans with it on its observed columns, whose weights sit on the whole window's grid."""
    device = query.device
    batch, _ = query.shape
    n_ref = reference.shape[0]
    q = query.to(torch.float64)
    a = observed.to(torch.float64) * wq  # [B, L]: m_i * w_i
    base = (a * q).sum(1, keepdim=True)  # sum_i m_i w_i q_i
    coef = a * (1.0 - 2.0 * q)  # r_i's coefficient: +m w where q=0, -m w where q=1
    best_d: Tensor | None = None
    best_i: Tensor | None = None
    step = max(chunk_size, k)
    for start in range(0, n_ref, step):
        stop = min(start + step, n_ref)
        chunk = reference[start:stop].to(device=device, dtype=torch.float64)
        _check_alleles(chunk, "reference")
        dist = torch.addmm(base.expand(batch, stop - start), coef, chunk.T)
        if exclude is not None:
            dist.masked_fill_(exclude[:, start:stop].to(device), math.inf)
        ids = torch.arange(start, stop, device=device).expand(batch, stop - start)
        if best_d is not None and best_i is not None:
            # Previous winners precede the chunk and have lower ids, so column order = id order among ties.
            dist = torch.cat([best_d, dist], dim=1)
            ids = torch.cat([best_i, ids], dim=1)
        cols = _smallest_k(dist, k)
        best_d, best_i = dist.gather(1, cols), ids.gather(1, cols)
    assert best_d is not None and best_i is not None
    return best_d, best_i


@torch.no_grad()
def masked_topk(
    query: Tensor,
    observed: Tensor,
    reference: Tensor,
    weights: Tensor,
    k: int,
    exclude: Tensor | None = None,
    *,
    chunk_size: int = _GEMM_CHUNK,
) -> tuple[Tensor, Tensor]:
    """Exact k nearest references per query under per-query masks.

    query [B, L] alleles 0/1; observed [B, L] bool (True = observed in that query; [L] is
    broadcast); reference [N, L] alleles 0/1 (any dtype; float64 avoids a per-call conversion);
    weights [L] >= 0 (ones: plain Hamming); exclude [B, N] bool (True = never return this reference).

    Returns (dist float64 [B, k], idx int64 [B, k]) on query's device, ascending by distance, ties
    to the lower reference index. dist is sum_i m_i w_i [q_i != r_i] with w on the fixed-point grid.
    One [B, L] x [L, chunk] product per ``chunk_size`` references (bounds memory at
    B x chunk distances plus a float64 copy of the chunk); no [B, N, L] tensor.
    """
    if query.dim() != 2:
        raise ValueError(f"query must be [B, L], got {tuple(query.shape)}")
    batch, length = query.shape
    if observed.dim() == 1:
        observed = observed.expand(batch, length)
    if tuple(observed.shape) != (batch, length):
        raise ValueError(f"observed must be [B, L] = [{batch}, {length}] or [L], got {tuple(observed.shape)}")
    if observed.dtype != torch.bool:
        raise ValueError(f"observed must be bool (True = observed), got {observed.dtype}")
    if reference.dim() != 2 or reference.shape[1] != length:
        raise ValueError(f"reference must be [N, {length}], got {tuple(reference.shape)}")
    if tuple(weights.shape) != (length,):
        raise ValueError(f"weights must be [{length}], got {tuple(weights.shape)}")
    n_ref = reference.shape[0]
    if exclude is not None and tuple(exclude.shape) != (batch, n_ref):
        raise ValueError(f"exclude must be [B, N] = [{batch}, {n_ref}], got {tuple(exclude.shape)}")
    available = n_ref - (exclude.sum(1) if exclude is not None else torch.zeros(batch, dtype=torch.long))
    if k < 1 or (batch and int(available.min()) < k):
        raise ValueError(
            f"k={k} but some query has only {int(available.min()) if batch else n_ref} references left after exclusion"
        )
    _check_alleles(query, "query")
    device = query.device
    if batch == 0:
        return torch.empty(0, k, dtype=torch.float64, device=device), torch.empty(0, k, dtype=torch.long, device=device)
    wq = fixed_point_weights(weights).to(device)
    # The tie rule needs float64 even for a caller inside autocast: exempt today, and this keeps it so.
    with torch.autocast(device_type=device.type, enabled=False):
        return _masked_topk_fixed(query, observed.to(device), reference, wq, k, exclude, chunk_size)
