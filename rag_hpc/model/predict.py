"""A trained checkpoint as an imputation predictor (``rag_hpc.impute.HaplotypePredictor``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from rag_hpc.config import ModelConfig, RagConfig
from rag_hpc.errors import CheckpointError, ConfigError, InputError
from rag_hpc.index.build import WindowCache
from rag_hpc.model.rag import RagImputer, retrieve


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


def load_model(checkpoint: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[RagImputer, dict]:
    state = load_checkpoint_state(checkpoint)
    saved = state["config"]
    model = RagImputer(ModelConfig(**saved["model"]), saved["windows"]["max_seq_len"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), saved


class ModelPredictor:
    """P(ALT) per site for target haplotypes: retrieve from the reference (train split) of the
    window under the target's observed sites, then run the model."""

    def __init__(self, model: RagImputer, cache: WindowCache, seed: int = 0, batch_size: int = 64):
        self.model = model
        self.cache = cache
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self._reference = cache.panel.reference_haplotypes(seed)  # the order training searched in

    @torch.no_grad()
    def predict_window(self, window_id: int, query: np.ndarray, observed: np.ndarray) -> np.ndarray:
        shard = self.cache.shard(window_id)
        reference = torch.from_numpy(shard.alleles[self._reference]).to(self.device)
        af = torch.from_numpy(shard.af).to(self.device)
        k = min(self.model.cfg.k, reference.shape[0])
        out = np.empty(query.shape, dtype=np.float32)
        for lo in range(0, query.shape[0], self.batch_size):
            q = torch.from_numpy(np.ascontiguousarray(query[lo : lo + self.batch_size])).to(self.device)
            obs = torch.from_numpy(observed).to(self.device).expand_as(q)
            _, retrieved = retrieve(self.model, q, obs, reference, af, k)
            logits = self.model(q.long(), ~obs, af, retrieved.long())
            out[lo : lo + q.shape[0]] = torch.sigmoid(logits.float()).cpu().numpy()
        return out


def model_predictor(checkpoint: str | os.PathLike[str], config: RagConfig) -> ModelPredictor:
    device = "cuda" if torch.cuda.is_available() and config.train.device != "cpu" else "cpu"
    model, saved = load_model(checkpoint, device)
    if saved["windows"]["window_size"] != config.windows.window_size:
        raise ConfigError(
            f"checkpoint was trained with windows.window_size={saved['windows']['window_size']} but the config "
            f"says {config.windows.window_size}: impute with the training window size"
        )
    return ModelPredictor(model, WindowCache(config), seed=saved["train"]["seed"])
