"""Validation metrics on masked sites, and where epoch metrics go (CSV, TensorBoard).

Dosage r² pairs the two haplotypes of each validation sample (haplotypes 2s and 2s + 1): predicted
dosage P(ALT | h1) + P(ALT | h2) against the true ALT count, at the sites the run's array leaves
untyped (the same for every validation haplotype). r² per MAF bin is the statistic ``rag_hpc.evaluate``
reports for an imputed VCF, so the two can be compared: the squared Pearson correlation over the
validation samples at each site, averaged over the bin's sites; sites monomorphic in the validation
truth have none and are left out, a constant prediction where the truth varies scores 0. MAF comes
from the panel's train-split AF (what the model sees).

Every quantity is a sum, accumulated in one float64 vector, so ranks (each validating its own
windows) combine with a single all_reduce.
"""

from __future__ import annotations

# matplotlib and TensorBoard are imported only to plot or to open a writer.
import csv
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rag_hpc.fsutil import atomic_file, save_figure
from rag_hpc.maf import MAF_BINS, MAF_EDGES, bin_key

log = logging.getLogger("rag_hpc.train")

MAF_KEYS = tuple(bin_key(lo, hi) for lo, hi in MAF_BINS)  # the metric names' bins (rag_hpc.maf)

# Layout of the accumulator vector.
_LOSS, _N, _CORRECT, _TP, _FP, _FN = range(6)
_HEAD = 6
_PER_BIN = 2  # sites with an r², sum of their r²
SIZE = _HEAD + _PER_BIN * len(MAF_KEYS)


def maf_bin(af: Tensor) -> Tensor:
    """Bin index 0..3 of each site's MAF: [0, .005), [.005, .01), [.01, .05), [.05, .5]."""
    maf = torch.minimum(af, 1.0 - af)
    # Edges in AF's own dtype: a float32 AF of 0.005 is just below the float64 0.005, and belongs in [.005, .01).
    edges = torch.tensor(MAF_EDGES[1:-1], dtype=maf.dtype, device=af.device)
    return torch.bucketize(maf, edges, right=True)


class ValAccumulator:
    """Sums over validation windows; ``result()`` turns them into metrics."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.sums = torch.zeros(SIZE, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add_window(self, logits: Tensor, target: Tensor, masked: Tensor, af: Tensor) -> None:
        """logits / target [H, L] for the validation haplotypes of one window, in pairs (2s, 2s + 1);
        masked [L] bool (the window's fixed mask); af [L] train-split ALT frequency."""
        if logits.shape[0] % 2:
            raise ValueError(f"validation haplotypes come in sample pairs, got {logits.shape[0]}")
        if not bool(masked.any()):
            return
        s = self.sums
        lg = logits[:, masked].double()
        y = target[:, masked].double()
        s[_LOSS] += torch.nn.functional.binary_cross_entropy_with_logits(lg, y, reduction="sum")
        s[_N] += y.numel()
        pred = lg > 0
        truth = y > 0.5
        s[_CORRECT] += (pred == truth).sum()
        s[_TP] += (pred & truth).sum()
        s[_FP] += (pred & ~truth).sum()
        s[_FN] += (~pred & truth).sum()
        p = torch.sigmoid(lg)
        dose = p[0::2] + p[1::2]  # [samples, untyped sites]
        true = y[0::2] + y[1::2]
        dx, dy = dose - dose.mean(0), true - true.mean(0)
        sxx, syy, sxy = (dx * dx).sum(0), (dy * dy).sum(0), (dx * dy).sum(0)
        r2 = torch.where(sxx > 1e-12, sxy * sxy / (sxx * syy).clamp(min=1e-300), torch.zeros_like(sxy)).clamp(max=1.0)
        has = (syy > 1e-12) & (dose.shape[0] >= 2)  # monomorphic in the truth: no r²
        bins = maf_bin(af[masked])
        for b in range(len(MAF_KEYS)):
            cols = has & (bins == b)
            o = _HEAD + _PER_BIN * b
            s[o] += cols.sum()
            s[o + 1] += r2[cols].sum()

    def result(self) -> dict[str, float]:
        s = self.sums.cpu().tolist()
        n = s[_N]
        out: dict[str, float] = {
            "val_loss": s[_LOSS] / n if n else math.nan,
            "val_acc": s[_CORRECT] / n if n else math.nan,
        }
        tp, fp, fn = s[_TP], s[_FP], s[_FN]
        out["val_f1_alt"] = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else math.nan
        for b, name in enumerate(MAF_KEYS):
            o = _HEAD + _PER_BIN * b
            out[f"val_r2_maf_{name}"] = s[o + 1] / s[o] if s[o] else math.nan
            out[f"val_n_maf_{name}"] = s[o]
        return out


# ------------------------------------------------------------------------------------------------
# sinks

EPOCH_COLUMNS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "val_loss",
    "val_acc",
    "val_f1_alt",
    *(f"val_r2_maf_{b}" for b in MAF_KEYS),
    *(f"val_n_maf_{b}" for b in MAF_KEYS),
    "epoch_seconds",
)
# One row per log window (train.log_every steps): the loss curve.
STEP_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "steps_per_s")


