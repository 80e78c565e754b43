"""Training: ``train(config) -> Path`` (resumes from the run dir's newest valid checkpoint) and
``request_checkpoint()`` for launchers; ``python -m rag_hpc.train`` on the command line."""

from rag_hpc.train.trainer import TrainingInterrupted, request_checkpoint, train

__all__ = ["TrainingInterrupted", "request_checkpoint", "train"]
