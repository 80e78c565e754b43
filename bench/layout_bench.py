"""The cache's packed layout against the unpacked one, in one run: training steps/s and imputation time.

    python -m bench.layout_bench [--steps 200] [--repeats 2] [--workdir bench_out/layout] [--json]

Packed is the package's layout: window shards bit-packed along sites (unpacked once per window load) and
donor tables in ``rag_hpc.index.donor_format``'s stored form (decoded once per read). Unpacked is the same
arrays stored as they are held: shard alleles one byte per haplotype and site, donor tables as their raw
slot-order donors and codes (``np.savez``). Each layout gets its own cache, prebuilt before anything is
timed; then, alternating layouts ``--repeats`` times, two fresh training runs, of ``--steps`` / 10 and of
``--steps`` steps (each reads its donor tables and loads every window it visits, its validation included),
and the imputation of the targets with the longer run's checkpoint (reading the targets' table). Steps/s is
the steady rate, (long - short steps) / (long - short seconds), so the runs' fixed start (reading the
tables) cancels; the start itself is reported as the short run's seconds beyond its steps at that rate.
The fastest of each is reported. Both layouts must end with the same parameters and the same imputed VCF
(checked): only where bytes sit differs.

Data: the kgp-like simulation of bench/accuracy_bench.py (5,008 haplotypes over 5 Mb, 100 targets typed
at ~1,200 array sites), simulated and prepared under ``--data`` on first use (shared with that bench); ``donors.train_samples``
128 to keep the HMM of the two prebuilds short (the layouts' costs scale with the tables alike).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench.accuracy_bench import prepared_panel, simulated_dataset, without_panel_samples
from bench.common import machine_line
from rag_hpc.config import RagConfig, load_config
from rag_hpc.index import build, donors


def _unpacked_shard_bytes(shard: build.Shard) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, alleles=shard.alleles, positions=shard.positions, af=shard.af)
    return buf.getvalue()


def _unpacked_shard(window, data: bytes) -> build.Shard:
    with np.load(io.BytesIO(data)) as npz:
        return build.Shard(window, npz["alleles"], npz["positions"], npz["af"])


def _unpacked_table_bytes(table: donors.DonorTable, queries: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, typed=table.typed, queries=queries, donors=table.donors, codes=table.codes)
    return buf.getvalue()


def _unpacked_table(data: bytes, typed: np.ndarray, queries: np.ndarray, where: object) -> donors.DonorTable:
    with np.load(io.BytesIO(data)) as npz:
        return donors.DonorTable(npz["typed"], npz["donors"], npz["codes"])


@contextmanager
def layout(name: str) -> Iterator[None]:
    """The package's own layout ('packed'), or the same arrays stored as held ('unpacked')."""
    if name == "packed":
        yield
        return
    saved = (build._shard_bytes, build._shard_from_bytes, donors._table_bytes, donors._table_from_bytes)
    build._shard_bytes, build._shard_from_bytes = _unpacked_shard_bytes, _unpacked_shard
    donors._table_bytes, donors._table_from_bytes = _unpacked_table_bytes, _unpacked_table
    try:
        yield
    finally:
        build._shard_bytes, build._shard_from_bytes, donors._table_bytes, donors._table_from_bytes = saved


def layout_config(base: RagConfig, work: Path, name: str, steps: int, run: int) -> RagConfig:
    cfg = base.model_copy(deep=True)
    cfg.paths.cache_dir = work / f"cache-{name}"
    cfg.train.run_dir = work / "runs" / f"{name}-{run}"
    cfg.train.max_steps = steps
    cfg.train.progress = False
    cfg.train.tensorboard = False
    return cfg


