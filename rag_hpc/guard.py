"""Memory guard: the bytes each job will need, checked against the budgets before anything runs.

    python -m rag_hpc.guard --haplotypes 5008 --sites 150000 --mem 64G --disk-free 500G [--json]

The same model serves the launcher (budgets from the partition, the cache filesystem and the GPUs)
and users planning a run before they have data. ``--index flat-lxd`` sizes the predecessor's
layout (every window's reference panel as flattened L×D float embeddings, held in RAM twice plus
the FAISS copy), which is what made it run out of 256 GB at window 54 of 331.

Constants below were measured on this project's own runs (bench/prebuild_bench.py, the test
suite); bench/guard_bench.py compares predictions with measured peaks.
"""

from __future__ import annotations

# Neither torch nor submitit: the guard plans on a login node (tests/test_guard.py checks). The panel and
# the cache are imported only to plan a config, so `--help` and argument errors load no h5py either.
import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel

from rag_hpc.cli import command_parser, run_main
from rag_hpc.config import (
    MAX_SWEEP_THREADS,
    DataConfig,
    DonorConfig,
    ImputeConfig,
    IndexConfig,
    MaskConfig,
    ModelConfig,
    RagConfig,
    TrainConfig,
    WindowConfig,
)
from rag_hpc.errors import ConfigError
from rag_hpc.fsutil import human_bytes
from rag_hpc.index.donor_format import donor_dtype
from rag_hpc.model.layers import parameter_shapes

if TYPE_CHECKING:
    from rag_hpc.data.panel import Panel

GiB = 2**30
MiB = 2**20
KiB = 2**10

# -- process baselines: resident size measured with psutil and ru_maxrss on this project's CPU builds
# (torch 2.13; bench/guard_bench.py). Every job imports rag_hpc.launch (submitit, pydantic) and the index
# builder and donor tables (numpy, h5py): 63-64 MiB before any work, all an index-prebuild task imports.
# Training adds torch: 244 MiB in all.
JOB_IMPORT_BYTES = 64 * MiB
TORCH_IMPORT_BYTES = 180 * MiB
# Library pages (BLAS, OpenMP thread pools, autograd kernels) first touched by training's first steps:
# steady RSS after them less the RSS after the imports.
TRAIN_FIRST_USE_BYTES = 12 * MiB
# Constructing a torch.optim optimizer imports torch._dynamo (measured: +72 MiB for AdamW).
OPTIMIZER_IMPORT_BYTES = 72 * MiB
# torch.utils.tensorboard and its event writer, when train.tensorboard is on.
TENSORBOARD_BYTES = 13 * MiB
# cyvcf2 and the target VCF's site arrays, when data.targets_vcf is set (its sites are read by both jobs).
TARGETS_READER_BYTES = 6 * MiB
# The HDF5 chunk cache each panel reader asks for (rag_hpc/data/panel.py: rdcc_nbytes) and the GT
# chunking prepare writes (rag_hpc/data/prepare.py: at most 1,024 sites and ~8 MiB per chunk).
H5_CHUNK_CACHE_BYTES = 64 * MiB
GT_CHUNK_SITES = 1024
GT_CHUNK_BYTES = 8 * MiB
# Host memory of a CUDA training process beyond the imports (CUDA context, pinned staging).
CUDA_HOST_BYTES = 1 * GiB
CUDA_CONTEXT_BYTES = 600 * MiB  # per GPU, not usable by tensors
# The model's step (rag_hpc/model/rag.py), fp32, counted from its tensors (doubled with autograd for
# what is kept and its gradient): per (gap x donor) the log weights, the score correction's input and
# 8-wide hidden layer, scores, exponentials and the donor sums' sorted copies (~30 floats); per site the
# sums, probabilities and the 8 features (~24 floats). Not fitted on measured RSS: they err high.
GAP_DONOR_BYTES = 120
SITE_BYTES = 96

