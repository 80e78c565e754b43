"""The imputer's learned layers, stated once and without torch.

``DonorImputer`` builds every learned layer from this table and, at construction, refuses to hold a
parameter the table does not state; the guard counts a checkpoint's parameters from the same table,
so it plans a run without importing torch and a change to the model cannot leave it behind.
"""

from __future__ import annotations

from dataclasses import dataclass

from rag_hpc.config import ModelConfig

# The per-site features the residual network reads (``DonorImputer.forward`` stacks them).
SITE_FEATURES = 11


@dataclass(frozen=True)
class Layer:
    inputs: int
    outputs: int
    # 0: a Linear over the last axis; otherwise a Conv1d over the sites, this many sites wide.
    width: int = 0
    bias: bool = True
    # Starts at exactly zero: the learned corrections, so an untrained model is the copy predictor.
    zero: bool = False

    def shapes(self) -> dict[str, tuple[int, ...]]:
        weight = (self.outputs, self.inputs, self.width) if self.width else (self.outputs, self.inputs)
        return {"weight": weight, "bias": (self.outputs,)} if self.bias else {"weight": weight}


def layers(cfg: ModelConfig) -> dict[str, Layer]:
    """Every learned layer, by its name in the model, in the order the model builds them (which fixes
    what the default initialisation draws from the seeded generator)."""
    return {
        "gap_hidden": Layer(2, 8),
        # No bias: a shift common to all donors cancels in the softmax, so its gradient is rounding
        # noise, which AdamW would turn into steps.
        "gap_score": Layer(8, 1, bias=False, zero=True),
        "allele_score": Layer(2, 1, zero=True),
        "inp": Layer(SITE_FEATURES, cfg.dims, width=1),
        **{f"mix.{i}": Layer(cfg.dims, cfg.dims, width=cfg.kernel) for i in range(cfg.layers)},
        "head": Layer(cfg.dims, 1, width=1, zero=True),
    }


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The model's parameters as its state dict names them, with their shapes."""
    return {f"{name}.{part}": shape for name, layer in layers(cfg).items() for part, shape in layer.shapes().items()}
