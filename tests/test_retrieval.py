"""Compact retrieval returns the predecessor's L×D top-k (DESIGN.md §2), ties and all.

``masked_topk`` (rag_hpc's, what the nearest baseline ranks by) and ``FixedMaskIndex`` (the compact FAISS
form, kept in bench/yardstick) are checked against the yardstick (bench/yardstick/lxd.py), which is the
definition: the squared L2 distance between flattened L×D embeddings of a
randomly initialised SiteEmbedding (D=192; its LayerNorm makes the site weights differ), computed
in float64 from the float32 embeddings, under each query's own mask. Panels are random, and
LD-structured (mosaics of a few founders): there, many references are identical on the observed
sites, so exact ties and near-ties are everywhere, as in real panels.
"""

from __future__ import annotations

from types import SimpleNamespace

import faiss
import numpy as np
import pytest
import torch

from bench.mosaic import mosaic_haplotypes
from bench.yardstick.embedding import SiteEmbedding
from bench.yardstick.fixed_mask import FixedMaskIndex
from bench.yardstick.lxd import (
    embedding_site_weights,
    lxd_bytes,
    lxd_embed,
    lxd_exact_distances,
    lxd_flat_index,
    lxd_tolerance,
    site_weights,
    topk_agreement,
)
from rag_hpc.errors import ClusterError
from rag_hpc.guard import Plan, lxd_window_bytes
from rag_hpc.index.retrieval import masked_topk

SITES = 160
N_REF = 320  # 160 samples
DIMS = 192
FROM_PANEL = np.array([0, 1, 57, 120, 201, 319])  # query haplotypes drawn from the reference panel
N_FRESH = 6  # and haplotypes the panel does not contain


def ld_haplotypes(rng: np.random.Generator, n: int, sites: int) -> np.ndarray:
    """At these rates ~2/3 of the haplotypes are unique and nearly every query has a tie at its k-th
    neighbour, which also makes FixedMaskIndex widen its candidate search."""
    return mosaic_haplotypes(rng, n, sites, founders=8, switch=0.006, mutation=0.003)


def random_haplotypes(rng: np.random.Generator, n: int, sites: int) -> np.ndarray:
    return (rng.random((n, sites)) < rng.uniform(0.02, 0.5, sites)).astype(np.uint8)


