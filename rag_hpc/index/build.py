"""Per-window artifacts: the panel shard and a FAISS index over the run's array sites.

``build_windows(config, window_ids)`` is what one index-prebuild array task runs. Everything a
window's artifacts depend on is in their cache keys, so a rerun skips exactly the windows that are
complete and valid (every checksum verified), and artifacts of different inputs can never overwrite one
another. A corrupted artifact is reported (one warning line naming it) and rebuilt.

Shard: alleles of every panel haplotype, bit-packed along sites (1 bit per haplotype per site),
with positions and AF; training, validation and every predictor read them. Index: the train-split
(reference) haplotypes on the run's array sites (the target VCF's, else the simulated array's), as
compact vectors of one float per typed site (DESIGN.md §2), uniform site weights: exact Hamming kNN on
the array. Known gap (issue #10, item 2): no pipeline stage reads this index yet — the model and the copy
predictor read Li–Stephens donor tables (``rag_hpc.index.donors``) and the nearest baseline searches the
shard directly; it is to become the HMM's candidate prefilter or go.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from rag_hpc.config import RagConfig
from rag_hpc.data.masks import simulated_array, sites_digest
from rag_hpc.data.panel import SPLIT_TRAIN, Panel
from rag_hpc.data.windows import Window, make_windows
from rag_hpc.errors import ConfigError, InputError
from rag_hpc.index.cache import Artifact, ArtifactStore
from rag_hpc.index.retrieval import FixedMaskIndex

SHARD = "shard"
INDEX = "index"

log = logging.getLogger("rag_hpc.index")


@dataclass(frozen=True)
class Shard:
    window: Window
    alleles: np.ndarray  # uint8 [n_haplotypes, L], 0 = REF, 1 = ALT
    positions: np.ndarray  # int64 [L]
    af: np.ndarray  # float32 [L]


@dataclass
class WindowResult:
    window_id: int
    status: Literal["built", "cached"]
    built: list[str] = field(default_factory=list)  # artifact names built in this call
    seconds: float = 0.0


def _panel_fields(panel: Panel, window: Window, config: RagConfig) -> dict[str, Any]:
    return {
        "panel_sha256": panel.info.source_sha256,
        "split": panel.split_digest(),
        "window": [window.id, window.start, window.stop],
        "window_size": config.windows.window_size,
    }


def shard_artifact(panel: Panel, window: Window, config: RagConfig) -> Artifact:
    return Artifact(SHARD, _panel_fields(panel, window, config))


def index_artifact(
    panel: Panel, window: Window, config: RagConfig, mask_spec: dict[str, Any], weights: np.ndarray | None = None
) -> Artifact:
    weights_id = "uniform" if weights is None else hashlib.sha256(np.ascontiguousarray(weights, np.float32)).hexdigest()
    return Artifact(
        INDEX,
        {
            **_panel_fields(panel, window, config),
            "mask": mask_spec,
            "reference": "train",
            "weights": weights_id,
            "index": {"kind": config.index.kind, "nlist": config.index.nlist},
        },
    )


def _shard_bytes(shard: Shard) -> bytes:
    buf = io.BytesIO()
    np.savez(
        buf,
        alleles=np.packbits(shard.alleles, axis=1),
        length=np.int64(shard.window.length),
        positions=shard.positions,
        af=shard.af,
    )
    return buf.getvalue()


def _shard_from_bytes(window: Window, data: bytes) -> Shard:
    with np.load(io.BytesIO(data)) as npz:
        length = int(npz["length"])
        alleles = np.unpackbits(npz["alleles"], axis=1, count=length)
        return Shard(window, alleles, npz["positions"], npz["af"])


def _make_shard(panel: Panel, window: Window) -> Shard:
    return Shard(
        window,
        panel.haplotypes(window.start, window.stop),
        panel.positions[window.start : window.stop],
        panel.af[window.start : window.stop],
    )


def _make_index(
    shard: Shard, panel: Panel, observed: np.ndarray, config: RagConfig, weights: np.ndarray | None
) -> FixedMaskIndex:
    reference = shard.alleles[panel.haplotype_split() == SPLIT_TRAIN]
    return FixedMaskIndex.from_config(reference, observed, config.index, weights=weights)


class WindowCache:
    """The window artifacts of one panel under one config: build, check, load."""

    def __init__(self, config: RagConfig, panel: Panel | None = None):
        self.config = config
        self.panel = panel if panel is not None else Panel(config.panel_h5)
        self.store = ArtifactStore(config.paths.cache)
        self.windows = make_windows(self.panel.n_sites, config.windows.window_size)
        self._target_observed: np.ndarray | bool | None = False  # False = not computed yet
        self._array: np.ndarray | None = None

    # -- fixed masks the config declares ---------------------------------------------------

    def target_observed(self) -> np.ndarray | None:
        """Panel sites typed in the target VCF (bool [n_sites]), or None without targets."""
        if self._target_observed is False:
            self._target_observed = None
            if self.config.data.targets_vcf is not None:
                from rag_hpc.data.vcf import target_panel_sites

                self._target_observed = target_panel_sites(self.panel, self.config.data.targets_vcf)
        return self._target_observed  # type: ignore[return-value]

    def array_sites(self) -> np.ndarray:
        """The run's typed sites (panel indices, increasing): the target VCF's when the config names one,
        else the simulated array. Training and validation queries see these sites only."""
        if self._array is None:
            typed = self.target_observed()
            self._array = (
                np.flatnonzero(typed).astype(np.int64) if typed is not None else simulated_array(self.config.masks, self.panel.af)
            )
        return self._array

    def fixed_masks(self, window: Window) -> dict[str, tuple[dict[str, Any], np.ndarray]]:
        """name -> (mask spec for the key, observed sites bool [L]) for the run's array where it types at
        least one site of this window (with none there is nothing to search on)."""
        observed = window.observed(self.array_sites())
        if not observed.any():
            return {}
        return {"array": ({"kind": "sites", "sites_sha256": sites_digest(np.flatnonzero(observed))}, observed)}

    def artifacts(self, window: Window) -> dict[str, Artifact]:
        out = {"shard": shard_artifact(self.panel, window, self.config)}
        for name, (spec, _) in self.fixed_masks(window).items():
            out[f"index:{name}"] = index_artifact(self.panel, window, self.config, spec)
        return out

    # -- building ----------------------------------------------------------------------------

    def build(self, window_ids: Iterable[int] | None = None, progress: bool = True) -> list[WindowResult]:
        ids = list(range(len(self.windows))) if window_ids is None else list(window_ids)
        bad = [i for i in ids if not 0 <= i < len(self.windows)]
        if bad:
            raise ConfigError(
                f"window ids {bad} out of range: this panel has {len(self.windows)} windows (0..{len(self.windows) - 1})"
            )
        self.store.sweep_stale()  # temporaries of writers killed mid-commit on this host
        results = []
        for wid in tqdm(ids, desc="windows", unit="win", disable=not progress, leave=False):
            results.append(self._build_one(self.windows[wid]))
        return results

    def _build_one(self, window: Window) -> WindowResult:
        t0 = time.perf_counter()
        artifacts = self.artifacts(window)
        missing = []
        for name, art in artifacts.items():
            why = self.store.problem(art, checksums=True)
            if why is None:
                continue
            if why != "missing":
                log.warning("window %d: %s artifact %s is invalid: %s; rebuilding it", window.id, name, self.store.path(art), why)
            missing.append(name)
        if not missing:
            return WindowResult(window.id, "cached", seconds=time.perf_counter() - t0)
        built = []
        shard: Shard | None = None
        masks = self.fixed_masks(window)
        for name in missing:
            art = artifacts[name]
            with self.store.lock(art):
                if self.store.problem(art, checksums=True) is None:
                    continue  # another task published it while we waited
                if shard is None:
                    shard = _make_shard(self.panel, window)
                if name == "shard":
                    self.store.commit(art, {"shard.npz": _shard_bytes(shard)})
                else:
                    observed = masks[name.split(":", 1)[1]][1]
                    index = _make_index(shard, self.panel, observed, self.config, None)
                    self.store.commit(art, {"index.bin": index.to_bytes()})
                built.append(name)
        status: Literal["built", "cached"] = "built" if built else "cached"
        return WindowResult(window.id, status, built, time.perf_counter() - t0)

    # -- loading (what training and imputation call) ----------------------------------------

    def shard(self, window_id: int) -> Shard:
        """The window's shard, checksum-verified; rebuilt first if missing or corrupt."""
        window = self.windows[window_id]
        art = shard_artifact(self.panel, window, self.config)
        files = self.store.read(art)
        if files is None:
            with self.store.lock(art):
                files = self.store.read(art)
                if files is None:
                    self.store.commit(art, {"shard.npz": _shard_bytes(_make_shard(self.panel, window))})
                    files = self.store.read(art)
        if files is None:
            raise RuntimeError(
                f"shard of window {window_id} failed its checksum right after being written at {self.store.path(art)}"
            )
        try:
            return _shard_from_bytes(window, files["shard.npz"])
        except (ValueError, KeyError, zipfile.BadZipFile) as exc:  # np.load refuses pickled objects with ValueError
            raise self._altered(f"shard of window {window_id}", art, exc) from None

    def fixed_index(self, window_id: int, mask: str, weights: np.ndarray | None = None) -> FixedMaskIndex:
        """The FAISS index of ``mask`` ('array') over the reference haplotypes,
        built for ``weights`` (None = uniform); checksum-verified, rebuilt if missing or corrupt."""
        window = self.windows[window_id]
        masks = self.fixed_masks(window)
        if mask not in masks:
            raise KeyError(f"window {window_id} has no fixed mask {mask!r} (has: {sorted(masks)})")
        spec, observed = masks[mask]
        art = index_artifact(self.panel, window, self.config, spec, weights)
        files = self.store.read(art)
        if files is None:
            with self.store.lock(art):
                files = self.store.read(art)
                if files is None:
                    index = _make_index(self.shard(window_id), self.panel, observed, self.config, weights)
                    self.store.commit(art, {"index.bin": index.to_bytes()})
                    return index
        try:
            return FixedMaskIndex.from_bytes(files["index.bin"], device=self.config.index.device, nprobe=self.config.index.nprobe)
        except (ValueError, KeyError) as exc:
            raise self._altered(f"{mask} index of window {window_id}", art, exc) from None

    def _altered(self, what: str, art: Artifact, exc: Exception) -> InputError:
        """A cached artifact whose bytes match its manifest but do not load: someone rewrote both."""
        where = self.store.path(art)
        return InputError(
            f"cache {what} at {where} does not load ({exc}): it was not written by rag_hpc or was altered; "
            f"remove {where} (or the whole paths.cache_dir) and rerun to rebuild it"
        )


@dataclass(frozen=True)
class PrebuildResult:
    windows: list[WindowResult]
    donor_parts_built: int
    donor_parts_cached: int


def build_windows(config: RagConfig, window_ids: Iterable[int] | None = None, progress: bool = True) -> list[WindowResult]:
    """Build (or skip, when cached and valid) every artifact of the given windows."""
    with Panel(config.panel_h5) as panel:
        return WindowCache(config, panel).build(window_ids, progress=progress)


def prebuild(config: RagConfig, window_ids: Iterable[int] | None = None, progress: bool = True) -> PrebuildResult:
    """What one index-prebuild task does: the given windows' artifacts (``WindowCache.build``), then the
    donor-table parts that go with them (``rag_hpc.index.donors.parts_of_windows``); both skip what is
    cached and valid."""
    from rag_hpc.index.donors import build_panel_donors, parts_of_windows

    with Panel(config.panel_h5) as panel:
        cache = WindowCache(config, panel)
        results = cache.build(window_ids, progress=progress)
        built, cached = build_panel_donors(cache, parts_of_windows(cache, [r.window_id for r in results]))
        return PrebuildResult(results, built, cached)
