"""Shared clusters: what the pipeline writes has exactly the permissions the user's umask allows, config
paths full of shell syntax reach sbatch and apptainer as plain text, and no file another user could plant
(a checkpoint, a cache artifact) gets code run by unpickling it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shlex
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from rag_hpc.checkpoint import CHECKPOINT_FORMAT
from rag_hpc.data.simulate import simulate_panel
from rag_hpc.launch import APPTAINER_ENV
from tests import reliability
from tests.conftest import TINY_SIM_PRESET, TINY_SIM_SEED
from tests.slurm_helpers import (
    as_flags,
    cli,
    fake_apptainer,
    final_state,
    launch_records,
    launcher,
    run_dir,
    sacct,
    tiny_sets,
    train_tiny,
)

# ------------------------------------------------------------------------------------------------ umask


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_every_file_and_directory_the_pipeline_writes_has_exactly_the_umask_permissions(umask: int, tmp_path: Path) -> None:
    # Temp files made with mkstemp/mkdtemp (0600/0700) and renamed into place must not stay private under
    # 022, and nothing may be chmod-ed wider than the umask allows under 077.
    previous = os.umask(umask)
    try:
        sim = simulate_panel(tmp_path / "sim", TINY_SIM_PRESET, TINY_SIM_SEED, verbose=False)
        out = launcher("--cluster", "local", *as_flags(tiny_sets(sim, tmp_path / "work")), timeout=400)
    finally:
        os.umask(previous)
    assert out.returncode == 0, out.stderr[-3000:]
    written = [p for root in (sim, tmp_path / "work") for p in (root, *root.rglob("*"))]
    wrong = [
        f"{stat.S_IMODE(p.lstat().st_mode):o} {p.relative_to(tmp_path)}"
        for p in written
        if stat.S_IMODE(p.lstat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~umask
    ]
    assert not wrong, f"not {0o666 & ~umask:o}/{0o777 & ~umask:o} under umask {umask:03o}:\n" + "\n".join(wrong)
    names = {p.name for p in written} | {p.suffix for p in written}
    # every kind of output: simulation, panel, cache artifacts and locks, checkpoints, imputed VCF, report
    for expected in (
        "panel.vcf.gz",
        ".tbi",
        "panel.h5",
        "manifest.json",
        "shard.npz",
        "donors.npz",
        ".lock",
        ".pt",
        ".sha256",
        "imputed.vcf.gz",
        "report.md",
        "metrics.json",
        "r2_by_maf.png",
        "loss_curve.png",
        "metrics.csv",
        "train.log",
    ):
        assert expected in names, f"the pipeline wrote no {expected}: the check above did not cover it"


# ------------------------------------------------------------------------------------------------ shell injection


@pytest.mark.slow
def test_shell_syntax_in_config_paths_reaches_sbatch_and_apptainer_as_plain_text(
    cluster: dict[str, int], tiny_simulation: Path, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    payloads = {
        "semicolon": f";touch {markers}/semicolon;",
        "command substitution": f"$(touch {markers}/dollar)",
        "backticks": f"`touch {markers}/backticks`",
        "single quotes": f"'$(touch {markers}/single)'",
        "double quotes": f'"$(touch {markers}/double)"',
    }
    # Every payload in every path that goes into a job script or a container command line: the submitit
    # folder and workdir, the cache, the image, and the data files the container binds.
    nasty = tmp_path.joinpath(*(f"a b{p}" for p in payloads.values()))
    data = nasty / "data"
    shutil.copytree(tiny_simulation, data)
    work, cache, image = nasty / "work", nasty / "cache dir", nasty / "rag hpc.sif"
    image.write_text("stand-in image")
    apptainer = fake_apptainer(tmp_path / "fake")
    out = launcher(
        *as_flags(tiny_sets(data, work, cache)),
        "--container",
        str(image),
        "--time",
        "10",
        "--wait",
        env={APPTAINER_ENV: str(apptainer)},
    )
    record = launch_records(work)[-1] if (work / "launch.json").exists() else {}
    states = {"train": final_state(record["train_id"], 120)} if record else {}
    states.update({row[0]: row[1] for a in record.get("array_ids", []) for row in sacct(a)})
    completed = out.returncode == 0 and bool(states) and set(states.values()) == {"COMPLETED"}
    ran = sorted(p.name for p in markers.iterdir())
    lost = sum(not (data / f.name).is_file() or (data / f.name).read_bytes() != f.read_bytes() for f in tiny_simulation.iterdir())
    reliability.record(
        "shell injection via config paths",
        trials=len(payloads),
        survived=len(payloads) - len(ran) if completed else 0,
        data_lost=lost,
        note="; $( ) ` ' \" in workdir, cache, image and data paths of a real container submission",
    )
    assert not ran, f"injected commands ran: {ran}"
    assert lost == 0, "input files changed"
    assert completed, f"launch rc {out.returncode}, jobs {states}: {out.stderr[-3000:]}"
    job_err = Path(record["folder"]) / f"{record['train_id']}_0_log.err"
    assert "fake apptainer" in job_err.read_text(), "the training job did not run through the container command"
    assert list((run_dir(work) / "checkpoints").glob("step_*.pt")) and list(cache.rglob("manifest.json"))


# ------------------------------------------------------------------------------------------------ pickles


class _RunsCode:
    """Unpickling this runs ``touch marker``: what a hostile file in a shared directory would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _checkpoint_bytes(marker: Path, as_zip: bool) -> bytes:
    state = {"format": CHECKPOINT_FORMAT, "model": _RunsCode(marker)}
    if not as_zip:
        return pickle.dumps(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _shard_bytes(marker: Path) -> bytes:
    hostile = np.empty(1, dtype=object)
    hostile[0] = _RunsCode(marker)
    buf = io.BytesIO()
    np.savez(buf, alleles=hostile, length=np.int64(1), positions=hostile, af=hostile)
    return buf.getvalue()


def _plant_checkpoint(path: Path, data: bytes) -> None:
    """With a matching sidecar: whoever can write the directory can write both."""
    path.write_bytes(data)
    path.with_name(f"{path.name}.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {len(data)}\n")


def _plant_shards(cache: Path, data: bytes) -> None:
    """Replace every shard of the cache, manifests updated so that sizes and checksums match."""
    for manifest in cache.glob("shard/*/*/manifest.json"):
        (manifest.parent / "shard.npz").write_bytes(data)
        meta = json.loads(manifest.read_text())
        meta["files"]["shard.npz"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest.write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def trained(tiny_simulation: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("trained") / "work"
    train_tiny(tiny_simulation, work)
    return work


def _unpickle_zip(data: bytes) -> object:
    return torch.load(io.BytesIO(data), weights_only=False)


def _unpickle_npz(data: bytes) -> object:
    return np.load(io.BytesIO(data), allow_pickle=True)["alleles"]


# (what is planted, its bytes for a marker, how a careless loader would read them, where it goes)
PLANTS = [
    ("checkpoint file (torch zip)", lambda m: _checkpoint_bytes(m, True), _unpickle_zip, "file"),
    ("checkpoint file (plain pickle)", lambda m: _checkpoint_bytes(m, False), pickle.loads, "file"),
    ("newest checkpoint of a run, train resumes", lambda m: _checkpoint_bytes(m, True), _unpickle_zip, "train"),
    ("newest checkpoint of a run, impute --checkpoint RUN_DIR", lambda m: _checkpoint_bytes(m, True), _unpickle_zip, "run dir"),
    ("cache shard (numpy object array)", _shard_bytes, _unpickle_npz, "cache"),
]


def test_planted_pickles_are_refused_with_one_line_and_their_code_never_runs(
    trained: Path, tiny_simulation: Path, tmp_path: Path
) -> None:
    failures: list[str] = []
    lost = 0
    for i, (name, hostile, careless_load, where) in enumerate(PLANTS):
        marker, control = tmp_path / f"pwned{i}", tmp_path / f"control{i}"
        careless_load(hostile(control))
        assert control.exists(), f"{name}: loading it carelessly runs nothing, so this trial would prove nothing"
        work = tmp_path / f"trial{i}" / "work"
        shutil.copytree(trained, work)
        checkpoints = run_dir(work) / "checkpoints"
        good = {p.name: p.read_bytes() for p in checkpoints.iterdir()}
        sets = as_flags(tiny_sets(tiny_simulation, work))
        targets = str(tiny_simulation / "targets.array.vcf.gz")
        impute = ["impute", "--targets", targets, "--out", str(work / "imputed.vcf.gz"), "--quiet", *sets]
        expect = "refused: it holds pickled objects no rag_hpc checkpoint contains"
        if where == "file":
            _plant_checkpoint(work / "step_000000001.pt", hostile(marker))
            argv = [*impute, "--checkpoint", str(work / "step_000000001.pt")]
        elif where == "cache":
            _plant_shards(work / "cache", hostile(marker))
            argv, expect = [*impute, "--checkpoint", str(run_dir(work))], ""  # numpy refuses; the message is numpy's
        else:
            _plant_checkpoint(checkpoints / "step_999999999.pt", hostile(marker))
            argv = ["train", *sets] if where == "train" else [*impute, "--checkpoint", str(run_dir(work))]
        proc = cli(*argv)
        lines = proc.stderr.strip().splitlines()
        problems = [
            what
            for what, bad in [
                ("its code ran", marker.exists()),
                ("exit code 0", proc.returncode == 0),
                ("not one stderr line", len(lines) != 1 or "Traceback" in proc.stderr),
                (f"no {expect!r} in the error", not lines or expect not in lines[-1]),
                ("an imputed VCF was written", (work / "imputed.vcf.gz").exists()),
            ]
            if bad
        ]
        if {p: (checkpoints / p).read_bytes() for p in good if (checkpoints / p).exists()} != good:
            lost += 1
            problems.append("a good checkpoint changed or vanished")
        if problems:
            failures.append(f"{name}: {', '.join(problems)}; stderr: {proc.stderr.strip()[-800:]}")
    reliability.record(
        "malicious pickle in checkpoint/cache",
        trials=len(PLANTS),
        survived=len(PLANTS) - len(failures),
        data_lost=lost,
        note="torch.load(weights_only=True); np.load never allows pickles",
    )
    assert not failures, "\n".join(failures)
