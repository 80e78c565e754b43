"""``python -m rag_hpc.launch`` on the two-node SLURM test cluster (slurm/up.sh --nodes 2): nodes rag-n1
and rag-n2, each slurmd in its own network and UTS namespace on one machine, one slurmctld.

One launch builds the tiny panel's index array and trains on 2 nodes x 1 task (gloo, CPU): its array
must run on both nodes, and its parameters must be those of one process with the same global batch
(``train.batch_size`` is split over the ranks). A second run of the same config loses the node of
rank 0 mid-run (every process in that node's namespace SIGKILLed, slurmd included, the node set
DOWN): SLURM requeues the job, the node comes back (up.sh --nodes 2 again, as a rebooted node's
slurmd would), and the rerun resumes from the newest checkpoint and ends where the first run ended.

Every SLURM command here, and through sbatch's environment every job, talks to cluster rag_hpc2: the
``two_nodes`` fixture points SLURM_CONF at it for the module.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests import reliability
from tests.slurm_helpers import (
    TWO_NODES,
    USABLE,
    TrainLog,
    as_flags,
    cancel,
    cli,
    final_model,
    final_state,
    kill_node,
    launch_records,
    launcher,
    log_time,
    max_param_diff,
    run,
    run_dir,
    sacct,
    squeue_ids,
    state_of,
    tiny_sets,
    two_node_states,
    unavailable,
    up_two_nodes,
    wait_for,
)

pytestmark = pytest.mark.slow

EPOCHS = 4  # 108 steps of the tiny run
# One CPU per task, one thread per rank (the two nodes share this machine's cores). The array's three
# tasks are pending together and both nodes idle, so the scheduler starts all three in one pass, in node
# order: two fill rag-n1's 2 CPUs, the third goes to rag-n2.
CPUS = 1
# The node-death run holds each step this long (train.min_step_seconds: a sleep that changes no number),
# so it trains >= 32 s whatever the machine's speed; the node dies at a step drawn in the run's second
# quarter, >= 16 s before the run could end. The first run does not hold.
HOLD_S = 0.3
SEED = 20261201  # draws the step at which the node dies
# 2 ranks vs 1 process: the same global batches, masks and dropout seeds, but DDP sums two half-batch
# gradients where one process sums the whole batch, so the float rounding differs, and Adam's
# normalisation amplifies it in parameters whose gradients are near zero. Bound: one step's largest
# Adam update (lr = 1e-3); measured 2.2e-5 here over 108 steps.
TOLERANCE = 1e-3
# The node-death run vs the first run: both 2 ranks with the same thread count, so bit-equal in practice.
RESUME_TOLERANCE = 1e-6


@dataclass
class TwoNodeRun:
    """The module's first launch (index array, then 2-node training), waited for."""

    sim: Path
    root: Path
    workdir: Path
    record: dict[str, Any]
    seconds: float

    def sets(self, workdir: Path, *extra: str) -> list[str]:
        """The run's config in ``workdir``: the prepared panel and window cache shared with the first launch."""
        # One window per index task: three tasks, and the donor-table parts every later run reads.
        return tiny_sets(
            self.sim,
            workdir,
            self.root / "cache",
            EPOCHS,
            f"data.panel_h5={self.root / 'panel.h5'}",
            "index.windows_per_task=1",
            *extra,
        )


def _launch(*args: str, timeout: float = 300) -> Any:
    return launcher(*args, "--nodes", "2", "--cpus-per-task", str(CPUS), "--time", "10", timeout=timeout)


@pytest.fixture(scope="module")
def two_node_run(two_nodes, tiny_simulation, tmp_path_factory) -> TwoNodeRun:
    root = tmp_path_factory.mktemp("two-nodes")
    run_ = TwoNodeRun(tiny_simulation, root, root / "first", {}, 0.0)
    # Where the array's tasks go is decided on idle nodes (CPUS above).
    wait_for(lambda: set(two_node_states().values()) == {"idle"}, 120, lambda: f"both nodes to be idle ({two_node_states()})")
    t0 = time.time()
    out = _launch(*as_flags(run_.sets(run_.workdir)), "--wait", timeout=600)
    run_.seconds = time.time() - t0
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_.record = launch_records(run_.workdir)[-1]
    print(f"\nfirst launch (index array, 2-node training, imputation, merge): {run_.seconds:.1f} s")
    return run_


