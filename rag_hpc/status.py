"""``python -m rag_hpc.status [--workdir DIR]``: what the launches recorded in DIR are doing.

Per launch: its jobs and their SLURM states (sacct, squeue for the pending reason), windows cached /
total (and per chromosome for a genome launch, with its tasks and imputed VCF), the newest checkpoint
step and the last metrics row. A training job cancelled because an index
task failed is called out with the failed task's log, since SLURM alone only says "CANCELLED".
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rag_hpc.checkpoint import CheckpointManager
from rag_hpc.cli import command_parser, run_main
from rag_hpc.config import RagConfig
from rag_hpc.errors import InputError
from rag_hpc.runs import RUN_RECORD, uncached_windows

FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return ""
    return out.stdout if out.returncode == 0 else ""


def job_states(job_ids: list[str]) -> dict[str, str]:
    """job id (``123`` or ``123_4``) -> state; sacct first, squeue's pending reason on top."""
    ids = [j for j in job_ids if j]
    if not ids:
        return {}
    states: dict[str, str] = {}
    for line in _run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)]).splitlines():
        if "|" in line:
            jid, state = line.split("|", 1)
            states[jid] = state.split()[0]
    for line in _run(["squeue", "-h", "-o", "%i|%T|%r", "-j", ",".join(ids)]).splitlines():
        jid, state, reason = ([*line.split("|"), "", ""])[:3]
        states[jid] = f"{state} ({reason})" if reason and reason != "None" else state
    return states


def newest_checkpoint_step(run_dir: Path) -> int | None:
    """Step of the run's newest checkpoint whose bytes verify (what a resume or an imputation would use)."""
    found = CheckpointManager(run_dir / "checkpoints").latest_valid()
    return found.step if found is not None else None


def last_metrics(run_dir: Path) -> dict[str, str] | None:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return None
    rows = list(csv.DictReader(path.open()))
    return rows[-1] if rows else None