class MetricsCsv:
    """A CSV of metric rows (``metrics.csv`` per epoch, ``steps.csv`` per log window). Rows whose
    ``key`` column is at or past ``resume_at`` were written by a run that died before checkpointing
    them and are dropped at start, so a resumed run never holds a row twice."""

    def __init__(self, path: Path, columns: tuple[str, ...], key: str, resume_at: int):
        self.path = path
        self.columns = columns
        rows: list[dict[str, str]] = []
        if path.is_file():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r[key]) < resume_at]
        self._write_all(rows)

    def _write_all(self, rows: list[dict[str, Any]]) -> None:
        with atomic_file(self.path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )
            fh.flush()


def plot_loss_curve(run_dir: Path, out_png: Path) -> Path:
    """Training loss per log window (steps.csv) and validation loss per epoch (metrics.csv) vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def read(name: str, column: str) -> tuple[list[int], list[float]]:
        path = run_dir / name
        if not path.is_file():
            return [], []
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get(column) not in (None, "", "nan")]
        return [int(r["step"]) for r in rows], [float(r[column]) for r in rows]

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(*read("steps.csv", "loss"), "-", color="C0", label="train loss (per log window)")
    ax.plot(*read("metrics.csv", "val_loss"), "o-", color="C1", label="validation loss (fixed 50% mask)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked-site cross-entropy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    try:
        return save_figure(fig, out_png)
    finally:
        plt.close(fig)


def open_tensorboard(log_dir: Path, purge_step: int | None) -> Any:
    """A SummaryWriter, or None (with one log line saying why) when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info(
            "TensorBoard scalars off: the `tensorboard` package is not installed (pip install tensorboard); "
            "metrics still go to metrics.csv and train.log"
        )
        return None
    # purge_step drops events a killed run logged past the checkpoint this run resumes from.
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class MetricsSink:
    """Where rank 0's numbers go: steps.csv (a row per logged step), metrics.csv (a row per epoch) and,
    when asked and installed, TensorBoard scalars. Opened at the step a run starts from, so a resumed run's
    files hold each step and epoch once (rows and events past it, from a killed run, are dropped)."""

    def __init__(self, run_dir: Path, step: int, steps_per_epoch: int, tensorboard: bool, resumed: bool):
        self.epochs = MetricsCsv(run_dir / "metrics.csv", EPOCH_COLUMNS, "epoch", step // steps_per_epoch)
        self.steps = MetricsCsv(run_dir / "steps.csv", STEP_COLUMNS, "step", step + 1)
        self.tb = open_tensorboard(run_dir / "tb", purge_step=step if resumed else None) if tensorboard else None

    def step(self, row: dict[str, Any]) -> None:
        """A logged step: ``STEP_COLUMNS``."""
        self.steps.append(row)
        if self.tb is not None:
            for name in ("loss", "lr", "grad_norm", "steps_per_s"):
                self.tb.add_scalar(f"train/{name}", row[name], row["step"])

    def epoch(self, row: dict[str, Any]) -> None:
        """An epoch's end: ``EPOCH_COLUMNS`` (validation's only when it ran)."""
        self.epochs.append(row)
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, float) and math.isfinite(value):
                    self.tb.add_scalar(
                        f"{'val' if key.startswith('val_') else 'epoch'}/{key.removeprefix('val_')}", value, row["step"]
                    )
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
