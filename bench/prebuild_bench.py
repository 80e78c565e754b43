"""Index prebuild at chromosome-21 scale: cold cache, then warm (every window skipped).

It times the window half of the prebuild (``build_windows``: one shard per window), not the donor-table
parts a task computes after its windows (bench/guard_bench.py's index cases run whole tasks; the tables'
stored size per entry is in rag_hpc/index/donor_format.py). The disk figure is set against the panel's
information, 1 bit per haplotype and site.

    python -m bench.prebuild_bench [--sites 150000] [--cores 1] [--workdir bench_out/prebuild] [--json]

The panel is the simulated kgp-like panel (5,008 haplotypes over 5 Mb, ~52k SNPs) tiled along the
chromosome to ``--sites`` (chr21 has ~150k biallelic SNPs in 1000 Genomes: ~294 windows of 511).
Tiling repeats haplotypes, which changes nothing the prebuild's cost depends on. Each build runs
in a fresh child process pinned to ``--cores`` cores; peak RSS is sampled with psutil every 20 ms
(and cross-checked against the kernel's ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import psutil

from bench.common import machine_line
from rag_hpc.config import load_config
from rag_hpc.data.panel import Panel


def tile_panel(src: Path, dst: Path, n_sites: int) -> None:
    """Write a panel with ``n_sites`` sites by repeating ``src`` along the chromosome."""
    with h5py.File(src, "r") as fin, h5py.File(dst.with_suffix(".tmp"), "w") as fout:
        n_src = fin["calldata/GT"].shape[0]
        reps = -(-n_sites // n_src)
        for key, value in fin.attrs.items():
            fout.attrs[key] = value
        fout.attrs["source_sha256"] = f"{fin.attrs['source_sha256']}-tiled-{n_sites}"
        for name in ("samples", "sample_population", "split"):
            fin.copy(fin[name], fout, name)
        pos = fin["variants/POS"][:]
        span = int(pos[-1]) + 1000
        tiled_pos = np.concatenate([pos + r * span for r in range(reps)])[:n_sites]
        fout.create_dataset("variants/POS", data=tiled_pos)
        for name in fin["variants"]:
            if name != "POS":
                fout.create_dataset(f"variants/{name}", data=np.tile(fin[f"variants/{name}"][:], reps)[:n_sites])
        src_gt = fin["calldata/GT"]
        gt = fout.create_dataset(
            "calldata/GT",
            shape=(n_sites, *src_gt.shape[1:]),
            dtype=src_gt.dtype,
            chunks=src_gt.chunks,
            compression=src_gt.compression,
        )
        step = src_gt.chunks[0] * 8
        for start in range(0, n_sites, step):
            stop = min(start + step, n_sites)
            idx = np.arange(start, stop) % n_src
            lo, hi = idx.min(), idx.max() + 1
            block = src_gt[lo:hi]
            gt[start:stop] = block[idx - lo]
    dst.with_suffix(".tmp").rename(dst)


def _build(config_overrides: list[str], cores: int, queue: mp.Queue[dict]) -> None:
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    from rag_hpc.index.build import build_windows

    config = load_config(overrides=config_overrides)
    t0 = time.perf_counter()
    results = build_windows(config, progress=False)
    seconds = time.perf_counter() - t0
    queue.put(
        {
            "seconds": seconds,
            "windows": len(results),
            "built": sum(r.status == "built" for r in results),
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )


def run_build(config_overrides: list[str], cores: int) -> dict:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_build, args=(config_overrides, cores, queue))
    proc.start()
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        ps = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                peak = max(peak, ps.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = queue.get()
    proc.join()
    stop.set()
    sampler.join()
    if proc.exitcode != 0:
        raise SystemExit(f"build process failed with exit code {proc.exitcode}")
    result["peak_rss_mb"] = peak / 2**20
    return result


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=150_000, help="panel sites after tiling (chr21: ~150k)")
    parser.add_argument("--cores", type=int, default=1, help="cores the build may use")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("bench_out/prebuild"))
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()

    from rag_hpc.data.prepare import prepare_panel
    from rag_hpc.data.simulate import simulate_panel

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sim = simulate_panel(work / "kgp-like", "kgp-like", args.seed)
    base = work / "kgp-like.h5"
    if not base.exists():
        prepare_panel(sim / "panel.vcf.gz", base, populations=sim / "populations.tsv")
    tiled = work / f"chr21-scale-{args.sites}.h5"
    if not tiled.exists():
        tile_panel(base, tiled, args.sites)
    setup_s = time.perf_counter() - t0
    with Panel(tiled) as panel:
        n_haps, n_sites = panel.n_haplotypes, panel.n_sites

    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    overrides = [f"data.panel_h5={tiled}", f"paths.cache_dir={cache}"]
    cold = run_build(overrides, args.cores)
    warm = run_build(overrides, args.cores)
    disk = dir_bytes(cache)

    row = {
        "haplotypes": n_haps,
        "sites": n_sites,
        "windows": cold["windows"],
        "cores": args.cores,
        "cold_s": round(cold["seconds"], 2),
        "cold_built": cold["built"],
        "warm_s": round(warm["seconds"], 3),
        "warm_built": warm["built"],
        "peak_rss_mb": round(max(cold["peak_rss_mb"], warm["peak_rss_mb"]), 1),
        "ru_maxrss_mb": round(max(cold["ru_maxrss_mb"], warm["ru_maxrss_mb"]), 1),
        "disk_mb": round(disk / 2**20, 1),
        # The information is 1 bit per haplotype and site: what the cache costs against it.
        "bytes_per_haplotype_site": round(disk / (n_haps * n_sites), 4),
        "raw_bit_ratio": round(disk / (n_haps * n_sites / 8), 3),
        "setup_s": round(setup_s, 1),
        "machine": machine_line(),
    }
    print(f"index prebuild, {n_haps:,} haplotypes x {n_sites:,} sites, {row['windows']} windows, {args.cores} core(s)")
    print(f"{'':<8}{'seconds':>10}{'built':>8}{'peak RSS MB':>13}")
    print(f"{'cold':<8}{row['cold_s']:>10.2f}{cold['built']:>8}{cold['peak_rss_mb']:>13.1f}")
    print(f"{'warm':<8}{row['warm_s']:>10.3f}{warm['built']:>8}{warm['peak_rss_mb']:>13.1f}")
    print(
        f"cache on disk: {row['disk_mb']} MiB in {cache}: {row['bytes_per_haplotype_site']} bytes per haplotype-site, "
        f"{row['raw_bit_ratio']}x the raw bit ({n_haps * n_sites / 8 / 2**20:.1f} MiB)"
    )
    if args.json:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
