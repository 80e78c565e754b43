"""Per-window artifact: the panel shard, the one thing training, validation and every predictor read per window.

``build_windows(config, window_ids)`` is the window half of an index-prebuild array task; ``prebuild`` adds
the task's donor-table parts (``rag_hpc.index.donors``). A shard is a window's alleles in the layout its
readers use — [haplotypes, sites], bit-packed along sites, with positions and AF — so training's epochs and
restarts read 1 bit per allele, checksum-verified, instead of decoding panel.h5's compressed site-major
chunks again. Nothing else is precomputed per window: retrieval is the donor tables (the Li–Stephens HMM
over all typed sites, which no per-window index can answer), and the nearest baseline searches a shard's
alleles directly (``rag_hpc.index.retrieval``).

Everything a shard depends on is in its cache key, so a rerun skips exactly the windows whose shard is
complete and valid (every checksum verified), and shards of different inputs can never overwrite one
another. A corrupted shard is reported (one warning line naming it) and rebuilt.
"""

from __future__ import annotations

# rag_hpc.index.donors imports this module: prebuild imports it in turn where it runs.
import io
import logging
import os
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from rag_hpc.config import RagConfig
from rag_hpc.data.masks import simulated_array
from rag_hpc.data.panel import Panel
from rag_hpc.data.targets import PanelOverlap, TargetSites, checked_against_panel, match_targets, panel_overlap
from rag_hpc.data.windows import Window, make_windows
from rag_hpc.errors import ConfigError, InputError
from rag_hpc.index.cache import Artifact, ArtifactStore

SHARD = "shard"
OVERLAP = "overlap"  # whether the targets' samples are panel samples (``WindowCache.match``)

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


class WindowCache:
    """The window artifacts of one panel under one config: build, check, load."""

    def __init__(self, config: RagConfig, panel: Panel | None = None):
        if config.data.chromosomes is not None:
            raise ConfigError(
                "a window cache is one chromosome's: this config lists data.chromosomes "
                f"({', '.join(config.data.chromosomes)}); run per chromosome (RagConfig.chromosome / --chromosome)"
            )
        self.config = config
        self.panel = panel if panel is not None else Panel(config.panel_h5)
        self.store = ArtifactStore(config.paths.cache)
        self.windows = make_windows(self.panel.n_sites, config.windows.window_size)
        self._targets: TargetSites | bool | None = False  # False = not read yet
        self._array: np.ndarray | None = None

    # -- the run's typed sites -----------------------------------------------------------------

    def targets(self) -> TargetSites | None:
        """The config's targets matched to the panel (``data.ambiguous`` policy), or None without targets."""
        if self._targets is False:
            self._targets = None
            data = self.config.data
            if data.targets_vcf is not None:
                self._targets = self.match(data.targets_vcf)
        return self._targets  # type: ignore[return-value]

    def match(self, targets_vcf: str | os.PathLike[str]) -> TargetSites:
        """Targets matched to the panel (``data.ambiguous``) and checked against its samples
        (``data.panel_overlap``: refused, or their own haplotypes excluded from the donors). Whether target
        samples are panel samples is computed once per panel and targets content, as a cache artifact:
        it reads the panel at every typed site (seconds at chromosome scale), and every job of a run asks."""
        data = self.config.data
        targets = match_targets(self.panel, targets_vcf, ambiguous=data.ambiguous, skip_non_snps=data.skip_non_snps)
        art = Artifact(OVERLAP, {"format": 1, "panel_sha256": self.panel.info.source_sha256, "targets_sha256": targets.digest()})
        files = self.store.read(art)
        if files is None:
            with self.store.lock(art):
                files = self.store.read(art)
                if files is None:
                    files = {"overlap.json": panel_overlap(self.panel, targets).to_json()}
                    self.store.commit(art, files)
        overlap = PanelOverlap.from_json(files["overlap.json"])
        return checked_against_panel(self.panel, targets, overlap, data.panel_overlap, str(targets_vcf))

    def array_sites(self) -> np.ndarray:
        """The run's typed sites (panel indices, increasing): the targets' sites as imputation will use them
        when the config names targets, else the simulated array. Training and validation queries see these
        sites only."""
        if self._array is None:
            targets = self.targets()
            self._array = targets.panel_index if targets is not None else simulated_array(self.config.masks, self.panel.af)
        return self._array

    def artifacts(self, window: Window) -> dict[str, Artifact]:
        """name -> artifact of what the prebuild keeps per window: the shard alone (donor-table parts belong
        to a task, not a window: ``rag_hpc.index.donors.part_artifacts``)."""
        return {SHARD: shard_artifact(self.panel, window, self.config)}

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
        art = shard_artifact(self.panel, window, self.config)
        why = self.store.problem(art, checksums=True)
        if why is None:
            return WindowResult(window.id, "cached", seconds=time.perf_counter() - t0)
        if why != "missing":
            log.warning("window %d: %s artifact %s is invalid: %s; rebuilding it", window.id, SHARD, self.store.path(art), why)
        with self.store.lock(art):
            if self.store.problem(art, checksums=True) is None:  # another task published it while we waited
                return WindowResult(window.id, "cached", seconds=time.perf_counter() - t0)
            self._commit_shard(art, window)
        return WindowResult(window.id, "built", [SHARD], time.perf_counter() - t0)

    def _commit_shard(self, art: Artifact, window: Window) -> None:
        self.store.commit(art, {"shard.npz": _shard_bytes(_make_shard(self.panel, window))})

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
                    self._commit_shard(art, window)
                    files = self.store.read(art)
        if files is None:
            raise RuntimeError(
                f"shard of window {window_id} failed its checksum right after being written at {self.store.path(art)}"
            )
        try:
            return _shard_from_bytes(window, files["shard.npz"])
        except (ValueError, KeyError, zipfile.BadZipFile) as exc:  # np.load refuses pickled objects with ValueError
            raise self._altered(f"shard of window {window_id}", art, exc) from None

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
    from rag_hpc.index.donors import build_donors, parts_of_windows

    with Panel(config.panel_h5) as panel:
        cache = WindowCache(config, panel)
        results = cache.build(window_ids, progress=progress)
        built, cached = build_donors(cache, parts_of_windows(cache, [r.window_id for r in results]))
        return PrebuildResult(results, built, cached)
