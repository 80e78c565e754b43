"""Donor tables: whom each query haplotype copies from, around every gap between its typed sites.

The retrieval the model, the copy predictor, training and validation all read (DESIGN.md §7). For
query haplotypes typed at one set of sites (a genotyping array), the Li–Stephens HMM over *all* typed
sites of the chromosome (``rag_hpc.index.matching.li_stephens_donors``) gives, per gap between typed
sites, each query's ``k`` heaviest reference haplotypes and their posterior copying weights. So a
query's donors at a site reflect how far each reference matches it on both sides, across window edges
— the evidence that tells the copied haplotype apart when hundreds of references tie on a window's
dozen typed sites.

Training and validation queries are panel haplotypes typed at the run's array (``WindowCache.array_sites``);
a training query never copies itself or its own sample's other haplotype. Their tables are cache
artifacts keyed by everything they depend on (panel, split, typed sites, queries, HMM parameters, k),
so they are computed once per run configuration, not on every step or restart. Imputation targets get
theirs at the start of ``impute`` (``DonorTable`` over the targets' own typed sites).
"""

from __future__ import annotations

import io
import logging
import time
import zipfile
from dataclasses import dataclass

import numpy as np

from rag_hpc.config import DonorConfig
from rag_hpc.data.masks import sites_digest
from rag_hpc.data.windows import Window
from rag_hpc.index.build import WindowCache
from rag_hpc.index.cache import Artifact
from rag_hpc.index.matching import li_stephens_donors, switch_probabilities

log = logging.getLogger("rag_hpc.index")

DONORS = "donors"
DONOR_FORMAT = 2  # 2: donors heaviest first