def dir_bytes(path: Path, kind: str) -> int:
    return sum(f.stat().st_size for f in (path / kind).rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps per timed run")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per layout, alternating")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("bench_out/layout"), help="the two caches and runs")
    parser.add_argument(
        "--data", type=Path, default=Path("bench_out/accuracy"), help="simulation and panel (shared with accuracy_bench)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()

    from rag_hpc.checkpoint import load_checkpoint
    from rag_hpc.impute import impute, load_model_predictor
    from rag_hpc.index.build import prebuild
    from rag_hpc.train import train

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = load_config(overrides=["donors.train_samples=128", "data.ambiguous=keep"])
    data_dir = args.data.resolve()
    data = simulated_dataset(data_dir, args.seed)
    panel_h5 = prepared_panel(data_dir, data, base)
    data = without_panel_samples(data, panel_h5, data_dir, base)
    base.data.panel_h5, base.data.targets_vcf, base.paths.workdir = panel_h5, data.targets, work

    names = ("packed", "unpacked")
    prebuild_s = {}
    for name in names:
        cfg = layout_config(base, work, name, args.steps, 0)
        shutil.rmtree(cfg.paths.cache_dir, ignore_errors=True)
        t0 = time.perf_counter()
        with layout(name):
            prebuild(cfg, progress=False)
        prebuild_s[name] = time.perf_counter() - t0

    short = max(1, args.steps // 10)
    train_s: dict[str, list[float]] = {n: [] for n in names}
    short_s: dict[str, list[float]] = {n: [] for n in names}
    impute_s: dict[str, list[float]] = {n: [] for n in names}
    outputs: dict[str, tuple[dict, bytes]] = {}
    for run in range(args.repeats):
        for name in names:
            cfg = layout_config(base, work, name, args.steps, run)
            shutil.rmtree(cfg.train.run_dir, ignore_errors=True)
            out = work / f"imputed-{name}.vcf.gz"
            with layout(name):
                brief = layout_config(base, work, name, short, run)
                brief.train.run_dir = work / "runs" / f"{name}-{run}-short"
                shutil.rmtree(brief.train.run_dir, ignore_errors=True)
                t0 = time.perf_counter()
                train(brief)
                short_s[name].append(time.perf_counter() - t0)
                shutil.rmtree(brief.train.run_dir, ignore_errors=True)
                t0 = time.perf_counter()
                checkpoint = train(cfg)
                train_s[name].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                impute(cfg, load_model_predictor(checkpoint, cfg), data.targets, out)
                impute_s[name].append(time.perf_counter() - t0)
            state = load_checkpoint(checkpoint)["model"]
            outputs[name] = ({k: v.clone() for k, v in state.items()}, gzip.decompress(out.read_bytes()))
            shutil.rmtree(cfg.train.run_dir, ignore_errors=True)
    (p_state, p_vcf), (u_state, u_vcf) = outputs["packed"], outputs["unpacked"]
    same_params = all(bool((p_state[k] == u_state[k]).all()) for k in p_state)
    same_vcf = p_vcf == u_vcf

    row: dict = {"steps": args.steps, "repeats": args.repeats, "same_parameters": same_params, "same_vcf": same_vcf}
    for name in names:
        cache = work / f"cache-{name}"
        rate = (args.steps - short) / (min(train_s[name]) - min(short_s[name]))
        row[name] = {
            "train_s": round(min(train_s[name]), 2),
            "steps_per_s": round(rate, 2),
            "start_s": round(min(short_s[name]) - short / rate, 2),
            "impute_s": round(min(impute_s[name]), 2),
            "shards_mb": round(dir_bytes(cache, build.SHARD) / 2**20, 2),
            "donor_tables_mb": round(dir_bytes(cache, donors.DONORS) / 2**20, 2),
            "prebuild_s": round(prebuild_s[name], 1),
        }
    row["steps_per_s_ratio"] = round(row["packed"]["steps_per_s"] / row["unpacked"]["steps_per_s"], 3)
    row["impute_time_ratio"] = round(row["packed"]["impute_s"] / row["unpacked"]["impute_s"], 3)
    row["machine"] = machine_line()

    print(f"cache layout: training runs of {short} and {args.steps} steps, one imputation, fastest of {args.repeats}")
    print(
        f"{'layout':<10}{'steps/s':>9}{'start s':>9}{'train s':>9}{'impute s':>10}{'shards MB':>11}{'donors MB':>11}{'prebuild s':>12}"
    )
    for name in names:
        r = row[name]
        print(
            f"{name:<10}{r['steps_per_s']:>9.2f}{r['start_s']:>9.2f}{r['train_s']:>9.2f}{r['impute_s']:>10.2f}"
            f"{r['shards_mb']:>11.2f}{r['donor_tables_mb']:>11.2f}{r['prebuild_s']:>12.1f}"
        )
    print(
        f"packed / unpacked: steps/s x{row['steps_per_s_ratio']}, imputation time x{row['impute_time_ratio']}; "
        f"same parameters: {same_params}, same VCF: {same_vcf}"
    )
    print(row["machine"])
    if args.json:
        print(json.dumps(row))
    if not (same_params and same_vcf):
        raise SystemExit("the two layouts trained or imputed differently: the layout changed what was read")


if __name__ == "__main__":
    main()
