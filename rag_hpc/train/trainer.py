"""The training loop: window-grouped batches, retrieval, AdamW with warmup + cosine, exact resume.

Determinism. Everything a step consumes is a function of the step number: the batch (``sampler``), its
masks (counter-based, ``rag_hpc.data.masks``), its retrieval (exact, ties to the lower index) and
dropout (torch's RNG is reseeded per micro-batch from (seed, step, micro-batch, rank)). So a run
resumed from a checkpoint continues bit-for-bit where it stopped, and the global batch of a step is
the same on any number of ranks: ``train.batch_size`` is split evenly across ranks and the loss is
normalised by the masked-site count of the *global* micro-batch (known on every rank without
communication, because masks are deterministic), times world size to undo DDP's gradient averaging.
The objective of an optimizer step is the mean over its ``grad_accum`` micro-batches of the masked-site
mean BCE.

Checkpoints are written at step boundaries only: every ``checkpoint_every_steps``, at each epoch end
(after its validation), at the end, and when asked by a signal or ``request_checkpoint``. A request on
any rank reaches all of them through the per-step all_reduce that also sums the step loss, so every
rank stops at the same step and nobody waits in a collective for a rank that left; rank 0 writes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from tqdm import tqdm

from rag_hpc.checkpoint import CHECKPOINT_FORMAT, CheckpointFile, CheckpointManager, rng_state, set_rng_state
from rag_hpc.config import RagConfig, TrainConfig
from rag_hpc.data.windows import Window
from rag_hpc.errors import CheckpointError, ConfigError
from rag_hpc.fsutil import atomic_write
from rag_hpc.index.build import WindowCache
from rag_hpc.index.donors import DonorTable, read_donors, run_queries
from rag_hpc.locks import RunInUseError, one_writer
from rag_hpc.model.predict import donor_logits
from rag_hpc.model.rag import DonorImputer, imputation_loss
from rag_hpc.rng import RNG_NAME, Stream, uniforms
from rag_hpc.train.distributed import DistEnv, all_reduce_sum, barrier, broadcast_object, init_distributed, shutdown, wrap_model
from rag_hpc.train.metrics import MetricsSink, ValAccumulator
from rag_hpc.train.sampler import MicroBatch, WindowBatchSampler
from rag_hpc.train.stop import DEFAULT_SIGNALS, TrainingInterrupted, stop_on_signals, stop_reason, take_request

log = logging.getLogger("rag_hpc.train")

# Config fields a resumed run may change: where things go, how often they are reported, when to
# stop. Anything else changes the trajectory, so resuming under it would be a different run.
_FREE_ON_RESUME = {
    "paths",
    "data",
    "index",
    "cluster",
    "train.name",
    "train.run_dir",
    "train.device",
    "train.bf16",
    "train.max_steps",
    "train.val_every",
    "train.val_batch_size",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.log_every",
    "train.progress",
    "train.tensorboard",
    "train.min_step_seconds",
    "donors.batch",
}


# ------------------------------------------------------------------------------------------------
# optimisation


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR factor after ``step`` optimizer steps: linear warmup to 1, then cosine down to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on Linear weights only (biases, norms, embeddings and the AF frequencies
    are not weights whose magnitude should shrink)."""
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay = [p for p in model.parameters() if id(p) in decay_ids]
    other = [p for p in model.parameters() if id(p) not in decay_ids]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        foreach=None,
    )


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


# ------------------------------------------------------------------------------------------------
# one window's tensors, and one micro-batch


@dataclass
class WindowData:
    window: int
    alleles: Tensor  # uint8 [n_haplotypes, L] on the device: queries are rows of it
    reference: Tensor  # float32 [n_reference, L]: the train split in ``reference_haplotypes`` order (donor rows)
    observed: Tensor  # bool [L]: the run's array sites in this window, all a query sees
    maf: Tensor  # float32 [L], train-split MAF

    @property
    def length(self) -> int:
        return int(self.maf.shape[0])


def window_data(
    window: int, alleles: np.ndarray, af: np.ndarray, reference_ids: np.ndarray, observed: np.ndarray, device: torch.device
) -> WindowData:
    all_t = torch.from_numpy(np.ascontiguousarray(alleles)).to(device)
    return WindowData(
        window,
        all_t,
        torch.from_numpy(alleles[np.asarray(reference_ids, dtype=np.int64)]).to(device, torch.float32),
        torch.from_numpy(observed).to(device),
        torch.from_numpy(np.minimum(af, 1 - af).astype(np.float32)).to(device),
    )


