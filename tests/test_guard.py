"""The memory guard refuses plans that cannot fit, before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rag_hpc.config import ModelConfig
from rag_hpc.errors import ConfigError
from rag_hpc.guard import Budget, Plan, check, donor_table_bytes, donor_table_disk, estimate, model_shape, parse_bytes
from rag_hpc.model.rag import DonorImputer
from tests.imports import run_and_list_heavy_imports

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
    # A task holds one window at a time, then runs its part of the donor HMM (up to 8 sweeps at once).
    assert est.index_task_ram < 2 * 2**30 and est.disk_to_build < 2 * 2**30
    rows = check(KGP_CHR21, est, Budget(mem=parse_bytes("16G"), disk_free=parse_bytes("100G"), gpu_mem=parse_bytes("80G")))
    assert all(r.ok for r in rows)


def test_cached_windows_need_no_disk():
    full = estimate(KGP_CHR21).disk_to_build
    half = estimate(Plan(haplotypes=5008, sites=150_000, cached_windows=147)).disk_to_build
    tables = full - estimate(KGP_CHR21).disk_per_window * KGP_CHR21.windows  # the donor tables: built once per run
    assert tables > 0 and half - tables == pytest.approx((full - tables) / 2, rel=0.01)


@pytest.mark.parametrize(("dims", "layers", "kernel"), [(32, 2, 5), (128, 6, 9), (16, 0, 3)])
def test_parameter_count_is_the_real_models(dims, layers, kernel):
    model = DonorImputer(ModelConfig(dims=dims, layers=layers, kernel=kernel))
    params = list(model.parameters())
    assert model_shape(Plan(haplotypes=100, sites=1000, dims=dims, layers=layers, kernel=kernel)) == (
        sum(p.numel() for p in params),
        len(params),
    )


def test_the_donor_tables_are_counted_and_a_genome_in_one_table_is_refused():
    est = estimate(KGP_CHR21)
    train_q, val_q = KGP_CHR21.queries
    tables = donor_table_bytes(KGP_CHR21, train_q) + donor_table_bytes(KGP_CHR21, val_q)
    entries = (KGP_CHR21.typed + 1) * (train_q + val_q) * KGP_CHR21.k
    assert entries * 3 == tables  # in memory: a uint16 donor and a uint8 weight code
    stored = donor_table_disk(KGP_CHR21, train_q, KGP_CHR21.donor_parts) + donor_table_disk(
        KGP_CHR21, val_q, KGP_CHR21.donor_parts
    )
    assert entries * 0.15 < stored < entries * 0.25  # on disk (rag_hpc/index/donor_format.py)
    assert est.train_host_ram > tables and est.disk_to_build > stored
    genome = Plan(haplotypes=5008, sites=80_000_000)
    est = estimate(genome)
    rows = check(genome, est, Budget(mem=parse_bytes("256G")))
    assert [r.figure for r in rows if not r.ok] == ["RAM for training (host)"]
    # A genome's cache in at most twice its raw bits (1 bit per haplotype and site): ~93 GiB.
    assert est.disk_to_build <= 2 * genome.haplotypes * genome.sites / 8


def test_with_targets_their_donor_table_and_the_imputation_tasks_are_sized():
    from dataclasses import replace

    with_targets = replace(KGP_CHR21, targets=True, target_haplotypes=2_000)
    plain, est = estimate(KGP_CHR21), estimate(with_targets)
    assert est.disk_to_build - plain.disk_to_build >= donor_table_disk(with_targets, 2_000)
    assert plain.impute_task_ram == 0 and est.impute_task_ram > donor_table_bytes(with_targets, 2_000)
    rows = {r.figure: r for r in check(with_targets, est, Budget(mem=est.impute_task_ram - 1))}
    assert not rows["RAM per imputation task"].ok and "impute.windows_per_task" in rows["RAM per imputation task"].advice
    # Fewer windows per task hold fewer records at once.
    fewer = estimate(replace(with_targets, impute_windows_per_task=4))
    assert fewer.impute_task_ram < est.impute_task_ram


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


def test_the_guard_plans_without_importing_torch_or_submitit():
    out, heavy = run_and_list_heavy_imports("rag_hpc.guard", "--haplotypes", "5008", "--sites", "150000", "--mem", "64G")
    assert out.returncode == 0 and "within budget" in out.stdout, out.stdout + out.stderr
    assert heavy == [], heavy


def test_a_genome_plan_adds_its_chromosomes_up_but_sizes_each_task_for_the_largest_chromosome():
    from dataclasses import replace

    from rag_hpc.guard import genome_plan

    small, large = (replace(KGP_CHR21, sites=n, targets=True, target_haplotypes=2_000) for n in (60_000, 150_000))
    genome = genome_plan([small, large, small])
    assert genome.sites == 270_000 and genome.chromosome_sites == (60_000, 150_000, 60_000)
    assert genome.windows == 2 * small.windows + large.windows and genome.typed == 2 * small.typed + large.typed
    est, alone = estimate(genome), estimate(large)
    # A prebuild or imputation task holds one chromosome: the largest's figures, whatever the genome's size.
    for figure in ("index_task_ram", "task_donor_disk", "impute_task_ram", "impute_task_disk"):
        assert getattr(est, figure) == getattr(alone, figure), figure

    # One model reads every chromosome: training holds all their donor tables; the cache holds all windows.
    def tables(plan: Plan) -> int:
        return sum(donor_table_bytes(plan, q) for q in plan.queries)

    assert est.train_host_ram - alone.train_host_ram >= tables(genome) - tables(large) > 0
    assert est.disk_to_build == pytest.approx(2 * estimate(small).disk_to_build + alone.disk_to_build, rel=0.01)
    assert genome_plan([large]) is large
