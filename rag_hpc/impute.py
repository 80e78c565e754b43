"""Imputation: phased array targets -> an imputed VCF (GT:DS:GP) at every panel site.

``python -m rag_hpc.impute (--checkpoint CKPT | --baseline copy|nearest) --targets targets.vcf.gz --out imputed.vcf.gz``

The driver (``impute``) owns everything that is not the model: reading and checking the targets, matching
their sites to the panel, building each window's query haplotypes, and writing the VCF. What fills the
unobserved sites is a pluggable ``HaplotypePredictor`` that returns P(ALT) per target haplotype and site,
one window at a time: the trained model (``load_model_predictor``), the match-weighted copy
(``CopyPredictor``) or the nearest-haplotype baseline (``NearestHaplotypePredictor``), so all are scored
through exactly the same code path.

Output per site: GT phased (each haplotype's more probable allele), DS = p1 + p2, GP from the two
haplotype probabilities (haplotypes treated as independent, as Beagle and Minimac do); INFO AF (mean DS / 2),
DR2 (the Beagle/Minimac estimate of dosage r²: variance of DS over its HWE variance 2 AF (1 - AF)) and a
TYPED or IMP flag. Typed sites keep the target's alleles. The file is bgzipped and tabix-indexed, written
under a temporary name and renamed, so a failure at any point leaves no output (and any older output
untouched): the predecessor exited 0 without a file after swallowing a writer error.
"""

from __future__ import annotations

# torch, the model, the index and the phasing stage are imported by what uses them: the nearest and copy
# predictors, the CLI's input errors and the merge job run without torch.
import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np

from rag_hpc.cli import add_config_args, command_parser, config_from_args, run_main
from rag_hpc.config import DonorConfig, RagConfig
from rag_hpc.data.targets import TargetSites
from rag_hpc.data.vcf import ImputedVcfWriter, imputed_records, is_phased
from rag_hpc.errors import ConfigError, InputError
from rag_hpc.index.cache import Artifact, ArtifactStore

if TYPE_CHECKING:
    from rag_hpc.data.panel import Panel
    from rag_hpc.data.windows import Window
    from rag_hpc.index.build import WindowCache
    from rag_hpc.index.donors import DonorTable


@runtime_checkable
class HaplotypePredictor(Protocol):
    """Fills one window: P(ALT) for each query haplotype at each of the window's panel sites.

    Optional: ``begin(targets)``, run once before the windows (the predictors here read the targets' donor
    table); ``identity() -> dict``, what its output depends on, which keys the ranges the imputation array
    writes (``impute_range``)."""

    def predict_window(self, window_id: int, query: np.ndarray, observed: np.ndarray) -> np.ndarray:
        """query uint8 [B, L]: alleles at the window's panel sites (0 where unobserved); observed bool [L]:
        the window's typed sites. Returns float [B, L] in [0, 1]. Values at observed sites are ignored
        (the driver keeps the typed alleles)."""
        ...


# ------------------------------------------------------------------------------------------------
# the baseline predictor


