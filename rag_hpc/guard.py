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

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Literal

GiB = 2**30
MiB = 2**20

# Resident size of a worker process after importing torch, faiss, h5py and numpy (CPU build),
# measured with psutil: ~250 MB. The HDF5 chunk cache the panel reader asks for is on top.
PROCESS_BASE_BYTES = 250 * MiB
H5_CHUNK_CACHE_BYTES = 64 * MiB
# Host memory of a CUDA training process beyond the imports (CUDA context, pinned staging).
CUDA_HOST_BYTES = 1 * GiB
CUDA_CONTEXT_BYTES = 600 * MiB  # per GPU, not usable by tensors
# Activation bytes per (token x dim x layer) of a pre-LN block under bf16 autocast with fused
# attention (Korthikanti et al. 2022: 34 s·b·h without the s² attention term), and fp32 without.
ACT_BYTES_BF16 = 34
ACT_BYTES_FP32 = 68


def parse_bytes(text: str) -> int:
    """'256G', '1T', '500M', '64GiB', '1.5T', or a plain number of bytes (SLURM's --mem units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGTP]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read {text!r} as a size: use e.g. 500M, 64G, 1T")
    value, unit = float(m.group(1)), m.group(2).upper()
    return int(value * 1024 ** "_KMGTP".index(unit)) if unit else int(value)


def human(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


@dataclass(frozen=True)
class Plan:
    haplotypes: int
    sites: int
    window_size: int = 511
    dims: int = 192
    layers: int = 10
    heads: int = 6
    k: int = 1
    batch_size: int = 32
    index: Literal["compact", "flat-lxd"] = "compact"
    val_fraction: float = 0.1
    val_rate: float = 0.5
    windows_per_task: int = 16
    cached_windows: int = 0
    bf16: bool = True
    activation_checkpointing: bool = False

    @property
    def windows(self) -> int:
        return math.ceil(self.sites / self.window_size)

    @property
    def reference(self) -> int:
        return max(1, round(self.haplotypes * (1 - self.val_fraction)))

    @property
    def observed(self) -> int:
        return max(1, round(self.window_size * (1 - self.val_rate)))


@dataclass
class Estimate:
    index_task_ram: int
    disk_per_window: int
    disk_to_build: int
    train_host_ram: int
    gpu_per_device: int
    params: int
    notes: list[str] = field(default_factory=list)


def model_params(dims: int, layers: int, fusion_scales: int = 3) -> int:
    d = dims
    block = 12 * d * d + 13 * d  # qkv, proj, 4x MLP, two LayerNorms
    embed = 7 * d + 2 * 16 * d + d + 16 + 2 * d
    fusion = (2 * fusion_scales + 1) * 32 + 32 + 33 + 2 * (d * d + d) + (2 * d + 1) * d + d + d * d + d
    return layers * block + embed + fusion + 2 * d + d + 1


def lxd_window_bytes(plan: Plan) -> int:
    """One window of the predecessor's index: reference panel as flattened float32 L×D vectors."""
    return plan.haplotypes * plan.window_size * plan.dims * 4


