"""Training step throughput of the donor imputer on one device, with synthetic panel data.

    python -m bench.train_bench [--dims 8 --layers 1 --kernel 5 --k 64 --batch 32 --seq 511 --steps 50
                                 --warmup 10 --panel-haps 4508 --device auto] [--json]

One "batch" is what one optimizer step of ``rag_hpc.train`` does for one micro-batch, through the same
functions (``forward_batch``): read each query's donors per gap from its donor table, the per-site donor
attention (sparse donor sums over the window's reference) and residual network forward, masked BCE on the untyped sites,
backward, gradient clipping and the AdamW step. The donor tables themselves are built once per run and
cached (``rag_hpc.index.donors``), so they are not part of a step; here they are random (the step's cost
does not depend on which donors they name). ms/batch is the median over --steps timed batches after
--warmup untimed ones (CUDA synchronised). samples/s = batch / that median.

The panel is one window of --seq sites over --panel-haps haplotypes with LD-like structure (mosaics of 16
founders, as in bench/index_bench.py), typed at every 40th site; it needs no files.

Peak memory: torch.cuda.max_memory_allocated on GPU; on CPU the process's peak RSS (ru_maxrss), which
includes the interpreter and torch themselves.

MFU (GPU only): model FLOPs per batch / time / the device's peak dense bf16 (or TF32 with --no-bf16)
tensor-core rate. Model FLOPs = 3 x forward FLOPs (backward ~ 2 x forward): 2 x in x out per token for
every nn.Linear call (forward hooks), 2 x in x out x kernel per site for every convolution, and the
attention over donors (4 x B x L x k). The gather, norms, activations and the optimizer are not counted.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.common import machine_line
from bench.index_bench import ld_haplotypes
from rag_hpc.config import ModelConfig, TrainConfig
from rag_hpc.data.windows import Window
from rag_hpc.index.donors import DonorTable
from rag_hpc.model.rag import DonorImputer, imputation_loss
from rag_hpc.train.distributed import resolve_device
from rag_hpc.train.trainer import build_optimizer, forward_batch, window_data

# Dense tensor-core peaks (FLOP/s) by device-name fragment: (bf16, tf32). SXM figures for H100/H200.
PEAKS = {
    "H200": (989.4e12, 494.7e12),
    "H100 PCIe": (756.0e12, 378.0e12),
    "H100": (989.4e12, 494.7e12),
    "A100": (312.0e12, 156.0e12),
    "L40S": (362.05e12, 183.0e12),
}

GPU_DEFAULTS = {
    "dims": 64,
    "layers": 4,
    "kernel": 5,
    "batch": 256,
    "seq": 511,
    "k": 64,
    "steps": 50,
    "warmup": 10,
    "panel_haps": 4508,
}
CPU_DEFAULTS = {  # the model config's defaults
    "dims": 8,
    "layers": 1,
    "kernel": 5,
    "batch": 32,
    "seq": 511,
    "k": 64,
    "steps": 20,
    "warmup": 3,
    "panel_haps": 4508,
}
TYPED_EVERY = 40  # a genotyping array's density


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--kernel", type=int)
    parser.add_argument("--batch", type=int, help="queries per batch")
    parser.add_argument("--seq", type=int, help="sites per window")
    parser.add_argument("--k", type=int, help="donors per query and gap")
    parser.add_argument("--steps", type=int, help="timed batches")
    parser.add_argument("--warmup", type=int, help="untimed batches first")
    parser.add_argument("--panel-haps", type=int, help="haplotypes in the synthetic reference window")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU when its name is not in the table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    args.device = resolve_device(args.device)
    defaults = GPU_DEFAULTS if args.device.type == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.bf16 is None:
        args.bf16 = args.device.type == "cuda"
    return args


def count_forward_flops(model: DonorImputer, run_forward: Any, batch: int, seq: int, k: int) -> float:
    """Forward FLOPs of one batch: Linear and Conv1d calls counted by hooks, the donor sums analytically."""
    counted = [0.0]

    def linear(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        counted[0] += 2.0 * (inputs[0].numel() // module.in_features) * module.in_features * module.out_features

    def conv(module: nn.Conv1d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        counted[0] += 2.0 * output.numel() * module.in_channels * module.kernel_size[0]

    handles = [m.register_forward_hook(linear) for m in model.modules() if isinstance(m, nn.Linear)]
    handles += [m.register_forward_hook(conv) for m in model.modules() if isinstance(m, nn.Conv1d)]
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for h in handles:
            h.remove()
    return counted[0] + 6.0 * batch * seq * k  # three donor sums (own and both neighbouring gaps), a multiply-add each


def peak_flops(device: torch.device, bf16: bool, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (bf, tf) in PEAKS.items():
        if fragment in name:
            return bf if bf16 else tf
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    rng = np.random.default_rng(args.seed)
    panel = ld_haplotypes(rng, args.panel_haps, args.seq)
    af = panel.mean(0).astype(np.float32)
    all_ids = np.arange(args.panel_haps, dtype=np.int64)
    typed = np.arange(0, args.seq, TYPED_EVERY, dtype=np.int64)
    observed = np.zeros(args.seq, bool)
    observed[typed] = True
    data = window_data(0, panel, af, all_ids, observed, device)  # the whole synthetic panel is the reference
    window = Window(0, 0, args.seq)
    # A donor table for every haplotype as a query: random donors, Dirichlet weights (quantized as stored).
    n_gaps = typed.size + 1
    donors = rng.integers(0, args.panel_haps, (n_gaps, args.panel_haps, args.k)).astype(np.uint16)
    weights = rng.dirichlet(np.ones(args.k), (n_gaps, args.panel_haps)).astype(np.float16)
    table = DonorTable.of(typed, donors, weights)

    model_cfg = ModelConfig(dims=args.dims, layers=args.layers, kernel=args.kernel, k=args.k)
    train_cfg = TrainConfig()
    torch.manual_seed(args.seed)
    model = DonorImputer(model_cfg).to(device).train()
    optimizer = build_optimizer(model, train_cfg)
    n_params = sum(p.numel() for p in model.parameters())
    masked_row = torch.from_numpy(~observed).to(device)

    def batch_ids(i: int) -> np.ndarray:
        return np.sort(np.random.default_rng([args.seed, i]).choice(all_ids, size=args.batch, replace=False))

    def forward(ids: np.ndarray) -> torch.Tensor:
        return forward_batch(model, window, data, table, ids, torch.from_numpy(ids).to(device), args.bf16)

    def step(i: int) -> float:
        ids = batch_ids(i)
        logits = forward(ids)
        masked = masked_row.expand_as(logits)
        loss = imputation_loss(logits, data.alleles[torch.from_numpy(ids).to(device)], masked)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.clip_norm or 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # synchronises, as the training loop's per-step loss does

    fwd_ids = batch_ids(10**9)  # a batch the timed loop never draws
    fwd_flops = count_forward_flops(model, lambda: forward(fwd_ids), args.batch, args.seq, args.k)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup):
        step(i)
    times = []
    losses = []
    for i in range(args.warmup, args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        losses.append(step(i))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    ms = 1000.0 * statistics.median(times)
    if device.type == "cuda":
        peak_mem, mem_kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        peak_mem, mem_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"
    train_flops = 3.0 * fwd_flops
    peak = peak_flops(device, args.bf16, args.peak_tflops)
    mfu = train_flops / (ms / 1000.0) / peak if peak else None

    row = {
        "bench": "train_step",
        "machine": machine_line(),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "config": {
            "dims": args.dims,
            "layers": args.layers,
            "kernel": args.kernel,
            "batch": args.batch,
            "seq": args.seq,
            "k": args.k,
            "panel_haps": args.panel_haps,
            "bf16": args.bf16,
            "threads": torch.get_num_threads(),
        },
        "parameters": n_params,
        "timed_batches": args.steps,
        "ms_per_batch": round(ms, 3),
        "ms_per_batch_min": round(1000.0 * min(times), 3),
        "samples_per_s": round(args.batch / (ms / 1000.0), 2),
        "tokens_per_s": round(args.batch * args.seq / (ms / 1000.0), 1),
        "includes": "donor sums + forward + backward + clip + AdamW step",
        "peak_memory_mib": round(peak_mem, 1),
        "peak_memory_kind": mem_kind,
        "model_tflop_per_batch": round(train_flops / 1e12, 6),
        "achieved_tflops": round(train_flops / (ms / 1000.0) / 1e12, 4),
        "mfu": round(mfu, 4) if mfu is not None else None,
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
    }
    print(f"{row['machine']}; {row['device']}")
    print(
        f"model: dims {args.dims}, layers {args.layers}, kernel {args.kernel}, k {args.k}, window {args.seq}, "
        f"batch {args.batch}, bf16 {'on' if args.bf16 else 'off'}: {n_params:,} parameters; panel {args.panel_haps} haplotypes"
    )
    print(
        f"{row['ms_per_batch']:.1f} ms/batch (median of {args.steps}, {row['includes']}), "
        f"{row['samples_per_s']:.1f} samples/s, {row['tokens_per_s']:.0f} tokens/s"
    )
    print(
        f"peak memory {row['peak_memory_mib']:.0f} MiB ({mem_kind}); model FLOPs {train_flops / 1e9:.2f} GFLOP/batch, "
        f"{row['achieved_tflops']:.3f} TFLOP/s" + (f", MFU {100 * mfu:.1f} %" if mfu is not None else ", MFU n/a (no GPU peak)")
    )
    if args.json:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
