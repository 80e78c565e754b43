"""Retrieval for one window: the predecessor's L×D index vs the compact forms (DESIGN.md §2).

    python -m bench.index_bench [--haplotypes 5008 --sites 511 --dims 192 --queries 64 --k 8 --seed 0] [--json]

One run, one synthetic window with LD-like structure (mosaics of a few founder haplotypes with
recombination and mutation noise, so near-identical references and exact ties abound as in real
panels), a randomly initialised SiteEmbedding(D) and AF from the data; fixed mask = half the sites.

(i)   L×D: lxd_embed + faiss.IndexFlatL2 over L*D floats per haplotype (the predecessor's layout);
(ii)  compact: FixedMaskIndex, flat, one float per observed site (an approximate IVF row is added
      for information; it is not part of the acceptance);
(iii) GEMM: masked_topk over the uint8 alleles.

Build = everything from the embedding to a searchable index (site weights included for ii/iii),
timed once for L×D (seconds) and as the median of 5 after a warm-up for the others (milliseconds);
search = a batch of --queries queries, median of repeats after one warm-up. Top-k agreement is
tie-aware against the exact L×D definition (float64 distances of the float32 L×D embeddings):
see bench.yardstick.lxd.topk_agreement. Per-query masks are checked for a subset of queries only:
each one needs its own L×D embedding of the whole panel (seconds and ~2 GB-equivalent of work each).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np
import torch

from bench.common import cpu_model
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
    topk_agreement,
)
from rag_hpc.index.retrieval import masked_topk


def ld_haplotypes(rng: np.random.Generator, n: int, sites: int) -> np.ndarray:
    """The bench's panel: rates per site scaled so a 511-site window sees about one switch and half a flip
    per haplotype."""
    return mosaic_haplotypes(rng, n, sites, founders=16, switch=0.002, mutation=0.001)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def median_ms(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    out = fn()  # warm-up: first-touch allocations, thread pools
    times = []
    for _ in range(repeats):
        out, s = timed(fn)
        times.append(s)
    return out, 1000.0 * statistics.median(times)


def median_build_s(fn: Callable[[], Any], repeats: int = 5) -> tuple[Any, float]:
    """Builds that take milliseconds are timed like searches: one stray scheduler hiccup on a
    shared 2-core machine would otherwise be most of the figure. The L×D build (seconds) runs once."""
    out, ms = median_ms(fn, repeats)
    return out, ms / 1000.0


def agreement_with_lxd(
    truth: np.ndarray, tol: float, idx: np.ndarray, dist: np.ndarray, lxd_idx: np.ndarray, lxd_dist: np.ndarray
) -> tuple[list[str | None], int, int]:
    """Tie-aware agreement of one method with the L×D definition and the L×D index's own answer.

    Per query: the method passes topk_agreement against the exact L×D distances, its sorted
    distances match the L×D index's within tol, and where the true k-th and (k+1)-th distances
    are more than tol apart its index set is the L×D index's. Also counts identical index sets
    and identical ordered lists (informative: within a tie any member is a right answer).
    """
    report = topk_agreement(truth, idx, tol, dist)
    k = idx.shape[1]
    same_sets = same_lists = 0
    for b in range(len(idx)):
        same_set = set(idx[b].tolist()) == set(lxd_idx[b].tolist())
        same_sets += same_set
        same_lists += bool(np.array_equal(idx[b], lxd_idx[b]))
        if report[b] is not None:
            continue
        if np.abs(np.sort(dist[b]) - np.sort(lxd_dist[b])).max() > tol:
            report[b] = f"query {b}: distances differ from the L×D index's beyond tol"
        else:
            t = np.sort(truth[b])
            if len(t) > k and t[k] - t[k - 1] > tol and not same_set:
                report[b] = f"query {b}: index set differs from the L×D index's with a clear gap"
    return report, same_sets, same_lists


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--haplotypes", type=int, default=5008)
    ap.add_argument("--sites", type=int, default=511)
    ap.add_argument("--dims", type=int, default=192)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-query-subset", type=int, default=8, help="queries checked with their own masks against L×D")
    ap.add_argument("--repeats", type=int, default=3, help="timed searches of the L×D index (the compact ones get 5x)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    n_ref, length, dims, n_q, k = args.haplotypes, args.sites, args.dims, args.queries, args.k

    rng = np.random.default_rng(args.seed)
    haplotypes = ld_haplotypes(rng, n_ref + n_q, length)
    reference, queries = haplotypes[:n_ref], haplotypes[n_ref:]  # queries: fresh haplotypes, not in the panel
    af = reference.mean(0).astype(np.float32)
    observed = np.zeros(length, bool)
    observed[rng.permutation(length)[: length // 2]] = True
    torch.manual_seed(args.seed)
    embedding = SiteEmbedding(dims, length + 1).eval()
    tol = lxd_tolerance(embedding, af)
    methods: dict[str, dict[str, Any]] = {}

    # (i) the predecessor: L×D floats per haplotype in an IndexFlatL2
    lxd_index, build_s = timed(lambda: lxd_flat_index(embedding, reference, observed, af))
    assert lxd_index.ntotal * lxd_index.d * 4 == lxd_bytes(n_ref, length, dims)
    (lxd_dist, lxd_idx), search_ms = median_ms(
        lambda: lxd_index.search(lxd_embed(embedding, queries, observed, af), k), args.repeats
    )
    methods["lxd"] = {
        "name": "L×D IndexFlatL2 (predecessor)",
        "bytes": lxd_bytes(n_ref, length, dims),
        "build_s": build_s,
        "search_ms": search_ms,
    }
    lxd_index.reset()  # frees its ~2 GB before the compact methods are timed

    # (ii) compact FAISS index on the observed sites
    def build_compact(kind: str) -> FixedMaskIndex:
        weights = embedding_site_weights(embedding, af)
        return FixedMaskIndex.build(reference, observed, weights, kind=kind, nlist=64, nprobe=16, device="cpu")

    compact, build_s = median_build_s(lambda: build_compact("flat"))
    (c_dist, c_idx), search_ms = median_ms(lambda: compact.search(queries, k), 5 * args.repeats)
    methods["compact"] = {
        "name": "compact FixedMaskIndex (flat)",
        "bytes": compact.nbytes,
        "build_s": build_s,
        "search_ms": search_ms,
    }
    ivf, build_s = median_build_s(lambda: build_compact("ivf"))
    (v_dist, v_idx), search_ms = median_ms(lambda: ivf.search(queries, k), 5 * args.repeats)
    methods["compact_ivf"] = {
        "name": "compact IVF nprobe 16/64 (approx.)",
        "bytes": ivf.nbytes,
        "build_s": build_s,
        "search_ms": search_ms,
        "approximate": True,
    }

    # (iii) the GEMM on alleles: "building" is computing the site weights
    ref_t, q_t, obs_t = torch.from_numpy(reference), torch.from_numpy(queries), torch.from_numpy(observed)
    weights, build_s = median_build_s(lambda: embedding_site_weights(embedding, af))
    (g_dist, g_idx), search_ms = median_ms(lambda: masked_topk(q_t, obs_t, ref_t, weights, k), 5 * args.repeats)
    methods["gemm"] = {
        "name": "masked_topk GEMM (uint8 alleles)",
        "bytes": reference.nbytes,
        "build_s": build_s,
        "search_ms": search_ms,
    }

    # Agreement with the L×D definition (exact float64 distances of the L×D embeddings)
    truth, truth_s = timed(lambda: lxd_exact_distances(embedding, queries, reference, observed, af))
    sorted_truth = np.sort(truth, axis=1)
    ties_at_kth = int((sorted_truth[:, k] - sorted_truth[:, k - 1] <= tol).sum())
    results = {
        "lxd": (lxd_dist, lxd_idx),
        "compact": (c_dist.numpy(), c_idx.numpy()),
        "compact_ivf": (v_dist.numpy(), v_idx.numpy()),
        "gemm": (g_dist.numpy(), g_idx.numpy()),
    }
    for key, (dist, idx) in results.items():
        report, same_sets, same_lists = agreement_with_lxd(truth, tol, idx, dist, lxd_idx, lxd_dist)
        problems = [p for p in report if p is not None]
        methods[key].update(
            agree=n_q - len(problems), same_sets_as_lxd=same_sets, same_lists_as_lxd=same_lists, problems=problems[:3]
        )
    gemm_equals_compact = bool(
        np.array_equal(results["gemm"][1], results["compact"][1]) and np.array_equal(results["gemm"][0], results["compact"][0])
    )

    # Per-query masks: GEMM vs L×D, each query under its own mask
    n_sub = min(args.per_query_subset, n_q)
    per_query = rng.random((n_sub, length)) < 0.5
    (pq_dist, pq_idx), pq_ms = median_ms(
        lambda: masked_topk(q_t[:n_sub], torch.from_numpy(per_query), ref_t, weights, k), 5 * args.repeats
    )
    pq_truth, pq_truth_s = timed(lambda: lxd_exact_distances(embedding, queries[:n_sub], reference, per_query, af))
    pq_problems = [p for p in topk_agreement(pq_truth, pq_idx, tol, pq_dist) if p is not None]

    lxd, comp, gemm = methods["lxd"], methods["compact"], methods["gemm"]
    bytes_ratio = lxd["bytes"] / comp["bytes"]
    lxd_total_ms = 1000 * lxd["build_s"] + lxd["search_ms"]
    speedup = lxd_total_ms / (1000 * comp["build_s"] + comp["search_ms"])
    speedup_gemm = lxd_total_ms / (1000 * gemm["build_s"] + gemm["search_ms"])
    topk_identical = comp["agree"] == n_q and gemm["agree"] == n_q and not pq_problems
    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "python": platform.python_version(),
    }
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(
        f"window: {n_ref} haplotypes x {length} sites, D={dims}, {int(observed.sum())} sites observed (fixed mask), "
        f"{n_q} queries, k={k}, seed {args.seed}"
    )
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores (torch {machine['torch_threads']} threads, "
        f"faiss {machine['faiss_threads']})"
    )
    print(
        f"tie-aware tolerance {tol:.3g} (distances up to ~{sorted_truth[:, k - 1].max():.0f}); "
        f"queries whose k-th and (k+1)-th true distances tie within it: {ties_at_kth}/{n_q}"
    )
    print()
    head = f"{'method':36} {'bytes/window':>14} {'build s':>9} {'search ms':>10} {'agree':>7} {'same set':>9} {'same list':>9}"
    print(head)
    print("-" * len(head))
    for m in methods.values():
        mb = m["bytes"] / 1e6
        print(
            f"{m['name']:36} {mb:>11.2f} MB {m['build_s']:>9.3f} {m['search_ms']:>10.2f} "
            f"{m['agree']:>3}/{n_q:<3} {m['same_sets_as_lxd']:>5}/{n_q:<3} {m['same_lists_as_lxd']:>5}/{n_q:<3}"
        )
    print()
    print(f"bytes ratio L×D / compact: {bytes_ratio:,.0f}x    (L×D / GEMM alleles: {lxd['bytes'] / gemm['bytes']:,.0f}x)")
    print(f"build+search speedup vs L×D: compact {speedup:,.0f}x, GEMM {speedup_gemm:,.0f}x")
    print(
        f"top-k identical to L×D (tie-aware, all {n_q} queries, compact and GEMM): {topk_identical}; "
        f"compact == GEMM bit for bit: {gemm_equals_compact}"
    )
    print(
        f"per-query masks (subset of {n_sub}: each needs its own L×D embedding of all {n_ref} references, "
        f"{pq_truth_s / n_sub:.1f} s per query here): GEMM agrees on {n_sub - len(pq_problems)}/{n_sub}, "
        f"{pq_ms:.2f} ms for the {n_sub}"
    )
    print(f"exact L×D distances for the agreement check: {truth_s:.1f} s; peak RSS {peak_rss_mb:,.0f} MB")
    for key, m in methods.items():
        for p in m["problems"]:
            print(f"  {key}{' (approximate by design)' if m.get('approximate') else ''}: {p}")
    for p in pq_problems[:3]:
        print(f"  per-query: {p}")

    if args.json:
        summary = {
            "bytes_ratio": bytes_ratio,
            "speedup": speedup,
            "speedup_gemm": speedup_gemm,
            "topk_identical": topk_identical,
            "compact_equals_gemm": gemm_equals_compact,
            "methods": methods,
            "per_query_masks": {
                "queries": n_sub,
                "agree": n_sub - len(pq_problems),
                "gemm_ms": pq_ms,
                "lxd_truth_s_per_query": pq_truth_s / n_sub,
                "subset_reason": "each query's mask needs its own L×D embedding of every reference",
            },
            "ties_at_kth": ties_at_kth,
            "tolerance": tol,
            "config": {
                "haplotypes": n_ref,
                "sites": length,
                "dims": dims,
                "queries": n_q,
                "k": k,
                "seed": args.seed,
                "observed_sites": int(observed.sum()),
            },
            "machine": machine,
            "peak_rss_mb": peak_rss_mb,
        }
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
