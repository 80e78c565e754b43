"""Phasing: unphased array targets phased by Beagle 5.4 against the run's reference, before imputation.

Real array data arrive unphased; the model, like Minimac4, reads haplotypes. ``phase_targets`` runs Beagle's
phasing alone (``impute=false``: it also fills missing calls) with the panel's train split as reference —
the haplotypes imputation copies from — and the genetic map when ``data.genetic_map`` names one (else
Beagle's 1 cM/Mb). The result is content-addressed under ``<cache>/phased/``: the same targets, panel,
split and map give the same path, found there by every later job or rerun, and a file appears only complete
(Beagle writes into a temporary directory, renamed when done).

    python -m rag_hpc.phase --targets T.vcf.gz [--out PHASED.vcf.gz]   # what `impute` and `launch` run
"""

from __future__ import annotations

# panel.h5's reader and pysam are imported where used: a launch asks for phased paths before any panel
# is prepared.
import argparse
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rag_hpc.cli import add_config_args, command_parser, config_from_args, run_main
from rag_hpc.config import RagConfig
from rag_hpc.data.vcf import VcfWriter, check_container, first_contig, same_chromosome
from rag_hpc.errors import ConfigError, InputError
from rag_hpc.fsutil import atomic_file, atomic_write

log = logging.getLogger("rag_hpc.phase")

BEAGLE_JAR = Path("/usr/share/beagle/beagle.jar")
BEAGLE_INSTALL = "apt-get install -y --no-install-recommends beagle"
_FORMAT = 1  # of the phased files' keys


def beagle_command() -> list[str]:
    """How to run Beagle here: Debian's ``beagle`` wrapper, or java with its jar."""
    exe = shutil.which("beagle")
    if exe:
        return [exe]
    if BEAGLE_JAR.is_file() and shutil.which("java"):
        return ["java", "-jar", str(BEAGLE_JAR)]
    raise ConfigError(f"phasing the targets needs Beagle 5.4, which is not installed: {BEAGLE_INSTALL} (Debian package beagle)")


def reference_vcf(config: RagConfig, contig: str) -> Path:
    """The panel's train split as a phased VCF with ``contig`` as its chromosome name (Beagle wants the
    targets' naming), written once per panel, split and name under ``<cache>/phased/``."""
    from rag_hpc.data.panel import SPLIT_TRAIN, Panel

    with Panel(config.panel_h5) as panel:
        out = config.paths.cache / "phased" / f"ref-{panel.info.source_sha256[:16]}-{panel.split_digest()}-{contig}.vcf.gz"
        if out.is_file() and Path(f"{out}.tbi").is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        train = np.flatnonzero(panel.split == SPLIT_TRAIN)
        source = "rag_hpc phase: the panel's train split, the reference imputation copies from"
        with VcfWriter(out, contig=contig, samples=panel.samples[train].tolist(), source=source) as writer:
            for start in range(0, panel.n_sites, 4096):
                stop = min(start + 4096, panel.n_sites)
                haps = panel.haplotypes(start, stop)  # [H, L]
                gt = haps.reshape(panel.n_samples, 2, stop - start).transpose(2, 0, 1)[:, train]
                writer.write_phased(panel.positions[start:stop], panel.ref[start:stop], panel.alt[start:stop], gt)
    return out


def _map_for(genetic_map: Path, contig: str, where: Path) -> Path:
    """The PLINK map with its chromosome column named as the targets name it (``chr21`` and ``21`` are one
    chromosome to us, not to Beagle); the file itself when it already is."""
    lines = genetic_map.read_text().splitlines()
    names = {line.split()[0] for line in lines if line.strip()}
    if names == {contig}:
        return genetic_map
    if not names or not all(same_chromosome(n, contig) for n in names):
        raise InputError(
            f"data.genetic_map {genetic_map} is for chromosome(s) {', '.join(sorted(names)) or 'none'}, the targets "
            f"are on {contig}: give the map of the targets' chromosome (PLINK format: chrom, id, cM, bp)"
        )
    renamed = where / f"map-{contig}.map"
    renamed.write_text("".join(f"{contig}\t{' '.join(line.split()[1:])}\n" for line in lines if line.strip()))
    return renamed