# -- disk. Every cache artifact is a directory holding its data file and manifest.json, under a
# fan-out directory (one per 256 keys at most), with a lock file: a filesystem block (4 KiB) each for
# the two directories and the manifest, and on average half a block of the data file's tail.
ARTIFACT_OVERHEAD_BYTES = 14 * KiB
# A stored donor table per (gap, query, donor) (rag_hpc/index/donor_format.py) falls as the k donors are a
# smaller share of the references (fewer of them above the weight floor, fewer changes per gap):
# DONOR_BYTES_SCALE * (k / references) ** DONOR_BYTES_POWER, at least DONOR_BYTES_MIN. Fitted on the tables
# of bench/guard_bench.py's index cases (k = 64: 0.67 bytes at 540 references, 0.25 at 2,700, 0.17 at
# 4,508) and the kgp-like bench's (0.172 and 0.186 at 4,508).
DONOR_BYTES_SCALE = 2.5
DONOR_BYTES_POWER = 0.61
DONOR_BYTES_MIN = 0.17
ZSTD_COMPRESS_BYTES = 16 * MiB  # a level-9 compression context (measured: ~10 MiB)
# A checkpoint is torch.save of the fp32 weights and both AdamW moments (12 bytes per parameter), plus
# per parameter tensor its three zip records and the optimizer's step counter (~1.1 KiB, measured),
# plus the RNG states and the config (~24 KiB); each has a sha256 sidecar (one block).
CHECKPOINT_BYTES_PER_TENSOR = 1152
CHECKPOINT_FIXED_BYTES = 28 * KiB
# A run directory's logs: config.yaml, train.log, metrics.csv, steps.csv and TensorBoard events (one
# block each, with the run, checkpoints and tb directories), and ~0.5 KiB per logged row across them.
RUN_LOG_FIXED_BYTES = 32 * KiB
RUN_LOG_ROW_BYTES = 512


def parse_bytes(text: str) -> int:
    """'256G', '1T', '500M', '64GiB', '1.5T', or a plain number of bytes (SLURM's --mem units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGTP]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"cannot read {text!r} as a size: use e.g. 500M, 64G, 1T")
    value, unit = float(m.group(1)), m.group(2).upper()
    return int(value * 1024 ** "_KMGTP".index(unit)) if unit else int(value)


def _default(section: type[BaseModel], name: str) -> Any:
    """A config field's default: a plan's defaults are the config's, stated once there."""
    return section.model_fields[name].default


@dataclass(frozen=True)
class Plan:
    haplotypes: int
    sites: int
    window_size: int = _default(WindowConfig, "window_size")
    dims: int = _default(ModelConfig, "dims")
    layers: int = _default(ModelConfig, "layers")
    kernel: int = _default(ModelConfig, "kernel")
    k: int = _default(ModelConfig, "k")
    batch_size: int = _default(TrainConfig, "batch_size")  # per training rank
    index: Literal["compact", "flat-lxd"] = "compact"
    val_fraction: float = _default(DataConfig, "val_fraction")
    # typed share of sites (the target array's, or the simulated one's)
    array_density: float = _default(MaskConfig, "array_density")
    targets: bool = False  # a target VCF is configured (its reader and sites are held)
    target_haplotypes: int = 0  # with targets: their haplotypes (a donor table, the imputation jobs)
    impute_windows_per_task: int = _default(ImputeConfig, "windows_per_task")
    train_samples: int = _default(DonorConfig, "train_samples")  # training queries (their donor tables are held in RAM)
    donor_batch: int = _default(DonorConfig, "batch")  # queries per HMM sweep
    donor_threads: int = 1  # HMM sweeps at once (donors.threads; unset: the job's CPUs, at most MAX_SWEEP_THREADS)
    windows_per_task: int = _default(IndexConfig, "windows_per_task")
    cached_windows: int = 0
    bf16: bool = True
    activation_checkpointing: bool = False
    train_on_gpu: bool = True
    mix_windows: int = _default(TrainConfig, "mix_windows")
    val_batch_size: int = _default(TrainConfig, "val_batch_size")
    keep_checkpoints: int = _default(TrainConfig, "keep_checkpoints")
    steps: int = 100_000  # optimizer steps of the run (its logs grow with them)
    log_every: int = _default(TrainConfig, "log_every")
    tensorboard: bool = _default(TrainConfig, "tensorboard")
    # A genome launch: the sites of each chromosome (``sites`` is their sum). Each chromosome has its own
    # windows, HMM and donor-table parts; the jobs of one task hold one chromosome at a time.
    chromosome_sites: tuple[int, ...] = ()

    @property
    def windows(self) -> int:
        return sum(math.ceil(s / self.window_size) for s in self.chromosome_sites or (self.sites,))

    @property
    def reference(self) -> int:
        return max(1, round(self.haplotypes * (1 - self.val_fraction)))

    @property
    def typed(self) -> int:
        """Array sites on the chromosome: every query's typed sites, one HMM step each."""
        return max(1, round(self.sites * self.array_density))

    @property
    def donor_parts(self) -> int:
        """Parts each donor table is computed in: one per prebuild task (rag_hpc.index.donors.donor_parts)."""
        return sum(
            math.ceil(math.ceil(s / self.window_size) / self.windows_per_task) for s in self.chromosome_sites or (self.sites,)
        )

    def largest_chromosome(self) -> Plan:
        """The plan of the genome's largest chromosome alone: what one prebuild or imputation task holds."""
        return replace(self, sites=max(self.chromosome_sites), chromosome_sites=(), cached_windows=0)

    @property
    def queries(self) -> tuple[int, int]:
        """(training, validation) query haplotypes, each with a donor table, which training holds."""
        return min(2 * self.train_samples, self.reference), self.haplotypes - self.reference

    @property
    def tables(self) -> tuple[int, ...]:
        """Query haplotypes of every donor table the prebuild computes: training's two and the targets'."""
        return (*self.queries, self.target_haplotypes) if self.target_haplotypes else self.queries


