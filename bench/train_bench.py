"""Training step throughput of the Embedding-RAG imputer on one device, with synthetic panel data.

    python bench/train_bench.py [--dims 192 --layers 10 --heads 6 --batch 32 --seq 512 --k 1 --steps 50
                                 --warmup 10 --panel-haps 4508 --device auto] [--json]

One "batch" is what one optimizer step of ``rag_hpc.train`` does for one micro-batch, through the same
functions: counter-based AF-guided masks for the queries (mask rate 0.5), the exact retrieval of the
k nearest reference haplotypes under each query's mask (a float64 GEMM over the whole synthetic panel,
own sample excluded), forward, masked BCE, backward, gradient clipping and the AdamW step. ms/batch
is the median over --steps timed batches after --warmup untimed ones (CUDA synchronised), and
*includes retrieval*. samples/s = batch / that median.

The panel is one window of --seq - 1 sites over --panel-haps haplotypes with LD-like structure
(mosaics of 16 founders with recombination and mutation, as in bench/index_bench.py); it needs no files.

Peak memory: torch.cuda.max_memory_allocated on GPU; on CPU the process's peak RSS (ru_maxrss), which
includes the interpreter, torch and faiss themselves.

MFU (GPU only): model FLOPs per batch / time / the device's peak dense bf16 (or TF32 with --no-bf16)
tensor-core rate. Model FLOPs = 3 x forward FLOPs (backward ~ 2 x forward), where forward FLOPs are
counted, not estimated from a parameter count: 2 x in x out per token for every nn.Linear call
(forward hooks, so the retrieved haplotypes' embedding and key projections are counted on their
B x k x L tokens and the encoder on B x (L + 1)), plus attention 4 x B x T^2 x D per layer and the
fusion einsums 4 x B x k x L x D. Retrieval (float64, off the tensor cores), norms, activations and
the optimizer are not model FLOPs; activation checkpointing's recompute is not counted either.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_line
from index_bench import ld_haplotypes

from rag_hpc.config import MaskConfig, ModelConfig, TrainConfig
from rag_hpc.data.masks import train_mask
from rag_hpc.model.rag import RagImputer, imputation_loss
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
    "dims": 192,
    "layers": 10,
    "heads": 6,
    "batch": 32,
    "seq": 512,
    "k": 1,
    "steps": 50,
    "warmup": 10,
    "panel_haps": 4508,
}
CPU_DEFAULTS = {"dims": 64, "layers": 2, "heads": 4, "batch": 8, "seq": 512, "k": 1, "steps": 20, "warmup": 3, "panel_haps": 1000}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--batch", type=int, help="queries per batch")
    parser.add_argument("--seq", type=int, help="model sequence length: SOS + (seq - 1) window sites")
    parser.add_argument("--k", type=int, help="retrieved haplotypes per query")
    parser.add_argument("--steps", type=int, help="timed batches")
    parser.add_argument("--warmup", type=int, help="untimed batches first")
    parser.add_argument("--panel-haps", type=int, help="haplotypes in the synthetic reference window")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    parser.add_argument("--activation-checkpointing", action="store_true")
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


def count_forward_flops(model: RagImputer, run_forward: Any, batch: int, seq: int, k: int) -> float:
    """Forward FLOPs of one batch: Linear calls counted by hooks, attention and fusion einsums analytically."""
    linear = [0.0]

    def hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        tokens = inputs[0].numel() // module.in_features
        linear[0] += 2.0 * tokens * module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for h in handles:
            h.remove()
    d, length = model.cfg.dims, seq - 1
    attention = model.cfg.layers * 4.0 * batch * seq * seq * d
    fusion = 4.0 * batch * k * length * d
    return linear[0] + attention + fusion


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
    length = args.seq - 1
    rng = np.random.default_rng(args.seed)
    panel = ld_haplotypes(rng, args.panel_haps, length)
    af = panel.mean(0).astype(np.float32)
    all_ids = np.arange(args.panel_haps, dtype=np.int64)
    data = window_data(0, panel, af, all_ids, device)  # the whole synthetic panel is the reference

    model_cfg = ModelConfig(
        dims=args.dims, layers=args.layers, heads=args.heads, k=args.k, activation_checkpointing=args.activation_checkpointing
    )
    masks_cfg = MaskConfig(levels=[0.5])
    train_cfg = TrainConfig()
    torch.manual_seed(args.seed)
    model = RagImputer(model_cfg, args.seq).to(device).train()
    optimizer = build_optimizer(model, train_cfg)
    n_params = sum(p.numel() for p in model.parameters())

    def batch_inputs(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.random.default_rng([args.seed, i]).choice(all_ids, size=args.batch, replace=False)
        masked = train_mask(masks_cfg, 0, ids, 0, af)
        return torch.from_numpy(ids).to(device), torch.from_numpy(masked).to(device)

    def step(i: int) -> float:
        ids, masked = batch_inputs(i)  # masks are part of the step's cost, as in training
        logits = forward_batch(model, model, data, ids, masked, args.k, args.bf16)
        loss = imputation_loss(logits, data.alleles[ids], masked)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.clip_norm or 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # synchronises, as the training loop's per-step loss does

    fwd_ids, fwd_masked = batch_inputs(10**9)  # a batch the timed loop never draws
    fwd_flops = count_forward_flops(
        model, lambda: forward_batch(model, model, data, fwd_ids, fwd_masked, args.k, args.bf16), args.batch, args.seq, args.k
    )
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
            "heads": args.heads,
            "batch": args.batch,
            "seq": args.seq,
            "k": args.k,
            "panel_haps": args.panel_haps,
            "bf16": args.bf16,
            "activation_checkpointing": args.activation_checkpointing,
            "threads": torch.get_num_threads(),
        },
        "parameters": n_params,
        "timed_batches": args.steps,
        "ms_per_batch": round(ms, 3),
        "ms_per_batch_min": round(1000.0 * min(times), 3),
        "samples_per_s": round(args.batch / (ms / 1000.0), 2),
        "tokens_per_s": round(args.batch * args.seq / (ms / 1000.0), 1),
        "includes": "masks + exact retrieval + forward + backward + clip + AdamW step",
        "peak_memory_mib": round(peak_mem, 1),
        "peak_memory_kind": mem_kind,
        "model_tflop_per_batch": round(train_flops / 1e12, 6),
        "achieved_tflops": round(train_flops / (ms / 1000.0) / 1e12, 4),
        "mfu": round(mfu, 4) if mfu is not None else None,
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
    }
    print(f"{row['machine']}; {row['device']}")
    print(
        f"model: dims {args.dims}, layers {args.layers}, heads {args.heads}, k {args.k}, seq {args.seq}, "
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