def phased_path(config: RagConfig, targets_vcf: str | os.PathLike[str]) -> Path:
    """Where ``phase_targets`` puts the phased ``targets_vcf``: a function of the targets' bytes, the panel,
    its split and the map alone, so a launch knows it before any job has phased them."""
    from rag_hpc.data.panel import Panel
    from rag_hpc.data.prepare import file_sha256

    targets = Path(targets_vcf).absolute()
    check_container(targets)
    genetic_map = config.data.genetic_map
    with Panel(config.panel_h5) as panel:
        panel_id = f"{panel.info.source_sha256}-{panel.split_digest()}"
    key = hashlib.sha256(
        repr((_FORMAT, file_sha256(targets), panel_id, file_sha256(genetic_map) if genetic_map else None)).encode()
    ).hexdigest()[:24]
    return config.paths.cache / "phased" / key / "targets.phased.vcf.gz"


def is_done(phased: Path) -> bool:
    return phased.is_file() and Path(f"{phased}.tbi").is_file()


def phase_targets(config: RagConfig, targets_vcf: str | os.PathLike[str], threads: int | None = None) -> Path:
    """Beagle-phased ``targets_vcf`` against the run's reference (see the module doc): its path under
    ``<cache>/phased/`` (``phased_path``), computed there unless already done for the same inputs."""
    targets = Path(targets_vcf).absolute()
    out = phased_path(config, targets)
    if is_done(out):
        log.info("phased targets: %s (done before for the same targets, panel and map)", out)
        return out
    contig, genetic_map, key = first_contig(targets), config.data.genetic_map, out.parent.name
    cmd = beagle_command()
    ref = reference_vcf(config, contig)
    out.parent.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=out.parent.parent))
    try:
        argv = [*cmd, f"gt={targets}", f"ref={ref}", f"out={tmp / 'phased'}", "impute=false"]
        argv.append(f"nthreads={threads or max(1, len(os.sched_getaffinity(0)))}")
        if genetic_map is not None:
            argv.append(f"map={_map_for(Path(genetic_map), contig, tmp)}")
        log.info("phasing %s with Beagle: %s", targets, " ".join(argv))
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        beagle_log = (tmp / "phased.log").read_text() if (tmp / "phased.log").is_file() else ""
        if proc.returncode != 0 or not (tmp / "phased.vcf.gz").is_file():
            tail = [x for x in (proc.stderr or proc.stdout or beagle_log).strip().splitlines() if x.strip()][-3:]
            raise InputError(
                f"Beagle could not phase {targets} (exit {proc.returncode}: {' | '.join(tail)}); its log: "
                f"{_keep_log(beagle_log, out.parent.parent / f'{key}.failed.log')}"
            )
        import pysam

        pysam.tabix_index(str(tmp / "phased.vcf.gz"), preset="vcf", force=True)
        version = re.search(r"version ([0-9.]+)", beagle_log)
        os.replace(tmp / "phased.log", tmp / "beagle.log")
        os.replace(tmp / "phased.vcf.gz", tmp / out.name)
        os.replace(tmp / "phased.vcf.gz.tbi", tmp / f"{out.name}.tbi")
        try:
            os.rename(tmp, out.parent)
        except OSError:
            if not out.is_file():  # else another job phased the same targets first: theirs is as good
                raise
        log.info(
            "phased %s in %.1f s (Beagle %s): %s",
            targets.name,
            time.perf_counter() - t0,
            version.group(1) if version else "?",
            out,
        )
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _keep_log(text: str, path: Path) -> Path:
    atomic_write(path, text.encode())
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "phase",
        "Phase array targets with Beagle 5.4 (impute=false) against the panel's train split, with "
        "data.genetic_map when set; prints the phased VCF's path (content-addressed under <cache>/phased/).",
    )
    parser.add_argument("--targets", type=Path, help="target VCF (default: data.targets_vcf)")
    parser.add_argument("--out", type=Path, help="also copy the phased VCF (and its .tbi) here")
    parser.add_argument("--threads", type=int, help="Beagle's nthreads (default: the CPUs this process may use)")
    add_config_args(parser, per_chromosome=True)
    return parser


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    targets = args.targets if args.targets is not None else config.data.targets_vcf
    if targets is None:
        raise ConfigError("no targets: pass --targets TARGETS.vcf.gz (or set data.targets_vcf)")
    phased = phase_targets(config, targets, args.threads)
    if args.out is not None:
        for suffix in ("", ".tbi"):  # the VCF first, as VcfWriter publishes
            with atomic_file(Path(f"{args.out}{suffix}")) as tmp:
                shutil.copyfile(f"{phased}{suffix}", tmp)
    print(args.out or phased)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
