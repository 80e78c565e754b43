"""Run a rag_hpc CLI that signals itself at an exact point of its file writes.

    python -m tests.kill_points CALL PATTERN NTH WHEN SIGNAL (MODULE | -c SCRIPT) [ARGS...]

runs ``python -m MODULE ARGS`` (or ``python -c SCRIPT ARGS``) with ``os.CALL`` (``fsync``, ``rename`` or ``replace``) wrapped: on the
NTH call whose file (the fd's path for fsync, the destination for a rename) has a basename matching
the regular expression PATTERN, the process sends itself SIGNAL (``KILL`` or ``INT``) ``before`` or
``after`` the call. So a fault test's kill lands exactly where it means to, inside a write or between
two, however fast this machine's disk and CPU are; a signal from outside at a polled moment lands
wherever the process has got to by then. SIGKILL is real: nothing of the process (no ``finally``, no
handler) runs after it. SIGINT is Ctrl-C: Python raises KeyboardInterrupt right there, so the CLI's
own cleanup runs.
"""

from __future__ import annotations

import os
import re
import runpy
import signal
import sys
from typing import Any

CALLS = ("fsync", "rename", "replace")


def command(call: str, pattern: str, nth: int, when: str, module: str, *args: str, sig: str = "KILL") -> list[str]:
    """The argv that runs ``python -m module args`` signalled (SIGKILL by default) at that point."""
    assert call in CALLS and when in ("before", "after") and nth >= 1 and sig in ("KILL", "INT")
    return [sys.executable, "-m", "tests.kill_points", call, pattern, str(nth), when, sig, module, *args]


def main() -> None:
    call, pattern, nth, when, sig, module, *args = sys.argv[1:]
    wanted, real, seen, signum = re.compile(pattern), getattr(os, call), 0, getattr(signal, f"SIG{sig}")

    def target(call_args: tuple[Any, ...]) -> str:
        path = os.readlink(f"/proc/self/fd/{call_args[0]}") if call == "fsync" else os.fspath(call_args[1])
        return os.path.basename(path)

    def wrapped(*call_args: Any, **kwargs: Any) -> Any:
        nonlocal seen
        hit = wanted.fullmatch(target(call_args)) is not None
        seen += hit
        if hit and seen == int(nth) and when == "before":
            os.kill(os.getpid(), signum)
        out = real(*call_args, **kwargs)
        if hit and seen == int(nth) and when == "after":
            os.kill(os.getpid(), signum)
        return out

    setattr(os, call, wrapped)
    if signum == signal.SIGINT:
        # A process started in the background of a non-interactive shell (CI, nohup) inherits SIGINT ignored,
        # and Python then installs no KeyboardInterrupt handler: restore the terminal's Ctrl-C.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if module == "-c":  # a script given inline, as to python -c
        sys.argv = ["-c", *args[1:]]
        exec(compile(args[0], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
