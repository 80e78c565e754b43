"""The simulated demo panel: a coalescent (msprime) simulation of three human populations under stdpopsim's
Out-of-Africa model, so the panel has human-like LD and allele frequencies without any download.

One simulation makes the reference panel and held-out target individuals together (the targets share the panel's
genealogy, as real imputation targets share ancestry with a reference panel). The targets are written twice:
at "array" sites only (what a genotyping chip would give) and at every panel site (the truth for scoring).

Outputs in DIR: panel.vcf.gz(+.tbi), targets.array.vcf.gz(+.tbi), targets.truth.vcf.gz(+.tbi),
populations.tsv, manifest.json. DIR appears complete or not at all (built in a sibling temp dir, then renamed).
A genome preset writes one such DIR per chromosome, DIR/<chromosome>/, of the same individuals.
"""

from __future__ import annotations

# msprime, stdpopsim and tskit (seconds and ~200 MB to import) are imported only when simulating.
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rag_hpc.data.vcf import VcfWriter
from rag_hpc.errors import ConfigError, InputError
from rag_hpc.fsutil import current_umask

SIM_FORMAT = "rag_hpc.simulate"
SIM_FORMAT_VERSION = 1
CONTIG = "21"  # a real autosome name, so tools and configs written for chr21-style panels apply unchanged
POPULATIONS = ("YRI", "CEU", "CHB")
MODEL = "OutOfAfrica_3G09"
MUTATION_RATE = 1.29e-8
RECOMBINATION_RATE = 1.2e-8

PANEL_VCF = "panel.vcf.gz"
ARRAY_VCF = "targets.array.vcf.gz"
TRUTH_VCF = "targets.truth.vcf.gz"
POPULATIONS_TSV = "populations.tsv"
MANIFEST = "manifest.json"
OUTPUT_FILES = (PANEL_VCF, PANEL_VCF + ".tbi", ARRAY_VCF, ARRAY_VCF + ".tbi", TRUTH_VCF, TRUTH_VCF + ".tbi", POPULATIONS_TSV)


@dataclass(frozen=True)
class SimPreset:
    """Size of one simulation. Individuals are spread as evenly as possible over the three populations."""

    name: str
    length: int  # bp
    n_panel: int  # panel individuals
    n_targets: int  # held-out target individuals
    array_spacing: int = 4000  # one array SNP per bin of this many bp (~ a 750k-SNP chip)
    array_min_maf: float = 0.05  # chips type common SNPs

    def __post_init__(self) -> None:
        if self.length < 1000 or self.n_panel < len(POPULATIONS) or self.n_targets < 1 or self.array_spacing < 1:
            raise ValueError(f"preset {self.name}: needs length >= 1000 bp, n_panel >= 3, n_targets >= 1, array_spacing >= 1")


PRESETS: dict[str, SimPreset] = {
    # Small enough that the whole pipeline (prepare, index, train, impute) runs in minutes on 2 cores.
    "demo": SimPreset("demo", length=1_000_000, n_panel=300, n_targets=30),
    # 1000 Genomes' sample count over 5 Mb (~52k SNPs): a third of chr21's sites at full panel width.
    "kgp-like": SimPreset("kgp-like", length=5_000_000, n_panel=2504, n_targets=100),
}


# A genome of several chromosomes (``simulate_genome``): the base preset per chromosome, each into DIR/<chromosome>/.
GENOME_PRESETS: dict[str, tuple[str, tuple[str, ...]]] = {
    # Two demo-sized chromosomes: a genome launch (one prebuild, one model, a report per chromosome) in minutes.
    "demo-genome": ("demo", ("20", "21")),
}


def split_evenly(n: int, parts: int) -> list[int]:
    return [n // parts + (i < n % parts) for i in range(parts)]


def _msprime_seed(seed: int) -> int:
    # msprime wants 1..2**32-1; derive one so that any non-negative user seed (0 included) works.
    state = np.random.SeedSequence([seed, 0x51A]).generate_state(1, np.uint32)[0]
    return int(state) % (2**32 - 1) + 1


def _preset(preset: str | SimPreset) -> SimPreset:
    if isinstance(preset, SimPreset):
        return preset
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join([*PRESETS, *GENOME_PRESETS])}")
    return PRESETS[preset]


