"""Donor tables: the retrieval training, validation and imputation read — each query's Li–Stephens
donors over the run's array sites, its own sample never among them, computed once and read from the cache."""

from __future__ import annotations

import numpy as np

from rag_hpc.config import load_config
from rag_hpc.data.panel import SPLIT_TRAIN, SPLIT_VAL
from rag_hpc.impute import CopyPredictor, impute, load_model_predictor
from rag_hpc.index import donor_format
from rag_hpc.index import donors as donors_module
from rag_hpc.index.build import WindowCache, prebuild
from rag_hpc.index.donors import DONORS, Queries, build_donors, compute_donors, read_donors, run_queries, typed_columns
from rag_hpc.train import train
from tests.train_helpers import train_overrides


def _cache(tiny_panel, tmp_path, *extra: str) -> WindowCache:
    return WindowCache(load_config(overrides=train_overrides(tiny_panel, tmp_path / "work", *extra)))


def test_a_training_query_never_copies_itself_or_its_sample_mate(tiny_panel, tmp_path):
    cache = _cache(tiny_panel, tmp_path)
    queries = np.flatnonzero(cache.panel.haplotype_split() == SPLIT_TRAIN)
    typed = cache.array_sites()
    table = read_donors(cache, Queries("test", typed, ids=queries))
    reference = cache.panel.reference_haplotypes()
    donor_samples = reference[table.donors] // 2  # [M + 1, Q, k] panel sample of every donor
    assert not (donor_samples == (queries // 2)[None, :, None]).any()
    assert np.allclose(donor_format.code_weights(table.codes).sum(axis=2), 1, atol=1e-5)
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
        order = np.argsort(table.codes[row], axis=1, kind="stable")  # heaviest first
        assert np.array_equal(donors[:, gaps[site - window.start]], np.take_along_axis(table.donors[row], order, 1))
        assert np.allclose(
            weights[:, gaps[site - window.start]],
            np.take_along_axis(donor_format.code_weights(table.codes)[row], order, 1),
            rtol=1e-6,
        )
        assert (np.diff(weights[:, gaps[site - window.start]], axis=1) <= 0).all()
    assert np.array_equal(
        np.flatnonzero(window.observed(typed)) + window.start, typed[(typed >= window.start) & (typed < window.stop)]
    )


def _count_hmm_runs(monkeypatch) -> list[int]:
    """Query haplotypes of every Li–Stephens run from here on (the real HMM runs; this only counts)."""
    hmm_runs: list[int] = []
    real = donors_module.li_stephens_donors

    def counted(query_t, *args, **kwargs):
        hmm_runs.append(query_t.shape[1])
        return real(query_t, *args, **kwargs)

    monkeypatch.setattr(donors_module, "li_stephens_donors", counted)
    return hmm_runs


def test_training_and_its_resume_read_the_donor_tables_the_prebuild_computed(tiny_panel, tmp_path, monkeypatch):
    hmm_runs = _count_hmm_runs(monkeypatch)
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


def test_a_table_prebuilt_part_by_part_is_the_table_computed_in_one_run(tiny_panel, tmp_path):
    whole = _cache(tiny_panel, tmp_path / "one")
    parts = _cache(tiny_panel, tmp_path / "three", "index.windows_per_task=1")
    for part in range(3):  # as three prebuild tasks would: one HMM run per part
        assert build_donors(parts, [part]) == (2, 0)
    a, b = (read_donors(c, run_queries(c)["training"]) for c in (whole, parts))
    assert np.array_equal(a.donors, b.donors) and np.array_equal(a.codes, b.codes)


def test_impute_reads_the_targets_donor_table_the_prebuild_computed_under_the_runs_ambiguity_policy(
    tiny_panel, tiny_simulation, tmp_path, monkeypatch
):
    hmm_runs = _count_hmm_runs(monkeypatch)
    targets_vcf = tiny_simulation / "targets.array.vcf.gz"
    overrides = train_overrides(
        tiny_panel, tmp_path / "work", f"data.targets_vcf={targets_vcf}", "train.max_steps=2", "index.windows_per_task=1"
    )
    config = load_config(overrides=overrides)
    cache = WindowCache(config)
    targets = cache.targets()
    assert targets is not None and targets.counts["ambiguous_skipped"] > 0  # the tiny targets have A/T and C/G sites
    assert np.array_equal(cache.array_sites(), targets.panel_index)  # training's array = the sites impute uses
    result = prebuild(config, progress=False)
    assert result.donor_parts_built == 3 * 3  # training, validation and targets, one part per window's task
    assert sum(hmm_runs[-3:]) == targets.haplotypes.shape[0]  # every target haplotype once, after the panel's
    checkpoint = train(config)

    hmm_runs.clear()
    for predictor in (CopyPredictor.from_config(config), load_model_predictor(checkpoint, config)):
        out = impute(config, predictor, targets_vcf, tmp_path / f"{predictor.name}.vcf.gz")
        assert out.out.is_file()
    assert hmm_runs == []  # both read the prebuilt targets table, neither ran the HMM

    # Keeping the ambiguous sites types other sites: another table (computed at impute), never the prebuilt one.
    keep = load_config(overrides=[*overrides, "data.ambiguous=keep"])
    impute(keep, CopyPredictor.from_config(keep), targets_vcf, tmp_path / "keep.vcf.gz")
    assert sum(hmm_runs) == targets.haplotypes.shape[0]