@dataclass
class Estimate:
    index_task_ram: int
    disk_per_window: int
    disk_to_build: int
    train_host_ram: int
    gpu_per_device: int
    params: int
    train_disk: int = 0  # the run directory: kept checkpoints and logs
    task_donor_disk: int = 0  # what one prebuild task adds to the cache beyond its windows: its donor-table parts
    impute_task_ram: int = 0  # one imputation array task (and the merge job, which needs less), with targets
    impute_task_disk: int = 0  # the range one imputation task writes
    impute_disk: int = 0  # every range and the merged VCF
    checkpoint_bytes: int = 0
    notes: list[str] = field(default_factory=list)


def genome_plan(plans: list[Plan], max_steps: int | None = None) -> Plan:
    """One plan over the chromosomes of a genome launch (``plan_for`` of each): their sites, typed sites,
    cached windows and training steps add up (one model sees every window); all else is the launch's."""
    if len(plans) == 1:
        return plans[0]
    sites = sum(p.sites for p in plans)
    steps = sum(p.steps for p in plans)
    return replace(
        plans[0],
        sites=sites,
        array_density=sum(p.typed for p in plans) / sites,
        cached_windows=sum(p.cached_windows for p in plans),
        steps=min(steps, max_steps or steps),
        chromosome_sites=tuple(p.sites for p in plans),
    )


