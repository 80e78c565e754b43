"""The predecessor's retrieval layout, kept only as the yardstick.

Each reference haplotype was indexed as its flattened per-position embedding, L×D floats, with
unobserved sites holding the MASK token (DESIGN.md §2): 392 KB per haplotype at 511×192, ~2 GB per
window. tests/test_retrieval.py and bench/index_bench.py measure the compact retrievers against it;
``lxd_bytes`` is the size the memory guard's ``--index flat-lxd`` plan counts per window (the test checks
they agree).

SOS is left out of the flattened vector: it is the same token at the same position with AF 0 in
every sequence, so it adds the same D floats to every vector and 0 to every distance. Sites sit at
positions 1..L, exactly as in ``SiteEmbedding.allele_embeddings``, so the per-site vectors are the
ones ``site_weights`` is derived from.
"""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import numpy as np
import torch
from torch import Tensor

from bench.yardstick.embedding import ALT, MASK, REF, SOS, SiteEmbedding

__all__ = [
    "embedding_site_weights",
    "lxd_bytes",
    "lxd_embed",
    "lxd_exact_distances",
    "lxd_flat_index",
    "lxd_tolerance",
    "site_weights",
    "topk_agreement",
]

# Floats per chunk of one [rows, L+1, D] activation: bounds peak memory whatever the panel size.
_CHUNK_FLOATS = 1 << 24


@torch.no_grad()
def site_weights(allele_emb: Tensor) -> Tensor:
    """w_i = ||e(ALT, i) - e(REF, i)||^2 from ``allele_embeddings(af)`` [2, L, D] -> float64 [L].

    float64 because the yardstick is the exact L×D distance of the float32 embeddings: squaring
    and summing their differences in float64 reproduces it to ~1e-16 relative, whereas float32
    would add ~D * 2^-24 relative noise per site, enough to reorder near-tied references. It costs
    L×D operations once per search, nothing next to the search itself. Carries no gradient.
    """
    if allele_emb.dim() != 3 or allele_emb.shape[0] != 2:
        raise ValueError(f"allele_emb must be [2, L, D] (REF, ALT), got {tuple(allele_emb.shape)}")
    diff = allele_emb[1].detach().double() - allele_emb[0].detach().double()
    return (diff * diff).sum(-1)


@torch.no_grad()
def embedding_site_weights(embedding: SiteEmbedding, af: Tensor | np.ndarray) -> Tensor:
    """Site weights of a ``SiteEmbedding`` at allele frequencies ``af`` [L] -> float64 [L]."""
    param = next(embedding.parameters())
    af_t = torch.as_tensor(af, dtype=param.dtype, device=param.device)
    return site_weights(embedding.allele_embeddings(af_t))


