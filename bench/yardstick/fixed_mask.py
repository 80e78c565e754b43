"""The compact FAISS form of the predecessor's fixed-mask index (DESIGN.md §2): the yardstick's middle term.

The pipeline retrieves donors by the Li–Stephens HMM and keeps no per-window index; this is kept to prove,
against the L×D definition (``bench.yardstick.lxd``) and ``rag_hpc.index.retrieval.masked_topk``, that the
predecessor's 2 GB-per-window index was one float per observed site (tests/test_retrieval.py,
bench/index_bench.py). Needs faiss (the ``bench`` or ``test`` extra); nothing in ``rag_hpc`` imports it.
"""

from __future__ import annotations

import json
import struct
import threading
from typing import Any, Literal

import faiss
import numpy as np
import torch
from torch import Tensor

from rag_hpc.errors import ClusterError
from rag_hpc.index.retrieval import _masked_topk_fixed, fixed_point_weights

__all__ = ["FixedMaskIndex"]

IndexKind = Literal["flat", "ivf"]
DeviceChoice = Literal["auto", "cpu", "gpu"]

_MAGIC = b"RAGFMI\x00\x01"
_FORMAT_VERSION = 1
_GPU_MAX_K = 2048  # FAISS GPU selection limit
_RERANK_ELEMENTS = 1 << 22  # candidates x sites unpacked at once when re-ranking
_gpu_lock = threading.Lock()
_gpu_resources: Any = None


def _faiss_has_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _resolve_device(device: str) -> Literal["cpu", "gpu"]:
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if device == "cpu":
        return "cpu"
    has_gpu = _faiss_has_gpu()
    if device == "gpu" and not has_gpu:
        why = (
            "this faiss build has no GPU support (faiss-cpu is installed; install faiss-gpu on GPU nodes)"
            if not hasattr(faiss, "StandardGpuResources")
            else "faiss sees no GPU (check CUDA_VISIBLE_DEVICES and the node's GPUs)"
        )
        raise ClusterError(f"device='gpu' but {why}; use device='auto' or 'cpu'")
    return "gpu" if has_gpu else "cpu"


def _gpu_res() -> Any:
    # One resource object per process: each one reserves a slab of GPU scratch memory.
    global _gpu_resources
    with _gpu_lock:
        if _gpu_resources is None:
            _gpu_resources = faiss.StandardGpuResources()
        return _gpu_resources


def _to_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


