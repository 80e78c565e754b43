"""A trained checkpoint as an imputation predictor (``rag_hpc.impute.HaplotypePredictor``)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from rag_hpc.checkpoint import load_checkpoint
from rag_hpc.config import DonorConfig, ModelConfig, RagConfig
from rag_hpc.data.windows import Window
from rag_hpc.errors import ConfigError
from rag_hpc.index.build import WindowCache
from rag_hpc.index.donors import DonorTable, read_donors, target_queries
from rag_hpc.model.rag import DonorImputer

if TYPE_CHECKING:
    from rag_hpc.data.targets import TargetSites


def load_model(checkpoint: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[DonorImputer, dict]:
    state = load_checkpoint(checkpoint)
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
        digest = hashlib.sha256(json.dumps(model.cfg.model_dump(), sort_keys=True).encode())
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self._weights = digest.hexdigest()

    def identity(self) -> dict[str, object]:
        """What the imputation depends on: the weights (and architecture) and the HMM that found the donors."""
        return {"method": "model", "weights_sha256": self._weights, "ne": self.donor_cfg.ne, "error": self.donor_cfg.error}

    def begin(self, targets: TargetSites) -> None:
        """The targets' donor table under the checkpoint's HMM: the prebuilt one when the run's prebuild
        computed it for these targets."""
        self._table = read_donors(self.cache, target_queries(targets), self.donor_cfg, self.model.cfg.k)

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
    differences = config.shaping_differences(saved)
    if differences:
        raise ConfigError(
            f"{checkpoint} was trained under other settings than this config's: {'; '.join(differences)}. Impute with "
            "the checkpoint's settings (python -m rag_hpc.impute --checkpoint takes them from it)"
        )
    # The HMM's parameters shaped what the model learnt from; how it is run (batch, threads) is this job's.
    donors = DonorConfig(**{**saved["donors"], "batch": config.donors.batch, "threads": config.donors.threads})
    return ModelPredictor(model, WindowCache(config), donors)