class NearestHaplotypePredictor:
    """Each target haplotype copies its nearest reference haplotype in the window (Hamming distance on the
    observed sites, ties to the lower index as ``masked_topk`` breaks them); with ``k`` > 1 it averages the
    k nearest, which gives calibrated-ish probabilities instead of hard 0/1 copies.

    Reference = the panel's train split, the same haplotypes the model retrieves from. A window with no
    observed site puts every reference at distance 0; rather than copy whichever happens to be first, it
    predicts the train-split allele frequency (the average over all of them, the k = N limit).
    """

    name = "nearest"

    def __init__(self, cache: WindowCache, k: int = 1):
        if k < 1:
            raise ConfigError(f"--k must be >= 1, got {k}")
        self.cache = cache
        self.k = k
        self._reference = cache.panel.reference_haplotypes()
        if self._reference.size < k:
            raise ConfigError(f"--k {k} but the panel's train split has only {self._reference.size} haplotypes: lower --k")

    @classmethod
    def from_config(cls, config: RagConfig, k: int = 1, panel: Panel | None = None) -> NearestHaplotypePredictor:
        from rag_hpc.index.build import WindowCache

        return cls(WindowCache(config, panel), k)

    def identity(self) -> dict[str, object]:
        return {"method": "nearest", "k": self.k}

    def predict_window(self, window_id: int, query: np.ndarray, observed: np.ndarray) -> np.ndarray:
        import torch

        from rag_hpc.index.retrieval import masked_topk

        reference = self.cache.shard(window_id).alleles[self._reference]  # uint8 [N, L]
        if not observed.any():
            return np.broadcast_to(reference.mean(axis=0, dtype=np.float64), query.shape).astype(np.float32)
        # Unobserved sites add nothing to any distance: searching on the observed columns alone gives the
        # same distances and ties, with a GEMM ~L / n_observed times smaller.
        sites = np.flatnonzero(observed)
        _, idx = masked_topk(
            torch.from_numpy(np.ascontiguousarray(query[:, sites])),
            torch.ones(sites.size, dtype=torch.bool),
            torch.from_numpy(np.ascontiguousarray(reference[:, sites])),
            torch.ones(sites.size, dtype=torch.float64),
            self.k,
        )
        return reference[idx.numpy()].mean(axis=1, dtype=np.float32)  # [B, k, L] -> [B, L]


class CopyPredictor:
    """Copy without a model: at an untyped site, each target haplotype's P(ALT) is the mean of its donors'
    alleles there, weighted by their Li–Stephens posterior copying probabilities over all the targets'
    typed sites (``rag_hpc.index.donors``: the model Minimac and Beagle rest on), ``k`` heaviest donors per
    gap between typed sites (default ``model.k``). ``ne`` sets the jump rate (1 cM/Mb without a map),
    ``error`` the copying error; defaults from ``donors`` in the config, chosen on the simulated kgp-like
    panel (README). Reference = the
    panel's train split, as for the other predictors. What the model starts from: an untrained model with
    the same donors predicts exactly this.
    """

    name = "copy"

    def __init__(self, cache: WindowCache, donors: DonorConfig, k: int):
        if k < 1:
            raise ConfigError(f"copy: k must be >= 1, got {k}")
        self.cache, self.donor_cfg, self.k = cache, donors, k
        self._reference = cache.panel.reference_haplotypes()
        self._table: DonorTable | None = None

    @classmethod
    def from_config(
        cls,
        config: RagConfig,
        panel: Panel | None = None,
        *,
        ne: float | None = None,
        error: float | None = None,
        k: int | None = None,
    ) -> CopyPredictor:
        from rag_hpc.index.build import WindowCache

        given = {name: value for name, value in (("ne", ne), ("error", error)) if value is not None}
        try:
            donors = DonorConfig(**{**config.donors.model_dump(), **given})
        except ValueError as exc:
            raise ConfigError(f"copy: {exc}") from None
        return cls(WindowCache(config, panel), donors, config.model.k if k is None else k)

    def describe(self) -> str:
        return f"li-stephens (ne {self.donor_cfg.ne:g}, error {self.donor_cfg.error:g}, k {self.k})"

    def identity(self) -> dict[str, object]:
        return {"method": "copy", "ne": self.donor_cfg.ne, "error": self.donor_cfg.error, "k": self.k}

    def begin(self, targets: TargetSites) -> None:
        """The targets' donor table: the prebuilt one when the run's prebuild computed it for these targets."""
        from rag_hpc.index.donors import read_donors, target_queries

        self._table = read_donors(self.cache, target_queries(targets), self.donor_cfg, self.k)

    def predict_window(self, window_id: int, query: np.ndarray, observed: np.ndarray) -> np.ndarray:
        if self._table is None:
            raise RuntimeError("CopyPredictor.begin(targets) must run before predict_window")
        import torch

        from rag_hpc.model.rag import donor_sums

        reference = torch.from_numpy(self.cache.shard(window_id).alleles[self._reference]).float()
        donors, weights, gaps = (torch.from_numpy(a) for a in self._table.window(self.cache.windows[window_id], slice(None)))
        return donor_sums(weights[None], donors, reference, gaps)[0].clamp(0.0, 1.0).numpy()