def lxd_bytes(n_haplotypes: int, sites: int, dims: int) -> int:
    """Bytes of the predecessor's float32 L×D index for one window."""
    return int(n_haplotypes) * int(sites) * int(dims) * 4


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _chunk_rows(length: int, dims: int, chunk_rows: int | None) -> int:
    return chunk_rows if chunk_rows is not None else max(1, _CHUNK_FLOATS // ((length + 1) * dims))


def _embed_rows(
    embedding: SiteEmbedding, alleles: np.ndarray, observed: np.ndarray, af: np.ndarray, chunk_rows: int | None
) -> Iterator[tuple[int, int, Tensor]]:
    """Yield (start, stop, float32 [rows, L*D]) embeddings of alleles under observed ([L] or [N, L])."""
    param = next(embedding.parameters())
    n, length = alleles.shape
    dims = embedding.token.embedding_dim
    rows = _chunk_rows(length, dims, chunk_rows)
    af_full = torch.cat([torch.zeros(1), torch.as_tensor(af, dtype=torch.float32)]).to(param.device)
    with torch.no_grad():
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            a = torch.from_numpy(np.ascontiguousarray(alleles[start:stop], dtype=np.int64))
            obs = observed if observed.ndim == 1 else observed[start:stop]
            tok = torch.where(torch.from_numpy(np.asarray(obs, dtype=bool)), REF + a, torch.full_like(a, MASK))
            tok = torch.cat([torch.full((stop - start, 1), SOS, dtype=torch.int64), tok], dim=1).to(param.device)
            emb = embedding(tok, af_full)[:, 1:]
            yield start, stop, emb.reshape(stop - start, length * dims).float()


def _check(alleles: np.ndarray, observed: np.ndarray, af: np.ndarray) -> None:
    if alleles.ndim != 2:
        raise ValueError(f"alleles must be [N, L], got {alleles.shape}")
    n, length = alleles.shape
    if observed.dtype != np.bool_ or observed.shape not in ((length,), (n, length)):
        raise ValueError(f"observed must be bool [L] or [N, L] with L={length}, got {observed.dtype} {observed.shape}")
    if af.shape != (length,):
        raise ValueError(f"af must be [{length}], got {af.shape}")
    if alleles.size and (alleles.min() < 0 or alleles.max() > 1):
        raise ValueError("alleles must be 0 (REF) / 1 (ALT)")


def lxd_embed(
    embedding: SiteEmbedding,
    alleles: np.ndarray | Tensor,
    observed: np.ndarray | Tensor,
    af: np.ndarray | Tensor,
    *,
    chunk_rows: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Flattened per-position embeddings float32 [N, L*D]; unobserved sites hold MASK, SOS is left out.

    Embeds ``chunk_rows`` haplotypes at a time so only the output (and ``out`` may be reused
    across masks) grows with N.
    """
    a, obs, f = _np(alleles), _np(observed), _np(af)
    _check(a, obs, f)
    n, length = a.shape
    dims = embedding.token.embedding_dim
    if out is None:
        out = np.empty((n, length * dims), np.float32)
    elif out.shape != (n, length * dims) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 [{n}, {length * dims}], got {out.dtype} {out.shape}")
    for start, stop, emb in _embed_rows(embedding, a, obs, f, chunk_rows):
        out[start:stop] = emb.cpu().numpy()
    return out


def lxd_flat_index(
    embedding: SiteEmbedding,
    alleles: np.ndarray | Tensor,
    observed: np.ndarray | Tensor,
    af: np.ndarray | Tensor,
    *,
    chunk_rows: int | None = None,
) -> faiss.IndexFlatL2:
    """The predecessor's index: IndexFlatL2 over ``lxd_embed``, filled chunk by chunk (no second copy)."""
    a, obs, f = _np(alleles), _np(observed), _np(af)
    _check(a, obs, f)
    dims = embedding.token.embedding_dim
    index = faiss.IndexFlatL2(a.shape[1] * dims)
    for _, _, emb in _embed_rows(embedding, a, obs, f, chunk_rows):
        index.add(np.ascontiguousarray(emb.cpu().numpy()))
    return index


def lxd_exact_distances(
    embedding: SiteEmbedding,
    queries: np.ndarray | Tensor,
    reference: np.ndarray | Tensor,
    observed: np.ndarray | Tensor,
    af: np.ndarray | Tensor,
    *,
    exclude: np.ndarray | Tensor | None = None,
    chunk_rows: int | None = None,
) -> np.ndarray:
    """The definition itself: ||E(q) - E(r)||^2 of the float32 L×D embeddings, in float64 -> [B, N].

    observed [L] (one mask for all) or [B, L] (each query's own mask, applied to the query and to
    every reference: each query then needs its own embedding of the whole panel). Excluded pairs
    are inf. Nothing of size N×L×D is held: references are embedded and reduced chunk by chunk.
    """
    q, r, obs, f = _np(queries), _np(reference), _np(observed), _np(af)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise ValueError(f"queries [B, L] and reference [N, L] must share L, got {q.shape} and {r.shape}")
    if obs.ndim == 2 and obs.shape != q.shape:
        raise ValueError(f"per-query observed must be [B, L] = {q.shape}, got {obs.shape}")
    _check(r, obs if obs.ndim == 1 else obs[0], f)
    batch, n_ref = q.shape[0], r.shape[0]
    out = np.empty((batch, n_ref), np.float64)
    masks = [(np.arange(batch), obs)] if obs.ndim == 1 else [(np.array([b]), obs[b]) for b in range(batch)]
    for rows, mask in masks:
        eq = torch.from_numpy(lxd_embed(embedding, q[rows], mask, f)).double()
        qn = (eq * eq).sum(1, keepdim=True)
        for start, stop, er in _embed_rows(embedding, r, mask, f, chunk_rows):
            er64 = er.cpu().double()
            d = qn + (er64 * er64).sum(1)[None, :] - 2.0 * (eq @ er64.T)
            out[rows, start:stop] = d.clamp_min_(0.0).numpy()
    if exclude is not None:
        out[_np(exclude).astype(bool)] = np.inf
    return out


def lxd_tolerance(embedding: SiteEmbedding, af: np.ndarray | Tensor, rtol: float = 1e-6) -> float:
    """Absolute distance tolerance: rtol x the largest ||E(q)||^2 + ||E(r)||^2 any two sequences can have.

    The predecessor's float32 FAISS distances err by ~1e-7 of that scale (DESIGN.md: 0.03 where
    the truth is 0, at 511×192); 1e-6 leaves a margin while staying far below a site's weight.
    """
    param = next(embedding.parameters())
    f = torch.as_tensor(_np(af), dtype=torch.float32)
    length = f.shape[0]
    tokens = torch.tensor([MASK, REF, ALT])[:, None].expand(3, length + 1).clone()
    tokens[:, 0] = SOS
    with torch.no_grad():
        emb = embedding(tokens.to(param.device), torch.cat([torch.zeros(1), f]).to(param.device))[:, 1:]
    per_site = emb.double().pow(2).sum(-1).amax(0)  # [L]: the largest token norm at each site
    return float(rtol * 2.0 * per_site.sum())


def topk_agreement(
    true_dist: np.ndarray, idx: np.ndarray | Tensor, tol: float, dist: np.ndarray | Tensor | None = None
) -> list[str | None]:
    """Tie-aware check of a top-k against the true distances [B, N] (inf = excluded): None per query that agrees.

    A query agrees when its k indices are distinct and allowed, their true distances sorted match
    the true k smallest within ``tol`` (so each is <= the true k-th + tol), ``dist`` (if given)
    sorted matches them too, and — where the true k-th and (k+1)-th distances differ by more than
    ``tol`` — the index set is exactly the true one. Within tol, any tied reference is acceptable.
    """
    t_all = np.asarray(true_dist, np.float64)
    ids_all = _np(idx).astype(np.int64)
    d_all = None if dist is None else _np(dist).astype(np.float64)
    batch, n_ref = t_all.shape
    k = ids_all.shape[1]
    result: list[str | None] = []
    for b in range(batch):
        ids, t = ids_all[b], t_all[b]
        if ids.min() < 0 or ids.max() >= n_ref or len(set(ids.tolist())) != k:
            result.append(f"query {b}: indices {ids.tolist()} are not {k} distinct references")
            continue
        order = np.argsort(t, kind="stable")
        best = t[order[:k]]
        got = np.sort(t[ids])
        problem = None
        if not np.isfinite(got).all():
            problem = f"returned an excluded reference: {ids.tolist()}"
        elif got[-1] > best[-1] + tol or np.abs(got - best).max() > tol:
            problem = f"true distances {got.tolist()} vs best {best.tolist()} (tol {tol:.3g})"
        elif d_all is not None and np.abs(np.sort(d_all[b]) - best).max() > tol:
            problem = f"reported distances {np.sort(d_all[b]).tolist()} vs true {best.tolist()} (tol {tol:.3g})"
        elif n_ref > k and t[order[k]] - best[-1] > tol and set(ids.tolist()) != set(order[:k].tolist()):
            problem = f"index set {sorted(ids.tolist())} != true {sorted(order[:k].tolist())} with a clear gap"
        result.append(None if problem is None else f"query {b}: {problem}")
    return result
