"""Match evidence beyond the window: the Li–Stephens copying model over all typed sites (DESIGN.md §7).

A SNP array types ~1 site in 40 of a panel's, so a 511-site window holds a dozen typed sites and
hundreds of references tie on them. What tells the copied haplotype apart is how far the agreement
reaches on both sides, across window edges. The Li–Stephens HMM (the model Minimac and Beagle rest on)
weighs exactly that: its posterior copying probability of a reference at a gap between typed sites
falls with every mismatch on either side, discounted by the recombination distance. Measured on the
simulated kgp-like panel (README): copying from its posterior beats the window-Hamming nearest copy
~10x in r² at the rarest alleles and beats softmax-weighted longest exact matches (PBWT-style runs)
in every MAF bin.

numpy on alleles at typed sites (uint8, one row per typed site); nothing here depends on the model.
"""

from __future__ import annotations

import math
import mmap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

FORWARD_BYTES = 512 * 2**20  # forward messages of one query batch (per thread) kept whole up to this size


@dataclass(frozen=True)
class GapDonors:
    """The ``k`` heaviest donors of each query haplotype around every gap, heaviest first, and their weights
    (summing to ~1).

    donors [M + 1, B, k]: reference rows; weights [M + 1, B, k]; row ``g + 1`` is gap ``g``
    (between typed sites g and g + 1; row 0 is before the first typed site)."""

    donors: np.ndarray
    weights: np.ndarray