def forward_batch(
    net: nn.Module, window: Window, data: WindowData, table: DonorTable, rows: np.ndarray, query_ids: Tensor, amp: bool
) -> Tensor:
    """Run ``net`` (the model or its DDP wrapper) on the queries ``query_ids`` (panel haplotype ids, rows
    ``rows`` of their donor table) typed at the window's array sites: ALT logits [B, L]."""
    with autocast(data.maf.device, amp):
        return donor_logits(net, table, window, rows, data.reference, data.alleles[query_ids], data.observed, data.maf)


@dataclass
class TrainState:
    """Where a run stands between optimizer steps: with the model, optimizer, scheduler and RNG states,
    what a checkpoint saves and a resume restores. The sampler's position follows from ``step`` (an
    epoch is ``steps_per_epoch`` steps of ``grad_accum`` micro-batches); the checkpoint records it too,
    so a resume under other windows or split is refused instead of drawing other batches."""

    step: int = 0
    epoch_loss_sum: float = 0.0  # this epoch's so far, for its train_loss
    epoch_loss_steps: int = 0
    epoch_seconds: float = 0.0

    def to_checkpoint(self, steps_per_epoch: int, grad_accum: int) -> dict[str, Any]:
        epoch, in_epoch = divmod(self.step, steps_per_epoch)
        return {
            "step": self.step,
            "epoch": epoch,
            "batch_in_epoch": in_epoch * grad_accum,  # the sampler position of the next micro-batch
            "epoch_accum": {"loss_sum": self.epoch_loss_sum, "steps": self.epoch_loss_steps, "seconds": self.epoch_seconds},
        }

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], steps_per_epoch: int, grad_accum: int, where: object) -> TrainState:
        state = cls(
            int(saved["step"]),
            float(saved["epoch_accum"]["loss_sum"]),
            int(saved["epoch_accum"]["steps"]),
            float(saved["epoch_accum"]["seconds"]),
        )
        expected = state.to_checkpoint(steps_per_epoch, grad_accum)
        if (saved["epoch"], saved["batch_in_epoch"]) != (expected["epoch"], expected["batch_in_epoch"]):
            raise CheckpointError(
                f"{where}: sampler position (epoch {saved['epoch']}, micro-batch {saved['batch_in_epoch']}) does not match "
                f"step {state.step} with {steps_per_epoch} steps per epoch; the panel's windows or split changed"
            )
        return state

    def end_epoch(self) -> None:
        self.epoch_loss_sum, self.epoch_loss_steps, self.epoch_seconds = 0.0, 0, 0.0


@dataclass
class ChromosomeData:
    """What training reads of one chromosome: its window cache, the run's typed sites on it and the donor
    tables of the training and validation queries there."""

    cache: WindowCache
    typed: np.ndarray
    train_donors: DonorTable | None = None
    val_donors: DonorTable | None = None


class WindowLoader:
    """Shards of the windows in flight, on the device; loaded (checksum-verified) once each. Windows are
    numbered over the run's chromosomes in order (``Trainer.where``)."""

    def __init__(
        self,
        chromosomes: list[ChromosomeData],
        where: list[tuple[int, int]],
        reference_ids: np.ndarray,
        device: torch.device,
        capacity: int,
    ):
        self.chromosomes = chromosomes
        self.where = where
        self.reference_ids = reference_ids
        self.device = device
        self.capacity = capacity
        self._held: OrderedDict[int, WindowData] = OrderedDict()

    def __call__(self, window: int) -> WindowData:
        if window in self._held:
            self._held.move_to_end(window)
            return self._held[window]
        chrom, local = self.where[window]
        cache = self.chromosomes[chrom].cache
        shard = cache.shard(local)
        observed = cache.windows[local].observed(self.chromosomes[chrom].typed)
        data = window_data(window, shard.alleles, shard.af, self.reference_ids, observed, self.device)
        self._held[window] = data
        while len(self._held) > self.capacity:
            self._held.popitem(last=False)
        return data


