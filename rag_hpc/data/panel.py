"""The prepared panel: an HDF5 file in scikit-allel's layout plus what later stages need.

Layout (written once by ``rag_hpc.prepare``, read by every other stage; never rewritten in place):

    calldata/GT        int8  [n_sites, n_samples, 2]  phased alleles (0 = REF, 1 = ALT), chunked by sites
    variants/POS       int64 [n_sites]                1-based, strictly increasing
    variants/REF       S1    [n_sites]
    variants/ALT       S1    [n_sites]                biallelic SNPs only
    variants/CHROM     S     [n_sites]
    variants/AF        float32 [n_sites]              ALT frequency over the *train* split's haplotypes
    variants/AF_<POP>  float32 [n_sites]              same per population (when a population file is given)
    samples            S     [n_samples]
    sample_population  S     [n_samples]              "" when no population file
    split              uint8 [n_samples]              SPLIT_TRAIN / SPLIT_VAL (attrs: labels)

    attrs: format_version, source_sha256 (content hash of the source VCF), source_path, contig,
           val_fraction, split_seed, n_skipped_non_snps

The train split is also the retrieval reference panel; validation samples are never retrieved.
AF is computed over the train split only, so validation scores see no information from themselves.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from rag_hpc.errors import InputError
from rag_hpc.rng import Stream, uniforms

PANEL_FORMAT_VERSION = 1
SPLIT_TRAIN = 0
SPLIT_VAL = 1
SPLIT_LABELS = ("train", "val")


class PanelError(InputError):
    """A prepared panel that is missing, from another format version, or inconsistent."""


@dataclass(frozen=True)
class PanelInfo:
    path: Path
    source_sha256: str
    contig: str
    n_sites: int
    n_samples: int


class Panel:
    """Read-only view of a prepared panel; opens the file lazily and keeps it open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise PanelError(f"prepared panel {self.path} does not exist: run `python -m rag_hpc.prepare` first")
        try:
            # Windows straddle GT chunks; a chunk cache larger than one chunk row keeps each
            # chunk decompressed once while consecutive windows are read.
            self._h5 = h5py.File(self.path, "r", rdcc_nbytes=64 * 2**20, rdcc_nslots=10007)
        except OSError as exc:
            raise PanelError(f"{self.path} is not a readable HDF5 panel ({exc}); re-run rag_hpc.prepare") from None
        version = self._h5.attrs.get("format_version")
        if version != PANEL_FORMAT_VERSION:
            raise PanelError(
                f"{self.path} has panel format version {version}, this rag_hpc reads {PANEL_FORMAT_VERSION}: "
                "re-run rag_hpc.prepare"
            )

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> Panel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @cached_property
    def info(self) -> PanelInfo:
        gt = self._h5["calldata/GT"]
        return PanelInfo(
            path=self.path,
            source_sha256=str(self._h5.attrs["source_sha256"]),
            contig=str(self._h5.attrs["contig"]),
            n_sites=int(gt.shape[0]),
            n_samples=int(gt.shape[1]),
        )

    @property
    def n_sites(self) -> int:
        return self.info.n_sites

    @property
    def n_samples(self) -> int:
        return self.info.n_samples

    @property
    def n_haplotypes(self) -> int:
        return 2 * self.info.n_samples

    @cached_property
    def positions(self) -> np.ndarray:
        return self._h5["variants/POS"][:].astype(np.int64)

    @cached_property
    def ref(self) -> np.ndarray:
        return self._h5["variants/REF"][:]

    @cached_property
    def alt(self) -> np.ndarray:
        return self._h5["variants/ALT"][:]

    @cached_property
    def af(self) -> np.ndarray:
        return self._h5["variants/AF"][:].astype(np.float32)

    @cached_property
    def samples(self) -> np.ndarray:
        return self._h5["samples"][:].astype(str)

    @cached_property
    def populations(self) -> np.ndarray:
        return self._h5["sample_population"][:].astype(str)

    @cached_property
    def split(self) -> np.ndarray:
        return self._h5["split"][:]

    def split_digest(self) -> str:
        """A short content hash of the split, for cache keys: artifacts that depend on which
        haplotypes are reference must not survive a change of split."""
        return hashlib.sha256(self.split.tobytes()).hexdigest()[:16]

    def haplotype_split(self) -> np.ndarray:
        """Split label per haplotype; haplotype h belongs to sample h // 2."""
        return np.repeat(self.split, 2)

    def reference_haplotypes(self, seed: int = 0) -> np.ndarray:
        """Train-split haplotype ids in the order retrieval searches them.

        Exact ties are the common case when a window holds a dozen typed sites, and ties go to the
        earlier reference. Panels list samples population by population, so in panel order every
        tie would go to the first population (seen: 89 % of CEU/CHB targets copying YRI haplotypes).
        A fixed pseudo-random order, the same in every process, spreads tied picks over the panel.
        """
        ids = np.flatnonzero(self.haplotype_split() == SPLIT_TRAIN)
        keys = uniforms(seed, Stream.REFERENCE_ORDER, 0, ids.astype(np.uint64), 0, 1)[:, 0]
        return ids[np.argsort(keys, kind="stable")].astype(np.int64)

    def haplotypes_at(self, sites: np.ndarray, block: int = 4096) -> np.ndarray:
        """Alleles of every haplotype at the (increasing) ``sites``: uint8 [n_haplotypes, len(sites)], read
        ``block`` sites of the panel at a time."""
        parts = []
        for start in range(0, self.n_sites, block):
            lo, hi = np.searchsorted(sites, [start, start + block])
            if hi > lo:
                parts.append(self.haplotypes(start, min(start + block, self.n_sites))[:, sites[lo:hi] - start])
        return np.concatenate(parts, axis=1) if parts else np.zeros((self.n_haplotypes, 0), np.uint8)

    def haplotypes(self, start: int, stop: int) -> np.ndarray:
        """Alleles of every haplotype at sites [start, stop): uint8 [n_haplotypes, stop - start].

        Haplotype 2*s is sample s's first allele, 2*s + 1 its second.
        """
        gt = self._h5["calldata/GT"][start:stop]  # [L, n_samples, 2]
        return np.ascontiguousarray(gt.reshape(gt.shape[0], -1).T).astype(np.uint8, copy=False)
