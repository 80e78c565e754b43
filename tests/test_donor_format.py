"""The donor table's stored layout: what the HMM found survives it, to the weights' quantization."""

import numpy as np

from rag_hpc.data.panel import SPLIT_VAL
from rag_hpc.index import donor_format
from rag_hpc.index.donors import DonorTable, _table_bytes, _table_from_bytes, compute_donors, typed_columns
from tests.test_donors import _cache


def _hmm_table(tiny_panel, tmp_path, monkeypatch) -> tuple[np.ndarray, np.ndarray, np.ndarray, DonorTable]:
    """A real HMM table of the validation haplotypes (k = 64, every reference: some weights fall under the floor), and the
    heaviest-first donors and codes it was made from."""
    cache = _cache(tiny_panel, tmp_path)
    typed = cache.array_sites()
    queries = np.flatnonzero(cache.panel.haplotype_split() == SPLIT_VAL)
    captured = {}
    real = donor_format.slot_order

    def keep(donors, codes):  # what DonorTable.of receives from the HMM
        captured["donors"], captured["codes"] = donors.copy(), codes.copy()
        return real(donors, codes)

    monkeypatch.setattr(donor_format, "slot_order", keep)
    table = compute_donors(cache, typed, typed_columns(cache, typed, queries), cache.config.donors, 64)
    return typed, captured["donors"], captured["codes"], table


def test_a_stored_table_reads_back_exactly_and_keeps_every_gaps_donors(tiny_panel, tmp_path, monkeypatch):
    typed, hmm_donors, hmm_codes, table = _hmm_table(tiny_panel, tmp_path, monkeypatch)
    labels = np.arange(table.donors.shape[1])
    back = _table_from_bytes(_table_bytes(table, labels), typed, labels, "here")
    assert np.array_equal(back.donors, table.donors) and np.array_equal(back.codes, table.codes)
    # Slot order reorders a gap's donors and their codes, never changes them; a slot under the weight
    # floor may hold another donor (at weight 0).
    below = table.codes == donor_format.BELOW
    assert below.any() and not below.all(2).any()
    assert np.array_equal(np.sort(table.codes, axis=2), np.sort(hmm_codes, axis=2))

    def weighted(donors, codes):  # per query and gap, the donors above the floor, sorted
        return np.sort(np.where(codes == donor_format.BELOW, -1, donors.astype(np.int64)), axis=2)

    assert np.array_equal(weighted(table.donors, table.codes), weighted(hmm_donors, hmm_codes))


def test_a_donor_keeps_its_slot_while_it_stays_among_a_gaps_donors(tiny_panel, tmp_path, monkeypatch):
    _, _, _, table = _hmm_table(tiny_panel, tmp_path, monkeypatch)
    d = table.donors
    stayed = (d[1:, :, :, None] == d[:-1, :, None, :]).any(3)  # [G-1, Q, slot]: also among the previous gap's
    assert stayed.any()
    assert np.array_equal(d[1:][stayed], d[:-1][stayed])


def test_weights_are_kept_to_their_quantization_step_and_read_heaviest_first():
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.full(16, 0.3), size=(50, 3)).astype(np.float32)  # [G, Q, k]
    donors = np.argsort(-w, axis=2).astype(np.uint16)  # any distinct ids, heaviest first
    w = -np.sort(-w, axis=2)
    table = DonorTable.of(np.arange(49), donors, w)
    got = np.take_along_axis(donor_format.code_weights(table.codes), donor_format.heaviest_first(table.codes), 2)
    kept = w >= donor_format.FLOOR
    # Each code rounds its weight's log by at most half a step; renormalising moves a gap's weights alike.
    error = np.where(kept, np.log(np.where(kept, got, 1) / np.where(kept, w, 1)), np.nan)
    assert (np.nanmax(error, 2) - np.nanmin(error, 2)).max() <= donor_format.STEP + 1e-6
    assert (got[~kept] == 0).all()
    assert np.allclose(got.sum(2), 1, atol=1e-6) and (np.diff(got, axis=2) <= 0).all()
