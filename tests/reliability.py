"""The reliability ledger: each fault-injection test records what it tried, what survived and what
was lost; the session ends by printing the table (and writing it to bench_out/reliability.md), which
is where the README's "Reliability" table comes from.

A test records *before* it asserts, so a failing trial still shows in the table as not survived.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Where the session's table goes; CI keeps it as an artifact of the run.
LEDGER_ENV = "RAG_HPC_RELIABILITY_OUT"


@dataclass(frozen=True)
class Row:
    fault: str
    trials: int
    survived: int
    data_lost: int
    note: str = ""


ROWS: list[Row] = []


def record(fault: str, trials: int, survived: int, data_lost: int, note: str = "") -> None:
    """One line of the table. ``survived``: trials after which every check of the test held;
    ``data_lost``: committed artifacts or checkpoints that were gone or unreadable afterwards."""
    ROWS.append(Row(fault, trials, survived, data_lost, note))


def table(rows: list[Row]) -> str:
    lines = ["| fault | trials | survived | data lost | notes |", "|---|---|---|---|---|"]
    # A "|" inside a cell would end it: markdown wants it escaped.
    lines += [f"| {r.fault} | {r.trials} | {r.survived} | {r.data_lost} | {r.note.replace('|', chr(92) + '|')} |" for r in rows]
    return "\n".join(lines)


def write(rows: list[Row]) -> Path:
    out = Path(os.environ.get(LEDGER_ENV, REPO / "bench_out" / "reliability.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table(rows) + "\n")
    out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return out