def estimate(plan: Plan) -> Estimate:
    L, H = plan.window_size, plan.haplotypes
    notes: list[str] = []
    if plan.index == "flat-lxd":
        emb = lxd_window_bytes(plan)
        # Predecessor, per window: complete + masked embeddings + the FAISS copy, and int64 tokens
        # twice; all windows held at once ("pre-encode everything, then train").
        per_window_ram = 3 * emb + 2 * H * L * 8
        held = plan.windows * per_window_ram
        disk_per_window = emb
        index_ram = PROCESS_BASE_BYTES + held
        train_ram = PROCESS_BASE_BYTES + CUDA_HOST_BYTES + held
        notes.append("flat-lxd holds every window's L×D embeddings in RAM (the predecessor's design)")
    else:
        shard = H * math.ceil(L / 8) + L * 12 + 4096
        vectors = plan.reference * plan.observed * 4
        index_file = vectors + plan.reference * math.ceil(plan.observed / 8) + L * 8 + 4096
        disk_per_window = shard + index_file
        # Working set of one window while building: GT slab and haplotypes (1 byte each), the
        # reference rows, and the float vectors three times (array, FAISS copy, serialised bytes).
        window_ram = 2 * H * L + plan.reference * L + 3 * vectors + 2 * index_file
        index_ram = PROCESS_BASE_BYTES + H5_CHUNK_CACHE_BYTES + window_ram
        # Training keeps the current window's shard unpacked and the panel reader's chunk cache.
        train_ram = PROCESS_BASE_BYTES + CUDA_HOST_BYTES + H5_CHUNK_CACHE_BYTES + 4 * H * L
    params = model_params(plan.dims, plan.layers)
    tokens = plan.batch_size * (L + 1)
    act_unit = ACT_BYTES_BF16 if plan.bf16 else ACT_BYTES_FP32
    layers_held = 1 if plan.activation_checkpointing else plan.layers
    activations = tokens * plan.dims * (act_unit * layers_held + (2 * plan.layers if plan.activation_checkpointing else 0))
    retrieved = plan.batch_size * plan.k * (L + 1) * plan.dims * 4 * 4  # embedded refs, fp32, 4 live copies
    gpu = CUDA_CONTEXT_BYTES + 16 * params + activations + retrieved
    if plan.index == "flat-lxd":
        gpu += lxd_window_bytes(plan)  # the predecessor searched a window's L×D index on the GPU
    return Estimate(
        index_task_ram=int(index_ram),
        disk_per_window=int(disk_per_window),
        disk_to_build=int(disk_per_window * max(0, plan.windows - plan.cached_windows)),
        train_host_ram=int(train_ram),
        gpu_per_device=int(gpu),
        params=params,
        notes=notes,
    )


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
        Row("RAM per index-array task", est.index_task_ram, budget.mem,
            "use --index compact (one float per observed site)" if lxd else
            "ask for more --mem per task or a partition with more memory per node"),
        Row("disk for uncached windows", est.disk_to_build, budget.disk_free,
            "use --index compact" if lxd else
            "free space at the cache dir, or set paths.cache_dir to a larger filesystem"),
        Row("RAM for training (host)", est.train_host_ram, budget.mem,
            "use --index compact: training needs no prebuilt embeddings" if lxd else
            "ask for more --mem, or a partition with more memory per node"),
        Row("GPU memory per device", est.gpu_per_device, budget.gpu_mem,
            "lower train.batch_size, set model.activation_checkpointing=true, or smaller model.dims/layers"),
    ]


def render(plan: Plan, est: Estimate, rows: list[Row]) -> str:
    lines = [
        f"plan: {plan.haplotypes:,} haplotypes x {plan.sites:,} sites = {plan.windows} windows of {plan.window_size}, "
        f"index {plan.index}, D={plan.dims}, {plan.layers} layers, batch {plan.batch_size}, k={plan.k}; "
        f"{est.params / 1e6:.1f} M parameters",
        f"{'figure':<28}{'need':>12}{'budget':>12}  status",
    ]
    for r in rows:
        status = "ok" if r.ok else f"OVER -> {r.advice}"
        lines.append(f"{r.figure:<28}{human(r.need):>12}{(human(r.budget) if r.budget is not None else '-'):>12}  {status}")
    lines.append(f"disk per window: {human(est.disk_per_window)}")
    lines.extend(f"note: {n}" for n in est.notes)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rag_hpc.guard",
        description="Estimate RAM, disk and GPU memory of a plan and check them against budgets; "
        "exits 1 when a budget is exceeded.",
    )
    p.add_argument("--haplotypes", type=int, required=True, help="reference panel haplotypes (2 x samples)")
    p.add_argument("--sites", type=int, required=True, help="biallelic sites on the chromosome")
    p.add_argument("--window-size", type=int, default=511)
    p.add_argument("--dims", type=int, default=192)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--index", choices=["compact", "flat-lxd"], default="compact",
                   help="compact: ours; flat-lxd: the predecessor's flattened L×D float index")
    p.add_argument("--mem", help="memory budget per node / job, e.g. 256G")
    p.add_argument("--disk-free", help="free disk at the cache directory, e.g. 1T")
    p.add_argument("--gpu-mem", help="memory per GPU, e.g. 80G")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for name in ("haplotypes", "sites", "window_size", "dims", "layers", "heads", "k", "batch_size"):
            if getattr(args, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
        plan = Plan(args.haplotypes, args.sites, args.window_size, args.dims, args.layers, args.heads, args.k,
                    args.batch_size, args.index)
        budget = Budget(*(parse_bytes(v) if v else None for v in (args.mem, args.disk_free, args.gpu_mem)))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    est = estimate(plan)
    rows = check(plan, est, budget)
    print(render(plan, est, rows))
    ok = all(r.ok for r in rows)
    print("within budget" if ok else "REFUSED: over budget (see OVER rows)")
    if args.json:
        print(json.dumps({"ok": ok, "plan": asdict(plan), "estimate": asdict(est),
                          "rows": [{**asdict(r), "ok": r.ok} for r in rows]}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
