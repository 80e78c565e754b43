"""Li–Stephens donors over all typed sites, and the copy predictor built on them."""

from __future__ import annotations

import numpy as np
import pytest

from rag_hpc.config import load_config
from rag_hpc.data.panel import Panel
from rag_hpc.evaluate import evaluate
from rag_hpc.impute import CopyPredictor, NearestHaplotypePredictor, impute
from rag_hpc.index import matching
from rag_hpc.index.matching import li_stephens_donors, switch_probabilities


def _li_stephens_by_matrices(
    query: np.ndarray, reference: np.ndarray, switch: np.ndarray, error: float, jump_n: int | None = None
) -> np.ndarray:
    """Posterior state probabilities at each gap's midpoint, from the full N x N transition matrices:
    [M + 1, N] (row g + 1 = gap g). ``jump_n``: the states a jump lands on uniformly (default N; more when
    some states were taken out of the HMM, which a jump still lands on with zero emission)."""
    n_typed, n = reference.shape[1], reference.shape[0]
    jump_n = jump_n or n

    def transition(rho: float) -> np.ndarray:
        return (1 - rho) * np.eye(n) + rho / jump_n

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
    # An excluded state (a query's own sample) is out of its HMM: the others' posteriors without it.
    got = li_stephens_donors(query_t, reference_t, switch, 0.01, k=5, exclude=np.array([[2, 2], [0, 4]]))
    for b, (query, out) in enumerate(zip(queries, ([2], [0, 4]), strict=True)):
        keep = np.setdiff1d(np.arange(6), out)
        want = _li_stephens_by_matrices(query, reference[keep], switch, 0.01, jump_n=6)
        dense = np.zeros((13, 6))
        np.put_along_axis(dense, got.donors[:, b], got.weights[:, b], axis=1)
        assert np.allclose(dense[:, out], 0) and np.allclose(dense[:, keep], want, atol=1e-5), np.abs(dense[:, keep] - want).max()
    # k < N keeps the heaviest states, renormalised.
    top = li_stephens_donors(query_t, reference_t, switch, 0.01, k=2)
    assert np.allclose(top.weights.sum(axis=2), 1) and top.donors.shape == (13, 2, 2)


def test_copy_imputes_the_tiny_simulation_better_than_the_nearest_haplotype(tiny_panel, tiny_simulation, tmp_path):
    config = load_config(
        overrides=[f"data.panel_h5={tiny_panel}", f"paths.workdir={tmp_path}", "windows.window_size=64", "data.ambiguous=keep"]
    )
    truth, targets = tiny_simulation / "targets.truth.vcf.gz", tiny_simulation / "targets.array.vcf.gz"
    r2 = {}
    with Panel(tiny_panel) as panel:
        for name, predictor in (
            # 74 references, not thousands: Li–Stephens' jump rate 4 Ne d / N wants a textbook Ne here.
            ("copy", CopyPredictor.from_config(config, panel=panel, ne=20_000)),
            ("nearest", NearestHaplotypePredictor.from_config(config, panel=panel)),
        ):
            out = impute(config, predictor, targets, tmp_path / f"{name}.vcf.gz", panel=panel).out
            r2[name] = evaluate(out, truth, tiny_panel, exclude_sites_vcf=targets).overall.r2
    assert r2["copy"] > r2["nearest"], r2


def test_copy_refuses_settings_that_cannot_work(tiny_panel, tmp_path):
    from rag_hpc.errors import ConfigError

    config = load_config(overrides=[f"data.panel_h5={tiny_panel}", f"paths.workdir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"copy: .*error"):
        CopyPredictor.from_config(config, error=0.7)
    with pytest.raises(ConfigError, match=r"k must be >= 1"):
        CopyPredictor.from_config(config, k=0)
