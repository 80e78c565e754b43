"""The SLURM job environment rag_hpc's jobs run in: submitit's, plus requeueing from inside a container.

Images rarely hold ``scontrol`` or the munge socket, so submitit's requeue (``scontrol requeue`` from the
job at a preemption or time-limit signal) fails there. This environment writes a request file instead,
and the batch script's host-side ``EXIT`` trap (``rag_hpc.launch.slurm._requeue_trap``) runs
``scontrol requeue`` for it. Registered the submitit way, as a ``job_environment`` plugin (the
``submitit`` entry point in pyproject.toml) named "slurm", so it replaces submitit's own SLURM
environment in every job of an installed rag_hpc; ``_requeue`` is the hook submitit's plugin API asks
an environment to override.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from submitit.slurm import slurm

from rag_hpc.fsutil import atomic_write

# Set by the batch script (rag_hpc.launch.slurm._requeue_trap): where a job asks the host to requeue it.
REQUEUE_ENV = "RAG_HPC_REQUEUE_FILE"


class SlurmJobEnvironment(slurm.SlurmJobEnvironment):
    """submitit's SLURM environment; without ``scontrol`` in the job, a requeue is a request to the host."""

    def _requeue(self, countdown: int) -> None:
        request = os.environ.get(REQUEUE_ENV)
        if not request or shutil.which("scontrol") is not None:
            super()._requeue(countdown)
            return
        # Atomic: a kill mid-write leaves no half request for the trap to read.
        atomic_write(Path(request), f"{self.job_id} {countdown} {time.time()}\n".encode())
