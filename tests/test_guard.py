"""The memory guard refuses plans that cannot fit, before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rag_hpc.config import ModelConfig
from rag_hpc.errors import ConfigError
from rag_hpc.guard import Budget, Plan, check, estimate, model_params, parse_bytes
from rag_hpc.model.rag import RagImputer

PREDECESSOR = Plan(haplotypes=2008, sites=331 * 1030, window_size=1030, dims=192, index="flat-lxd")
KGP_CHR21 = Plan(haplotypes=5008, sites=150_000)


def test_predecessors_design_needs_about_one_and_a_half_terabytes_and_is_refused():
    est = estimate(PREDECESSOR)
    assert PREDECESSOR.windows == 331
    assert 1.5e12 < est.index_task_ram < 1.7e12  # the ~1.6 TB it ran out of memory on
    assert 5.0e11 < est.disk_to_build < 5.6e11  # the ~530 GB of L×D indexes on disk
    rows = check(PREDECESSOR, est, Budget(mem=parse_bytes("256G"), disk_free=parse_bytes("1T")))
    over = [r.figure for r in rows if not r.ok]
    assert over == ["RAM per index-array task", "RAM for training (host)"]


def test_chr21_scale_plan_fits_a_modest_node():
    est = estimate(KGP_CHR21)
    assert est.index_task_ram < 1 * 2**30 and est.disk_to_build < 2 * 2**30
    rows = check(KGP_CHR21, est, Budget(mem=parse_bytes("16G"), disk_free=parse_bytes("100G"), gpu_mem=parse_bytes("80G")))
    assert all(r.ok for r in rows)


def test_cached_windows_need_no_disk():
    full = estimate(KGP_CHR21).disk_to_build
    half = estimate(Plan(haplotypes=5008, sites=150_000, cached_windows=147)).disk_to_build
    assert half == pytest.approx(full / 2, rel=0.01)


@pytest.mark.parametrize(("dims", "layers", "heads"), [(192, 10, 6), (384, 12, 12), (64, 2, 4)])
def test_parameter_count_matches_the_real_model(dims, layers, heads):
    model = RagImputer(ModelConfig(dims=dims, layers=layers, heads=heads), 512)
    assert model_params(dims, layers) == sum(p.numel() for p in model.parameters())


def test_sizes_parse_like_slurm_and_garbage_is_refused():
    assert parse_bytes("256G") == 256 * 2**30 and parse_bytes("1T") == 2**40 and parse_bytes("1.5K") == 1536
    assert parse_bytes("64GiB") == 64 * 2**30 and parse_bytes("4096") == 4096
    with pytest.raises(ConfigError, match="cannot read"):
        parse_bytes("lots")


def test_cli_exits_nonzero_over_budget_and_prints_the_table():
    cmd = [
        sys.executable,
        "-m",
        "rag_hpc.guard",
        "--haplotypes",
        "2008",
        "--sites",
        str(331 * 1030),
        "--window-size",
        "1030",
        "--dims",
        "192",
        "--index",
        "flat-lxd",
        "--mem",
        "256G",
        "--disk-free",
        "1T",
        "--json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 1
    assert "OVER" in out.stdout and "REFUSED" in out.stdout
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["ok"] is False and report["estimate"]["index_task_ram"] > 1.5e12
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "rag_hpc.guard",
            "--haplotypes",
            "5008",
            "--sites",
            "150000",
            "--mem",
            "64G",
            "--disk-free",
            "500G",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "within budget" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "rag_hpc.guard", "--haplotypes", "0", "--sites", "10"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --haplotypes must be positive, got 0"