def plan_for(config: RagConfig, panel: Panel, cached_windows: int, tasks_per_node: int, cpus_per_task: int = 1) -> Plan:
    """The plan of a launch: this panel under this config, as its jobs will run (one place, so the
    launcher and bench/guard_bench.py size the same thing); ``cpus_per_task``: what each job may use
    (the HMM runs that many sweeps at once unless donors.threads says)."""
    from rag_hpc.data.panel import SPLIT_TRAIN
    from rag_hpc.index.build import WindowCache

    train_haplotypes = int((panel.haplotype_split() == SPLIT_TRAIN).sum())
    # The array's actual size, from the owner of the run's typed sites (the targets' as data.ambiguous
    # leaves them; the simulated one is a random draw, on a tiled bench panel 20 % over its nominal
    # density), since every donor table and HMM step scales with it.
    cache = WindowCache(config, panel)
    typed = cache.array_sites().size
    targets = cache.targets()
    density = max(1, typed) / panel.n_sites
    t = config.train
    on_gpu = config.cluster.gpus_per_node > 0 and t.device != "cpu"
    windows = math.ceil(panel.n_sites / config.windows.window_size)
    # WindowBatchSampler: every window gives (training queries // batch) micro-batches per epoch.
    queries = min(2 * config.donors.train_samples, train_haplotypes)
    steps = t.epochs * windows * (queries // t.batch_size) // t.grad_accum
    return Plan(
        haplotypes=panel.n_haplotypes,
        sites=panel.n_sites,
        window_size=config.windows.window_size,
        dims=config.model.dims,
        layers=config.model.layers,
        kernel=config.model.kernel,
        k=config.model.k,
        batch_size=max(1, t.batch_size // max(1, config.cluster.nodes * tasks_per_node)),
        val_fraction=1 - train_haplotypes / panel.n_haplotypes,
        array_density=density,
        targets=targets is not None,
        target_haplotypes=0 if targets is None else int(targets.haplotypes.shape[0]),
        impute_windows_per_task=config.impute.windows_per_task,
        train_samples=config.donors.train_samples,
        donor_batch=config.donors.batch,
        donor_threads=config.donors.threads or min(MAX_SWEEP_THREADS, cpus_per_task),
        windows_per_task=config.index.windows_per_task,
        cached_windows=cached_windows,
        bf16=t.bf16 if t.bf16 is not None else on_gpu,
        train_on_gpu=on_gpu,
        mix_windows=t.mix_windows,
        val_batch_size=t.val_batch_size,
        keep_checkpoints=t.keep_checkpoints,
        steps=min(steps, t.max_steps or steps),
        log_every=t.log_every,
        tensorboard=t.tensorboard,
    )


def model_shape(plan: Plan) -> tuple[int, int]:
    """(parameters, parameter tensors) of the model this plan trains, from the table the model is built
    from (``rag_hpc.model.layers``), so a change to the model cannot leave the guard behind."""
    shapes = parameter_shapes(ModelConfig(dims=plan.dims, layers=plan.layers, kernel=plan.kernel, k=plan.k)).values()
    return sum(math.prod(shape) for shape in shapes), len(shapes)


def checkpoint_bytes(plan: Plan) -> int:
    params, tensors = model_shape(plan)
    return 12 * params + CHECKPOINT_BYTES_PER_TENSOR * tensors + CHECKPOINT_FIXED_BYTES


def _donor_itemsize(plan: Plan) -> int:
    return np.dtype(donor_dtype(plan.reference)).itemsize


def donor_table_bytes(plan: Plan, queries: int) -> int:
    """One donor table in memory (``rag_hpc.index.donor_format``): a donor and a uint8 weight code per
    query, gap and donor."""
    return (plan.typed + 1) * queries * plan.k * (_donor_itemsize(plan) + 1)


def donor_stored_bytes(plan: Plan) -> float:
    """Bytes per (gap, query, donor) of a stored donor table (``DONOR_BYTES_SCALE``)."""
    share = min(plan.k, plan.reference) / max(1, plan.reference)
    return max(DONOR_BYTES_MIN, DONOR_BYTES_SCALE * share**DONOR_BYTES_POWER)


def donor_table_disk(plan: Plan, queries: int, parts: int = 1) -> int:
    """A donor table as stored in ``parts`` parts (the empty ones are not stored): ``donor_stored_bytes``
    per entry, its query labels (int64), and per part the npz's fixed part and the artifact's own files."""
    stored = min(parts, queries * max(1, len(plan.chromosome_sites)))
    entries = (plan.typed + 1) * queries * plan.k
    return math.ceil(entries * donor_stored_bytes(plan)) + 8 * queries + stored * (2 * KiB + ARTIFACT_OVERHEAD_BYTES)


def donor_part_bytes(plan: Plan, queries: int) -> int:
    """Peak of computing and storing one donor-table part of ``queries`` haplotypes: the largest of the
    HMM's run (its output, a donor and a float16 weight per entry, beside its working set), turning that
    output into the table's layout (output, codes and the slot-ordered table), and packing the table (its
    query-major copies and differences, and zstd's compression context)."""
    entries = (plan.typed + 1) * queries * plan.k
    d = _donor_itemsize(plan)
    return max(
        entries * (d + 2) + donor_build_bytes(plan, queries),
        entries * ((d + 2) + 1 + (d + 1)),
        entries * 4 * (d + 1) + ZSTD_COMPRESS_BYTES,
    )


def donor_decode_bytes(plan: Plan, queries: int) -> int:
    """Peak of reading a stored table (or part) beyond the result: its npz bytes and, of donors and codes
    alike, the decompressed bytes, their running XOR / sum, and its transposed copy."""
    entries = (plan.typed + 1) * queries * plan.k
    return math.ceil(entries * donor_stored_bytes(plan)) + 3 * entries * (_donor_itemsize(plan) + 1)


def donor_build_bytes(plan: Plan, queries: int) -> int:
    """Peak of computing a donor table of ``queries`` haplotypes beyond the table itself: the panel read in
    4,096-site blocks (and the block's selected columns), the reference and the queries at the typed
    sites (uint8), the HMM's emission tables, and one sweep's forward messages (all kept up to
    FORWARD_BYTES, else one per block of 64 sites plus one block) and its few working vectors of batch x
    reference floats, for each of the sweeps that run at once."""
    from rag_hpc.index.matching import FORWARD_BYTES

    per_site = min(plan.donor_batch, queries) * plan.reference * 4
    forward = per_site * plan.typed if per_site * plan.typed <= FORWARD_BYTES else per_site * (plan.typed // 64 + 64)
    tables = 8 * plan.typed * plan.reference  # the emission tables, kept when they fit FORWARD_BYTES
    return (
        2 * plan.haplotypes * 4096
        + plan.typed * (plan.reference + queries)
        + plan.donor_threads * (forward + 8 * per_site)
        + (tables if tables <= FORWARD_BYTES else 0)
    )


def lxd_window_bytes(plan: Plan) -> int:
    """One window of the predecessor's index: reference panel as flattened float32 L×D vectors."""
    return plan.haplotypes * plan.window_size * plan.dims * 4


def _chunk_cache_bytes(plan: Plan) -> int:
    """The HDF5 chunk cache while a window is read: the GT chunks the window overlaps, decompressed.
    HDF5 evicts fully read chunks first, so it does not fill up over the windows of a task."""
    chunk_sites = max(1, min(GT_CHUNK_SITES, GT_CHUNK_BYTES // plan.haplotypes))
    chunks = math.ceil(plan.window_size / chunk_sites) + 1
    return min(H5_CHUNK_CACHE_BYTES, chunks * chunk_sites * plan.haplotypes)


def _panel_bytes(plan: Plan) -> int:
    """What a panel reader keeps for the whole chromosome: positions (int64), AF (float32) and the
    target array's sites (bool), plus the reader for the targets VCF when there is one."""
    return 13 * plan.sites + (TARGETS_READER_BYTES if plan.targets else 0)


def _step_bytes(plan: Plan, batch: int, amp: bool, training: bool) -> int:
    """Memory of one forward (+ backward when ``training``) beyond the weights, on the training device."""
    L, D = plan.window_size, plan.dims
    gaps = math.ceil(L * plan.array_density) + 1
    grad = 2 if training else 1
    # Per (gap x donor) the scores and their correction's hidden layer; per site the donor sums and
    # features; per (site x dim) the residual network's activations; in backward, one [batch, reference]
    # product per gap at a time (rag_hpc.model.rag.donor_sums).
    per_gap_donor = GAP_DONOR_BYTES * grad
    per_site = SITE_BYTES * grad + 4 * D * (plan.layers + 2) * grad
    return batch * (gaps * plan.k * per_gap_donor + L * per_site) + (batch * plan.reference * 4 if training else 0)


def _record_bytes(plan: Plan) -> int:
    """One imputed VCF record on disk: the fixed fields and INFO, then 28 bytes per sample (GT:DS:GP),
    compressed (zlib level 1 in the ranges, bgzip in the merged file) by ~10x: measured 11x on the
    simulated demo (bench/guard_bench.py), where, as in real panels, most sites are rare and most
    genotypes print the same 28 bytes."""
    return (60 + 14 * plan.target_haplotypes) // 10


def _impute_task_bytes(plan: Plan, params: int) -> int:
    """One imputation task: imports (torch for the model), the panel arrays and the targets (reader and
    alleles), the targets' donor table read whole (the prebuild computed it), one part decoded at a time,
    per window its shard, the reference rows as float32 and the model's forward over a batch of 256 target
    haplotypes, and the range's record text (28 bytes per sample and site) with its compressed copy."""
    L, H, R, T = plan.window_size, plan.haplotypes, plan.reference, plan.target_haplotypes
    table = donor_table_bytes(plan, T)
    window = 2 * H * L + H * math.ceil(L / 8) + 4 * R * L + 8 * T * L * 3
    records = min(plan.impute_windows_per_task, plan.windows) * L * (60 + 14 * T)
    return (
        JOB_IMPORT_BYTES
        + TORCH_IMPORT_BYTES
        + TRAIN_FIRST_USE_BYTES
        + TARGETS_READER_BYTES
        + _panel_bytes(plan)
        + _chunk_cache_bytes(plan)
        + T * plan.typed * 2
        + table
        + donor_decode_bytes(plan, math.ceil(T / plan.donor_parts))
        + 16 * params
        + window
        + _step_bytes(plan, min(256, T), False, False)
        + records * 5 // 4
    )


def estimate(plan: Plan) -> Estimate:
    L, H, R = plan.window_size, plan.haplotypes, plan.reference
    notes: list[str] = []
    params, _ = model_shape(plan)
    ckpt = checkpoint_bytes(plan)
    # The run dir holds keep_checkpoints checkpoints with their sidecars, and the logs.
    train_disk = (
        plan.keep_checkpoints * (ckpt + 4 * KiB)
        + RUN_LOG_FIXED_BYTES
        + RUN_LOG_ROW_BYTES * (plan.steps // max(1, plan.log_every) + 1)
    )
    amp = plan.bf16
    # The donor tables are cache artifacts too, one per part and table.
    donor_disk = 0 if plan.index == "flat-lxd" else sum(donor_table_disk(plan, q, plan.donor_parts) for q in plan.tables)
    if plan.index == "flat-lxd":
        emb = lxd_window_bytes(plan)
        # Predecessor, per window: complete + masked embeddings + the FAISS copy, and int64 tokens
        # twice; all windows held at once ("pre-encode everything, then train").
        per_window_ram = 3 * emb + 2 * H * L * 8
        held = plan.windows * per_window_ram
        disk_per_window = emb
        # It embedded with torch in both jobs.
        index_ram = JOB_IMPORT_BYTES + TORCH_IMPORT_BYTES + held
        train_ram = JOB_IMPORT_BYTES + TORCH_IMPORT_BYTES + CUDA_HOST_BYTES + held
        notes.append("flat-lxd holds every window's L×D embeddings in RAM (the predecessor's design)")
    else:
        shard_file = H * math.ceil(L / 8) + 12 * L + 2 * KiB  # npz: packed alleles, positions, AF
        disk_per_window = shard_file + ARTIFACT_OVERHEAD_BYTES
        # One window at a time: its GT block and the haplotype-major copy of it (H·L bytes each), then the
        # packed alleles, the npz buffer and the bytes taken out of it (H·L/8 each).
        window_ram = 2 * H * L + 3 * H * math.ceil(L / 8)
        # After its windows, a task computes its part of each donor table (one part per task).
        part = math.ceil(max(plan.tables) / plan.donor_parts)
        index_ram = (
            JOB_IMPORT_BYTES + _panel_bytes(plan) + _chunk_cache_bytes(plan) + max(window_ram, donor_part_bytes(plan, part))
        )
        # Training: imports (torch.optim pulls in torch._dynamo), the panel arrays, the donor tables of
        # the training and validation queries (held whole; the prebuild computed them: the larger is
        # read as its parts, one part decoded at a time, and joined), and at a checkpoint
        # torch.save's BytesIO plus the bytes copied out of it.
        tables = [donor_table_bytes(plan, q) for q in plan.queries]
        train_ram = (
            JOB_IMPORT_BYTES
            + TORCH_IMPORT_BYTES
            + TRAIN_FIRST_USE_BYTES
            + OPTIMIZER_IMPORT_BYTES
            + _panel_bytes(plan)
            + (TENSORBOARD_BYTES if plan.tensorboard else 0)
            + sum(tables)
            + max(max(tables) + donor_decode_bytes(plan, math.ceil(max(plan.queries) / plan.donor_parts)), 2 * ckpt)
        )
        # A window's tensors: alleles (uint8) of every haplotype, the reference rows again (float32, what
        # the donor sums multiply); mix_windows of them stay loaded (WindowLoader).
        window = H * L + 4 * R * L
        if plan.train_on_gpu:
            # Weights, optimizer state and windows live on the GPU; the host stages one shard (its
            # npz bytes and the unpacked alleles) on the way there.
            train_ram += CUDA_HOST_BYTES + H * math.ceil(L / 8) + 2 * H * L
        else:
            val_batch = min(plan.val_batch_size, max(2, H - R))
            train_ram += (
                16 * params
                + min(plan.mix_windows, plan.windows) * window
                + max(_step_bytes(plan, plan.batch_size, amp, True), _step_bytes(plan, val_batch, amp, False))
            )
    gpu = CUDA_CONTEXT_BYTES + 16 * params + _step_bytes(plan, plan.batch_size, amp, True)
    gpu += min(plan.mix_windows, plan.windows) * (H * L + 4 * R * L)
    if plan.index == "flat-lxd":
        gpu += lxd_window_bytes(plan)  # the predecessor searched a window's L×D index on the GPU
    est = Estimate(
        index_task_ram=int(index_ram),
        disk_per_window=int(disk_per_window),
        disk_to_build=int(disk_per_window * max(0, plan.windows - plan.cached_windows) + donor_disk),
        train_host_ram=int(train_ram),
        gpu_per_device=int(gpu),
        params=params,
        train_disk=int(train_disk),
        task_donor_disk=int(
            0 if plan.index == "flat-lxd" else sum(donor_table_disk(plan, math.ceil(q / plan.donor_parts)) for q in plan.tables)
        ),
        impute_task_ram=int(_impute_task_bytes(plan, params)) if plan.target_haplotypes else 0,
        impute_task_disk=int(min(plan.impute_windows_per_task, plan.windows) * L * _record_bytes(plan) + ARTIFACT_OVERHEAD_BYTES)
        if plan.target_haplotypes
        else 0,
        impute_disk=int(2 * plan.sites * _record_bytes(plan)) if plan.target_haplotypes else 0,
        checkpoint_bytes=int(ckpt),
        notes=notes,
    )
    if len(plan.chromosome_sites) > 1:
        # A prebuild or imputation task holds one chromosome (its panel, HMM, table part): the largest one's.
        one = estimate(plan.largest_chromosome())
        est = replace(
            est,
            index_task_ram=one.index_task_ram,
            task_donor_disk=one.task_donor_disk,
            impute_task_ram=one.impute_task_ram,
            impute_task_disk=one.impute_task_disk,
        )
    return est


@dataclass
class Budget:
    mem: int | None = None  # per node (or the --mem a job may ask for)
    disk_free: int | None = None
    gpu_mem: int | None = None


@dataclass
class Row:
    figure: str
    need: int
    budget: int | None
    advice: str

    @property
    def ok(self) -> bool:
        return self.budget is None or self.need <= self.budget


def check(plan: Plan, est: Estimate, budget: Budget) -> list[Row]:
    lxd = plan.index == "flat-lxd"
    return [
        Row(
            "RAM per index-array task",
            est.index_task_ram,
            budget.mem,
            "use --index compact (window shards of 1 bit per allele, no embeddings)"
            if lxd
            else "ask for more --mem per task or a partition with more memory per node",
        ),
        Row(
            "disk for uncached windows",
            est.disk_to_build,
            budget.disk_free,
            "use --index compact" if lxd else "free space at the cache dir, or set paths.cache_dir to a larger filesystem",
        ),
        # The run dir usually shares the cache's filesystem (both under paths.workdir): counted together.
        Row(
            "disk, + run and imputed" if est.impute_disk else "disk, + the training run",
            est.disk_to_build + est.train_disk + est.impute_disk,
            budget.disk_free,
            "free space, lower train.keep_checkpoints, or put train.run_dir / paths.cache_dir elsewhere",
        ),
        Row(
            "RAM for training (host)",
            est.train_host_ram,
            budget.mem,
            "use --index compact: training needs no prebuilt embeddings"
            if lxd
            else "ask for more --mem, or a partition with more memory per node",
        ),
        *(
            [
                Row(
                    "RAM per imputation task",
                    est.impute_task_ram,
                    budget.mem,
                    "lower impute.windows_per_task, or ask for more --mem / a partition with more memory per node",
                )
            ]
            if plan.target_haplotypes
            else []
        ),
        Row(
            "GPU memory per device",
            est.gpu_per_device,
            budget.gpu_mem,
            "lower train.batch_size, set model.activation_checkpointing=true, or smaller model.dims/layers",
        ),
    ]


def render(plan: Plan, est: Estimate, rows: list[Row]) -> str:
    lines = [
        f"plan: {plan.haplotypes:,} haplotypes x {plan.sites:,} sites"
        + (f" on {len(plan.chromosome_sites)} chromosomes" if plan.chromosome_sites else "")
        + f" = {plan.windows} windows of {plan.window_size}, "
        f"index {plan.index}, D={plan.dims}, {plan.layers} layers, batch {plan.batch_size}, k={plan.k}; "
        f"{est.params:,} parameters",
        f"{'figure':<28}{'need':>12}{'budget':>12}  status",
    ]
    for r in rows:
        status = "ok" if r.ok else f"OVER -> {r.advice}"
        lines.append(
            f"{r.figure:<28}{human_bytes(r.need):>12}{(human_bytes(r.budget) if r.budget is not None else '-'):>12}  {status}"
        )
    lines.append(
        f"disk per window: {human_bytes(est.disk_per_window)}; per checkpoint: {human_bytes(est.checkpoint_bytes)} "
        f"(x{plan.keep_checkpoints} kept)"
    )
    lines.extend(f"note: {n}" for n in est.notes)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "guard",
        "Estimate RAM, disk and GPU memory of a plan and check them against budgets; exits 1 when a budget is exceeded.",
    )
    p.add_argument("--haplotypes", type=int, required=True, help="reference panel haplotypes (2 x samples)")
    p.add_argument("--sites", type=int, required=True, help="biallelic sites on the chromosome")
    p.add_argument("--window-size", type=int, default=Plan.window_size)
    p.add_argument("--dims", type=int, default=Plan.dims)
    p.add_argument("--layers", type=int, default=Plan.layers)
    p.add_argument("--kernel", type=int, default=Plan.kernel)
    p.add_argument("--k", type=int, default=Plan.k, help="donors per query and gap")
    p.add_argument("--batch-size", type=int, default=Plan.batch_size)
    p.add_argument(
        "--index",
        choices=["compact", "flat-lxd"],
        default="compact",
        help="compact: ours (window shards and donor tables); flat-lxd: the predecessor's flattened L×D float index",
    )
    p.add_argument("--mem", help="memory budget per node / job, e.g. 256G")
    p.add_argument("--disk-free", help="free disk at the cache directory, e.g. 1T")
    p.add_argument("--gpu-mem", help="memory per GPU, e.g. 80G")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def main(args: argparse.Namespace) -> int:
    for name in ("haplotypes", "sites", "window_size", "dims", "kernel", "k", "batch_size"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    plan = Plan(
        args.haplotypes, args.sites, args.window_size, args.dims, args.layers, args.kernel, args.k, args.batch_size, args.index
    )
    budget = Budget(*(parse_bytes(v) if v else None for v in (args.mem, args.disk_free, args.gpu_mem)))
    est = estimate(plan)
    rows = check(plan, est, budget)
    print(render(plan, est, rows))
    ok = all(r.ok for r in rows)
    print("within budget" if ok else "REFUSED: over budget (see OVER rows)")
    if args.json:
        print(
            json.dumps(
                {"ok": ok, "plan": asdict(plan), "estimate": asdict(est), "rows": [{**asdict(r), "ok": r.ok} for r in rows]}
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