def load_model_predictor(checkpoint: str | os.PathLike[str], config: RagConfig) -> HaplotypePredictor:
    """The trained model as a ``HaplotypePredictor``."""
    from rag_hpc.model.predict import model_predictor

    return model_predictor(checkpoint, config)


# ------------------------------------------------------------------------------------------------
# the driver


@dataclass
class ImputeSummary:
    out: Path
    n_samples: int
    n_panel_sites: int
    n_windows: int
    n_typed_sites: int
    targets: TargetSites = field(repr=False)
    seconds: float = 0.0

    def describe(self) -> str:
        return (
            f"{self.out}: {self.n_panel_sites:,} sites ({self.n_typed_sites:,} typed) x {self.n_samples:,} samples, "
            f"{self.n_windows:,} windows in {self.seconds:.1f} s\n  targets: {self.targets.describe()}"
        )


def _check_prediction(p: np.ndarray, shape: tuple[int, int], window_id: int, predictor: object) -> np.ndarray:
    p = np.asarray(p)
    who = type(predictor).__name__
    if p.shape != shape:
        raise ValueError(
            f"{who}.predict_window({window_id}) returned shape {p.shape}, expected {shape} (haplotypes x window sites)"
        )
    if not np.isfinite(p).all():
        raise ValueError(f"{who}.predict_window({window_id}) returned NaN or infinite probabilities")
    lo, hi = float(p.min()), float(p.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"{who}.predict_window({window_id}) returned values in [{lo:g}, {hi:g}]; expected P(ALT) in [0, 1]")
    return np.clip(p, 0.0, 1.0)


@dataclass
class _Prepared:
    """Targets matched, predictor begun: what every window of an imputation reads."""

    panel: Panel
    targets: TargetSites
    windows: list[Window]
    header: list[str]


def _prepare(
    config: RagConfig, predictor: HaplotypePredictor, targets_vcf: str | os.PathLike[str], panel: Panel, begin: bool
) -> _Prepared:
    from rag_hpc.data.windows import make_windows

    ambiguous = config.data.ambiguous
    from rag_hpc.index.build import WindowCache

    targets = WindowCache(config, panel).match(targets_vcf)
    if begin:
        _begin(predictor, targets)
    name = getattr(predictor, "name", type(predictor).__name__)
    header = [
        f"##rag_hpc_impute=<predictor={name},panel={panel.path.name},panel_sha256={panel.info.source_sha256},"
        f"window_size={config.windows.window_size},ambiguous={ambiguous}>"
    ]
    return _Prepared(panel, targets, make_windows(panel.n_sites, config.windows.window_size), header)


def _begin(predictor: HaplotypePredictor, targets: TargetSites) -> None:
    """Predictors whose evidence reaches beyond the window take all typed sites first."""
    start = getattr(predictor, "begin", None)
    if start is not None:
        start(targets)


def _window_records(prep: _Prepared, predictor: HaplotypePredictor, window: Window) -> bytes:
    """The VCF records of one window: the predictor's P(ALT), the typed sites keeping the targets' alleles."""
    targets, panel = prep.targets, prep.panel
    lo, hi = np.searchsorted(targets.panel_index, [window.start, window.stop])
    local = targets.panel_index[lo:hi] - window.start
    observed = np.zeros(window.length, bool)
    observed[local] = True
    query = np.zeros((targets.haplotypes.shape[0], window.length), np.uint8)
    query[:, local] = targets.haplotypes[:, lo:hi]
    raw = predictor.predict_window(window.id, query.copy(), observed.copy())
    prob = _check_prediction(raw, query.shape, window.id, predictor).astype(np.float64, copy=True)
    prob[:, local] = query[:, local]
    sl = slice(window.start, window.stop)
    return imputed_records(panel.info.contig, panel.positions[sl], panel.ref[sl], panel.alt[sl], prob, observed)