def own_sample(query_ids: np.ndarray) -> np.ndarray:
    """exclude bool [B, N_REF]: each query's own sample (haplotypes 2s and 2s+1), itself included — what a
    query drawn from the panel must not retrieve, or it finds itself at distance 0."""
    return (query_ids[:, None] // 2) == (np.arange(N_REF)[None, :] // 2)


@pytest.fixture(scope="module")
def embedding() -> SiteEmbedding:
    torch.manual_seed(0)
    return SiteEmbedding(DIMS, SITES + 1).eval()


@pytest.fixture(scope="module", params=["random", "ld"])
def panel(request: pytest.FixtureRequest, embedding: SiteEmbedding) -> SimpleNamespace:
    rng = np.random.default_rng(7)
    make = random_haplotypes if request.param == "random" else ld_haplotypes
    haplotypes = make(rng, N_REF + N_FRESH, SITES)
    reference = haplotypes[:N_REF]
    queries = np.concatenate([reference[FROM_PANEL], haplotypes[N_REF:]])
    query_ids = np.concatenate([FROM_PANEL, N_REF + 2 * np.arange(N_FRESH)])  # fresh ones: samples not in the panel
    exclude = own_sample(query_ids)
    af = reference.mean(0).astype(np.float32)
    per_query = rng.random((len(queries), SITES)) < rng.uniform(0.2, 0.9, (len(queries), 1))
    fixed = rng.random(SITES) < 0.5
    return SimpleNamespace(
        name=request.param,
        reference=reference,
        queries=queries,
        query_ids=query_ids,
        exclude=exclude,
        af=af,
        weights=embedding_site_weights(embedding, af),
        tol=lxd_tolerance(embedding, af),
        per_query=per_query,
        fixed=fixed,
        truth_per_query=lxd_exact_distances(embedding, queries, reference, per_query, af, exclude=exclude),
        truth_fixed=lxd_exact_distances(embedding, queries, reference, fixed, af),
    )


def _problems(report: list[str | None]) -> list[str]:
    return [p for p in report if p is not None]


def test_site_weights_are_squared_distances_between_alt_and_ref_site_embeddings(embedding):
    af = np.random.default_rng(0).uniform(0, 1, SITES).astype(np.float32)
    weights = embedding_site_weights(embedding, af)
    one_alt = np.eye(SITES, dtype=np.uint8)  # row i: ALT at site i only
    all_ref = np.zeros((1, SITES), np.uint8)
    by_definition = lxd_exact_distances(embedding, all_ref, one_alt, np.ones(SITES, bool), af)[0]
    assert weights.dtype == torch.float64 and not weights.requires_grad
    np.testing.assert_allclose(weights.numpy(), by_definition, rtol=1e-5)
    # The LayerNorm makes sites unequal: uniform weights (plain Hamming) would be a different ranking.
    assert weights.std() / weights.mean() > 1e-2
    emb = embedding.allele_embeddings(torch.from_numpy(af))
    assert emb.requires_grad and not site_weights(emb).requires_grad


@pytest.mark.parametrize("k", [1, 8])
def test_masked_gemm_topk_matches_flattened_lxd_embedding_with_per_query_masks(panel, k):
    dist, idx = masked_topk(
        torch.from_numpy(panel.queries),
        torch.from_numpy(panel.per_query),
        torch.from_numpy(panel.reference),
        panel.weights,
        k,
        exclude=torch.from_numpy(panel.exclude),
    )
    assert dist.shape == idx.shape == (len(panel.queries), k)
    assert _problems(topk_agreement(panel.truth_per_query, idx, panel.tol, dist)) == []
    assert torch.all(dist[:, 1:] >= dist[:, :-1])


@pytest.mark.parametrize("k", [1, 8])
def test_fixed_mask_index_equals_gemm_with_broadcast_mask_and_the_lxd_flat_index(panel, embedding, k):
    index = FixedMaskIndex.build(panel.reference, panel.fixed, panel.weights, kind="flat", device="cpu")
    dist, idx = index.search(panel.queries, k)
    gemm_dist, gemm_idx = masked_topk(
        torch.from_numpy(panel.queries),
        torch.from_numpy(panel.fixed),
        torch.from_numpy(panel.reference),
        panel.weights,
        k,
    )
    # Same fixed-point distances, same tie rule: bit-identical, not merely close.
    assert torch.equal(idx, gemm_idx) and torch.equal(dist, gemm_dist)
    assert _problems(topk_agreement(panel.truth_fixed, idx, panel.tol, dist)) == []

    lxd = lxd_flat_index(embedding, panel.reference, panel.fixed, panel.af)
    lxd_dist, lxd_idx = lxd.search(lxd_embed(embedding, panel.queries, panel.fixed, panel.af), k)
    assert _problems(topk_agreement(panel.truth_fixed, lxd_idx, panel.tol, lxd_dist)) == []
    np.testing.assert_allclose(np.sort(lxd_dist, 1), dist.numpy(), atol=panel.tol, rtol=0)
    assert index.ntotal == N_REF and index.n_observed == int(panel.fixed.sum())
    assert index.nbytes * 50 < lxd_bytes(N_REF, SITES, DIMS)


@pytest.mark.parametrize("k", [1, 8])
def test_ivf_probing_every_list_equals_flat(panel, k):
    exclude = panel.exclude
    flat = FixedMaskIndex.build(panel.reference, panel.fixed, panel.weights, kind="flat", device="cpu")
    ivf = FixedMaskIndex.build(panel.reference, panel.fixed, panel.weights, kind="ivf", nlist=4, nprobe=4, device="cpu")
    assert ivf.exact
    for a, b in zip(flat.search(panel.queries, k, exclude), ivf.search(panel.queries, k, exclude)):
        assert torch.equal(a, b)


def test_approximate_ivf_still_returns_k_allowed_references(panel):
    ivf = FixedMaskIndex.build(panel.reference, panel.fixed, panel.weights, kind="ivf", nlist=4, nprobe=1, device="cpu")
    assert not ivf.exact
    dist, idx = ivf.search(panel.queries, 8, panel.exclude)
    assert (idx >= 0).all() and not np.take_along_axis(panel.exclude, idx.numpy(), 1).any()
    assert torch.all(dist[:, 1:] >= dist[:, :-1])


@pytest.mark.parametrize("k", [1, 8])
def test_query_never_retrieves_itself_or_its_sample_mate(panel, k):
    own = FROM_PANEL
    queries = torch.from_numpy(panel.reference[own])
    exclude = torch.from_numpy(own_sample(own))
    mates = {int(h): {2 * (int(h) // 2), 2 * (int(h) // 2) + 1} for h in own}
    observed = torch.from_numpy(panel.per_query[: len(own)])
    index = FixedMaskIndex.build(panel.reference, panel.fixed, panel.weights, device="cpu")

    gemm_idx = masked_topk(queries, observed, torch.from_numpy(panel.reference), panel.weights, k, exclude)[1]
    faiss_idx = index.search(queries, k, exclude)[1]
    for row, h in enumerate(own):
        assert not mates[int(h)] & set(gemm_idx[row].tolist())
        assert not mates[int(h)] & set(faiss_idx[row].tolist())
    # Without the exclusion each of them finds itself at distance 0 (lowest index of its tie group).
    dist = masked_topk(queries, observed, torch.from_numpy(panel.reference), panel.weights, 1)[0]
    assert torch.all(dist[:, 0] == 0)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_serialization_round_trip_gives_identical_search_results(panel, kind):
    index = FixedMaskIndex.build(panel.reference, panel.fixed, panel.weights, kind=kind, nlist=4, nprobe=2, device="cpu")
    data = index.to_bytes()
    again = FixedMaskIndex.from_bytes(data, device="cpu")
    assert data == index.to_bytes() == again.to_bytes()  # deterministic: a rebuilt artifact has the same checksum
    assert index.nbytes == len(data)
    assert (again.kind, again.nprobe, again.nlist) == (index.kind, index.nprobe, index.nlist)
    if kind == "ivf":
        assert FixedMaskIndex.from_bytes(data, device="cpu", nprobe=4).exact
    for k in (1, 8):
        for a, b in zip(index.search(panel.queries, k, panel.exclude), again.search(panel.queries, k, panel.exclude)):
            assert torch.equal(a, b)


def test_truncated_or_foreign_index_bytes_are_rejected(panel):
    data = FixedMaskIndex.build(panel.reference, panel.fixed, device="cpu").to_bytes()
    with pytest.raises(ValueError, match="truncated"):
        FixedMaskIndex.from_bytes(data[:-7])
    with pytest.raises(ValueError, match="magic"):
        FixedMaskIndex.from_bytes(b"PK\x03\x04" + data[4:])


def _hamming_lexsort(
    queries: np.ndarray, observed: np.ndarray, reference: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Plain Hamming on observed sites, ties to the lower index: the rule spelled out by brute force."""
    ham = ((queries[:, None, :] != reference[None, :, :]) & observed[:, None, :]).sum(-1).astype(np.float64)
    if exclude is not None:
        ham[exclude] = np.inf
    order = np.stack([np.lexsort((np.arange(len(reference)), row))[:k] for row in ham])
    return np.take_along_axis(ham, order, 1), order


@pytest.mark.parametrize("k", [1, 8])
def test_equal_distances_go_to_the_lowest_reference_index(panel, k):
    # Uniform weights: plain Hamming, where exact ties are the rule.
    uniform = torch.ones(SITES, dtype=torch.float64)
    queries, reference = torch.from_numpy(panel.queries), torch.from_numpy(panel.reference)
    want_d, want_i = _hamming_lexsort(panel.queries, panel.per_query, panel.reference, k, panel.exclude)
    for chunk in (16384, 37):  # one GEMM, and many chunks merged
        dist, idx = masked_topk(
            queries, torch.from_numpy(panel.per_query), reference, uniform, k, torch.from_numpy(panel.exclude), chunk_size=chunk
        )
        assert np.array_equal(idx.numpy(), want_i) and np.array_equal(dist.numpy(), want_d)

    fixed = np.broadcast_to(panel.fixed, panel.queries.shape)
    want_d, want_i = _hamming_lexsort(panel.queries, fixed, panel.reference, k, panel.exclude)
    for kind in ("flat", "ivf"):
        index = FixedMaskIndex.build(panel.reference, panel.fixed, None, kind=kind, nlist=4, nprobe=4, device="cpu")
        dist, idx = index.search(panel.queries, k, panel.exclude)
        assert np.array_equal(idx.numpy(), want_i) and np.array_equal(dist.numpy(), want_d)


@pytest.mark.parametrize("n_ref", [300, 1100])  # 1100: the tie group outgrows FAISS candidates -> exact scan
def test_when_every_reference_ties_the_lowest_allowed_indices_win(n_ref):
    rng = np.random.default_rng(3)
    reference = (rng.random((n_ref, 40)) < 0.4).astype(np.uint8)
    reference[:, :10] = 1  # identical on the observed sites
    observed = np.zeros(40, bool)
    observed[:10] = True
    queries = (rng.random((3, 40)) < 0.5).astype(np.uint8)
    exclude = np.zeros((3, n_ref), bool)
    exclude[0, [0, 1]] = True
    exclude[1, [0, 2, 4, 6]] = True
    weights = rng.uniform(0.5, 3.0, 40)
    want = np.array([[2, 3, 4, 5, 6, 7, 8, 9], [1, 3, 5, 7, 8, 9, 10, 11], [0, 1, 2, 3, 4, 5, 6, 7]])
    index = FixedMaskIndex.build(reference, observed, weights, device="cpu")
    _, idx = index.search(queries, 8, exclude)
    assert np.array_equal(idx.numpy(), want)
    _, idx = masked_topk(
        torch.from_numpy(queries),
        torch.from_numpy(observed),
        torch.from_numpy(reference),
        torch.from_numpy(weights),
        8,
        torch.from_numpy(exclude),
    )
    assert np.array_equal(idx.numpy(), want)


def test_bad_inputs_are_refused_with_the_reason(panel):
    queries, reference = torch.from_numpy(panel.queries), torch.from_numpy(panel.reference)
    observed = torch.from_numpy(panel.fixed)
    with pytest.raises(ValueError, match="token ids"):
        masked_topk(queries + 5, observed, reference, panel.weights, 1)  # REF/ALT token ids, not alleles
    with pytest.raises(ValueError, match="references left"):
        masked_topk(queries[:1], observed, reference[:4], panel.weights, 3, exclude=torch.tensor([[1, 1, 0, 0]]).bool())
    with pytest.raises(ValueError, match="bool"):
        masked_topk(queries, observed.long(), reference, panel.weights, 1)
    with pytest.raises(ValueError, match="nothing to search"):
        FixedMaskIndex.build(panel.reference, np.zeros(SITES, bool))


@pytest.mark.skipif(hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0, reason="a GPU is present")
def test_asking_for_a_gpu_index_without_a_gpu_is_a_clear_error(panel):
    with pytest.raises(ClusterError, match="device='gpu'"):
        FixedMaskIndex.build(panel.reference, panel.fixed, device="gpu")
    assert FixedMaskIndex.build(panel.reference, panel.fixed, device="auto").device == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masked_topk_on_cuda_returns_the_cpu_result_bit_for_bit(panel):
    args = (
        torch.from_numpy(panel.queries),
        torch.from_numpy(panel.per_query),
        torch.from_numpy(panel.reference),
        panel.weights,
        8,
        torch.from_numpy(panel.exclude),
    )
    cpu = masked_topk(*args)
    gpu = masked_topk(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())


def test_predecessor_window_is_two_gigabytes_as_the_guard_counts_it():
    # DESIGN.md §2: 5,008 haplotypes x 511 sites x 192 dims of float32 = 1,965 MB per window.
    assert lxd_bytes(5008, 511, 192) == 1_965_379_584
    # The guard's --index flat-lxd plan cannot import the yardstick (no faiss in rag_hpc): same bytes.
    assert lxd_window_bytes(Plan(haplotypes=5008, sites=511, window_size=511, dims=192, index="flat-lxd")) == 1_965_379_584