@dataclass(frozen=True)
class DonorTable:
    """k donors per query and gap. ``typed`` int64 [M]: panel sites, increasing; ``donors`` [M + 1, Q, k]:
    rows of the reference (``Panel.reference_haplotypes()`` order), heaviest first per query and gap, uint16 when the reference has fewer
    than 65,536 haplotypes, else int32; ``weights`` float16 [M + 1, Q, k], summing to 1 per query and gap
    (to float16's 1e-3: the tables are the run's largest artifact, and a weight needs no more).
    Row ``g + 1`` is the gap after typed site ``g``."""

    typed: np.ndarray
    donors: np.ndarray
    weights: np.ndarray

    def window(self, window: Window, rows: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What the model reads for the queries ``rows`` in ``window``: donors and weights [B, G, k] of the
        G gaps the window's sites fall in, and each site's gap among them (int64 [L])."""
        gap_rows = np.searchsorted(self.typed, np.arange(window.start, window.stop), side="right")
        first, last = int(gap_rows[0]), int(gap_rows[-1]) + 1
        donors = self.donors[first:last][:, rows].transpose(1, 0, 2).astype(np.int64)
        weights = self.weights[first:last][:, rows].transpose(1, 0, 2).astype(np.float32)
        return donors, weights, gap_rows - first


def typed_columns(cache: WindowCache, typed: np.ndarray, haplotypes: np.ndarray) -> np.ndarray:
    """Alleles uint8 [M, len(haplotypes)] of panel haplotypes at the typed sites, read from the shards
    (one row per typed site: each HMM step reads one contiguous row)."""
    parts = []
    for window in cache.windows:
        lo, hi = np.searchsorted(typed, [window.start, window.stop])
        if hi > lo:
            parts.append(cache.shard(window.id).alleles[haplotypes][:, typed[lo:hi] - window.start])
    return np.ascontiguousarray(np.concatenate(parts, axis=1).T)


def compute_donors(
    cache: WindowCache,
    typed: np.ndarray,
    query_t: np.ndarray,
    cfg: DonorConfig,
    k: int,
    exclude: np.ndarray | None = None,
    reference_t: np.ndarray | None = None,
) -> DonorTable:
    """Li–Stephens donors of queries with alleles ``query_t`` uint8 [M, Q] at ``typed`` among the panel's
    train-split haplotypes (``exclude``: reference rows [Q, e] each query may not copy)."""
    reference = cache.panel.reference_haplotypes()
    if reference_t is None:
        reference_t = typed_columns(cache, typed, reference)
    switch = switch_probabilities(cache.panel.positions[typed], reference.size, cfg.ne)
    dtypes = (donor_dtype(reference.size), np.float16)
    found = li_stephens_donors(
        query_t, reference_t, switch, cfg.error, k, cfg.batch, exclude=exclude, threads=cfg.sweep_threads(), dtypes=dtypes
    )
    return DonorTable(typed, found.donors, found.weights)


def donor_dtype(n_reference: int) -> type[np.integer]:
    return np.uint16 if n_reference <= np.iinfo(np.uint16).max + 1 else np.int32


def own_sample_rows(queries: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Reference rows int64 [Q, 2] of each panel query haplotype's own sample (both haplotypes)."""
    row = np.full(int(max(queries.max(), reference.max())) + 2, -1, np.int64)
    row[reference] = np.arange(reference.size)
    own = np.stack([row[2 * (queries // 2)], row[2 * (queries // 2) + 1]], axis=1)
    if (own < 0).any():
        raise ValueError("own_sample_rows: every query must be a train-split (reference) haplotype")
    return own


def donor_artifact(
    cache: WindowCache, typed: np.ndarray, queries: np.ndarray, cfg: DonorConfig, k: int, exclude_own: bool
) -> Artifact:
    panel = cache.panel
    return Artifact(
        DONORS,
        {
            "format": DONOR_FORMAT,
            "panel_sha256": panel.info.source_sha256,
            "split": panel.split_digest(),
            "typed_sha256": sites_digest(typed),
            "queries_sha256": sites_digest(queries),
            "exclude": "own-sample" if exclude_own else "none",
            "hmm": {"ne": cfg.ne, "error": cfg.error, "k": k},
        },
    )


def panel_donors(cache: WindowCache, typed: np.ndarray, queries: np.ndarray, cfg: DonorConfig, k: int, what: str) -> DonorTable:
    """The donor table of panel haplotypes ``queries`` typed at ``typed``, from the cache or computed and
    committed there (under the artifact's lock: concurrent ranks or jobs compute it once). Train-split
    queries never copy their own sample."""
    reference = cache.panel.reference_haplotypes()
    exclude_own = bool(np.isin(queries, reference).any())
    art = donor_artifact(cache, typed, queries, cfg, k, exclude_own)
    files = cache.store.read(art)
    if files is None:
        with cache.store.lock(art):
            files = cache.store.read(art)
            if files is None:
                t0 = time.perf_counter()
                both = typed_columns(cache, typed, np.concatenate([reference, queries]))  # one pass over the shards
                reference_t, query_t = (
                    np.ascontiguousarray(both[:, : reference.size]),
                    np.ascontiguousarray(both[:, reference.size :]),
                )
                del both
                exclude = own_sample_rows(queries, reference) if exclude_own else None
                table = compute_donors(cache, typed, query_t, cfg, k, exclude, reference_t)
                cache.store.commit(art, {"donors.npz": _table_bytes(table, queries)})
                log.info(
                    "%s donors: %d haplotypes x %d typed sites, k %d, in %.1f s: %s",
                    what,
                    queries.size,
                    typed.size,
                    k,
                    time.perf_counter() - t0,
                    cache.store.path(art),
                )
                return table
    return _table_from_bytes(files["donors.npz"], typed, queries, cache.store.path(art))


def _table_bytes(table: DonorTable, queries: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, typed=table.typed, queries=queries, donors=table.donors, weights=table.weights)
    return buf.getvalue()


def _table_from_bytes(data: bytes, typed: np.ndarray, queries: np.ndarray, where: object) -> DonorTable:
    from rag_hpc.index.cache import CacheError

    try:
        with np.load(io.BytesIO(data)) as npz:
            table = DonorTable(npz["typed"], npz["donors"], npz["weights"])
            same = np.array_equal(table.typed, typed) and np.array_equal(npz["queries"], queries)
    except (ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise CacheError(f"donor table {where} is unreadable ({exc}): delete it and rerun") from None
    if not same:
        raise CacheError(f"donor table {where} holds other typed sites or queries than its key says: delete it and rerun")
    return table