def test_the_index_array_runs_on_both_nodes(two_node_run):
    record = two_node_run.record
    (array_id,) = record["array_ids"]
    tasks = {r[0]: r for r in sacct(array_id, "JobID,State,NodeList,Start")}
    assert record["array_tasks"] == 3 and {tasks[f"{array_id}_{i}"][1] for i in range(3)} == {"COMPLETED"}, tasks
    print(
        f"\nindex array {array_id}: "
        + ", ".join(f"task {j.split('_')[1]} on {r[2]} (start {r[3]})" for j, r in sorted(tasks.items()))
    )
    assert {r[2] for r in tasks.values()} == set(TWO_NODES), tasks


def test_training_on_two_nodes_ends_with_the_parameters_of_one_process_with_the_same_global_batch(two_node_run, tmp_path):
    train_id = two_node_run.record["train_id"]
    ((state, nodes, n_nodes, cpus),) = sacct(train_id, "State,NodeList,NNodes,AllocCPUS")
    assert (state, nodes, n_nodes) == ("COMPLETED", "rag-n[1-2]", "2"), (state, nodes, n_nodes)
    two = (run_dir(two_node_run.workdir) / "train.log").read_text()
    assert "2 rank(s) on cpu (gloo)" in two, two[-3000:]

    # One process, same config (so the same global batch of train.batch_size queries), same cache.
    one_dir = tmp_path / "one"
    t0 = time.time()
    one = cli("train", *as_flags(two_node_run.sets(one_dir)), timeout=600, env={"OMP_NUM_THREADS": str(CPUS)})
    seconds = time.time() - t0
    assert one.returncode == 0, one.stderr[-3000:]
    one_log = (run_dir(one_dir) / "train.log").read_text()
    assert "1 rank(s) on cpu," in one_log
    # "3 windows x 9 batches of 8, grad_accum 1: 27 steps/epoch, 4 epochs = 108 steps" in both.
    plans = [re.findall(r" parameters; (.*)", text) for text in (two, one_log)]
    assert plans[0] and plans[0] == plans[1], f"not the same global batches: {plans}"
    diff = max_param_diff(final_model(two_node_run.workdir), final_model(one_dir))
    print(
        f"\n2 nodes x 1 task (gloo, job {train_id} on {nodes}, {cpus} CPUs) vs 1 process ({seconds:.1f} s): "
        f"max |param difference| {diff:.3g} after 108 steps (tolerance {TOLERANCE:g})"
    )
    assert diff <= TOLERANCE


def _netns_processes(node: str) -> list[psutil.Process]:
    """Every process of ``node``: all that live in its network namespace (its slurmd, and the job steps under it)."""
    out = run(["ip", "netns", "pids", node])
    assert out.returncode == 0, out.stderr
    procs = []
    for pid in out.stdout.split():
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(int(pid)))
    return procs


def _usable() -> bool:
    states = two_node_states()
    return set(states) == set(TWO_NODES) and set(states.values()) <= USABLE


@contextlib.contextmanager
def _cluster_restored() -> Iterator[None]:
    """However the test ends, both nodes answer again afterwards and nothing of the test stays queued."""
    try:
        yield
    finally:
        if not _usable():
            up_two_nodes()
        wait_for(_usable, 60, lambda: f"both nodes to return to service ({two_node_states()})")