def _report_r2(path: Path) -> dict[str, str] | None:
    """MAF bin -> dosage r² of an imputation report's metrics.json (``rag_hpc.evaluate``), when there is one."""
    try:
        bins = json.loads(path.read_text())["bins"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {b["label"]: "-" if b["r2"] is None else f"{b['r2']:.3f}" for b in bins}


def run_status(record: dict[str, Any]) -> dict[str, Any]:
    """One launch record -> its current status (what ``render`` prints)."""
    array_ids, impute_ids = record.get("array_ids", []), record.get("impute_ids", [])
    train_id, merge_id, phase_ids = record.get("train_id"), record.get("merge_id"), record.get("phase_ids", [])
    states = job_states(
        [*phase_ids, *array_ids, *([train_id] if train_id else []), *impute_ids, *([merge_id] if merge_id else [])]
    )
    phase_tasks = {j: s for j, s in states.items() if j.split("_")[0] in phase_ids and "_" in j}
    tasks = {j: s for j, s in states.items() if j.split("_")[0] in array_ids and "_" in j}
    impute_tasks = {j: s for j, s in states.items() if j.split("_")[0] in impute_ids and "_" in j}
    failed = sorted(j for j, s in tasks.items() if s.split()[0] in FAILED)
    status: dict[str, Any] = {
        "launched": record.get("time"),
        "cluster": record.get("cluster"),
        "phase": {a: states.get(a) for a in phase_ids},
        "phase_tasks": phase_tasks,
        "array": {a: states.get(a) for a in array_ids},
        "array_tasks": tasks,
        "train": {train_id: states.get(train_id, "unknown")} if train_id else {},
        "impute_array": {a: states.get(a) for a in impute_ids},
        "impute_tasks": impute_tasks,
        "merge": {merge_id: states.get(merge_id, "unknown")} if merge_id else {},
        # A genome launch, per chromosome: windows cached, its tasks' states, its imputed VCF when written.
        "chromosomes": [
            {
                "name": ch["name"],
                "offset": ch["offset"],
                "windows": ch["windows"],
                "index_tasks": {j: states.get(j, "unknown") for j in ch.get("index_tasks", [])},
                "impute_tasks": {j: states.get(j, "unknown") for j in ch.get("impute_tasks", [])},
                "imputes": ch.get("imputed") is not None,  # the run has targets
                "imputed": ch["imputed"] if ch.get("imputed") and Path(ch["imputed"]).is_file() else None,
                "r2_by_maf": _report_r2(Path(ch["imputed"]).parent / "metrics.json") if ch.get("imputed") else None,
            }
            for ch in record.get("chromosomes", [])
        ],
        "windows_total": record.get("windows_total"),
        "run_dir": record.get("run_dir"),
        "checkpoint_step": newest_checkpoint_step(Path(record["run_dir"])) if record.get("run_dir") else None,
        "last_metrics": last_metrics(Path(record["run_dir"])) if record.get("run_dir") else None,
        "problems": [],
    }
    if record.get("config"):
        try:
            todo, total = uncached_windows(RagConfig(**record["config"]))
            status["windows_cached"] = total - len(todo)
            for ch in status["chromosomes"]:
                ch["windows_cached"] = ch["windows"] - sum(ch["offset"] <= w < ch["offset"] + ch["windows"] for w in todo)
        except Exception as exc:  # noqa: BLE001 - the status must print even when the cache cannot be read
            status["problems"].append(f"cannot read the cache: {exc}")
    folder = Path(record.get("folder", "."))
    for jid in failed:
        status["problems"].append(f"index task {jid} {tasks[jid]}: see {folder / f'{jid}_0_log.err'}")
    train_state = states.get(train_id or "", "")
    if train_state.startswith("CANCELLED") and failed:
        status["problems"].append(
            f"training job {train_id} was cancelled because index task(s) {', '.join(failed)} failed (afterok)"
        )
    elif "DependencyNeverSatisfied" in train_state:
        status["problems"].append(f"training job {train_id} can never start: an index task failed")
    for jid in sorted(j for j, s in phase_tasks.items() if s.split()[0] in FAILED):
        status["problems"].append(f"phase task {jid} {phase_tasks[jid]}: see {folder / f'{jid}_0_log.err'}")
    for aid in phase_ids:  # one chromosome: a plain job
        own = states.get(aid, "")
        if own.split()[:1] and own.split()[0] in FAILED and not any(j.startswith(f"{aid}_") for j in phase_tasks):
            status["problems"].append(f"phase job {aid} {own}: see {folder / f'{aid}_0_log.err'}")
    for jid in sorted(j for j, s in impute_tasks.items() if s.split()[0] in FAILED):
        status["problems"].append(
            f"imputation task {jid} {impute_tasks[jid]}: see {folder / f'{jid}_0_log.err'}; a relaunch redoes only its range"
        )
    return status


def _num(text: str) -> str:
    try:
        return f"{float(text):.3f}"
    except ValueError:
        return text


def _counts(states: Iterable[str]) -> str:
    """'3 COMPLETED, 1 RUNNING'."""
    counts: dict[str, int] = {}
    for state in states:
        counts[state.split()[0]] = counts.get(state.split()[0], 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no task seen yet"


def _task_counts(tasks: dict[str, str], array_id: str, own: str | None) -> str:
    """'3 COMPLETED, 1 RUNNING' over the tasks of one array; an array of one item is a plain job (submitit
    submits it so): then its own state (``own``)."""
    counts = _counts(state for jid, state in tasks.items() if jid.startswith(f"{array_id}_"))
    if counts != "no task seen yet" or own is None:
        return counts
    return f"1 {own.split()[0]}"


def render(status: dict[str, Any]) -> str:
    local = status.get("cluster") == "local"
    lines = [f"launch {status['launched']}{' (local, in one process)' if local else ''}: run dir {status['run_dir']}"]
    for jid, state in status["train"].items():
        lines.append(f"  training job {jid}: {state}")
    for aid in status.get("phase", {}):
        lines.append(f"  phase job {aid} (Beagle): {_task_counts(status['phase_tasks'], aid, status['phase'][aid])}")
    for aid in status["array"]:
        lines.append(f"  index array {aid}: {_task_counts(status['array_tasks'], aid, status['array'][aid])}")
    if not status["array"] and not local:
        lines.append("  index array: none (all windows were cached)")
    for aid in status.get("impute_array", {}):
        lines.append(f"  imputation array {aid}: {_task_counts(status['impute_tasks'], aid, status['impute_array'][aid])}")
    for jid, state in status.get("merge", {}).items():
        lines.append(f"  merge job {jid}: {state}")
    if "windows_cached" in status:
        lines.append(f"  windows cached: {status['windows_cached']} / {status['windows_total']}")
    for ch in status.get("chromosomes", []):
        # One unnamed chromosome: its windows are the launch's, said above.
        parts = [f"windows cached {ch.get('windows_cached', '?')} / {ch['windows']}"] if ch["name"] is not None else []
        for what, key in (("index", "index_tasks"), ("imputation", "impute_tasks")):
            if ch[key] and ch["name"] is not None:
                parts.append(f"{what} tasks: {_counts(ch[key].values())}")
        if ch["imputes"]:
            parts.append(f"imputed: {ch['imputed'] or 'not yet'}")
        if not parts:
            continue
        lines.append(f"  {'chromosome ' + ch['name'] + ': ' if ch['name'] is not None else ''}" + "; ".join(parts))
        if ch.get("r2_by_maf"):
            lines.append("    dosage r² by MAF (report): " + "  ".join(f"{b} {r}" for b, r in ch["r2_by_maf"].items()))
    step = status["checkpoint_step"]
    lines.append(f"  newest valid checkpoint: {'none yet' if step is None else f'step {step}'}")
    m = status["last_metrics"]
    if m:
        val = {k.removeprefix("val_r2_maf_"): v for k, v in m.items() if k.startswith("val_r2_maf_") and v not in ("", None)}
        if val:
            lines.append(
                f"  last validation (epoch {m.get('epoch')}) r² by MAF: " + "  ".join(f"{b} {_num(v)}" for b, v in val.items())
            )
        lines.append("  last metrics: " + ", ".join(f"{k}={v}" for k, v in m.items() if v not in ("", None)))
    lines.extend(f"  PROBLEM: {p}" for p in status["problems"])
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("status", __doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("rag_hpc_work"), help="paths.workdir of the launches")
    parser.add_argument("--all", action="store_true", help="every launch recorded, not only the newest")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def main(args: argparse.Namespace) -> int:
    path = args.workdir / RUN_RECORD
    if not path.exists():
        raise InputError(
            f"no launch recorded in {args.workdir} ({path} missing): pass the paths.workdir of a launch with --workdir"
        )
    records = json.loads(path.read_text())
    statuses = [run_status(r) for r in (records if args.all else records[-1:])]
    if args.json:
        print(json.dumps(statuses, indent=2, default=str))
    else:
        print("\n".join(render(s) for s in statuses))
    return 1 if any(s["problems"] for s in statuses) else 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