def _out_path(out_vcf: str | os.PathLike[str]) -> Path:
    """The output VCF's path, refused before any work when it is not named as bgzipped."""
    out = Path(out_vcf)
    if not out.name.endswith(".vcf.gz"):
        raise InputError(f"--out {out}: the imputed VCF is bgzipped, name it *.vcf.gz")
    return out


def _writer(out: Path, prep: _Prepared) -> ImputedVcfWriter:
    out.parent.mkdir(parents=True, exist_ok=True)
    return ImputedVcfWriter(
        out, contig=prep.panel.info.contig, samples=prep.targets.samples, source="rag_hpc.impute", extra_header=prep.header
    )


def _summary(out: Path, prep: _Prepared, t0: float) -> ImputeSummary:
    return ImputeSummary(
        out=out,
        n_samples=len(prep.targets.samples),
        n_panel_sites=prep.panel.n_sites,
        n_windows=len(prep.windows),
        n_typed_sites=int(prep.targets.panel_index.size),
        targets=prep.targets,
        seconds=time.perf_counter() - t0,
    )


@contextlib.contextmanager
def _open_panel(config: RagConfig, panel: Panel | None) -> Iterator[Panel]:
    from rag_hpc.data.panel import Panel

    if panel is not None:
        yield panel
        return
    with Panel(config.panel_h5) as own:
        yield own


def impute(
    config: RagConfig,
    predictor: HaplotypePredictor,
    targets_vcf: str | os.PathLike[str],
    out_vcf: str | os.PathLike[str],
    *,
    panel: Panel | None = None,
    progress: bool = False,
) -> ImputeSummary:
    """Impute phased targets at every panel site with ``predictor`` and write ``out_vcf`` (+ .tbi).

    The panel is ``panel`` or ``config.panel_h5``; windows are ``config.windows.window_size`` sites, the
    same as training's; strand-ambiguous sites follow ``data.ambiguous``. Every check on the inputs runs
    before the output is opened; an error at any later point (a predictor failure, a full disk, Ctrl-C)
    removes the partial output and propagates.
    """
    from tqdm import tqdm

    t0, out = time.perf_counter(), _out_path(out_vcf)
    with _open_panel(config, panel) as panel:
        prep = _prepare(config, predictor, targets_vcf, panel, begin=True)
        with _writer(out, prep) as writer:
            for window in tqdm(prep.windows, desc="impute", unit="win", disable=not progress, leave=False):
                records = _window_records(prep, predictor, window)
                writer.write_records(
                    records, int(panel.positions[window.start]), int(panel.positions[window.stop - 1]), window.length
                )
        return _summary(out, prep, t0)


# ------------------------------------------------------------------------------------------------
# imputation in ranges of windows: the cluster's imputation array and its merge job

PART = "imputed"
PART_FORMAT = 1


def parts_store(config: RagConfig) -> ArtifactStore:
    """Where a run's imputed ranges live: beside its checkpoints, since the model they come from is the run's."""
    return ArtifactStore(config.train.resolved_run_dir(config.paths.workdir) / "imputed-ranges")


def _part_artifact(config: RagConfig, prep: _Prepared, predictor: HaplotypePredictor, window_ids: Sequence[int]) -> Artifact:
    identity = getattr(predictor, "identity", None)
    if identity is None:
        raise TypeError(f"{type(predictor).__name__} has no identity(): its ranges could not be told apart from another's")
    panel = prep.panel
    return Artifact(
        PART,
        {
            "format": PART_FORMAT,
            "panel_sha256": panel.info.source_sha256,
            "split": panel.split_digest(),
            "window_size": config.windows.window_size,
            "windows": [min(window_ids), max(window_ids)],
            "targets_sha256": prep.targets.digest(),
            "samples": prep.targets.samples,
            "header": prep.header,
            "predictor": identity(),
        },
    )


