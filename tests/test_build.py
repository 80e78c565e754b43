"""build_windows and prebuild: what one index-prebuild array task does to the content-addressed cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rag_hpc.config import RagConfig, load_config
from rag_hpc.data.panel import SPLIT_TRAIN, Panel
from rag_hpc.errors import ConfigError
from rag_hpc.index.build import SHARD, WindowCache, build_windows, prebuild
from rag_hpc.index.donors import DONORS
from tests import kill_points

ROOT = Path(__file__).resolve().parents[1]


def _config(panel: Path, cache: Path, *extra: str, targets: Path | None = None) -> RagConfig:
    # A dense simulated array: every 100-site window of the tiny panel types some sites.
    overrides = [
        f"data.panel_h5={panel}",
        f"paths.cache_dir={cache}",
        "windows.window_size=100",
        "masks.array_density=0.2",
        *extra,
    ]
    if targets is not None:
        overrides.append(f"data.targets_vcf={targets}")
    return load_config(overrides=overrides)


def test_first_build_builds_every_window_and_rerun_skips_them_all(tiny_panel, tmp_path):
    cfg = _config(tiny_panel, tmp_path / "cache")
    first = build_windows(cfg, progress=False)
    with Panel(tiny_panel) as panel:
        assert len(first) == -(-panel.n_sites // 100)
    assert all(r.status == "built" and r.built == [SHARD] for r in first)
    second = build_windows(cfg, progress=False)
    assert [r.status for r in second] == ["cached"] * len(first)


def test_only_the_requested_windows_are_built(tiny_panel, tmp_path):
    cfg = _config(tiny_panel, tmp_path / "cache")
    assert [r.window_id for r in build_windows(cfg, [2, 0], progress=False)] == [2, 0]
    statuses = {r.window_id: r.status for r in build_windows(cfg, [0, 1, 2], progress=False)}
    assert statuses == {0: "cached", 1: "built", 2: "cached"}
    with pytest.raises(ConfigError, match="out of range"):
        build_windows(cfg, [10_000], progress=False)


def test_shard_holds_the_panel_alleles_of_its_window(tiny_panel, tmp_path):
    cfg = _config(tiny_panel, tmp_path / "cache")
    cache = WindowCache(cfg)
    shard = cache.shard(1)
    with Panel(tiny_panel) as panel:
        assert np.array_equal(shard.alleles, panel.haplotypes(100, 200))
        assert np.array_equal(shard.positions, panel.positions[100:200])
        assert np.array_equal(shard.af, panel.af[100:200])


def test_a_prebuild_writes_window_shards_and_donor_table_parts_and_nothing_else(tiny_panel, tmp_path):
    cfg = _config(tiny_panel, tmp_path / "cache", "index.windows_per_task=2")
    done = prebuild(cfg, progress=False)
    root = cfg.paths.cache
    # <cache>/<kind>/<key[:2]>/<key>/: one directory per artifact kind, besides the store's own dot-dirs.
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == sorted([SHARD, DONORS])
    assert len(list((root / SHARD).glob("*/*"))) == len(done.windows)
    assert done.donor_parts_built == len(list((root / DONORS).glob("*/*"))) > 0


def test_with_targets_the_array_is_their_sites_and_every_window_still_gets_one_shard(tiny_panel, tiny_simulation, tmp_path):
    # 10-site windows: more windows than the targets type sites, so some windows have none.
    cfg = _config(tiny_panel, tmp_path / "cache", "windows.window_size=10", targets=tiny_simulation / "targets.array.vcf.gz")
    cache = WindowCache(cfg)
    typed = cache.array_sites()
    assert 0 < typed.size < cache.panel.n_sites
    untyped = [w.id for w in cache.windows if not w.observed(typed).any()]
    assert untyped
    results = build_windows(cfg, progress=False)
    assert [r.built for r in results] == [[SHARD]] * len(cache.windows)
    # A window the array does not type is built like any other: the model imputes all of it from donors.
    assert all(cache.shard(wid).alleles.shape[1] == cache.windows[wid].length for wid in untyped)


def test_changing_an_input_of_the_key_rebuilds_and_keeps_the_old_artifacts(tiny_panel, tmp_path):
    cache_dir = tmp_path / "cache"
    build_windows(_config(tiny_panel, cache_dir), [0], progress=False)
    other_mask = build_windows(_config(tiny_panel, cache_dir, "masks.array_density=0.3"), [0], progress=False)
    assert other_mask[0].status == "cached"  # a shard does not depend on the array
    other_window = build_windows(_config(tiny_panel, cache_dir, "windows.window_size=50"), [0], progress=False)
    assert other_window[0].built == [SHARD]
    assert build_windows(_config(tiny_panel, cache_dir), [0], progress=False)[0].status == "cached"


def test_truncated_shard_is_rebuilt_not_used(tiny_panel, tmp_path):
    cfg = _config(tiny_panel, tmp_path / "cache")
    cache = WindowCache(cfg)
    build_windows(cfg, [0], progress=False)
    data = cache.store.path(cache.artifacts(cache.windows[0])["shard"]) / "shard.npz"
    with open(data, "r+b") as fh:
        fh.truncate(data.stat().st_size // 2)
    result = build_windows(cfg, [0], progress=False)[0]
    assert result.status == "built" and result.built == [SHARD]
    with Panel(tiny_panel) as panel:
        assert np.array_equal(cache.shard(0).alleles, panel.haplotypes(0, 100))


def test_bit_flipped_shard_is_rebuilt_when_loaded(tiny_panel, tmp_path):
    cfg = _config(tiny_panel, tmp_path / "cache")
    cache = WindowCache(cfg)
    build_windows(cfg, [0], progress=False)
    data = cache.store.path(cache.artifacts(cache.windows[0])["shard"]) / "shard.npz"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with Panel(tiny_panel) as panel:
        assert np.array_equal(cache.shard(0).alleles, panel.haplotypes(0, 100))
    assert cache.store.read(cache.artifacts(cache.windows[0])["shard"]) is not None


BUILDER = """
import sys
from rag_hpc.config import load_config
from rag_hpc.index.build import build_windows
cfg = load_config(overrides=sys.argv[1:])
build_windows(cfg, progress=False)
"""


def _committed(cache: WindowCache) -> list[int]:
    return [w.id for w in cache.windows if all(cache.store.problem(a) is None for a in cache.artifacts(w).values())]


def test_sigkilled_builds_leave_only_valid_artifacts_and_rerun_builds_only_the_rest(tiny_panel, tmp_path):
    overrides = [f"data.panel_h5={tiny_panel}", f"paths.cache_dir={tmp_path / 'cache'}", "windows.window_size=4"]
    cfg = load_config(overrides=overrides)
    cache = WindowCache(cfg)
    rng = np.random.default_rng(0)
    interrupted = 0
    for _ in range(12):  # each process publishes a few artifacts and dies; the next one goes on
        # The builder SIGKILLs itself (tests/kill_points.py) right after publishing its n-th artifact, or
        # right before (a commit in flight): mid-build by construction, whatever this machine's speed.
        n, when = int(rng.integers(1, 6)), str(rng.choice(["before", "after"]))
        argv = kill_points.command("rename", "[0-9a-f]{64}", n, when, "-c", BUILDER, *overrides)
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=300, check=False)
        committed = _committed(cache)
        for wid in committed:  # everything that looks committed verifies
            assert all(cache.store.read(a) is not None for a in cache.artifacts(cache.windows[wid]).values())
        if proc.returncode == 0:
            break  # fewer than n artifacts were left to build
        assert proc.returncode == -9, proc.stderr[-2000:]
        interrupted += 1
    assert interrupted >= 2  # the kills really hit builds in progress
    rerun = build_windows(cfg, progress=False)
    assert {r.window_id for r in rerun if r.status == "cached"} == set(committed)
    assert all(r.status == "cached" for r in build_windows(cfg, progress=False))


def test_two_processes_building_overlapping_ranges_produce_valid_artifacts(tiny_panel, tmp_path):
    overrides = [f"data.panel_h5={tiny_panel}", f"paths.cache_dir={tmp_path / 'cache'}", "windows.window_size=20"]
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, *overrides], stdout=subprocess.PIPE) for _ in range(2)]
    assert all(p.wait() == 0 for p in procs)
    cfg = load_config(overrides=overrides)
    cache = WindowCache(cfg)
    for w in cache.windows:
        assert all(cache.store.read(a) is not None for a in cache.artifacts(w).values())
    assert all(r.status == "cached" for r in build_windows(cfg, progress=False))


def test_index_cli_builds_named_windows(tiny_panel, tmp_path):
    env = {**os.environ, "RAG_HPC_PATHS__CACHE_DIR": str(tmp_path / "cache")}
    cmd = [
        sys.executable,
        "-m",
        "rag_hpc.index",
        "--set",
        f"data.panel_h5={tiny_panel}",
        "--set",
        "windows.window_size=100",
        "--windows",
        "0,2",
        "--quiet",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "2 windows: 2 built, 0 cached" in out.stdout
    bad = subprocess.run([*cmd[:-3], "--windows", "x-y"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --windows 'x-y': expected ids and ranges like 0-9,12"
    ]


def test_reference_search_order_is_a_fixed_shuffle_of_the_train_split(tiny_panel):
    with Panel(tiny_panel) as panel:
        order = panel.reference_haplotypes(0)
        train = np.flatnonzero(panel.haplotype_split() == SPLIT_TRAIN)
        assert np.array_equal(np.sort(order), train)
        assert not np.array_equal(order, train)  # not panel order: ties must not all go to the first population
        assert np.array_equal(order, panel.reference_haplotypes(0))
        assert not np.array_equal(order, panel.reference_haplotypes(1))
