"""The errors a user can fix, each with its own exit code; anything else is a bug in rag_hpc.

Every CLI (``rag_hpc.cli.run_main``) prints a ``UserError`` as ONE stderr line and exits with its kind's
code. Any other exception (ValueError, RuntimeError, TypeError, AssertionError, ...) means our code is
wrong: the CLI writes its full traceback to ``<workdir>/logs/crash-<time>-<pid>.log``, prints one line
naming that file and exits ``BUG_EXIT_CODE``. So raise a kind below where a problem the user can fix is
detected, with a message that names the problem and the fix; keep ValueError / RuntimeError /
AssertionError for broken invariants and wrong arguments from our own code.

====================  ====  ============================================================================
kind                  exit  what the user has to fix
====================  ====  ============================================================================
``ConfigError``       2     a config value or flag that cannot work (the message names the field)
``InputError``        3     input data (VCF, panel, populations, targets) or a path they gave that
                            does not exist or cannot be read or written
``ClusterError``      4     SLURM (sbatch, sinfo, squeue), a partition, GPUs, the launch environment,
                            another job of the same run
``DiskSpaceError``    5     a full disk or quota
``CheckpointError``   6     a checkpoint that cannot be used: corrupt, foreign, from another run or config
(any other)           70    a bug in rag_hpc (sysexits EX_SOFTWARE): traceback in the crash log
====================  ====  ============================================================================

Other exits: 0 success, 1 a check that ran and said no (guard over budget, status problems), 75 training
stopped with a checkpoint on request (rerun resumes), 130 interrupted (Ctrl-C). argparse's own usage
errors exit 2, like ``ConfigError``.

Torch-free, and imports nothing from rag_hpc, so every module can raise these.
"""

from __future__ import annotations

from typing import ClassVar

# sysexits.h EX_SOFTWARE: an internal software error.
BUG_EXIT_CODE = 70


class UserError(Exception):
    """A problem the user can fix from the message alone; the message names the problem and the fix.

    Raise one of the kinds below rather than this root, so the exit code says which kind it is."""

    exit_code: ClassVar[int] = 1


class ConfigError(UserError):
    """A config that cannot work (a config file, ``--set``, env or flag value); the message names the field."""

    exit_code: ClassVar[int] = 2


class InputError(UserError):
    """Input data (VCF, panel, populations, targets) that cannot be used, or a path the user gave that does
    not exist or cannot be read or written."""

    exit_code: ClassVar[int] = 3


class ClusterError(UserError):
    """SLURM or the machine: sbatch/sinfo/squeue, a partition, GPUs, the launch environment, another job of the run."""

    exit_code: ClassVar[int] = 4


class DiskSpaceError(UserError):
    """A full disk or quota; the message names the directory and the bytes needed and free."""

    exit_code: ClassVar[int] = 5


class CheckpointError(UserError):
    """A checkpoint that cannot be used: corrupt, foreign, or from another run, panel or config."""

    exit_code: ClassVar[int] = 6


USER_ERROR_KINDS: tuple[type[UserError], ...] = (ConfigError, InputError, ClusterError, DiskSpaceError, CheckpointError)