# ------------------------------------------------------------------------------------------------
# the trainer


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _trajectory_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    a, b = _flatten(saved), _flatten(current)

    def free(key: str) -> bool:
        return any(key == f or key.startswith(f + ".") for f in _FREE_ON_RESUME)

    return [
        f"{key}: checkpoint {a.get(key)!r}, now {b.get(key)!r}"
        for key in sorted(set(a) | set(b))
        if not free(key) and a.get(key) != b.get(key)
    ]


class _LogSetup:
    def __init__(self, run_dir: Path, env: DistEnv):
        self.handlers: list[logging.Handler] = []
        self.saved = (log.level, log.propagate)
        log.setLevel(logging.INFO)
        log.propagate = False
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
        if env.is_main:
            fh = logging.FileHandler(run_dir / "train.log")
            fh.setFormatter(fmt)
            self.handlers.append(fh)
            err = logging.StreamHandler(sys.stderr)
            err.setFormatter(fmt)
            self.handlers.append(err)
        else:
            err = logging.StreamHandler(sys.stderr)
            err.setLevel(logging.WARNING)
            err.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [rank {env.rank}] %(message)s", "%H:%M:%S"))
            self.handlers.append(err)
        for h in self.handlers:
            log.addHandler(h)

    def close(self) -> None:
        for h in self.handlers:
            log.removeHandler(h)
            h.close()
        self.handlers = []
        log.setLevel(self.saved[0])
        log.propagate = self.saved[1]


