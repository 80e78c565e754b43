"""Donor tables: the retrieval training, validation and imputation read — each query's Li–Stephens
donors over the run's array sites, its own sample never among them, computed once and read from the cache."""

from __future__ import annotations

import numpy as np

from rag_hpc.config import load_config
from rag_hpc.data.panel import SPLIT_TRAIN, SPLIT_VAL
from rag_hpc.index import donors as donors_module
from rag_hpc.index.build import WindowCache, prebuild
from rag_hpc.index.donors import DONORS, compute_donors, panel_donors, typed_columns
from rag_hpc.train import train
from tests.train_helpers import train_overrides


def _cache(tiny_panel, tmp_path, *extra: str) -> WindowCache:
    return WindowCache(load_config(overrides=train_overrides(tiny_panel, tmp_path / "work", *extra)))


def test_a_training_query_never_copies_itself_or_its_sample_mate(tiny_panel, tmp_path):
    cache = _cache(tiny_panel, tmp_path)
    queries = np.flatnonzero(cache.panel.haplotype_split() == SPLIT_TRAIN)
    typed = cache.array_sites()
    table = panel_donors(cache, typed, queries, "test")
    reference = cache.panel.reference_haplotypes()
    donor_samples = reference[table.donors] // 2  # [M + 1, Q, k] panel sample of every donor
    assert not (donor_samples == (queries // 2)[None, :, None]).any()
    assert np.allclose(table.weights.astype(np.float32).sum(axis=2), 1, atol=2e-3)  # float16 weights
    # Validation queries are not in the reference: nothing to exclude, and their table says so in its key.
    val = np.flatnonzero(cache.panel.haplotype_split() == SPLIT_VAL)
    assert not np.isin(val, reference).any()


def test_a_window_reads_each_sites_gap_donors(tiny_panel, tmp_path):
    cache = _cache(tiny_panel, tmp_path)
    typed = cache.array_sites()
    queries = np.flatnonzero(cache.panel.haplotype_split() == SPLIT_VAL)
    table = compute_donors(cache, typed, typed_columns(cache, typed, queries), cache.config.donors, 8)
    window = cache.windows[1]
    donors, weights, gaps = table.window(window, slice(None))
    for site in (window.start, window.start + 37, window.stop - 1):
        row = np.searchsorted(typed, site, side="right")  # gap after the last typed site at or before it
        assert np.array_equal(donors[:, gaps[site - window.start]], table.donors[row])
        assert np.array_equal(weights[:, gaps[site - window.start]], table.weights[row])
    assert np.array_equal(
        np.flatnonzero(window.observed(typed)) + window.start, typed[(typed >= window.start) & (typed < window.stop)]
    )


def test_training_and_its_resume_read_the_donor_tables_the_prebuild_computed(tiny_panel, tmp_path, monkeypatch):
    hmm_runs: list[int] = []
    real = donors_module.li_stephens_donors

    def counted(query_t, *args, **kwargs):
        hmm_runs.append(query_t.shape[1])
        return real(query_t, *args, **kwargs)

    monkeypatch.setattr(donors_module, "li_stephens_donors", counted)
    # One prebuild task per window (3 windows): each computes its third of each table's queries.
    overrides = train_overrides(tiny_panel, tmp_path / "work", "train.max_steps=4", "index.windows_per_task=1")
    config = load_config(overrides=overrides)
    first_task = prebuild(config, [0], progress=False)
    assert (first_task.donor_parts_built, first_task.donor_parts_cached) == (2, 0)  # training + validation, part 1/3
    assert len(hmm_runs) == 2
    rest = prebuild(config, progress=False)
    assert (rest.donor_parts_built, rest.donor_parts_cached) == (4, 2)
    assert sum(hmm_runs) == 74 + 6  # every training and validation haplotype once
    tables = sorted((config.paths.cache / DONORS).glob("*/*/donors.npz"))
    assert len(tables) == 6
    stamps = [t.stat().st_mtime_ns for t in tables]

    hmm_runs.clear()
    train(config)
    assert hmm_runs == []  # training read the prebuilt parts
    log = (tmp_path / "work" / "runs" / "default" / "train.log").read_text()
    assert "74 training and 6 validation haplotypes" in log
    train(load_config(overrides=[*overrides, "train.max_steps=8"]))
    assert hmm_runs == [] and [t.stat().st_mtime_ns for t in tables] == stamps  # the resume too: read, not rebuilt
    # A part that no longer matches its checksum is recomputed (that part alone), not read.
    tables[0].write_bytes(b"garbage")
    train(load_config(overrides=[*overrides, "train.max_steps=9"]))
    assert len(hmm_runs) == 1 and tables[0].read_bytes()[:2] == b"PK"


def test_typed_columns_read_from_the_panel_are_those_of_the_shards(tiny_panel, tmp_path):
    cache = _cache(tiny_panel, tmp_path)
    typed, haps = cache.array_sites(), np.arange(0, cache.panel.n_haplotypes, 3)
    assert np.array_equal(typed_columns(cache, typed, haps, from_panel=True), typed_columns(cache, typed, haps))


def test_a_table_read_in_parts_is_the_table_computed_whole(tiny_panel, tmp_path):
    whole = _cache(tiny_panel, tmp_path / "one")
    parts = _cache(tiny_panel, tmp_path / "three", "index.windows_per_task=1")
    typed = whole.array_sites()
    queries = np.flatnonzero(whole.panel.haplotype_split() == SPLIT_TRAIN)
    a, b = panel_donors(whole, typed, queries, "test"), panel_donors(parts, typed, queries, "test")
    assert np.array_equal(a.donors, b.donors) and np.array_equal(a.weights, b.weights)
