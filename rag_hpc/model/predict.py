"""A trained checkpoint as an imputation predictor (``rag_hpc.impute.HaplotypePredictor``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from rag_hpc.config import DonorConfig, ModelConfig, RagConfig
from rag_hpc.data.windows import Window
from rag_hpc.errors import CheckpointError, ConfigError, InputError
from rag_hpc.index.build import WindowCache
from rag_hpc.index.donors import DonorTable, compute_donors
from rag_hpc.model.rag import DonorImputer

if TYPE_CHECKING:
    from rag_hpc.impute import TargetSites


def load_checkpoint_state(checkpoint: str | os.PathLike[str]) -> dict:
    """State of a checkpoint file, or of the newest valid one in a run or checkpoint directory;
    checksum-verified and loaded with ``weights_only=True``."""
    from rag_hpc.train.checkpoint import CheckpointFile, CheckpointManager

    path = Path(checkpoint)
    if path.is_dir():
        directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = CheckpointManager(directory).load_latest(set_aside=False)
        if found is None:
            raise CheckpointError(f"no valid checkpoint in {directory}: train first (python -m rag_hpc.train)")
        return found[1]
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist: pass a step_<N>.pt file or a run directory")
    step = path.stem.removeprefix("step_")
    if not step.isdigit():
        raise CheckpointError(f"{path} is not a rag_hpc checkpoint (expected step_<N>.pt from python -m rag_hpc.train)")
    return CheckpointManager(path.parent).load(CheckpointFile(int(step), path))


def load_model(checkpoint: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[DonorImputer, dict]:
    state = load_checkpoint_state(checkpoint)
    saved = state["config"]
    model = DonorImputer(ModelConfig(**saved["model"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), saved


def donor_logits(
    model: nn.Module,
    table: DonorTable,
    window: Window,
    rows: slice | np.ndarray,
    reference: Tensor,
    query: Tensor,
    observed: Tensor,
    maf: Tensor,
) -> Tensor:
    """ALT logits [B, L] of the queries ``rows`` of ``table`` in ``window`` from ``model`` (a DonorImputer or
    its DDP wrapper); ``reference`` float [N, L]: the window's reference alleles (train split,
    ``reference_haplotypes`` order), on the model's device like ``query``, ``observed`` and ``maf``."""
    donors, weights, gaps = table.window(window, rows)
    device = reference.device
    donors_t, weights_t, gaps_t, along = (torch.from_numpy(a).to(device) for a in (donors, weights, gaps, table.along(window)))
    return model(reference, donors_t, weights_t, gaps_t, along, query, observed, maf)


class ModelPredictor:
    """P(ALT) per site for target haplotypes: their Li–Stephens donors over all their typed sites
    (``begin``), then the model per window."""

    name = "model"

    def __init__(self, model: DonorImputer, cache: WindowCache, donors: DonorConfig, batch_size: int = 256):
        self.model = model
        self.cache = cache
        self.donor_cfg = donors
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self._reference = cache.panel.reference_haplotypes()
        self._table: DonorTable | None = None

    def begin(self, targets: TargetSites) -> None:
        query_t = np.ascontiguousarray(targets.haplotypes.T)
        self._table = compute_donors(self.cache, targets.panel_index, query_t, self.donor_cfg, self.model.cfg.k)

    @torch.no_grad()
    def predict_window(self, window_id: int, query: np.ndarray, observed: np.ndarray) -> np.ndarray:
        if self._table is None:
            raise RuntimeError("ModelPredictor.begin(targets) must run before predict_window")
        shard = self.cache.shard(window_id)
        reference = torch.from_numpy(shard.alleles[self._reference]).to(self.device, torch.float32)
        maf = torch.from_numpy(np.minimum(shard.af, 1 - shard.af)).to(self.device)
        obs = torch.from_numpy(observed).to(self.device)
        out = np.empty(query.shape, dtype=np.float32)
        for lo in range(0, query.shape[0], self.batch_size):
            rows = slice(lo, min(lo + self.batch_size, query.shape[0]))
            q = torch.from_numpy(np.ascontiguousarray(query[rows])).to(self.device)
            logits = donor_logits(self.model, self._table, self.cache.windows[window_id], rows, reference, q, obs, maf)
            out[rows] = torch.sigmoid(logits.float()).cpu().numpy()
        return out


def model_predictor(checkpoint: str | os.PathLike[str], config: RagConfig) -> ModelPredictor:
    device = "cuda" if torch.cuda.is_available() and config.train.device != "cpu" else "cpu"
    model, saved = load_model(checkpoint, device)
    if saved["windows"]["window_size"] != config.windows.window_size:
        raise ConfigError(
            f"checkpoint was trained with windows.window_size={saved['windows']['window_size']} but the config "
            f"says {config.windows.window_size}: impute with the training window size"
        )
    # The HMM's parameters shaped what the model learnt from; how it is run (batch, threads) is this job's.
    donors = DonorConfig(**{**saved["donors"], "batch": config.donors.batch, "threads": config.donors.threads})
    return ModelPredictor(model, WindowCache(config), donors)