class FixedMaskIndex:
    """FAISS index over the compact vectors of a reference panel under one fixed mask.

    Vectors hold only the observed sites, x = sqrt(w[obs]) * alleles[:, obs] (float32): masked
    sites would contribute 0 on both sides, so dropping them is exact. FAISS proposes candidates;
    they are re-ranked with exact fixed-point distances from the bit-packed alleles kept alongside
    (1 bit per haplotype per observed site, 1/32 of the vectors), so results equal ``masked_topk``'s
    bit for bit, ties going to the lower index.

    Tie rule where FAISS cannot see ties (its float32 distances are off by up to ``_faiss_error``):
    search k + excluded + extra candidates; the answer is certified when the exact k-th distance is
    below the largest FAISS distance returned minus that error bound (no reference outside the
    candidates can then beat or tie it); otherwise widen the search 4x, and past FAISS's limit scan
    all references exactly. With ``kind="ivf"`` and nprobe < nlist the search is approximate by
    design: candidates are re-ranked exactly but not certified.
    """

    def __init__(
        self,
        index: Any,
        observed: np.ndarray,
        weights: np.ndarray,
        uniform: bool,
        packed: np.ndarray,
        kind: IndexKind,
        nlist: int,
        nprobe: int,
        device: Literal["cpu", "gpu"],
    ):
        """Internal: use ``build`` or ``from_bytes``."""
        self._index = index
        self.observed = observed
        self.weights = weights
        self.uniform = uniform
        self._packed = packed
        self.kind: IndexKind = kind
        self.nlist = nlist
        self._nprobe = nprobe
        self.device: Literal["cpu", "gpu"] = device
        self._sites = np.flatnonzero(observed)
        w_obs = weights[self._sites]
        self._sqrt_w = np.sqrt(w_obs).astype(np.float32)
        self._wq = fixed_point_weights(weights).numpy()[self._sites]  # same grid as masked_topk's
        self._faiss_error = self._error_bound(float(w_obs.sum()))
        self._nbytes: int | None = None
        if kind == "ivf":
            self.nprobe = nprobe

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        reference: np.ndarray | Tensor,
        observed: np.ndarray | Tensor,
        weights: np.ndarray | Tensor | None = None,
        *,
        kind: IndexKind = "flat",
        nlist: int = 64,
        nprobe: int = 16,
        device: DeviceChoice = "auto",
    ) -> FixedMaskIndex:
        """reference alleles [N, L] (0/1), observed bool [L], weights [L] (None = uniform 1.0)."""
        ref = _to_numpy(reference)
        obs = _to_numpy(observed)
        if ref.ndim != 2:
            raise ValueError(f"reference must be [N, L], got shape {ref.shape}")
        n_ref, length = ref.shape
        if obs.dtype != np.bool_ or obs.shape != (length,):
            raise ValueError(f"observed must be bool [{length}] (True = observed), got {obs.dtype} {obs.shape}")
        if not obs.any():
            raise ValueError("observed has no site: there is nothing to search on")
        if n_ref == 0:
            raise ValueError("reference panel is empty")
        if ref.size and (ref.min() < 0 or ref.max() > 1):
            raise ValueError(f"reference must hold alleles 0/1, got values in [{ref.min()}, {ref.max()}]")
        uniform = weights is None
        w = np.ones(length, np.float64) if weights is None else _to_numpy(weights).astype(np.float64)
        if w.shape != (length,):
            raise ValueError(f"weights must be [{length}], got {w.shape}")
        fixed_point_weights(w)  # validates: finite, >= 0
        if kind not in ("flat", "ivf"):
            raise ValueError(f"kind must be 'flat' or 'ivf', got {kind!r}")
        if nlist < 1 or nprobe < 1:
            raise ValueError(f"nlist and nprobe must be >= 1, got {nlist}, {nprobe}")
        resolved = _resolve_device(device)
        sites = np.flatnonzero(obs)
        bits = np.ascontiguousarray(ref[:, sites], dtype=np.uint8)
        vectors = bits.astype(np.float32) * np.sqrt(w[sites]).astype(np.float32)
        dim = len(sites)
        if kind == "flat":
            index: Any = faiss.IndexFlatL2(dim)
            nlist = 1
        else:
            nlist = min(nlist, n_ref)
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist, faiss.METRIC_L2)
            index.train(vectors)  # FAISS k-means is seeded (1234): same panel, same lists
        index.add(vectors)
        del vectors
        return cls(
            cls._place(index, resolved),
            obs.copy(),
            w,
            uniform,
            np.packbits(bits, axis=1),
            kind,
            nlist,
            min(nprobe, nlist),
            resolved,
        )

    @staticmethod
    def _place(index: Any, device: Literal["cpu", "gpu"]) -> Any:
        if device == "gpu":
            return faiss.index_cpu_to_gpu(_gpu_res(), 0, index)
        return index

    def _error_bound(self, total_weight: float) -> float:
        """Upper bound on |FAISS float32 distance - exact distance| for these vectors.

        FAISS computes ||x||^2 + ||y||^2 - 2<x, y> in float32: each term <= total_weight, summed
        over d sites, so a d * 2^-24 relative bound on 4 * total_weight covers it. GPU GEMMs may
        round inputs to TF32 (10-bit mantissa); 2^-9 relative on top covers that too.
        """
        dim = len(self._sites)
        bound = 4.0 * total_weight * (dim + 4) * 2.0**-24
        if self.device == "gpu":
            bound += 4.0 * total_weight * 2.0**-9
        return bound

    # -- properties --------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def sites(self) -> int:
        """Window length L (queries are [B, L])."""
        return int(self.observed.shape[0])

    @property
    def n_observed(self) -> int:
        return len(self._sites)

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"nprobe must be >= 1, got {value}")
        self._nprobe = min(int(value), self.nlist)
        if self.kind == "ivf":
            if self.device == "gpu":
                faiss.GpuParameterSpace().set_index_parameter(self._index, "nprobe", self._nprobe)
            else:
                self._index.nprobe = self._nprobe

    @property
    def exact(self) -> bool:
        """True when every reference is reachable by a search (flat, or IVF probing all lists)."""
        return self.kind == "flat" or self._nprobe >= self.nlist

    @property
    def nbytes(self) -> int:
        """Size of the serialized index (what the cache stores): FAISS vectors + packed alleles + header."""
        if self._nbytes is None:
            self._nbytes = len(self.to_bytes())
        return self._nbytes

    # -- search ------------------------------------------------------------------------------

    def _exact(self, q_obs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Exact fixed-point distances of queries q_obs [b, d] to candidate labels [b, c] (float64)."""
        b, c = labels.shape
        dim = q_obs.shape[1]
        qf = q_obs.astype(np.float64)
        base = qf @ self._wq
        coef = self._wq * (1.0 - 2.0 * qf)
        out = np.empty((b, c), np.float64)
        rows = max(1, _RERANK_ELEMENTS // max(1, c * dim))
        for s in range(0, b, rows):
            e = min(s + rows, b)
            cand = np.unpackbits(self._packed[labels[s:e]], axis=-1, count=dim).astype(np.float64)
            out[s:e] = base[s:e, None] + np.matmul(cand, coef[s:e, :, None])[..., 0]
        return out

    def search(
        self, query_alleles: np.ndarray | Tensor, k: int, exclude: np.ndarray | Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """query alleles [B, L] (0/1, all L sites; only the observed ones are read), exclude [B, N] bool.

        Returns (dist float64 [B, k], idx int64 [B, k]) as ``masked_topk`` would with this mask
        broadcast; on query's device when it is a tensor. An approximate IVF search that finds
        fewer than k candidates pads with idx -1, dist inf.
        """
        out_device = query_alleles.device if isinstance(query_alleles, Tensor) else torch.device("cpu")
        q_full = _to_numpy(query_alleles)
        if q_full.ndim != 2 or q_full.shape[1] != self.sites:
            raise ValueError(f"query must be [B, {self.sites}], got {q_full.shape}")
        if q_full.size and (q_full.min() < 0 or q_full.max() > 1):
            raise ValueError(f"query must hold alleles 0/1, got values in [{q_full.min()}, {q_full.max()}]")
        batch = q_full.shape[0]
        n_ref = self.ntotal
        excl = None if exclude is None else _to_numpy(exclude).astype(bool)
        if excl is not None and excl.shape != (batch, n_ref):
            raise ValueError(f"exclude must be [B, N] = [{batch}, {n_ref}], got {excl.shape}")
        n_excl = np.zeros(batch, np.int64) if excl is None else excl.sum(1)
        if k < 1 or (batch and int((n_ref - n_excl).min()) < k):
            raise ValueError(
                f"k={k} but some query has only {int((n_ref - n_excl).min()) if batch else n_ref} references left after exclusion"
            )

        q_obs = np.ascontiguousarray(q_full[:, self._sites], dtype=np.uint8)
        xq = q_obs.astype(np.float32) * self._sqrt_w
        dist = np.full((batch, k), np.inf)
        idx = np.full((batch, k), -1, np.int64)
        cap = min(n_ref, _GPU_MAX_K if self.device == "gpu" else 1024)
        width = min(n_ref, k + int(n_excl.max(initial=0)) + max(k, 8))
        pending = np.arange(batch)
        while pending.size:
            if width > cap:
                self._scan(q_obs, excl, k, pending, dist, idx)
                break
            fd, labels = self._index.search(xq[pending], width)
            valid = labels >= 0
            safe = np.where(valid, labels, 0)
            exact = self._exact(q_obs[pending], safe)
            drop = ~valid
            if excl is not None:
                drop |= np.take_along_axis(excl[pending], safe, axis=1)
            exact[drop] = np.inf
            order = np.lexsort((np.where(valid, labels, n_ref), exact), axis=-1)[:, :k]
            top_d = np.take_along_axis(exact, order, 1)
            top_i = np.where(np.isfinite(top_d), np.take_along_axis(labels, order, 1), -1)
            if width >= n_ref and self.exact:
                done = np.ones(len(pending), bool)  # every reference was a candidate
            elif self.exact:
                fmax = np.where(valid, fd, -np.inf).max(1)
                done = np.isfinite(top_d[:, -1]) & (top_d[:, -1] < fmax - self._faiss_error)
            else:
                done = np.isfinite(top_d[:, -1]) | (width >= n_ref) | (valid.sum(1) < width)
            dist[pending[done]] = top_d[done]
            idx[pending[done]] = top_i[done]
            pending = pending[~done]
            width = min(n_ref, width * 4)  # pending ones are never at n_ref: all of them were done there
        return (
            torch.from_numpy(dist).to(out_device),
            torch.from_numpy(idx).to(out_device),
        )

    def _scan(
        self, q_obs: np.ndarray, excl: np.ndarray | None, k: int, rows: np.ndarray, dist: np.ndarray, idx: np.ndarray
    ) -> None:
        """Exact GEMM over every reference for ``rows``: huge tie groups outgrow candidate search."""
        reference = torch.from_numpy(np.unpackbits(self._packed, axis=1, count=self.n_observed))
        query = torch.from_numpy(q_obs[rows])
        observed = torch.ones(query.shape, dtype=torch.bool)
        ex = None if excl is None else torch.from_numpy(excl[rows])
        d, i = _masked_topk_fixed(query, observed, reference, torch.from_numpy(self._wq), k, ex)
        dist[rows] = d.numpy()
        idx[rows] = i.numpy()

    # -- serialization -------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Self-contained, deterministic bytes: magic, JSON header, observed, weights, packed alleles, FAISS index."""
        cpu_index = faiss.index_gpu_to_cpu(self._index) if self.device == "gpu" else self._index
        sections = {
            "observed": np.packbits(self.observed).tobytes(),
            "weights": self.weights.astype("<f8").tobytes(),
            "packed": np.ascontiguousarray(self._packed).tobytes(),
            "faiss": faiss.serialize_index(cpu_index).tobytes(),
        }
        header = {
            "format": _FORMAT_VERSION,
            "kind": self.kind,
            "nlist": self.nlist,
            "nprobe": self._nprobe,
            "sites": self.sites,
            "n": self.ntotal,
            "n_observed": self.n_observed,
            "uniform": self.uniform,
            "sections": [[name, len(data)] for name, data in sections.items()],
        }
        head = json.dumps(header, sort_keys=True).encode()
        return b"".join([_MAGIC, struct.pack("<I", len(head)), head, *sections.values()])

    @classmethod
    def from_bytes(cls, data: bytes, device: DeviceChoice = "auto", nprobe: int | None = None) -> FixedMaskIndex:
        """Inverse of ``to_bytes``; raises ValueError on bytes that are not a complete index.

        ``nprobe`` overrides the stored one (a search setting, not part of what was built).
        """
        view = memoryview(data)
        if len(view) < len(_MAGIC) + 4 or bytes(view[: len(_MAGIC)]) != _MAGIC:
            raise ValueError("not a FixedMaskIndex (bad magic)")
        (head_len,) = struct.unpack_from("<I", view, len(_MAGIC))
        pos = len(_MAGIC) + 4
        try:
            header = json.loads(bytes(view[pos : pos + head_len]))
        except ValueError as exc:
            raise ValueError(f"FixedMaskIndex header is corrupt: {exc}") from None
        if header.get("format") != _FORMAT_VERSION:
            raise ValueError(f"FixedMaskIndex format {header.get('format')} is not {_FORMAT_VERSION}")
        pos += head_len
        expected = pos + sum(size for _, size in header["sections"])
        if len(view) != expected:
            raise ValueError(f"FixedMaskIndex bytes are truncated or padded: {len(view)} bytes, header says {expected}")
        parts: dict[str, memoryview] = {}
        for name, size in header["sections"]:
            parts[name] = view[pos : pos + size]
            pos += size
        length, n_ref, n_obs = header["sites"], header["n"], header["n_observed"]
        observed = np.unpackbits(np.frombuffer(parts["observed"], np.uint8), count=length).astype(bool)
        weights = np.frombuffer(parts["weights"], "<f8").astype(np.float64)
        packed = np.frombuffer(parts["packed"], np.uint8).reshape(n_ref, -1).copy()
        index = faiss.deserialize_index(np.frombuffer(parts["faiss"], np.uint8))
        if int(observed.sum()) != n_obs or weights.shape != (length,) or index.ntotal != n_ref or index.d != n_obs:
            raise ValueError("FixedMaskIndex sections disagree with its header")
        resolved = _resolve_device(device)
        return cls(
            cls._place(index, resolved),
            observed,
            weights,
            bool(header["uniform"]),
            packed,
            header["kind"],
            int(header["nlist"]),
            int(header["nprobe"] if nprobe is None else nprobe),
            resolved,
        )

    def __repr__(self) -> str:
        return (
            f"FixedMaskIndex(kind={self.kind!r}, n={self.ntotal}, sites={self.sites}, observed={self.n_observed}, "
            f"device={self.device!r}{f', nlist={self.nlist}, nprobe={self._nprobe}' if self.kind == 'ivf' else ''})"
        )