class Trainer:
    def __init__(self, config: RagConfig, env: DistEnv):
        # Recorded with absolute paths: imputation from any directory finds the run's panel, targets and cache.
        config = config.absolute()
        self.config = config
        self.cfg = config.train
        self.env = env
        self.run_dir = self.cfg.resolved_run_dir(config.paths.workdir)
        # One writer per run, taken before anything in the run dir is opened (train.log included).
        self._writer = contextlib.ExitStack()
        refused = None
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                self._writer.enter_context(one_writer(self.run_dir, "training"))
            except RunInUseError as exc:
                refused = str(exc)
        refused = broadcast_object(refused, env)  # every rank leaves together, none waits in a collective
        if refused is not None:
            self._writer.close()
            raise RunInUseError(refused)
        self._logs = _LogSetup(self.run_dir, env)
        self.metrics: MetricsSink | None = None  # rank 0's
        self.chromosomes: list[ChromosomeData] = []
        try:
            self._setup(config, env)
        except BaseException:
            self.close()
            raise

    def _setup(self, config: RagConfig, env: DistEnv) -> None:
        self.device = env.device
        self.amp = self.cfg.bf16 if self.cfg.bf16 is not None else self.device.type == "cuda"

        # One model over every chromosome of the run: its inputs are window-relative (alleles, the donors'
        # posteriors, MAF from the window's own chromosome), so windows of all chromosomes are batches of
        # one epoch, and the queries are the same samples on each.
        queries = []
        for _, one in config.genome():
            cache = WindowCache(one)
            self.chromosomes.append(ChromosomeData(cache, np.empty(0, np.int64)))
            queries.append(run_queries(cache))
        self.queries = queries[0]
        self.train_ids, self.val_ids = self.queries["training"].ids, self.queries["validation"].ids
        panels = [ch.cache.panel for ch in self.chromosomes]
        reference = panels[0].reference_haplotypes()
        for name, panel, q in zip(config.data.chromosomes or [], panels, queries):
            if panel.split_digest() != panels[0].split_digest() or not np.array_equal(q["training"].ids, self.train_ids):
                raise ConfigError(
                    f"chromosome {name}'s panel ({panel.path}) splits other samples than chromosome "
                    f"{config.data.chromosomes[0]}'s ({panels[0].path}): one model needs the same samples and split "
                    "on every chromosome (same samples, data.populations, data.val_fraction, data.split_seed)"
                )
        if config.model.k > reference.size - 2:
            raise ConfigError(
                f"model.k={config.model.k} but a query can copy only {reference.size - 2} train-split "
                "haplotypes (its own sample is excluded): lower model.k"
            )
        # Global window id -> (chromosome, its window id).
        self.where = [(c, w) for c, ch in enumerate(self.chromosomes) for w in range(len(ch.cache.windows))]
        self.n_windows = len(self.where)
        self.sampler = WindowBatchSampler(
            self.n_windows, self.train_ids, self.cfg.batch_size, self.cfg.seed, self.cfg.mix_windows, env.world_size
        )
        self.steps_per_epoch = self.sampler.batches_per_epoch // self.cfg.grad_accum
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"an epoch has {self.sampler.batches_per_epoch} micro-batches, fewer than train.grad_accum={self.cfg.grad_accum}: "
                "lower train.grad_accum or train.batch_size"
            )
        self.total_steps = self.cfg.epochs * self.steps_per_epoch
        self.stop_step = min(self.total_steps, self.cfg.max_steps or self.total_steps)
        sources = [p.info.source_sha256 for p in panels]
        self.panel_id = {"source_sha256": sources[0] if len(sources) == 1 else sources, "split": panels[0].split_digest()}

        torch.manual_seed(self.cfg.seed)
        self.model = DonorImputer(config.model).to(self.device)
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.cfg.warmup_steps, self.total_steps, self.cfg.min_lr_ratio)
        )
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", self.cfg.keep_checkpoints)
        self.progress = TrainState()
        self.last_checkpoint: Path | None = None
        self.resumed_from = self._resume()
        # After the checkpoint checks: a run refused for its checkpoint costs no HMM.
        # Every query of the run sees the same array sites, so each one's donors are computed once (cached).
        k, t0 = config.model.k, time.perf_counter()
        for (name, _), ch, q in zip(config.genome(), self.chromosomes, queries):
            ch.typed = ch.cache.array_sites()
            if ch.typed.size == 0:
                raise ConfigError(
                    f"the run's array types no panel site{f' on chromosome {name}' if name else ''}: check "
                    "data.targets_vcf, or raise masks.array_density"
                )
            ch.train_donors = read_donors(ch.cache, q["training"])
            ch.val_donors = read_donors(ch.cache, q["validation"]) if self.val_ids.size else None
        log.info(
            "donors: %d training and %d validation haplotypes typed at %d array sites%s, k %d, ready in %.1f s (%s)",
            self.train_ids.size,
            self.val_ids.size,
            sum(ch.typed.size for ch in self.chromosomes),
            f" on {len(self.chromosomes)} chromosomes" if len(self.chromosomes) > 1 else "",
            k,
            time.perf_counter() - t0,
            "the target VCF's sites" if self.chromosomes[0].cache.targets() is not None else "simulated array",
        )
        self.loader = WindowLoader(self.chromosomes, self.where, reference, self.device, capacity=self.sampler.mix_windows)
        self.net = wrap_model(self.model, env)

        if env.is_main:
            atomic_write(self.run_dir / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).encode())
            self.metrics = MetricsSink(
                self.run_dir, self.progress.step, self.steps_per_epoch, self.cfg.tensorboard, self.resumed_from is not None
            )
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info(
            "run %s: %d rank(s) on %s%s, bf16 %s; %s parameters; %d windows x %d batches of %d, grad_accum %d: "
            "%d steps/epoch, %d epochs = %d steps%s",
            self.run_dir,
            env.world_size,
            self.device,
            f" ({env.backend})" if env.backend else "",
            "on" if self.amp else "off",
            f"{n_params:,}",
            self.n_windows,
            self.sampler.batches_per_window,
            self.cfg.batch_size,
            self.cfg.grad_accum,
            self.steps_per_epoch,
            self.cfg.epochs,
            self.total_steps,
            f", stopping at step {self.stop_step} (max_steps)" if self.stop_step < self.total_steps else "",
        )
        if self.resumed_from:
            log.info(
                "resumed from %s: next step %d (epoch %d, micro-batch %d)",
                self.resumed_from,
                self.progress.step,
                self.progress.step // self.steps_per_epoch,
                (self.progress.step % self.steps_per_epoch) * self.cfg.grad_accum,
            )
        else:
            log.info("fresh start: no usable checkpoint in %s", self.checkpoints.directory)

    # -- checkpoint state ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            **self.progress.to_checkpoint(self.steps_per_epoch, self.cfg.grad_accum),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "config": self.config.model_dump(mode="json"),
            "panel": dict(self.panel_id),
            "rng_streams": RNG_NAME,
            "world_size": self.env.world_size,
            "torch_version": str(torch.__version__),
        }

    def _resume(self) -> Path | None:
        chosen: str | None = None
        state: dict[str, Any] | None = None
        if self.env.is_main:
            found = self.checkpoints.load_latest(map_location=self.device)
            if found is not None:
                chosen, state = str(found[0].path), found[1]
        chosen = broadcast_object(chosen, self.env)
        if chosen is None:
            return None
        path = Path(chosen)
        if state is None:
            state = self.checkpoints.load(CheckpointFile.named(path), map_location=self.device)  # type: ignore[arg-type]
        if state["panel"] != self.panel_id:
            raise CheckpointError(
                f"{path} was trained on another panel or split ({state['panel']} vs {self.panel_id}): "
                "use a new train.name (or train.run_dir) for this panel"
            )
        if state.get("rng_streams") != RNG_NAME:
            raise CheckpointError(
                f"{path} was written under the random streams {state.get('rng_streams', 'splitmix64-v1')!r}, this version "
                f"draws batches, masks and dropout from {RNG_NAME!r}, so resuming would not continue that run: "
                "use a new train.name (or train.run_dir), or finish it with the version that started it"
            )
        conflicts = _trajectory_conflicts(state["config"], self.config.model_dump(mode="json"))
        if conflicts:
            raise CheckpointError(
                f"{path} belongs to a run with a different config, so resuming would not continue it: "
                + "; ".join(conflicts)
                + ". Use a new train.name (or train.run_dir), or restore those values"
            )
        progress = TrainState.from_checkpoint(state, self.steps_per_epoch, self.cfg.grad_accum, path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.progress = progress
        self.last_checkpoint = path
        return path

    def save(self) -> Path:
        path = self.checkpoints.path_for(self.progress.step)
        if self.env.is_main:
            t0 = time.perf_counter()
            path = self.checkpoints.save(self.state(), self.progress.step)
            log.info("checkpoint %s written in %.2f s", path, time.perf_counter() - t0)
        barrier(self.env)  # nobody returns (or gets requeued) before the file is complete
        self.last_checkpoint = path
        return path

    # -- one step ------------------------------------------------------------------------------

    def _micro_batch(self, mb: MicroBatch, micro: int) -> Tensor:
        """Forward + backward of one micro-batch; returns this rank's share of the step loss."""
        env, cfg = self.env, self.cfg
        data = self.loader(mb.window)
        n_global = len(mb.haplotypes) * int((~data.observed).sum())  # every query hides the same sites
        local = mb.local(env.rank, env.world_size)
        ids = torch.from_numpy(local).to(self.device)
        rows = np.searchsorted(self.train_ids, local)  # the train query table is in haplotype-id order
        seed = uniforms(cfg.seed, Stream.DROPOUT, env.rank, np.array([self.progress.step], np.uint64), micro, 1)[0, 0]
        torch.manual_seed(int(seed * 2**53))
        chrom, window = self.where[mb.window]
        ch = self.chromosomes[chrom]
        assert ch.train_donors is not None
        logits = forward_batch(self.net, ch.cache.windows[window], data, ch.train_donors, rows, ids, self.amp)
        masked = (~data.observed).expand_as(logits)
        bce_sum = imputation_loss(logits, data.alleles[ids], masked) * int(masked.sum())
        scale = 1.0 / (max(n_global, 1) * cfg.grad_accum)
        (bce_sum * (scale * env.world_size)).backward()
        return bce_sum.detach().double() * scale

    def train_step(self) -> tuple[Tensor, float]:
        """One optimizer step at ``self.progress.step``: (this rank's loss share, grad norm)."""
        cfg = self.cfg
        epoch, in_epoch = divmod(self.progress.step, self.steps_per_epoch)
        share = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro in range(cfg.grad_accum):
            mb = self.sampler.batch(epoch, in_epoch * cfg.grad_accum + micro)
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or not self.env.distributed else self.net.no_sync()
            with sync:
                share += self._micro_batch(mb, micro)
        if cfg.clip_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm))
        else:
            grad_norm = math.nan
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        return share, grad_norm

    # -- validation ----------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss, accuracy, ALT F1 and dosage r² by MAF bin on the val split typed at the run's array (the
        task imputation does, so the figure the accuracy bench finds for this checkpoint); windows are
        dealt round-robin to ranks and the sums combined."""
        model, env = self.model, self.env
        model.eval()
        acc = ValAccumulator(self.device)
        vbs = max(2, self.cfg.val_batch_size - self.cfg.val_batch_size % 2)  # keep sample pairs together
        val_ids = torch.from_numpy(self.val_ids).to(self.device)
        for window in range(env.rank, self.n_windows, env.world_size):
            data = self.loader(window)
            # Scored: untyped sites where the train split (the reference) carries both alleles. A val-split
            # haplotype's variant that no reference carries is in the panel only because the val split is;
            # an imputation target's would not be a panel site at all, so scoring it would put an
            # unimputable site in val's rarest bin (measured: 0.81 there against the bench's 0.955).
            hidden = ~data.observed & (data.maf > 0)
            chrom, local = self.where[window]
            ch = self.chromosomes[chrom]
            if not bool(hidden.any()) or ch.val_donors is None:
                continue
            logits = []
            for start in range(0, len(val_ids), vbs):
                rows = np.arange(start, min(start + vbs, len(val_ids)))
                logits.append(
                    forward_batch(model, ch.cache.windows[local], data, ch.val_donors, rows, val_ids[rows], self.amp).float()
                )
            acc.add_window(torch.cat(logits), data.alleles[val_ids], hidden, data.maf)  # MAF bins the same as AF
        all_reduce_sum(acc.sums, env)
        model.train()
        return acc.result()

    # -- the loop ------------------------------------------------------------------------------

    def _agree(self, share: Tensor) -> tuple[float, bool, bool]:
        """Step loss summed over ranks, and whether any rank wants a checkpoint / a stop."""
        wanted, stop = take_request()
        flags = torch.tensor([share.item(), float(wanted), float(stop)], dtype=torch.float64, device=self.device)
        all_reduce_sum(flags, self.env)
        loss, ckpt, stop = flags.tolist()
        return loss, ckpt > 0 or stop > 0, stop > 0

    def _progress(self) -> Any:
        enabled = self.env.is_main and self.cfg.progress
        return tqdm(
            total=self.stop_step,
            initial=self.progress.step,
            unit="step",
            dynamic_ncols=True,
            disable=not enabled,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
            desc="train",
        )

    def run(self) -> Path:
        cfg = self.cfg
        if self.progress.step >= self.stop_step:
            log.info("nothing to do: step %d already reaches the stop step %d", self.progress.step, self.stop_step)
            return self.last_checkpoint if self.last_checkpoint is not None else self.save()
        self.model.train()
        window_loss, window_steps, window_t0 = 0.0, 0, time.perf_counter()
        bar = self._progress()
        try:
            while self.progress.step < self.stop_step:
                t0 = time.perf_counter()
                epoch = self.progress.step // self.steps_per_epoch
                if self.progress.step % self.steps_per_epoch == 0:
                    log.info(
                        "epoch %d: %d steps of %d queries", epoch, self.steps_per_epoch, self.cfg.batch_size * self.cfg.grad_accum
                    )
                share, grad_norm = self.train_step()
                if cfg.min_step_seconds > 0:
                    # Tests and benchmarks only: a sleep, so the numbers are those of a run without it.
                    time.sleep(max(0.0, cfg.min_step_seconds - (time.perf_counter() - t0)))
                loss, want_checkpoint, want_stop = self._agree(share)
                self.progress.epoch_loss_sum += loss
                self.progress.epoch_loss_steps += 1
                window_loss += loss
                window_steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if self.progress.step % cfg.log_every == 0 or self.progress.step == self.stop_step:
                    self._log_window(window_loss / window_steps, grad_norm, window_steps, time.perf_counter() - window_t0)
                    window_loss, window_steps, window_t0 = 0.0, 0, time.perf_counter()
                epoch_end = self.progress.step % self.steps_per_epoch == 0
                self.progress.epoch_seconds += time.perf_counter() - t0
                if epoch_end:
                    self._end_epoch(epoch)
                periodic = cfg.checkpoint_every_steps > 0 and self.progress.step % cfg.checkpoint_every_steps == 0
                if want_checkpoint or periodic or epoch_end or self.progress.step == self.stop_step:
                    path = self.save()
                    if want_stop and self.progress.step < self.stop_step:
                        self._stop(path)
        finally:
            bar.close()
        assert self.last_checkpoint is not None
        log.info(
            "%s at step %d: %s",
            "finished" if self.progress.step >= self.total_steps else "stopped (max_steps)",
            self.progress.step,
            self.last_checkpoint,
        )
        return self.last_checkpoint

    def _log_window(self, loss: float, grad_norm: float, steps: int, seconds: float) -> None:
        if not self.env.is_main:
            return
        lr = self.scheduler.get_last_lr()[0]
        rate = steps / seconds if seconds > 0 else math.nan
        log.info(
            "step %d/%d epoch %d loss %.4f lr %.3g grad_norm %.3g | %.2f step/s, %.0f queries/s",
            self.progress.step,
            self.total_steps,
            (self.progress.step - 1) // self.steps_per_epoch,
            loss,
            lr,
            grad_norm,
            rate,
            rate * self.cfg.batch_size * self.cfg.grad_accum,
        )
        assert self.metrics is not None
        self.metrics.step(
            {
                "step": self.progress.step,
                "epoch": (self.progress.step - 1) // self.steps_per_epoch,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "steps_per_s": rate,
            }
        )

    def _end_epoch(self, epoch: int) -> None:
        t0 = time.perf_counter()
        due = (epoch + 1) % self.cfg.val_every == 0 or self.progress.step == self.total_steps
        val = self.validate() if due and len(self.val_ids) else {}
        self.progress.epoch_seconds += time.perf_counter() - t0
        row: dict[str, Any] = {
            "epoch": epoch,
            "step": self.progress.step,
            "lr": self.scheduler.get_last_lr()[0],
            "train_loss": self.progress.epoch_loss_sum / max(1, self.progress.epoch_loss_steps),
            **val,
            "epoch_seconds": self.progress.epoch_seconds,
        }
        if self.env.is_main:
            r2 = "  ".join(f"{k.removeprefix('val_r2_maf_')}: {v:.3f}" for k, v in val.items() if k.startswith("val_r2"))
            log.info(
                "epoch %d done in %.1f s: train loss %.4f%s",
                epoch,
                self.progress.epoch_seconds,
                row["train_loss"],
                f" | val loss {val['val_loss']:.4f} acc {val['val_acc']:.4f} F1(ALT) {val['val_f1_alt']:.4f} | r2 by MAF {r2}"
                if val
                else " (no validation this epoch)",
            )
            assert self.metrics is not None
            self.metrics.epoch(row)
        self.progress.end_epoch()

    def _stop(self, path: Path) -> None:
        reason = stop_reason() or "a request on another rank"
        log.warning("stopping at step %d on %s; rerun the same command to resume from %s", self.progress.step, reason, path)
        raise TrainingInterrupted(path, self.progress.step, reason)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        for ch in self.chromosomes:
            ch.cache.panel.close()
        self.chromosomes = []
        self._logs.close()
        self._writer.close()


def train(config: RagConfig, signals: tuple[int, ...] = DEFAULT_SIGNALS) -> Path:
    """Train (or resume from the newest valid checkpoint in the run dir) and return the final checkpoint's path.

    Runs as one process, or as one rank of a group described by the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, LOCAL_RANK). ``signals`` (default SIGUSR2, SIGTERM) request a checkpoint
    and a stop: at the next step boundary every rank stops, rank 0 writes the checkpoint, the handler
    the signal replaced is then called if it was a Python function (so a submitit handler that requeues
    the job runs only once the state is safely on disk), and ``TrainingInterrupted`` is raised.
    """
    env = init_distributed(config.train.device)
    try:
        with stop_on_signals(signals) as pass_on:
            trainer = Trainer(config, env)
            try:
                return trainer.run()
            except TrainingInterrupted:
                trainer.close()
                trainer = None  # type: ignore[assignment]
                pass_on()
                raise
            finally:
                if trainer is not None:
                    trainer.close()
    finally:
        shutdown(env)


def validate_checkpoint(config: RagConfig) -> dict[str, float]:
    """The validation metrics of the newest checkpoint in the config's run directory, computed by the
    training's own validator (what an epoch end logs): for a run stopped between epochs (a time budget,
    a preemption), and for comparing a checkpoint's validation with what imputation scores."""
    env = init_distributed(config.train.device)
    try:
        trainer = Trainer(config, env)
        try:
            if trainer.resumed_from is None:
                raise CheckpointError(f"no valid checkpoint in {trainer.checkpoints.directory} to validate: train first")
            return trainer.validate()
        finally:
            trainer.close()
    finally:
        shutdown(env)