def test_a_node_that_dies_mid_run_is_requeued_and_the_job_resumes_from_its_last_checkpoint(two_nodes, two_node_run, tmp_path):
    from rag_hpc.checkpoint import CheckpointManager

    # As in tests/test_faults_slurm.py, a node that dies takes every process on it at once, with no
    # signal anyone can catch, and slurmctld learns of it only when it marks the node DOWN (after
    # SlurmdTimeout, 300 s: too slow to wait for, so the test marks it). The node that dies runs rank 0,
    # the batch step and srun: the only checkpoint writer, so the newest checkpoint when it is frozen is
    # the last one that run writes. Rank 1, on the node that lives, loses its peer in gloo and exits.
    if os.geteuid() != 0:
        unavailable("killing a node's processes and marking it DOWN needs root")
    work = tmp_path / "work"
    t_submit = time.time()
    out = _launch(*as_flags(two_node_run.sets(work, f"train.min_step_seconds={HOLD_S}", "train.log_every=1")))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record = launch_records(work)[-1]
    train_id, log = record["train_id"], TrainLog(run_dir(work) / "train.log")
    assert record["array_ids"] == [], "the first launch's cache should hold every window"
    jobs = [train_id, *record["impute_ids"], record["merge_id"]]
    checkpoints = CheckpointManager(run_dir(work) / "checkpoints")
    with _cluster_restored():
        try:
            total = wait_for(log.total_steps, 180, lambda: f"training to start ({state_of(train_id)})")
            kill_at = random.Random(SEED).randrange(total // 4, total // 2)
            wait_for(
                lambda: (log.progress(0) or 0) >= kill_at,
                300,
                lambda: f"job {train_id} to reach step {kill_at} (at {log.progress(0)}; {state_of(train_id)})",
            )
            job = run(["scontrol", "show", "job", train_id]).stdout
            node = next(f.split("=", 1)[1] for f in job.split() if f.startswith("BatchHost="))
            procs = _netns_processes(node)
            names = [" ".join(p.cmdline()) for p in procs]
            assert any(n.startswith("slurmd ") for n in names) and any("submitit" in n for n in names), names
            committed, last_step, t_kill = kill_node(procs, node, log, checkpoints, "rag_hpc test: node died")
            t_kill -= t_submit
            wait_for(
                lambda: any(r[0] == "NODE_FAIL" for r in sacct(train_id, "State", all_runs=True)),
                60,
                lambda: f"SLURM to record the node failure of job {train_id} ({sacct(train_id, 'State', all_runs=True)})",
            )
            t_fail = time.time() - t_submit
            # The node boots again: its slurmd registers, and the requeued job (it needs both nodes) can start.
            back = up_two_nodes()
            assert back.returncode == 0, back.stdout[-2000:] + back.stderr[-4000:]
            t_back = time.time() - t_submit
            wait_for(
                lambda: len(log.starts()) > 1 or train_id not in squeue_ids(),
                300,
                lambda: f"the requeued job {train_id} to start again ({state_of(train_id)})",
            )
            state = final_state(train_id, 300)
            merged = final_state(record["merge_id"], 300) if state == "COMPLETED" else "-"
        finally:
            cancel([j for j in jobs if j])

    runs = sacct(train_id, "State,NodeList", all_runs=True)
    resumes, stops, finished = log.resumed_steps(), log.stops(), log.finished()
    diff = max_param_diff(final_model(work), final_model(two_node_run.workdir)) if state == "COMPLETED" else math.inf
    resumed_at = [log_time(line) - t_submit for line in log.starts()[1:]]
    print(
        f"\nnode death timeline (s after submit; seed {SEED}, {total} steps): {node} (rank 0, batch step) SIGKILLed "
        f"at {t_kill:.1f} (drawn step {kill_at}, last logged step {last_step}, newest checkpoint step {committed}), "
        f"NODE_FAIL seen {t_fail:.1f}, node back {t_back:.1f}, resumed at step {resumes[0] if resumes else None} "
        f"{f'{resumed_at[0]:.1f}' if resumed_at else '-'}, "
        f"{f'done {log_time(finished) - t_submit:.1f}' if finished else f'not done ({state})'}, merge {merged}; "
        f"sacct runs {runs}; max |param difference| to the uninterrupted 2-node run {diff:.3g}"
    )
    resumed = resumes[0] if resumes else None
    ok = (
        state == merged == "COMPLETED"
        and resumes == [committed]
        and 0 < committed < total
        and not stops
        and diff <= RESUME_TOLERANCE
    )
    reliability.record(
        fault="node of rank 0 dies, 2-node job (SIGKILL, no signal)",
        trials=1,
        survived=int(ok),
        data_lost=int(resumed is None or resumed < committed),
        note=f"{node} killed after step {last_step} of {total}, resumed at checkpoint step {resumed} of {committed}; "
        f"max |dparam| to the uninterrupted 2-node run {diff:.2g}",
    )
    assert state == "COMPLETED", log.lines()[-30:]
    assert last_step is not None and kill_at <= last_step < total, (
        f"the run was not training when {node} died ({last_step} of {total})"
    )
    assert runs == [["NODE_FAIL", "rag-n[1-2]"], ["COMPLETED", "rag-n[1-2]"]], runs
    assert not stops, f"the job had a chance to checkpoint on a signal: {stops}"
    assert 0 < committed < total, f"newest checkpoint at the kill: step {committed} of {total}"
    assert resumes == [committed], f"resumed at {resumes}, the newest checkpoint at the kill was step {committed}"
    assert merged == "COMPLETED", "the imputation and merge after the resumed training did not complete"
    assert diff <= RESUME_TOLERANCE
