"""``python -m rag_hpc.launch`` against the real single-node SLURM cluster (slurm/up.sh).

Tiny simulated panel (3 windows of 100 sites), tiny CPU model. Each test launches through the CLI in a
subprocess, exactly as a user would, and checks what SLURM and the run directory say afterwards.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from rag_hpc.errors import ClusterError
from tests.slurm_helpers import (
    REPO,
    as_flags,
    cancel,
    cli,
    fake_apptainer,
    final_model,
    final_state,
    launch_records,
    launcher,
    log_time,
    max_param_diff,
    node_occupied,
    plain_env,
    run,
    run_dir,
    sacct,
    squeue_ids,
    state_of,
    submit_urgent,
    tiny_genome_sets,
    tiny_sets,
    wait_for,
)

pytestmark = pytest.mark.slow


def _status(workdir: Path) -> tuple[int, str]:
    out = cli("status", "--workdir", str(workdir))
    return out.returncode, out.stdout + out.stderr


def test_launch_builds_the_index_array_then_trains_and_a_relaunch_builds_nothing(cluster, tiny_simulation, tmp_path):
    work = tmp_path / "work"
    flags = [*as_flags(tiny_sets(tiny_simulation, work)), "--windows-per-task", "1", "--time", "10"]
    first = launcher(*flags, "--wait")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    record = launch_records(work)[-1]
    assert record["windows_todo"] == 3 and record["array_tasks"] == 3 and len(record["array_ids"]) == 1
    array_id, train_id = record["array_ids"][0], record["train_id"]
    tasks = {r[0]: r for r in sacct(array_id, "JobID,State,End")}
    assert {tasks[f"{array_id}_{i}"][1] for i in range(3)} == {"COMPLETED"}, tasks
    assert final_state(train_id, 60) == "COMPLETED"
    (train_row,) = sacct(train_id, "JobID,State,Start")
    assert train_row[2] >= max(t[2] for t in tasks.values()), "training started before the index array ended"
    assert (run_dir(work) / "metrics.csv").exists() and list((run_dir(work) / "checkpoints").glob("step_*.pt"))
    for expected in (
        f"training job: {train_id}",
        "_%a_0_log.out",
        "python -m rag_hpc.status --workdir",
        "RAM per index-array task",
    ):
        assert expected in first.stdout

    second = launcher(*flags, "--wait")
    assert second.returncode == 0, second.stderr[-3000:]
    again = launch_records(work)[-1]
    assert again["array_ids"] == [] and again["windows_todo"] == 0
    assert "none (all windows cached)" in second.stdout
    # --wait returns when the result file exists; sacct may say RUNNING a moment longer.
    assert final_state(again["train_id"], 60) == "COMPLETED"
    assert "resumed from" in (run_dir(work) / "train.log").read_text()
    rc, text = _status(work)
    assert rc == 0 and "windows cached: 3 / 3" in text and "COMPLETED" in text, text


def test_imputation_array_after_training_merges_into_the_vcf_a_local_imputation_writes(cluster, tiny_simulation, tmp_path):
    import gzip

    work = tmp_path / "work"
    sets = tiny_sets(tiny_simulation, work, None, 1, "impute.windows_per_task=1")
    flags = [*as_flags(sets), "--time", "10"]
    first = launcher(*flags, "--wait")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    record = launch_records(work)[-1]
    (impute_id,), merge_id, train_id = record["impute_ids"], record["merge_id"], record["train_id"]
    assert record["impute_tasks"] == 3 and "RAM per imputation task" in first.stdout
    # The job graph: training -> imputation array (afterok) -> merge (afterok), each after the one before.
    assert final_state(merge_id, 60) == "COMPLETED"
    (train_row,) = sacct(train_id, "JobID,State,Start,End")
    tasks = {r[0]: r for r in sacct(impute_id, "JobID,State,Start,End")}
    assert {tasks[f"{impute_id}_{i}"][1] for i in range(3)} == {"COMPLETED"}, tasks
    assert min(t[2] for t in tasks.values()) >= train_row[3], "imputation started before training ended"
    (merge_row,) = sacct(merge_id, "JobID,State,Start")
    assert merge_row[2] >= max(t[3] for t in tasks.values()), "merge started before the imputation array ended"
    report = run_dir(work) / "report"
    merged = report / "imputed.vcf.gz"
    assert (report / "report.md").is_file() and Path(f"{merged}.tbi").is_file()

    # The same checkpoint imputed in one local process: the same VCF.
    local = cli("impute", "--checkpoint", str(run_dir(work)), "--out", str(tmp_path / "local.vcf.gz"), *as_flags(sets))
    assert local.returncode == 0, local.stderr[-3000:]
    assert gzip.decompress(merged.read_bytes()) == gzip.decompress((tmp_path / "local.vcf.gz").read_bytes())
    rc, text = _status(work)
    assert rc == 0 and f"imputation array {impute_id}: 3 COMPLETED" in text and f"merge job {merge_id}: COMPLETED" in text, text

    # A range lost: the relaunch's array recomputes that range alone, the merge writes the same VCF.
    parts = sorted((run_dir(work) / "imputed-ranges").glob("imputed/*/*/records.gz"))
    assert len(parts) == 3
    stamps = [p.stat().st_mtime_ns for p in parts]
    parts[1].write_bytes(b"lost")
    before = gzip.decompress(merged.read_bytes())
    second = launcher(*flags, "--wait")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert [p.stat().st_mtime_ns == t for p, t in zip(parts, stamps)] == [True, False, True]
    assert parts[1].read_bytes() != b"lost" and gzip.decompress(merged.read_bytes()) == before


def test_a_genome_launch_is_one_job_graph_and_writes_each_chromosomes_vcf_as_a_local_imputation_does(
    cluster, tiny_genome, tmp_path
):
    import gzip

    work = tmp_path / "work"
    sets = tiny_genome_sets(tiny_genome, work, "impute.windows_per_task=2")
    first = launcher(*as_flags(sets), "--windows-per-task", "2", "--time", "10", "--wait")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    record = launch_records(work)[-1]
    (array_id,), train_id, (impute_id,), merge_id = (
        record["array_ids"],
        record["train_id"],
        record["impute_ids"],
        record["merge_id"],
    )
    assert final_state(merge_id, 60) == "COMPLETED"
    rows = {r[0]: r for j in (array_id, train_id, impute_id, merge_id) for r in sacct(j, "JobID,JobName,State,Start,End")}
    print("\ngenome launch, sacct -X (JobID|JobName|State|Start|End):\n" + "\n".join("|".join(r) for r in rows.values()))
    per = {ch["name"]: ch for ch in record["chromosomes"]}
    assert list(per) == ["20", "21"]
    # One index array over the windows of both chromosomes, one training after it, one imputation array
    # after training over both chromosomes, one merge after that.
    for key, after in (("index_tasks", None), ("impute_tasks", train_id)):
        tasks = [t for ch in per.values() for t in ch[key]]
        assert all(per[c][key] for c in per) and len(tasks) == len(set(tasks))
        assert {rows[t][2] for t in tasks} == {"COMPLETED"}, rows
        if after is not None:
            assert min(rows[t][3] for t in tasks) >= rows[after][4], f"{key} started before job {after} ended"
    assert rows[train_id][3] >= max(rows[t][4] for t in per["21"]["index_tasks"] + per["20"]["index_tasks"])
    assert rows[merge_id][3] >= max(rows[t][4] for ch in per.values() for t in ch["impute_tasks"])
    rc, text = _status(work)
    assert rc == 0, text
    for chrom, ch in per.items():
        merged = Path(ch["imputed"])
        assert merged == run_dir(work) / "report" / chrom / "imputed.vcf.gz" and (merged.parent / "report.md").is_file()
        n_index, n_impute = len(ch["index_tasks"]), len(ch["impute_tasks"])
        assert (
            f"chromosome {chrom}: windows cached {ch['windows']} / {ch['windows']}; index tasks: {n_index} COMPLETED; "
            f"imputation tasks: {n_impute} COMPLETED; imputed: {merged}"
        ) in text, text
        # The same checkpoint imputing this chromosome in one local process: the same VCF.
        out = tmp_path / f"local-{chrom}.vcf.gz"
        local = cli("impute", "--checkpoint", str(run_dir(work)), "--chromosome", chrom, "--out", str(out), *as_flags(sets))
        assert local.returncode == 0, local.stderr[-3000:]
        assert gzip.decompress(merged.read_bytes()) == gzip.decompress(out.read_bytes())
    print(text)


def test_unphased_targets_are_phased_by_a_job_the_index_array_waits_for(cluster, tiny_simulation, tmp_path):
    from tests.test_phase import unphased

    work = tmp_path / "work"
    raw = unphased(tiny_simulation / "targets.array.vcf.gz", tmp_path / "array.unphased.vcf.gz")
    flags = [*as_flags(tiny_sets(tiny_simulation, work, None, 1, f"data.targets_vcf={raw}")), "--time", "10"]
    first = launcher(*flags, "--wait")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    record = launch_records(work)[-1]
    (phase_id,), (array_id,) = record["phase_ids"], record["array_ids"]
    assert final_state(record["merge_id"], 60) == "COMPLETED"
    # One chromosome: an array of one item, which submitit submits as a plain job.
    (phase,) = [r for r in sacct(phase_id, "JobID,JobName,State,Start,End") if r[0] in (phase_id, f"{phase_id}_0")]
    assert phase[1:3] == ["rag_hpc-phase", "COMPLETED"], phase
    index = sacct(array_id, "JobID,State,Start")
    assert index and min(r[2] for r in index) >= phase[4], "the index array started before the targets were phased"
    (phased,) = (work / "cache" / "phased").glob("*/targets.phased.vcf.gz")
    assert (run_dir(work) / "report" / "imputed.vcf.gz").is_file()
    rc, text = _status(work)
    assert rc == 0 and f"phase job {phase_id} (Beagle): 1 COMPLETED" in text, text
    # Relaunched: the phased targets are found, so no phase job.
    again = launcher(*flags, "--wait")
    assert again.returncode == 0, again.stderr[-3000:]
    assert launch_records(work)[-1]["phase_ids"] == [] and phased.is_file()


def test_a_failing_index_task_cancels_training_and_status_says_why(cluster, tiny_simulation, tmp_path):
    from rag_hpc.config import load_config
    from rag_hpc.index.build import WindowCache
    from rag_hpc.launch import ensure_data

    work = tmp_path / "work"
    sets = tiny_sets(tiny_simulation, work)
    config = ensure_data(load_config(None, sets), log=lambda _m: None)
    # A file where window 1's shard directory must go: a real corrupt cache, which the task cannot
    # repair (root ignores permissions, so a read-only directory would not stop it).
    cache = WindowCache(config)
    blocker = cache.store.path(cache.artifacts(cache.windows[1])["shard"])
    cache.panel.close()
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a directory")

    out = launcher(*as_flags(sets), "--windows-per-task", "1", "--time", "10")
    assert out.returncode == 0, out.stderr[-3000:]
    record = launch_records(work)[-1]
    array_id = record["array_ids"][0]
    assert final_state(record["train_id"], 120) == "CANCELLED"
    assert final_state(f"{array_id}_1", 60) == "FAILED"
    assert record["train_id"] not in squeue_ids(), "training left pending"
    rc, text = _status(work)
    assert rc != 0
    assert f"index task {array_id}_1 FAILED" in text and "cancelled because index task" in text, text
    assert not (run_dir(work) / "checkpoints").exists()


def test_preempted_training_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(cluster, tiny_simulation, tmp_path):
    work = tmp_path / "work"
    # 108 steps held >= 0.3 s each: the job trains >= 32 s after the preemption is asked for at its first
    # step, whatever the machine's speed (SLURM delivers it in ~2-5 s).
    sets = tiny_sets(tiny_simulation, work, None, 4, "train.min_step_seconds=0.3")
    t_submit = time.time()
    out = launcher(*as_flags(sets), "--cpus-per-task", str(cluster["cpus"]), "--time", "60")
    assert out.returncode == 0, out.stderr[-3000:]
    train_id = launch_records(work)[-1]["train_id"]
    log = run_dir(work) / "train.log"
    # Preempt as soon as training runs (its signal handlers are in place once the log says so).
    wait_for(lambda: log.exists() and "epoch 0:" in log.read_text(), 180, lambda: f"training to start ({state_of(train_id)})")
    t_urgent = time.time()
    urgent_id = submit_urgent(tmp_path / "urgent.out")
    assert final_state(urgent_id, 120) == "COMPLETED"
    assert final_state(train_id, 300) == "COMPLETED", (run_dir(work) / "train.log").read_text()[-3000:]
    runs = [r[0] for r in sacct(train_id, "State", all_runs=True)]
    assert runs[-1] == "COMPLETED" and {"REQUEUED", "PREEMPTED"} & set(runs[:-1]), runs

    text = log.read_text()
    assert "stopping at step" in text, "the job was not training when the preemption came"
    stopped = next(x for x in text.splitlines() if "stopping at step" in x)
    resumed = next(x for x in text.splitlines() if "resumed from" in x)
    finished = next(x for x in text.splitlines() if " finished at step " in x)
    started = next(x for x in text.splitlines() if "fresh start" in x)
    step = int(re.search(r"stopping at step (\d+)", stopped).group(1))
    (urgent_row,) = sacct(urgent_id, "Start,End")
    t_urgent_start = datetime.fromisoformat(urgent_row[0]).timestamp()
    print(
        f"\npreemption timeline (s after submit): training started {log_time(started) - t_submit:.1f}, "
        f"urgent submitted {t_urgent - t_submit:.1f}, checkpoint on SIGUSR2 at step {step} {log_time(stopped) - t_submit:.1f}, "
        f"urgent ran {t_urgent_start - t_submit:.1f}, requeued+resumed {log_time(resumed) - t_submit:.1f}, "
        f"done {log_time(finished) - t_submit:.1f}; sacct runs {runs}"
    )
    assert "SIGUSR2" in stopped
    job_log = Path(launch_records(work)[-1]["folder"]) / f"{train_id}_0_log.out"
    assert "this job is preempted" in job_log.read_text(), "submitit took the signal for a timeout"

    # The same run without interruption, same seed and thread count, as a plain process.
    ref = tmp_path / "ref"
    ref_sets = [*sets, f"paths.workdir={ref}", f"data.panel_h5={work / 'panel.h5'}", "train.min_step_seconds=0"]
    plain = cli("train", *as_flags(ref_sets), timeout=600, env={"OMP_NUM_THREADS": str(cluster["cpus"])})
    assert plain.returncode == 0, plain.stderr[-3000:]
    diff = max_param_diff(final_model(work), final_model(ref))
    print(f"max |param difference| preempted vs uninterrupted: {diff:.3g}")
    assert diff < 1e-5


def test_time_limit_requeues_from_a_container_without_scontrol_and_finishes(cluster, tiny_simulation, tmp_path):
    odd = tmp_path / "dir with space;echo injected"
    work = odd / "work"
    apptainer = fake_apptainer(tmp_path / "fake")
    image = odd / "rag hpc.sif"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_text("stand-in image")
    # 54 steps held >= 1.2 s each: >= 65 s of training, which no run under a 1-minute limit can finish,
    # whatever the machine's speed (asserted below: the first run ends in a time-out, not COMPLETED).
    sets = tiny_sets(tiny_simulation, work, None, 2, "train.min_step_seconds=1.2")
    t0 = time.time()
    # SLURM signals a 1-minute job 10-40 s in, so a run trains ~5-30 s: allow requeues enough for a slow day.
    out = launcher(
        *as_flags(sets),
        "--time",
        "1",
        "--container",
        str(image),
        "--cpus-per-task",
        "2",
        "--max-timeouts",
        "30",
        env={"RAG_HPC_APPTAINER": str(apptainer)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    record = launch_records(work)[-1]
    train_id = record["train_id"]
    assert final_state(train_id, 400) == "COMPLETED", (run_dir(work) / "train.log").read_text()[-3000:]
    runs = [r[0] for r in sacct(train_id, "State", all_runs=True)]
    job_log = Path(record["folder"]) / f"{train_id}_0_log.err"
    batch_out = Path(record["folder"]) / f"{train_id}_0_log.out"
    text = job_log.read_text() + batch_out.read_text()
    print(f"\ntime-limit run: {time.time() - t0:.1f} s, sacct runs {runs}")
    assert "timed-out" in text and "requeued" in text and "fake apptainer" in text, text[-3000:]
    assert runs[-1] == "COMPLETED" and len(runs) >= 2 and runs[0] != "COMPLETED", runs
    assert not list(odd.parent.glob("injected*")) and "injected" not in text.replace(str(odd), "")


def test_a_two_task_training_job_runs_over_gloo(cluster, tiny_simulation, tmp_path):
    work = tmp_path / "work"
    out = launcher(*as_flags(tiny_sets(tiny_simulation, work, None, 1, "cluster.gpus_per_node=2")), "--time", "10", "--wait")
    assert out.returncode == 0, out.stderr[-3000:]
    record = launch_records(work)[-1]
    assert final_state(record["train_id"], 60) == "COMPLETED"
    assert "training job" in out.stdout and "x 2 task(s)" in out.stdout
    assert "2 rank(s) on cpu (gloo)" in (run_dir(work) / "train.log").read_text()


def test_the_guard_refuses_an_over_budget_plan_and_submits_nothing(cluster, tiny_simulation, tmp_path):
    before = squeue_ids()
    out = launcher(*as_flags(tiny_sets(tiny_simulation, tmp_path / "work")), "--mem", "100M")
    assert out.returncode != 0
    assert "OVER" in out.stdout and "RAM per index-array task" in out.stdout and "nothing was submitted" in out.stderr
    assert not (tmp_path / "work" / "launch.json").exists()
    assert squeue_ids() <= before


# ---------------------------------------------------------------- one writer per run


def _queue_by_name() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for line in run(["squeue", "-h", "-o", "%F|%j"]).stdout.split():
        job, name = line.split("|", 1)
        out.setdefault(name, set()).add(job)
    return out


def test_a_run_launched_twice_at_once_is_submitted_once_and_attach_waits_for_it(cluster, tiny_simulation, tmp_path):
    work = tmp_path / "work"
    flags = [*as_flags(tiny_sets(tiny_simulation, work)), "--windows-per-task", "1", "--time", "10"]
    before = _queue_by_name()
    env = {**plain_env(1), "PYTHONUNBUFFERED": "1"}
    # The node is full, so whatever the first launch submits is still PENDING when the second looks.
    with node_occupied(cluster["cpus"], tmp_path / "occupier.out"):
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "rag_hpc.launch", *flags],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=REPO,
            )
            for _ in range(2)
        ]
        outs = [p.communicate(timeout=300) for p in procs]
        records = launch_records(work) if (work / "launch.json").exists() else []
        ids = [j for r in records for j in (*r["array_ids"], r["train_id"])]
        try:
            assert sorted(p.returncode for p in procs) == [0, ClusterError.exit_code], outs
            (record,) = records
            array_id, train_id = record["array_ids"][0], record["train_id"]
            refused = next(err for p, (_out, err) in zip(procs, outs) if p.returncode != 0).strip().splitlines()
            assert len(refused) == 1, refused
            for expected in (
                f"training job {train_id} (PENDING)",
                f"index array {array_id} (PENDING)",
                f"scancel {array_id} {train_id}",
                "launch --attach",
                "rag_hpc.status --workdir",
            ):
                assert expected in refused[0], refused[0]
            now = _queue_by_name()
            assert now.get("rag_hpc-index", set()) - before.get("rag_hpc-index", set()) == {array_id}, now
            assert now.get("rag_hpc-train", set()) - before.get("rag_hpc-train", set()) == {train_id}, now

            attach_out = tmp_path / "attach.out"
            with attach_out.open("w") as fh:
                attach = subprocess.Popen(
                    [sys.executable, "-m", "rag_hpc.launch", *flags, "--attach"],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=env,
                    cwd=REPO,
                )
            wait_for(
                lambda: "attached (nothing submitted)" in attach_out.read_text(),
                120,
                lambda: f"launch --attach to attach: {attach_out.read_text()[-2000:]}",
            )
            cancel(ids)
            assert attach.wait(timeout=120) == 1, attach_out.read_text()[-3000:]
            text = attach_out.read_text()
            assert f"training job {train_id}: CANCELLED" in text, text[-3000:]
            assert len(launch_records(work)) == 1, "launch --attach submitted"
        finally:
            cancel(ids)


def test_a_launch_that_shares_the_cache_waits_for_the_queued_array_instead_of_building_again(cluster, tiny_simulation, tmp_path):
    work = tmp_path / "work"
    base = tiny_sets(tiny_simulation, work)
    flags = ["--windows-per-task", "1", "--time", "10"]
    ids: list[str] = []
    with node_occupied(cluster["cpus"], tmp_path / "occupier.out"):
        try:
            first = launcher(*as_flags([*base, "train.name=a"]), *flags)
            assert first.returncode == 0, first.stderr[-3000:]
            a = launch_records(work)[-1]
            ids += [*a["array_ids"], a["train_id"]]
            assert a["windows_todo"] == 3 and len(a["array_ids"]) == 1
            second = launcher(*as_flags([*base, "train.name=b"]), *flags)
            assert second.returncode == 0, second.stderr[-3000:]
            b = launch_records(work)[-1]
            ids.append(b["train_id"])
            assert b["array_ids"] == [] and b["windows_todo"] == 0 and b["depends_on"] == a["array_ids"], b
            assert "3 more window(s) are being built by queued array(s)" in second.stdout, second.stdout
            job = run(["scontrol", "show", "job", b["train_id"]]).stdout
            assert re.search(rf"Dependency=afterok:{a['array_ids'][0]}(_\*)?\(", job), job
        finally:
            cancel(ids)


def test_a_second_trainer_on_a_running_run_exits_at_once_naming_the_job_that_holds_it(cluster, tiny_simulation, tmp_path):
    work = tmp_path / "work"
    # 108 steps held >= 0.5 s: the job trains for >= 54 s, by construction still running when the second comes.
    sets = tiny_sets(tiny_simulation, work, None, 4, "train.min_step_seconds=0.5")
    out = launcher(*as_flags(sets), "--time", "10")
    assert out.returncode == 0, out.stderr[-3000:]
    train_id = launch_records(work)[-1]["train_id"]
    try:
        log = run_dir(work) / "train.log"
        wait_for(lambda: log.exists() and "epoch 0:" in log.read_text(), 180, lambda: f"training to start ({state_of(train_id)})")
        second = cli("train", *as_flags(sets))
        lines = second.stderr.strip().splitlines()
        assert second.returncode == ClusterError.exit_code and len(lines) == 1, second.stderr[-3000:]
        assert re.search(
            rf"runs/default is already in use by host \S+, pid \d+, SLURM job {train_id}, since .*`scancel {train_id}`", lines[0]
        ), lines
        assert state_of(train_id) == "RUNNING", "the first trainer was not holding the run throughout"
        assert log.read_text().count("fresh start") == 1, "the second trainer wrote to the run's log"
    finally:
        cancel([train_id])
