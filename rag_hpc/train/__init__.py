"""Training: ``train(config) -> Path`` (resumes from the run dir's newest valid checkpoint),
``request_checkpoint()`` for launchers, ``validate_checkpoint(config)`` for a run stopped between
epochs; ``python -m rag_hpc.train`` on the command line."""

from rag_hpc.train.stop import TrainingInterrupted, request_checkpoint
from rag_hpc.train.trainer import train, validate_checkpoint

__all__ = ["TrainingInterrupted", "request_checkpoint", "train", "validate_checkpoint"]