def impute_range(
    config: RagConfig,
    predictor: HaplotypePredictor,
    targets_vcf: str | os.PathLike[str],
    window_ids: Sequence[int],
    *,
    panel: Panel | None = None,
) -> Literal["built", "cached"]:
    """One imputation task: the records of the consecutive windows ``window_ids``, committed atomically
    as one content-addressed part (predictor, targets, windows); a valid part already there is kept."""
    import zlib

    ids = sorted(window_ids)
    if ids != list(range(ids[0], ids[-1] + 1)):
        raise ValueError(f"impute_range: windows must be consecutive, got {ids}")
    store = parts_store(config)
    with _open_panel(config, panel) as panel:
        prep = _prepare(config, predictor, targets_vcf, panel, begin=False)
        art = _part_artifact(config, prep, predictor, ids)
        if store.problem(art, checksums=True) is None:
            return "cached"
        with store.lock(art):
            if store.problem(art, checksums=True) is None:
                return "cached"
            _begin(predictor, prep.targets)
            records = b"".join(_window_records(prep, predictor, prep.windows[w]) for w in ids)
            store.commit(art, {"records.gz": zlib.compress(records, 1)})
    return "built"


def merge_ranges(
    config: RagConfig,
    predictor: HaplotypePredictor,
    targets_vcf: str | os.PathLike[str],
    out_vcf: str | os.PathLike[str],
    ranges: Sequence[Sequence[int]],
    *,
    panel: Panel | None = None,
) -> ImputeSummary:
    """The merge job: the parts of ``ranges`` (together every window, in order) into one imputed VCF,
    byte for byte what ``impute`` writes in one process. A part missing or invalid is an error naming it."""
    import zlib

    t0, out, store = time.perf_counter(), _out_path(out_vcf), parts_store(config)
    with _open_panel(config, panel) as panel:
        prep = _prepare(config, predictor, targets_vcf, panel, begin=False)
        ids = sorted(w for r in ranges for w in r)
        if ids != list(range(len(prep.windows))):
            raise ValueError(f"merge_ranges: the ranges cover windows {ids[:3]}...{ids[-3:]}, not all {len(prep.windows)}")
        arts = [(sorted(r), _part_artifact(config, prep, predictor, r)) for r in sorted(ranges, key=min)]
        problems = [(r, a, store.problem(a, checksums=True)) for r, a in arts]
        bad = [f"windows {r[0]}-{r[-1]} ({why}: {store.path(a)})" for r, a, why in problems if why is not None]
        if bad:
            raise InputError(
                f"cannot merge: {len(bad)} imputed range(s) missing or invalid: {'; '.join(bad[:3])}"
                f"{' ...' if len(bad) > 3 else ''}; rerun the imputation array (a relaunch redoes only these ranges)"
            )
        with _writer(out, prep) as writer:
            for r, art in arts:
                files = store.read(art)
                if files is None:
                    raise InputError(f"imputed range windows {r[0]}-{r[-1]} changed while merging: {store.path(art)}; rerun")
                first, last = prep.windows[r[0]], prep.windows[r[-1]]
                writer.write_records(
                    zlib.decompress(files["records.gz"]),
                    int(panel.positions[first.start]),
                    int(panel.positions[last.stop - 1]),
                    last.stop - first.start,
                )
        return _summary(out, prep, t0)