def _versions() -> dict[str, str]:
    import msprime
    import stdpopsim
    import tskit

    return {"msprime": msprime.__version__, "stdpopsim": stdpopsim.__version__, "tskit": tskit.__version__}


def cached_manifest(out_dir: Path, preset: SimPreset, seed: int, contig: str = CONTIG) -> dict | None:
    """The manifest of a complete simulation in out_dir made with this preset, seed and contig, else None."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    same = (
        manifest.get("format") == SIM_FORMAT
        and manifest.get("format_version") == SIM_FORMAT_VERSION
        and manifest.get("preset") == asdict(preset)
        and manifest.get("seed") == seed
        and manifest.get("contig") == contig
    )
    if not same:
        return None
    sizes = manifest.get("files", {})
    for name in OUTPUT_FILES:
        f = out_dir / name
        if not f.is_file() or f.stat().st_size != sizes.get(name):
            return None
    return manifest


def _simulate_tree_sequence(preset: SimPreset, seed: int):  # -> tskit.TreeSequence
    import stdpopsim

    species = stdpopsim.get_species("HomSap")
    model = species.get_demographic_model(MODEL)
    contig = species.get_contig(length=preset.length, mutation_rate=MUTATION_RATE, recombination_rate=RECOMBINATION_RATE)
    panel = split_evenly(preset.n_panel, len(POPULATIONS))
    targets = split_evenly(preset.n_targets, len(POPULATIONS))
    samples = {pop: p + t for pop, p, t in zip(POPULATIONS, panel, targets)}
    engine = stdpopsim.get_engine("msprime")
    with warnings.catch_warnings():
        # The brief's mutation rate (1.29e-8, the 1000G-era estimate) differs from the model's on purpose.
        warnings.filterwarnings("ignore", message=".*mutation rate.*", category=UserWarning)
        return engine.simulate(model, contig, samples, seed=_msprime_seed(seed))


def _sample_layout(ts, preset: SimPreset) -> tuple[list[str], list[str], list[str], np.ndarray]:
    """Names, populations and haplotype node ids: panel individuals first, then targets.

    Within a population the coalescent's sampled individuals are exchangeable, so taking the first ones as the
    panel and the rest as targets is as random as any draw.
    """
    pop_names = [ts.population(i).metadata["name"] for i in range(ts.num_populations)]
    ind_pop = ts.individuals_population
    ind_nodes = ts.individuals_nodes
    panel_names, target_names, pops = [], [], []
    panel_nodes, target_nodes = [], []
    target_pops = []
    for pop, n_panel, n_target in zip(
        POPULATIONS, split_evenly(preset.n_panel, len(POPULATIONS)), split_evenly(preset.n_targets, len(POPULATIONS))
    ):
        inds = np.flatnonzero(ind_pop == pop_names.index(pop))
        if inds.size != n_panel + n_target:
            raise RuntimeError(f"simulation returned {inds.size} {pop} individuals, expected {n_panel + n_target}")
        for k, ind in enumerate(inds, start=1):
            name = f"{pop}_{k:04d}"
            if k <= n_panel:
                panel_names.append(name)
                pops.append(pop)
                panel_nodes.append(ind_nodes[ind])
            else:
                target_names.append(name)
                target_pops.append(pop)
                target_nodes.append(ind_nodes[ind])
    nodes = np.concatenate([np.asarray(panel_nodes).ravel(), np.asarray(target_nodes).ravel()]).astype(np.int32)
    populations = pops + target_pops
    return panel_names, target_names, populations, nodes


def choose_array_sites(pos: np.ndarray, maf: np.ndarray, spacing: int, min_maf: float, seed: int) -> np.ndarray:
    """Indices (sorted) of one common site per ``spacing``-bp bin, drawn uniformly within the bin from ``seed``."""
    rng = np.random.default_rng([seed, 0xA77A])
    keys = rng.random(pos.shape[0])
    common = np.flatnonzero(maf >= min_maf)
    bins = (pos[common] - 1) // spacing
    order = np.lexsort((keys[common], bins))
    sorted_bins = bins[order]
    first = np.ones(order.size, bool)
    first[1:] = sorted_bins[1:] != sorted_bins[:-1]
    return np.sort(common[order[first]])


def _write_outputs(ts, preset: SimPreset, seed: int, contig: str, tmp: Path, log) -> dict:
    panel_names, target_names, populations, nodes = _sample_layout(ts, preset)
    n_panel_haps = 2 * len(panel_names)
    n_target = len(target_names)
    source = "rag_hpc.simulate (msprime {msprime}, stdpopsim {stdpopsim}, HomSap/{model}, seed {seed})".format(
        model=MODEL, seed=seed, **_versions()
    )

    n_mutations = np.bincount(ts.tables.mutations.site, minlength=ts.num_sites)
    block = 2048
    gbuf = np.empty((block, nodes.size), np.int8)
    kept_pos: list[np.ndarray] = []
    kept_ref: list[np.ndarray] = []
    kept_alt: list[np.ndarray] = []
    target_gt: list[np.ndarray] = []
    panel_af: list[np.ndarray] = []
    dropped_multi = dropped_mono = dropped_dup = 0
    last_pos = 0
    bpos = np.empty(block, np.int64)
    bref = np.empty(block, "S1")
    balt = np.empty(block, "S1")

    t0 = time.perf_counter()
    with VcfWriter(tmp / PANEL_VCF, contig=contig, samples=panel_names, contig_length=preset.length, source=source) as panel_vcf:

        def flush(n: int) -> None:
            nonlocal dropped_mono
            g = gbuf[:n]
            ac = g[:, :n_panel_haps].sum(axis=1, dtype=np.int64)
            poly = (ac > 0) & (ac < n_panel_haps)  # a panel site must vary within the panel
            dropped_mono += int(n - poly.sum())
            if not poly.any():
                return
            g = g[poly]
            panel_vcf.write_phased(
                bpos[:n][poly], bref[:n][poly], balt[:n][poly], g[:, :n_panel_haps].reshape(-1, n_panel_haps // 2, 2)
            )
            kept_pos.append(bpos[:n][poly].copy())
            kept_ref.append(bref[:n][poly].copy())
            kept_alt.append(balt[:n][poly].copy())
            target_gt.append(g[:, n_panel_haps:].copy())
            panel_af.append(ac[poly] / n_panel_haps)

        n = 0
        for var in ts.variants(samples=nodes, copy=False):
            site = var.site
            if n_mutations[site.id] != 1 or len(var.alleles) != 2:
                dropped_multi += 1
                continue
            p = int(site.position) + 1
            if p <= last_pos:  # only possible with a continuous genome; keep the first site at a position
                dropped_dup += 1
                continue
            ref, alt = var.alleles
            if ref not in ("A", "C", "G", "T") or alt not in ("A", "C", "G", "T"):
                raise RuntimeError(f"simulation produced non-nucleotide alleles {ref}/{alt} at {p}")
            last_pos = p
            bpos[n], bref[n], balt[n] = p, ref, alt
            gbuf[n] = var.genotypes
            n += 1
            if n == block:
                flush(n)
                n = 0
        if n:
            flush(n)
    log(f"  panel VCF: {panel_vcf.n_sites:,} sites x {len(panel_names):,} samples in {time.perf_counter() - t0:.1f} s")

    pos = np.concatenate(kept_pos)
    ref = np.concatenate(kept_ref)
    alt = np.concatenate(kept_alt)
    tgt = np.concatenate(target_gt).reshape(pos.size, n_target, 2)
    af = np.concatenate(panel_af)
    maf = np.minimum(af, 1.0 - af)
    array_idx = choose_array_sites(pos, maf, preset.array_spacing, preset.array_min_maf, seed)

    t0 = time.perf_counter()
    common = {"contig": contig, "samples": target_names, "contig_length": preset.length}
    with VcfWriter(tmp / TRUTH_VCF, source=source + "; targets, all panel sites", **common) as w:
        w.write_phased(pos, ref, alt, tgt)
    with VcfWriter(
        tmp / ARRAY_VCF, source=source + f"; targets, one MAF>={preset.array_min_maf} SNP per {preset.array_spacing} bp", **common
    ) as w:
        w.write_phased(pos[array_idx], ref[array_idx], alt[array_idx], tgt[array_idx])
    with open(tmp / POPULATIONS_TSV, "w") as fh:
        fh.write("sample\tpopulation\n")
        for name, pop in zip(panel_names + target_names, populations):
            fh.write(f"{name}\t{pop}\n")
    log(f"  target VCFs: {pos.size:,} truth sites, {array_idx.size:,} array sites in {time.perf_counter() - t0:.1f} s")

    panel_split = split_evenly(preset.n_panel, len(POPULATIONS))
    target_split = split_evenly(preset.n_targets, len(POPULATIONS))
    return {
        "counts": {
            "sites": int(pos.size),
            "array_sites": int(array_idx.size),
            "panel_samples": len(panel_names),
            "target_samples": n_target,
            "dropped_multi_mutation_sites": dropped_multi,
            "dropped_monomorphic_in_panel": dropped_mono,
            "dropped_duplicate_positions": dropped_dup,
        },
        "populations": {pop: {"panel": p, "targets": t} for pop, p, t in zip(POPULATIONS, panel_split, target_split)},
    }


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def simulate_panel(
    out_dir: str | os.PathLike[str],
    preset: str | SimPreset = "demo",
    seed: int = 1,
    *,
    overwrite: bool = False,
    verbose: bool = True,
    contig: str = CONTIG,
) -> Path:
    """Simulate panel + targets into out_dir (see module doc) and return out_dir.

    A complete simulation with the same preset and seed already in out_dir is reused. A different one is only
    replaced with ``overwrite=True``; out_dir is never left half-written. A genome preset
    (``GENOME_PRESETS``) writes one such simulation per chromosome into out_dir/<chromosome>/.
    """
    if isinstance(preset, str) and preset in GENOME_PRESETS:
        base, chromosomes = GENOME_PRESETS[preset]
        return simulate_genome(out_dir, base, chromosomes, seed, overwrite=overwrite, verbose=verbose)
    spec = _preset(preset)
    if seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {seed}")
    out = Path(out_dir).absolute()
    log = print if verbose else (lambda _msg: None)
    if cached_manifest(out, spec, seed, contig) is not None:
        log(f"{out}: cached simulation ({spec.name}, seed {seed}); nothing to do")
        return out
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory: choose a directory for the simulation")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(
            f"{out} already holds other files (not a complete {spec.name} simulation with seed {seed}); "
            "choose another --out, remove it, or pass --force to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        log(
            f"simulating {spec.name}: {spec.n_panel:,} panel + {spec.n_targets:,} target individuals over {spec.length / 1e6:g} Mb (seed {seed})"
        )
        t0 = time.perf_counter()
        ts = _simulate_tree_sequence(spec, seed)
        log(f"  msprime: {ts.num_sites:,} sites in {time.perf_counter() - t0:.1f} s")
        info = _write_outputs(ts, spec, seed, contig, tmp, log)
        manifest = {
            "format": SIM_FORMAT,
            "format_version": SIM_FORMAT_VERSION,
            "preset": asdict(spec),
            "seed": seed,
            "contig": contig,
            "model": f"HomSap/{MODEL}",
            "mutation_rate": MUTATION_RATE,
            "recombination_rate": RECOMBINATION_RATE,
            **info,
            "files": {name: (tmp / name).stat().st_size for name in OUTPUT_FILES},
            "versions": _versions(),
            "seconds": round(time.perf_counter() - t_start, 2),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync_tree(tmp)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would make the published dir private
        _publish(tmp, out, spec, seed, contig)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(
        f"{out}: {manifest['counts']['sites']:,} sites, {manifest['counts']['array_sites']:,} array sites, "
        f"{spec.n_panel:,} panel + {spec.n_targets:,} target samples in {time.perf_counter() - t_start:.1f} s"
    )
    return out


def simulate_genome(
    out_dir: str | os.PathLike[str],
    preset: str | SimPreset,
    chromosomes: tuple[str, ...],
    seed: int = 1,
    *,
    overwrite: bool = False,
    verbose: bool = True,
) -> Path:
    """One ``preset`` simulation per chromosome, of the same individuals, into out_dir/<chromosome>/ (the
    layout a genome config names with {chrom}); chromosome i (from 0) with seed + 1000 * i, so unlinked."""
    for i, chrom in enumerate(chromosomes):
        simulate_panel(Path(out_dir) / chrom, preset, seed + 1000 * i, overwrite=overwrite, verbose=verbose, contig=chrom)
    return Path(out_dir).absolute()


def _publish(tmp: Path, out: Path, spec: SimPreset, seed: int, contig: str) -> None:
    """Move the finished temp dir into place; the old out (if replaced) goes only after the new one is in."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)
    except OSError:
        # Another process published the same simulation first: theirs is as good as ours.
        if cached_manifest(out, spec, seed, contig) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