def _unmapped_on_release(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array in its own anonymous mapping, unmapped as soon as the array and its views are gone.
    The forward messages are the HMM's working set: kept as thousands of batch x references copies, or
    in one malloc'd block, glibc's heap arenas held on to a varying share after each sweep (one prebuild
    task peaked at 224 or 251 MB from run to run), which the guard cannot size."""
    n = math.prod(shape)
    return np.frombuffer(mmap.mmap(-1, max(1, 4 * n)), np.float32, count=n).reshape(shape)


def li_stephens_donors(
    query_t: np.ndarray,
    reference_t: np.ndarray,
    switch: np.ndarray,
    error: float,
    k: int,
    batch: int = 16,
    block: int = 64,
    exclude: np.ndarray | None = None,
    threads: int = 1,
    dtypes: tuple[type, type] = (np.int32, np.float32),
) -> GapDonors:
    """Posterior copying probabilities of the Li–Stephens HMM at every gap between typed sites.

    States: the N references. At typed site j the query copies its current state's allele, wrong with
    probability ``error``; between typed sites j - 1 and j it jumps to a uniformly chosen reference with
    probability ``switch[j]`` (float [M], from the genetic distance). The posterior at a gap combines
    the forward message at its left typed site with the backward message at its right one, each taken half
    the gap's way (so a gap's sites share one weight vector), and keeps each query's ``k`` heaviest states.

    Messages are rescaled every step and kept in float32: the jump term puts a floor of ~switch / N under
    every state, far above float32's range. Memory is bounded whatever the chromosome's length: when a
    batch's forward messages exceed ``FORWARD_BYTES`` they are kept every ``block`` typed sites and
    recomputed one block at a time during the backward sweep, (M / block + block) x batch x N floats.

    ``exclude`` (int [B, e], reference rows) takes states out of each query's HMM (emission 0 everywhere):
    a panel haplotype used as a query must not copy itself or its own sample's other haplotype.
    ``threads`` query batches are swept at once (each holds its own forward messages). ``dtypes``: of the
    donors and the weights kept (narrow ones save the conversion afterwards, which the threads share).
    """
    n_typed, n_ref = reference_t.shape
    k = min(k, n_ref)
    n_query = query_t.shape[1]
    donors = np.zeros((n_typed + 1, n_query, k), dtypes[0])
    weights = np.zeros((n_typed + 1, n_query, k), dtypes[1])
    switch = np.clip(np.asarray(switch, np.float64), 0.0, 1.0)
    half = 1.0 - np.sqrt(1.0 - switch)  # a switch probability over half the gap's distance
    hit, miss = np.float32(1.0 - error), np.float32(error)
    # Kept forward messages: all of a batch's when they fit FORWARD_BYTES, else one per block + one block.
    keep_all = n_typed * min(batch, n_query) * n_ref * 4 <= FORWARD_BYTES

    if exclude is not None and exclude.shape[0] != n_query:
        raise ValueError(f"exclude has {exclude.shape[0]} rows for {n_query} queries")

    def emission(j: int) -> np.ndarray:
        ref = reference_t[j]
        return np.stack([np.where(ref == 0, hit, miss), np.where(ref == 1, hit, miss)])

    # Emission tables [2, N] per typed site, made once for all query batches when they fit FORWARD_BYTES
    # (each is read twice per batch: forward and backward).
    tables = [emission(j) for j in range(n_typed)] if n_typed * 2 * n_ref * 4 <= FORWARD_BYTES else None

    def emit(out: np.ndarray, query: np.ndarray, j: int, q0: int) -> None:
        """out *= P(query allele | each reference) at typed site j: one gather from a [2, N] table."""
        out *= (tables[j] if tables is not None else emission(j))[query[j]]
        if exclude is not None:
            np.put_along_axis(out, exclude[q0 : q0 + out.shape[0]], 0.0, axis=1)

    def forward_step(alpha: np.ndarray, query: np.ndarray, j: int, q0: int) -> None:
        # alpha sums to 1, so each reference receives switch / N of jumps; the (1 - switch) factor on
        # staying goes into the rescaling.
        if j and switch[j] < 1.0:
            alpha += np.float32(switch[j] / (n_ref * (1.0 - switch[j])))
        elif j:
            alpha[:] = 1.0
        emit(alpha, query, j, q0)
        alpha /= alpha.sum(axis=1, keepdims=True)

    def keep(gap: int, q0: int, post: np.ndarray) -> None:
        """Store each query's k heaviest states at ``gap``, heaviest first (the model reads a donor's rank)."""
        if exclude is not None:  # the half-gap jump gives every state a share, excluded ones too
            np.put_along_axis(post, exclude[q0 : q0 + post.shape[0]], 0.0, axis=1)
        top, w = heaviest(post, k)
        donors[gap + 1, q0 : q0 + post.shape[0]] = top
        weights[gap + 1, q0 : q0 + post.shape[0]] = w / w.sum(axis=1, keepdims=True)

    starts = list(range(0, n_typed, block))

    def sweep(q0: int) -> None:
        query = query_t[:, q0 : q0 + batch]
        alpha = np.full((query.shape[1], n_ref), 1.0 / n_ref, np.float32)
        # The forward messages a sweep keeps (alpha_{j-1}, the prior of typed site j): every one with
        # keep_all, else one per block start plus the block being swept back.
        kept = _unmapped_on_release((n_typed if keep_all else len(starts), *alpha.shape))
        for j in range(n_typed):
            if keep_all or j % block == 0:
                kept[j if keep_all else j // block] = alpha
            forward_step(alpha, query, j, q0)
        keep(n_typed - 1, q0, alpha)  # after the last typed site: the forward message alone
        beta_e = np.ones_like(alpha)  # e_j * beta_j, rescaled to mean 1 (beta after the last site: 1)
        swept = None if keep_all else _unmapped_on_release((block, *alpha.shape))
        for b0 in reversed(starts):
            b1 = min(b0 + block, n_typed)
            if keep_all:
                block_lefts = kept[b0:b1]
            else:  # recompute this block's forward messages from the one kept
                block_lefts = swept
                block_lefts[0] = kept[b0 // block]
                alpha = kept[b0 // block].copy()
                for j in range(b0, b1 - 1):
                    forward_step(alpha, query, j, q0)
                    block_lefts[j - b0 + 1] = alpha
            for j in range(b1 - 1, b0 - 1, -1):
                if j < n_typed - 1:  # beta_j from e_{j+1} beta_{j+1}, up to a factor (1 - switch)
                    s_next = switch[j + 1]
                    if s_next < 1.0:
                        beta_e += np.float32(s_next / (1.0 - s_next))  # x mean(beta_e), which is 1 here
                    else:
                        beta_e[:] = 1.0
                emit(beta_e, query, j, q0)
                beta_e /= beta_e.mean(axis=1, keepdims=True)
                # The gap left of typed site j: alpha_{j-1} and e_j beta_j, each moved half the gap:
                # ((1 - h) alpha + h / N) * ((1 - h) beta_e + h mean(beta_e)), mean 1, up to the factor
                # (1 - h)^2, which the weights' normalisation removes.
                h = float(half[j])
                right = beta_e + np.float32(h / (1.0 - h)) if h < 1.0 else np.ones_like(beta_e)
                if j == 0:
                    keep(-1, q0, right)
                else:
                    left = block_lefts[j - b0] + np.float32(h / (n_ref * (1.0 - h))) if h < 1.0 else np.ones_like(beta_e)
                    keep(j - 1, q0, left * right)

    # Query batches are independent and write disjoint rows, so the result is the same whatever the
    # thread count; numpy releases the GIL in the array operations, so threads use the cores.
    batches = range(0, n_query, batch)
    if threads <= 1 or len(batches) == 1:
        for q0 in batches:
            sweep(q0)
    else:
        with ThreadPoolExecutor(min(threads, len(batches))) as pool:
            list(pool.map(sweep, batches))
    return GapDonors(donors, weights)


def heaviest(post: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns [B, k] of each row's k largest values, largest first, and the values."""
    n = post.shape[1]
    top = np.argpartition(post, n - k, axis=1)[:, n - k :]
    values = np.take_along_axis(post, top, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(values, order, axis=1)


def switch_probabilities(positions_bp: np.ndarray, n_reference: int, ne: float, cm_per_mb: float = 1.0) -> np.ndarray:
    """Li–Stephens jump probability between consecutive typed sites, 1 - exp(-4 Ne d / N), d in Morgans at a
    uniform ``cm_per_mb`` (Beagle's default without a map); float [M], entry 0 unused."""
    d = np.diff(np.asarray(positions_bp, np.float64), prepend=positions_bp[0]) * cm_per_mb * 1e-8
    return np.maximum(1.0 - np.exp(-4.0 * ne * d / n_reference), 1e-5)
