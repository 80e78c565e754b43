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
computed in parts (``donor_parts``: one per prebuild task, each over its share of the queries) by the
index-prebuild job array after its windows (``build_panel_donors``), and read by training and
validation (``panel_donors``), which compute only a part the cache lacks. Imputation targets get
theirs at the start of ``impute`` (``DonorTable`` over the targets' own typed sites).
"""

from __future__ import annotations

import io
import logging
import math
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from rag_hpc.config import DonorConfig
from rag_hpc.data.masks import sites_digest
from rag_hpc.data.panel import SPLIT_TRAIN, SPLIT_VAL
from rag_hpc.data.windows import Window
from rag_hpc.index.build import WindowCache
from rag_hpc.index.cache import Artifact
from rag_hpc.index.matching import li_stephens_donors, switch_probabilities
from rag_hpc.rng import Stream, uniforms

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
        gaps the window's sites fall in and the gap on each side of them (where the chromosome has one:
        the model reads a site's neighbouring gaps too), and each site's gap among them (int64 [L])."""
        gap_rows = np.searchsorted(self.typed, np.arange(window.start, window.stop), side="right")
        first, last = max(int(gap_rows[0]) - 1, 0), min(int(gap_rows[-1]) + 2, self.donors.shape[0])
        donors = self.donors[first:last][:, rows].transpose(1, 0, 2).astype(np.int64)  # [B, G, k]
        weights = self.weights[first:last][:, rows].transpose(1, 0, 2).astype(np.float32)
        return donors, weights, gap_rows - first

    def along(self, window: Window) -> np.ndarray:
        """float32 [L]: how far each site of ``window`` lies through its gap, from 0 at the typed site on its
        left to 1 at the one on its right; 0.5 before the first typed site and after the last."""
        sites = np.arange(window.start, window.stop)
        row = np.searchsorted(self.typed, sites, side="right")
        inner = (row > 0) & (row < self.typed.size)
        left = self.typed[np.clip(row - 1, 0, self.typed.size - 1)]
        right = self.typed[np.clip(row, 0, self.typed.size - 1)]
        return np.where(inner, (sites - left) / np.maximum(right - left, 1), 0.5).astype(np.float32)


def typed_columns(cache: WindowCache, typed: np.ndarray, haplotypes: np.ndarray, from_panel: bool = False) -> np.ndarray:
    """Alleles uint8 [M, len(haplotypes)] of panel haplotypes at the typed sites (one row per typed site:
    each HMM step reads one contiguous row), read from the window shards, or with ``from_panel`` from
    panel.h5 4,096 sites at a time: a prebuild task computes its part of the donor tables while other
    tasks may still be writing their windows (the shards, when they exist, read ~8x faster: 0.3 s against
    2.4 s for the kgp-like panel's 1,212 array sites)."""
    parts = []
    if from_panel:
        panel, block = cache.panel, 4096
        for start in range(0, panel.n_sites, block):
            lo, hi = np.searchsorted(typed, [start, start + block])
            if hi > lo:
                parts.append(panel.haplotypes(start, min(start + block, panel.n_sites))[haplotypes][:, typed[lo:hi] - start])
    else:
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


def training_queries(train_haplotypes: np.ndarray, n_samples: int, seed: int) -> np.ndarray:
    """Panel haplotype ids (sorted, both of each sample) of ``n_samples`` train-split samples drawn by
    ``Stream.TRAIN_QUERIES``: all of them when the split has no more."""
    samples = np.unique(np.asarray(train_haplotypes) // 2)
    if samples.size > n_samples:
        keys = uniforms(seed, Stream.TRAIN_QUERIES, 0, samples.astype(np.uint64), 0, 1)[:, 0]
        samples = np.sort(samples[np.argsort(keys, kind="stable")[:n_samples]])
    return np.stack([2 * samples, 2 * samples + 1], axis=1).reshape(-1).astype(np.int64)


def run_queries(cache: WindowCache) -> dict[str, np.ndarray]:
    """The run's donor-table queries: 'training' (``donors.train_samples`` train-split samples drawn with
    ``train.seed``) and 'validation' (the whole val split), panel haplotype ids."""
    split = cache.panel.haplotype_split()
    config = cache.config
    return {
        "training": training_queries(np.flatnonzero(split == SPLIT_TRAIN), config.donors.train_samples, config.train.seed),
        "validation": np.flatnonzero(split == SPLIT_VAL).astype(np.int64),
    }


def donor_parts(cache: WindowCache) -> int:
    """Parts each donor table is computed in: one per prebuild task (``index.windows_per_task`` windows
    each), so the job array that builds the windows also runs the HMM, each task over its share of the
    queries (query batches are independent)."""
    return math.ceil(len(cache.windows) / cache.config.index.windows_per_task)


def parts_of_windows(cache: WindowCache, window_ids: Iterable[int]) -> list[int]:
    """The donor parts a prebuild task over ``window_ids`` computes."""
    return sorted({int(w) // cache.config.index.windows_per_task for w in window_ids})


def _parts(
    cache: WindowCache, typed: np.ndarray, queries: np.ndarray, parts: Iterable[int]
) -> Iterator[tuple[int, np.ndarray, Artifact]]:
    """(part, its queries, its artifact) of a table of ``queries`` over the given ``parts``, empty parts
    left out: the one place a table is cut into parts and each part keyed."""
    n_parts = donor_parts(cache)
    for part in parts:
        sub = np.array_split(queries, n_parts)[part]
        if sub.size:
            exclude_own = _queries_are_reference(cache, sub)
            yield part, sub, donor_artifact(cache, typed, sub, cache.config.donors, cache.config.model.k, exclude_own)


def part_artifacts(cache: WindowCache) -> dict[int, list[Artifact]]:
    """part -> the artifacts of the run's donor-table parts it computes (what a launch checks before it
    decides which prebuild tasks to submit)."""
    typed, n_parts = cache.array_sites(), donor_parts(cache)
    out: dict[int, list[Artifact]] = {part: [] for part in range(n_parts)}
    if typed.size:
        for queries in run_queries(cache).values():
            for part, _, art in _parts(cache, typed, queries, range(n_parts)):
                out[part].append(art)
    return out


def build_panel_donors(cache: WindowCache, parts: Iterable[int]) -> tuple[int, int]:
    """Compute the run's donor-table ``parts`` (``run_queries`` typed at the run's array) that the cache
    lacks or holds invalid: (built, cached). What a prebuild task runs after its windows."""
    typed, n_parts, built, cached = cache.array_sites(), donor_parts(cache), 0, 0
    if typed.size == 0:
        return 0, 0
    parts = list(parts)
    for what, queries in run_queries(cache).items():
        for part, sub, art in _parts(cache, typed, queries, parts):
            if cache.store.problem(art, checksums=True) is None:
                cached += 1
                continue
            with cache.store.lock(art):
                if cache.store.problem(art, checksums=True) is not None:  # else another task just built it
                    _compute_part(cache, typed, sub, art, f"{what} donors part {part + 1}/{n_parts}")
                    built += 1
    return built, cached


def panel_donors(cache: WindowCache, typed: np.ndarray, queries: np.ndarray, what: str) -> DonorTable:
    """The donor table of panel haplotypes ``queries`` typed at ``typed``: its parts read from the cache
    (the prebuild wrote them), any missing one computed and committed here first (under the part's lock:
    concurrent ranks or jobs compute it once). Train-split queries never copy their own sample."""
    n_parts = donor_parts(cache)
    tables = []
    for part, sub, art in _parts(cache, typed, queries, range(n_parts)):
        files = cache.store.read(art)
        if files is None:
            with cache.store.lock(art):
                files = cache.store.read(art)
                if files is None:
                    tables.append(
                        _compute_part(cache, typed, sub, art, f"{what} donors part {part + 1}/{n_parts} (not prebuilt)")
                    )
                    continue
        tables.append(_table_from_bytes(files["donors.npz"], typed, sub, cache.store.path(art)))
    return DonorTable(
        typed, np.concatenate([t.donors for t in tables], axis=1), np.concatenate([t.weights for t in tables], axis=1)
    )


def _queries_are_reference(cache: WindowCache, queries: np.ndarray) -> bool:
    """Train-split queries: they must not copy their own sample (and their tables' keys say so)."""
    return bool(np.isin(queries, cache.panel.reference_haplotypes()).any())


def _compute_part(cache: WindowCache, typed: np.ndarray, queries: np.ndarray, art: Artifact, label: str) -> DonorTable:
    """Run the HMM for panel haplotypes ``queries`` and commit their table as ``art`` (caller holds its lock)."""
    t0 = time.perf_counter()
    reference = cache.panel.reference_haplotypes()
    both = typed_columns(cache, typed, np.concatenate([reference, queries]), from_panel=True)  # one pass over the panel
    reference_t, query_t = np.ascontiguousarray(both[:, : reference.size]), np.ascontiguousarray(both[:, reference.size :])
    del both
    exclude = own_sample_rows(queries, reference) if _queries_are_reference(cache, queries) else None
    table = compute_donors(cache, typed, query_t, cache.config.donors, cache.config.model.k, exclude, reference_t)
    cache.store.commit(art, {"donors.npz": _table_bytes(table, queries)})
    log.info(
        "%s: %d haplotypes x %d typed sites, k %d, in %.1f s: %s",
        label,
        queries.size,
        typed.size,
        cache.config.model.k,
        time.perf_counter() - t0,
        cache.store.path(art),
    )
    return table


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