# ------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "impute",
        "Impute phased array targets at every panel site and write a bgzipped, tabix-indexed VCF with "
        "GT:DS:GP (INFO AF, DR2, TYPED/IMP). Targets are matched to the panel by position and alleles (REF/ALT swaps "
        "and strand flips are fixed, strand-ambiguous A/T and C/G sites are skipped). Bad input stops with one "
        "'error:' line; no partial output is ever left.",
        epilog="With --checkpoint, the window geometry, model, retrieval (donors.ne, donors.error) and masks are the "
        "checkpoint's (a --set that contradicts one is refused), and the panel, targets and cache are its run's unless "
        "--panel, --targets or --set name others: `--checkpoint RUN --out O` imputes the run's targets from any "
        "directory. Without one, the panel is data.panel_h5 (else <workdir>/panel.h5).",
    )
    method = parser.add_mutually_exclusive_group()
    method.add_argument(
        "--checkpoint",
        type=Path,
        help="trained model checkpoint (rag_hpc.train), or a run directory: its newest valid checkpoint",
    )
    method.add_argument(
        "--baseline",
        choices=["nearest", "copy"],
        help="no model, no GPU: 'nearest' copies the nearest reference haplotype(s) on the window's typed sites; 'copy' "
        "averages each target's Li–Stephens donors over all its typed sites, across window edges (much better: see README, "
        "Accuracy)",
    )
    parser.add_argument("--k", type=int, default=1, help="--baseline nearest: average the k nearest haplotypes (default 1)")
    parser.add_argument(
        "--ne", type=float, help="--baseline copy: Li–Stephens effective size, sets the jump rate (default: donors.ne, 1e6)"
    )
    parser.add_argument(
        "--error", type=float, help="--baseline copy: Li–Stephens copying error per typed site (default: donors.error, 0.01)"
    )
    parser.add_argument("--targets", type=Path, help="phased target VCF (.vcf.gz); default: data.targets_vcf")
    parser.add_argument(
        "--out", type=Path, required=True, help="imputed VCF to write (*.vcf.gz; a .tbi index is written beside it)"
    )
    parser.add_argument("--panel", type=Path, help="prepared panel HDF5 (default: data.panel_h5, else <workdir>/panel.h5)")
    parser.add_argument(
        "--ambiguous",
        choices=["skip", "keep"],
        help="strand-ambiguous A/T and C/G target sites: skip them or trust they are on the panel's strand "
        "(default: data.ambiguous, skip; a model is best given the sites its training array had)",
    )
    parser.add_argument(
        "--phase",
        action="store_true",
        help="phase the targets with Beagle 5.4 (impute=false) against the panel's train split first, with "
        "data.genetic_map when set; done anyway when the targets are unphased (rag_hpc.phase)",
    )
    parser.add_argument(
        "--exclude-panel-overlap",
        action="store_true",
        help="target samples that are panel samples (same ID, or genotypes agreeing at >= 99.5 %% of the typed sites) are "
        "imputed without their own haplotypes among the donors (default: refused, data.panel_overlap)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    add_config_args(parser, per_chromosome=True)
    return parser


def main(args: argparse.Namespace) -> int:
    from rag_hpc.data.panel import Panel

    # With a model: its window geometry, retrieval and masks, and its run's panel, targets and cache, from
    # the checkpoint; the command line may name other targets or another panel, never other settings.
    config = config_from_args(args, args.checkpoint)
    if args.panel is not None:
        config.data.panel_h5 = args.panel
    if args.ambiguous is not None:
        config.data.ambiguous = args.ambiguous
    if args.exclude_panel_overlap:
        config.data.panel_overlap = "exclude"
    targets = args.targets if args.targets is not None else config.data.targets_vcf
    if targets is None:
        raise ConfigError("no targets: pass --targets TARGETS.vcf.gz (or set data.targets_vcf)")
    if args.checkpoint is None and args.baseline is None:
        raise ConfigError("nothing to impute with: pass --checkpoint CKPT (a trained model) or --baseline copy|nearest")
    with Panel(config.panel_h5) as panel:
        from rag_hpc.phase import phase_targets

        if args.phase or not is_phased(targets):
            targets = phase_targets(config, targets)
        if args.checkpoint is not None:
            predictor: HaplotypePredictor = load_model_predictor(args.checkpoint, config)
        elif args.baseline == "copy":
            predictor = CopyPredictor.from_config(config, panel=panel, ne=args.ne, error=args.error)
        else:
            predictor = NearestHaplotypePredictor.from_config(config, k=args.k, panel=panel)
        summary = impute(
            config,
            predictor,
            targets,
            args.out,
            panel=panel,
            progress=not args.quiet and sys.stderr.isatty(),
        )
    if not args.quiet:
        print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
