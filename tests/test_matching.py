"""Match evidence beyond the window and the copy predictor built on it."""

from __future__ import annotations

import numpy as np
import pytest

from rag_hpc.config import load_config
from rag_hpc.data.panel import Panel
from rag_hpc.evaluate import evaluate
from rag_hpc.impute import CopyPredictor, NearestHaplotypePredictor, impute
from rag_hpc.index import matching
from rag_hpc.index.matching import copy_probabilities, gap_runs, li_stephens_donors, match_weights, switch_probabilities


def _brute_runs(query: np.ndarray, reference: np.ndarray, gap: int, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Left and right agreement runs around ``gap`` by the definition, one pair at a time."""
    batch, n_typed = query.shape
    left = np.zeros((batch, reference.shape[0]), int)
    right = np.zeros_like(left)
    for b in range(batch):
        for r in range(reference.shape[0]):
            j = gap
            while j >= 0 and query[b, j] == reference[r, j] and left[b, r] < cap:
                left[b, r] += 1
                j -= 1
            j = gap + 1
            while j < n_typed and query[b, j] == reference[r, j] and right[b, r] < cap:
                right[b, r] += 1
                j += 1
    return left, right


def test_gap_runs_count_consecutive_matches_on_both_sides_capped_and_across_the_ends():
    rng = np.random.default_rng(5)
    # Mostly-agreeing pairs, so runs reach the cap and the ends of the chromosome.
    reference = (rng.random((7, 40)) < 0.3).astype(np.uint8)
    query = reference[[0, 3, 5]] ^ (rng.random((3, 40)) < 0.08).astype(np.uint8)
    for cap in (1, 5, 60):
        runs = gap_runs(np.ascontiguousarray(query.T), np.ascontiguousarray(reference.T), -1, 39, cap)
        assert runs.left.shape == (41, 3, 7)
        for gap in range(-1, 40):
            left, right = _brute_runs(query, reference, gap, cap)
            assert np.array_equal(runs.left[gap + 1], left) and np.array_equal(runs.right[gap + 1], right), (cap, gap)
            assert np.array_equal(runs.score(gap), left + right)
    # A slice of gaps gives the same runs as the whole chromosome.
    part = gap_runs(np.ascontiguousarray(query.T), np.ascontiguousarray(reference.T), 10, 14, 5)
    whole = gap_runs(np.ascontiguousarray(query.T), np.ascontiguousarray(reference.T), -1, 39, 5)
    assert np.array_equal(part.left, whole.left[11:16]) and np.array_equal(part.right, whole.right[11:16])


def test_match_weights_are_a_softmax_that_top_k_restricts_to_the_best_scores():
    score = np.array([[3, 1, 3, 0], [0, 0, 0, 2]])
    w = match_weights(score, beta=1.0)
    assert np.allclose(w.sum(axis=1), 1) and np.isclose(w[0, 0] / w[0, 1], np.e**2)
    top = match_weights(score, beta=1.0, top_k=1)
    assert np.allclose(top[0], [0.5, 0, 0.5, 0])  # a tie at the k-th score keeps both
    assert np.allclose(top[1], [0, 0, 0, 1])


def test_copy_follows_the_donor_that_matches_longest_on_each_side_of_a_switch():
    # 6 references over 30 typed sites; the query copies reference 1 up to typed site 14 and reference 4
    # after it. Untyped sites (one per gap) carry a private allele of each reference: the copy must
    # predict reference 1's left of the switch and reference 4's right of it.
    rng = np.random.default_rng(11)
    typed = (rng.random((6, 30)) < 0.5).astype(np.uint8)
    query = np.concatenate([typed[1, :15], typed[4, 15:]])[None, :]
    untyped = np.zeros((29, 6), np.float32)  # one site in each gap 0..28, [L, N]
    untyped[:14, 1] = 1.0
    untyped[15:, 4] = 1.0
    gaps = np.arange(29)
    p = copy_probabilities(np.ascontiguousarray(query.T), np.ascontiguousarray(typed.T), untyped, gaps, cap=64, beta=2.0)
    assert p.shape == (1, 29)
    assert (p[0, :13] > 0.9).all() and (p[0, 16:] > 0.9).all(), p.round(2)


def _li_stephens_by_matrices(query: np.ndarray, reference: np.ndarray, switch: np.ndarray, error: float) -> np.ndarray:
    """Posterior state probabilities at each gap's midpoint, from the full N x N transition matrices:
    [M + 1, N] (row g + 1 = gap g)."""
    n_typed, n = reference.shape[1], reference.shape[0]

    def transition(rho: float) -> np.ndarray:
        return (1 - rho) * np.eye(n) + rho / n

    emit = [np.where(reference[:, j] == query[j], 1 - error, error) for j in range(n_typed)]
    alpha = [emit[0] / n]
    for j in range(1, n_typed):
        alpha.append(emit[j] * (alpha[-1] @ transition(switch[j])))
    beta = [np.ones(n)] * n_typed
    for j in range(n_typed - 2, -1, -1):
        beta[j] = transition(switch[j + 1]) @ (emit[j + 1] * beta[j + 1])
    half = 1 - np.sqrt(1 - switch)
    post = [emit[0] * beta[0]]  # before the first typed site
    for g in range(n_typed - 1):
        post.append((alpha[g] @ transition(half[g + 1])) * (transition(half[g + 1]) @ (emit[g + 1] * beta[g + 1])))
    post.append(alpha[-1])
    return np.array([p / p.sum() for p in post])


def test_li_stephens_donors_are_the_hmm_posteriors_at_every_gap(monkeypatch):
    rng = np.random.default_rng(3)
    reference = (rng.random((6, 12)) < 0.4).astype(np.uint8)
    queries = np.stack([np.concatenate([reference[2, :6], reference[5, 6:]]), reference[0] ^ (rng.random(12) < 0.1)])
    switch = switch_probabilities(np.cumsum(rng.integers(2_000, 9_000, 12)), 6, ne=20_000)
    query_t, reference_t = np.ascontiguousarray(queries.T.astype(np.uint8)), np.ascontiguousarray(reference.T)
    # Every forward message kept, and (over the memory budget) recomputed block by block.
    for budget, block in ((matching.FORWARD_BYTES, 64), (0, 64), (0, 5), (0, 1)):
        monkeypatch.setattr(matching, "FORWARD_BYTES", budget)
        got = li_stephens_donors(query_t, reference_t, switch, 0.01, k=6, block=block)
        for b, query in enumerate(queries):
            want = _li_stephens_by_matrices(query, reference, switch, 0.01)
            dense = np.zeros_like(want)
            np.put_along_axis(dense, got.donors[:, b], got.weights[:, b], axis=1)
            assert np.allclose(dense, want, atol=1e-5), (budget, block, b, np.abs(dense - want).max())
    # k < N keeps the heaviest states, renormalised.
    top = li_stephens_donors(query_t, reference_t, switch, 0.01, k=2)
    assert np.allclose(top.weights.sum(axis=2), 1) and top.donors.shape == (13, 2, 2)


def test_copy_imputes_the_tiny_simulation_better_than_the_nearest_haplotype(tiny_panel, tiny_simulation, tmp_path):
    config = load_config(overrides=[f"data.panel_h5={tiny_panel}", f"paths.workdir={tmp_path}", "windows.window_size=64"])
    truth, targets = tiny_simulation / "targets.truth.vcf.gz", tiny_simulation / "targets.array.vcf.gz"
    r2 = {}
    with Panel(tiny_panel) as panel:
        for name, predictor in (
            # 74 references, not thousands: Li–Stephens' jump rate 4 Ne d / N wants a textbook Ne here.
            ("copy", CopyPredictor.from_config(config, panel=panel, ne=20_000)),
            ("nearest", NearestHaplotypePredictor.from_config(config, panel=panel)),
        ):
            out = impute(config, predictor, targets, tmp_path / f"{name}.vcf.gz", panel=panel, ambiguous="keep").out
            r2[name] = evaluate(out, truth, tiny_panel, exclude_sites_vcf=targets).overall.r2
    assert r2["copy"] > r2["nearest"], r2


def test_copy_refuses_settings_that_cannot_work(tiny_panel, tmp_path):
    from rag_hpc.errors import ConfigError

    config = load_config(overrides=[f"data.panel_h5={tiny_panel}", f"paths.workdir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"cap must be in 1\.\.255"):
        CopyPredictor.from_config(config, weighting="runs", cap=300)
