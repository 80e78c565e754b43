"""Stop requests: a signal (preemption, a time limit) or a launcher asks the running ``train`` for a
checkpoint, and usually a stop, at its next step boundary.

The trainer takes the request at each step (``take_request``) and agrees on it across ranks; after the
checkpoint is on disk it calls the handlers the signals replaced (``stop_on_signals``), so a submitit
handler that requeues the job runs only once the state is safe.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

log = logging.getLogger("rag_hpc.train")

DEFAULT_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped early on request (signal or ``request_checkpoint``) after writing a checkpoint.

    Rerunning ``train`` with the same config resumes from it at the next batch.
    """

    def __init__(self, checkpoint: Path, step: int, reason: str):
        super().__init__(f"training interrupted by {reason} at step {step}; checkpoint {checkpoint}")
        self.checkpoint = checkpoint
        self.step = step
        self.reason = reason


class _Requests:
    """Plain attributes, not threading primitives: set from signal handlers, where taking a lock the
    interrupted main thread may hold would deadlock."""

    checkpoint: ClassVar[bool] = False
    stop: ClassVar[bool] = False
    reason: ClassVar[str] = ""
    signals: ClassVar[list[int]] = []  # replaced, never mutated: a handler may run mid-update

    @classmethod
    def clear(cls) -> None:
        cls.checkpoint, cls.stop, cls.reason, cls.signals = False, False, "", []


def request_checkpoint(stop: bool = True, reason: str = "request_checkpoint()") -> None:
    """Ask the running ``train`` to write a checkpoint at its next step boundary.

    Safe from a signal handler or another thread, on any rank: the ranks agree on the request at the
    next step and rank 0 writes once. With ``stop`` (the default: preemption, time limit) ``train``
    then raises ``TrainingInterrupted``; without it training continues after the checkpoint.
    """
    _Requests.checkpoint = True
    _Requests.stop = _Requests.stop or stop
    _Requests.reason = _Requests.reason or reason


def take_request() -> tuple[bool, bool]:
    """(a checkpoint is wanted, a stop is wanted) at this step boundary. The checkpoint request is
    consumed: one that arrives while it is written is for the next boundary. A stop stays asked."""
    wanted, _Requests.checkpoint = _Requests.checkpoint, False
    return wanted, _Requests.stop


def stop_reason() -> str:
    """What asked for the stop; empty when it was asked on another rank."""
    return _Requests.reason


def _on_signal(signum: int, frame: Any) -> None:
    _Requests.signals = [*_Requests.signals, signum]
    request_checkpoint(stop=True, reason=signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...]) -> Iterator[Callable[[], None]]:
    """Route ``signals`` to ``request_checkpoint`` for the duration. Yields ``pass_on``: call it once the
    checkpoint is written, to run the Python handlers that the received signals replaced. On exit the
    replaced handlers are back and no request is left for the next ``train``."""
    previous: dict[int, Any] = {}

    def pass_on() -> None:
        for sig in dict.fromkeys(_Requests.signals):
            handler = previous.get(sig)
            if callable(handler):
                signal.signal(sig, handler)
                handler(sig, None)

    try:
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                previous[sig] = signal.signal(sig, _on_signal)
        else:
            log.info("train() runs outside the main thread: no signal handlers; use request_checkpoint()")
        yield pass_on
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _Requests.clear()
