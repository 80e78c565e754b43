"""Donor tables: whom each query haplotype copies from, around every gap between its typed sites.

The retrieval the model, the copy predictor, training and validation all read (DESIGN.md §7). For
query haplotypes typed at one set of sites (a genotyping array), the Li–Stephens HMM over *all* typed
sites of the chromosome (``rag_hpc.index.matching.li_stephens_donors``) gives, per gap between typed
sites, each query's ``k`` heaviest reference haplotypes and their posterior copying weights. So a
query's donors at a site reflect how far each reference matches it on both sides, across window edges
— the evidence that tells the copied haplotype apart when hundreds of references tie on a window's
dozen typed sites.

A run has up to three tables, all typed at the run's array (``WindowCache.array_sites``: the targets'
sites when the config names targets): training and validation queries are panel haplotypes (a training
query never copies itself or its own sample's other haplotype); the targets' are the target haplotypes.
Each table is a set of cache artifacts keyed by everything it depends on (panel, split, typed sites, the
queries or the targets' content, HMM parameters, k), computed in parts (``donor_parts``: one per prebuild
task, each over its share of the queries) by the index-prebuild job array after its windows
(``build_donors``), and read by training, validation and ``impute`` (``read_donors``), which compute only
a part the cache lacks: targets given to ``impute`` that the run did not prebuild get their table there.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import zstandard

from rag_hpc.config import DonorConfig
from rag_hpc.data.masks import sites_digest
from rag_hpc.data.panel import SPLIT_TRAIN, SPLIT_VAL
from rag_hpc.data.windows import Window
from rag_hpc.index import donor_format
from rag_hpc.index.build import WindowCache
from rag_hpc.index.cache import Artifact, CacheError
from rag_hpc.index.matching import li_stephens_donors, switch_probabilities
from rag_hpc.rng import Stream, uniforms

if TYPE_CHECKING:
    from rag_hpc.data.targets import TargetSites

log = logging.getLogger("rag_hpc.index")

DONORS = "donors"


@dataclass(frozen=True)
class DonorTable:
    """k donors per query and gap, in ``rag_hpc.index.donor_format``'s layout. ``typed`` int64 [M]: panel
    sites, increasing; ``donors`` [M + 1, Q, k]: rows of the reference (``Panel.reference_haplotypes()``
    order), uint16 when the reference has fewer than 65,536 haplotypes, else int32, each donor in its slot
    from gap to gap (a slot under the weight floor holds its last donor); ``codes`` uint8 [M + 1, Q, k]:
    their weights as log codes. Row ``g + 1`` is the gap after typed site ``g``."""

    typed: np.ndarray
    donors: np.ndarray
    codes: np.ndarray

    @classmethod
    def of(cls, typed: np.ndarray, donors: np.ndarray, weights: np.ndarray) -> DonorTable:
        """The table of the HMM's heaviest-first donors and weights [M + 1, Q, k], weights quantized."""
        slots, codes = donor_format.slot_order(donors, donor_format.weight_codes(weights))
        return cls(typed, slots, codes)

    def window(self, window: Window, rows: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What the model reads for the queries ``rows`` in ``window``: donors and weights [B, G, k] of the
        gaps the window's sites fall in and the gap on each side of them (where the chromosome has one:
        the model reads a site's neighbouring gaps too), heaviest first, and each site's gap among them
        (int64 [L])."""
        gap_rows = np.searchsorted(self.typed, np.arange(window.start, window.stop), side="right")
        first, last = max(int(gap_rows[0]) - 1, 0), min(int(gap_rows[-1]) + 2, self.donors.shape[0])
        codes = self.codes[first:last][:, rows].transpose(1, 0, 2)  # [B, G, k]
        order = donor_format.heaviest_first(codes)
        donors = np.take_along_axis(self.donors[first:last][:, rows].transpose(1, 0, 2), order, 2).astype(np.int64)
        weights = donor_format.code_weights(np.take_along_axis(codes, order, 2))
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
    dtypes = (donor_format.donor_dtype(reference.size), np.float16)
    found = li_stephens_donors(
        query_t, reference_t, switch, cfg.error, k, cfg.batch, exclude=exclude, threads=cfg.sweep_threads(), dtypes=dtypes
    )
    return DonorTable.of(typed, found.donors, found.weights)


def own_sample_rows(queries: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Reference rows int64 [Q, 2] of each panel query haplotype's own sample (both haplotypes)."""
    row = np.full(int(max(queries.max(), reference.max())) + 2, -1, np.int64)
    row[reference] = np.arange(reference.size)
    own = np.stack([row[2 * (queries // 2)], row[2 * (queries // 2) + 1]], axis=1)
    if (own < 0).any():
        raise ValueError("own_sample_rows: every query must be a train-split (reference) haplotype")
    return own


def training_queries(train_haplotypes: np.ndarray, n_samples: int, seed: int) -> np.ndarray:
    """Panel haplotype ids (sorted, both of each sample) of ``n_samples`` train-split samples drawn by
    ``Stream.TRAIN_QUERIES``: all of them when the split has no more."""
    samples = np.unique(np.asarray(train_haplotypes) // 2)
    if samples.size > n_samples:
        keys = uniforms(seed, Stream.TRAIN_QUERIES, 0, samples.astype(np.uint64), 0, 1)[:, 0]
        samples = np.sort(samples[np.argsort(keys, kind="stable")[:n_samples]])
    return np.stack([2 * samples, 2 * samples + 1], axis=1).reshape(-1).astype(np.int64)


@dataclass(frozen=True)
class Queries:
    """The query haplotypes of one donor table, typed at ``typed``: panel haplotypes (``ids``), or target
    haplotypes given by their alleles there (``alleles`` uint8 [Q, M], ``targets`` their content id)."""

    what: str
    typed: np.ndarray
    ids: np.ndarray | None = None
    alleles: np.ndarray | None = None
    targets: str | None = None  # the targets' digest: it covers ``exclude``
    exclude: np.ndarray | None = None  # reference rows no query may copy (targets that are panel samples)

    @property
    def labels(self) -> np.ndarray:
        """What a stored part records as its queries: panel ids, or target haplotype rows."""
        return self.ids if self.ids is not None else np.arange(self.alleles.shape[0], dtype=np.int64)  # type: ignore[union-attr]


def target_queries(targets: TargetSites) -> Queries:
    exclude = targets.exclude if targets.exclude.size else None
    return Queries("targets", targets.panel_index, alleles=targets.haplotypes, targets=targets.digest(), exclude=exclude)


def run_queries(cache: WindowCache) -> dict[str, Queries]:
    """The run's donor tables, all typed at the run's array: 'training' (``donors.train_samples`` train-split
    samples drawn with ``train.seed``), 'validation' (the whole val split) and, when the config names
    targets, 'targets' (what ``impute`` reads for them)."""
    split = cache.panel.haplotype_split()
    config, typed = cache.config, cache.array_sites()
    out = {
        "training": Queries(
            "training",
            typed,
            ids=training_queries(np.flatnonzero(split == SPLIT_TRAIN), config.donors.train_samples, config.train.seed),
        ),
        "validation": Queries("validation", typed, ids=np.flatnonzero(split == SPLIT_VAL).astype(np.int64)),
    }
    targets = cache.targets()
    if targets is not None:
        out["targets"] = target_queries(targets)
    return out


def donor_parts(cache: WindowCache) -> int:
    """Parts each donor table is computed in: one per prebuild task (``index.windows_per_task`` windows
    each), so the job array that builds the windows also runs the HMM, each task over its share of the
    queries (query batches are independent)."""
    return math.ceil(len(cache.windows) / cache.config.index.windows_per_task)


def parts_of_windows(cache: WindowCache, window_ids: Iterable[int]) -> list[int]:
    """The donor parts a prebuild task over ``window_ids`` computes."""
    return sorted({int(w) // cache.config.index.windows_per_task for w in window_ids})


@dataclass(frozen=True)
class _Part:
    index: int
    rows: slice  # of the table's queries
    artifact: Artifact
    exclude_own: bool


def _parts(
    cache: WindowCache, queries: Queries, parts: Iterable[int], cfg: DonorConfig | None = None, k: int | None = None
) -> Iterator[_Part]:
    """The given ``parts`` of the table of ``queries`` (empty ones left out), each with its key: the one
    place a table is cut into parts and keyed. ``cfg``/``k``: the HMM's, default the run's."""
    cfg = cache.config.donors if cfg is None else cfg
    k = cache.config.model.k if k is None else k
    panel, n_parts = cache.panel, donor_parts(cache)
    bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(queries.labels.size), n_parts)])
    for part in parts:
        rows = slice(int(bounds[part]), int(bounds[part + 1]))
        if rows.stop == rows.start:
            continue
        exclude_own = queries.ids is not None and _queries_are_reference(cache, queries.ids[rows])
        which = (
            {"queries_sha256": sites_digest(queries.ids[rows])}
            if queries.ids is not None
            else {"targets_sha256": queries.targets, "rows": [rows.start, rows.stop]}
        )
        key = {
            "format": donor_format.FORMAT,
            "panel_sha256": panel.info.source_sha256,
            "split": panel.split_digest(),
            "typed_sha256": sites_digest(queries.typed),
            **which,
            "exclude": "own-sample" if exclude_own else "none",
            "hmm": {"ne": cfg.ne, "error": cfg.error, "k": k},
        }
        yield _Part(part, rows, Artifact(DONORS, key), exclude_own)


def part_artifacts(cache: WindowCache) -> dict[int, list[Artifact]]:
    """part -> the artifacts of the run's donor-table parts it computes (what a launch checks before it
    decides which prebuild tasks to submit)."""
    n_parts = donor_parts(cache)
    out: dict[int, list[Artifact]] = {part: [] for part in range(n_parts)}
    if cache.array_sites().size:
        for queries in run_queries(cache).values():
            for part in _parts(cache, queries, range(n_parts)):
                out[part.index].append(part.artifact)
    return out


def build_donors(cache: WindowCache, parts: Iterable[int]) -> tuple[int, int]:
    """Compute the run's donor-table ``parts`` (``run_queries``) that the cache lacks or holds invalid:
    (built, cached). What a prebuild task runs after its windows."""
    n_parts, built, cached = donor_parts(cache), 0, 0
    if cache.array_sites().size == 0:
        return 0, 0
    parts = list(parts)
    for queries in run_queries(cache).values():
        for part in _parts(cache, queries, parts):
            art = part.artifact
            if cache.store.problem(art, checksums=True) is None:
                cached += 1
                continue
            with cache.store.lock(art):
                if cache.store.problem(art, checksums=True) is not None:  # else another task just built it
                    label = f"{queries.what} donors part {part.index + 1}/{n_parts}"
                    # Other tasks may still be writing their window shards: read the typed columns from panel.h5.
                    _compute_parts(cache, queries, [part], cache.config.donors, cache.config.model.k, label, from_panel=True)
                    built += 1
    return built, cached


def read_donors(cache: WindowCache, queries: Queries, cfg: DonorConfig | None = None, k: int | None = None) -> DonorTable:
    """The donor table of ``queries``: its parts read from the cache (the prebuild wrote them), any missing
    one computed and committed here first (under the part's lock: concurrent ranks or jobs compute it once).
    ``cfg``/``k``: the HMM's (a checkpoint's, a baseline's), default the run's. Train-split queries never
    copy their own sample."""
    cfg = cache.config.donors if cfg is None else cfg
    k = cache.config.model.k if k is None else k
    n_parts = donor_parts(cache)
    tables: dict[int, DonorTable] = {}

    def read(parts: list[_Part]) -> list[_Part]:
        """Read into ``tables`` the given parts the cache holds; return the others."""
        absent = []
        for part in parts:
            files = cache.store.read(part.artifact)
            if files is None:
                absent.append(part)
            else:
                where = cache.store.path(part.artifact)
                tables[part.index] = _table_from_bytes(files["donors.npz"], queries.typed, queries.labels[part.rows], where)
        return absent

    missing = read(list(_parts(cache, queries, range(n_parts), cfg, k)))
    if missing:
        # Under every missing part's lock (taken in part order, so concurrent readers cannot deadlock): the
        # parts still missing then are computed in one HMM run, whose query batches fill every thread; one
        # part at a time would leave threads idle (a part of a small table is a single batch).
        with contextlib.ExitStack() as locks:
            for part in missing:
                locks.enter_context(cache.store.lock(part.artifact))
            todo = read(missing)
            if todo:
                label = f"{queries.what} donors, {len(todo)} of {n_parts} part(s) (not prebuilt)"
                for part, table in zip(todo, _compute_parts(cache, queries, todo, cfg, k, label, from_panel=False)):
                    tables[part.index] = table
    ordered = [tables[i] for i in sorted(tables)]
    return DonorTable(
        queries.typed,
        np.concatenate([t.donors for t in ordered], axis=1),
        np.concatenate([t.codes for t in ordered], axis=1),
    )


def _queries_are_reference(cache: WindowCache, ids: np.ndarray) -> bool:
    """Train-split queries: they must not copy their own sample (and their tables' keys say so)."""
    return bool(np.isin(ids, cache.panel.reference_haplotypes()).any())


def _compute_parts(
    cache: WindowCache, queries: Queries, parts: list[_Part], cfg: DonorConfig, k: int, label: str, from_panel: bool
) -> list[DonorTable]:
    """Run the HMM once for the queries of ``parts`` (one table's, all or none excluding their own
    sample) and commit each part's table (the caller holds the parts' locks)."""
    t0 = time.perf_counter()
    reference, typed = cache.panel.reference_haplotypes(), queries.typed
    rows = np.concatenate([np.arange(p.rows.start, p.rows.stop) for p in parts])
    if queries.ids is not None:
        ids = queries.ids[rows]
        both = typed_columns(cache, typed, np.concatenate([reference, ids]), from_panel)  # one pass over the panel
        reference_t, query_t = np.ascontiguousarray(both[:, : reference.size]), np.ascontiguousarray(both[:, reference.size :])
        del both
    else:
        ids = None
        reference_t = typed_columns(cache, typed, reference, from_panel)
        query_t = np.ascontiguousarray(queries.alleles[rows].T)  # type: ignore[index]
    exclude_own = {p.exclude_own for p in parts}
    if len(exclude_own) > 1:
        raise ValueError("_compute_parts: parts of one table either all exclude their own sample or none do")
    if exclude_own == {True}:
        exclude = own_sample_rows(ids, reference)  # type: ignore[arg-type]
    elif queries.exclude is not None:
        exclude = np.broadcast_to(queries.exclude, (query_t.shape[1], queries.exclude.size))
    else:
        exclude = None
    whole = compute_donors(cache, typed, query_t, cfg, k, exclude, reference_t)
    out, start = [], 0
    for part in parts:
        n = part.rows.stop - part.rows.start
        table = DonorTable(typed, whole.donors[:, start : start + n], whole.codes[:, start : start + n])
        cache.store.commit(part.artifact, {"donors.npz": _table_bytes(table, queries.labels[part.rows])})
        out.append(table)
        start += n
    log.info(
        "%s: %d haplotypes x %d typed sites, k %d, in %.1f s: %s",
        label,
        query_t.shape[1],
        typed.size,
        k,
        time.perf_counter() - t0,
        ", ".join(str(cache.store.path(p.artifact)) for p in parts),
    )
    return out


def _table_bytes(table: DonorTable, queries: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # The typed sites by digest: the key has them too, and at genome scale the sites themselves (int64)
    # would be a fifth of the stored tables.
    np.savez(
        buf, typed_sha256=np.array(sites_digest(table.typed)), queries=queries, **donor_format.pack(table.donors, table.codes)
    )
    return buf.getvalue()


def _table_from_bytes(data: bytes, typed: np.ndarray, queries: np.ndarray, where: object) -> DonorTable:
    try:
        with np.load(io.BytesIO(data)) as npz:
            table = DonorTable(typed, *donor_format.unpack(npz))
            same = str(npz["typed_sha256"]) == sites_digest(typed) and np.array_equal(npz["queries"], queries)
    except (ValueError, KeyError, zipfile.BadZipFile, zstandard.ZstdError) as exc:
        raise CacheError(f"donor table {where} is unreadable ({exc}): delete it and rerun") from None
    if not same:
        raise CacheError(f"donor table {where} holds other typed sites or queries than its key says: delete it and rerun")
    return table
