"""One model across a genome's chromosomes, or one model per chromosome: which imputes better.

    python -m bench.genome_bench [--preset demo-genome] [--workdir bench_out/genome] [--json]

Runs the ``--cluster local`` pipeline on the simulated two-chromosome preset twice over the same data and
the demo's settings (``rag_hpc.launch.DEMO_OVERRIDES``):

- joint: one genome launch (``data.chromosomes``): one model trained over the windows of both chromosomes
  (an epoch is every window of the genome, so it takes as many steps as the separate runs together);
- separate: one launch per chromosome, each training its own model on its own windows only;
- separate, same steps: the same with as many epochs as there are chromosomes, so each model takes the
  joint model's number of steps (more steps alone, against more data).

Both read the same window cache and donor tables (content-addressed, built by the first run), so the
comparison is the training alone. Prints dosage r² by MAF bin per chromosome for each, and the training
and total time per run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import machine_line
from rag_hpc.config import CHROM
from rag_hpc.data.simulate import GENOME_PRESETS
from rag_hpc.launch import DEMO_OVERRIDES
from rag_hpc.launch import _flatten_overrides as flatten


def launch(workdir: Path, sets: list[str]) -> tuple[float, float]:
    """(training seconds, wall seconds) of one ``--cluster local`` launch in ``workdir``, its run trained
    afresh (an earlier run's checkpoints would make training a no-op; the shared cache stays)."""
    shutil.rmtree(workdir / "runs", ignore_errors=True)
    sets = [*sets, f"paths.workdir={workdir}"]
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "rag_hpc.launch", "--cluster", "local", *[x for s in sets for x in ("--set", s)]],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"launch failed ({out.returncode}):\n{out.stderr[-3000:]}")
    trained = re.search(r"^training: \S+ in ([\d.]+) s$", out.stdout, re.M)
    assert trained is not None, out.stdout[-2000:]
    return float(trained.group(1)), wall


def r2_by_bin(metrics: Path) -> dict[str, float | None]:
    return {b["label"]: b["r2"] for b in json.loads(metrics.read_text())["bins"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo-genome", choices=sorted(GENOME_PRESETS))
    p.add_argument("--workdir", type=Path, default=Path("bench_out/genome"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    work = args.workdir.absolute()
    common = [*flatten(DEMO_OVERRIDES), "train.progress=false", f"paths.cache_dir={work / 'cache'}"]
    chromosomes = GENOME_PRESETS[args.preset][1]

    joint = work / "joint"
    runs = {"joint": launch(joint, [*common, f"data.demo_preset={args.preset}"])}
    sim = joint / "demo" / args.preset / CHROM
    r2 = {("joint", c): r2_by_bin(joint / "runs" / "default" / "report" / c / "metrics.json") for c in chromosomes}
    epochs = DEMO_OVERRIDES["train"]["epochs"]
    arms = {"separate": epochs, "separate, same steps": epochs * len(chromosomes)}
    for c in chromosomes:
        files = {
            "panel_vcf": "panel.vcf.gz",
            "populations": "populations.tsv",
            "targets_vcf": "targets.array.vcf.gz",
            "truth_vcf": "targets.truth.vcf.gz",
        }
        one = [f"data.{k}={str(sim / v).replace(CHROM, c)}" for k, v in files.items()]
        for arm, n in arms.items():
            run = work / f"{arm.replace(', ', '-').replace(' ', '-')}-{c}"
            runs[f"{arm} {c}"] = launch(run, [*common, *one, f"train.epochs={n}"])
            r2[(arm, c)] = r2_by_bin(run / "runs" / "default" / "report" / "metrics.json")

    bins = list(next(iter(r2.values())))
    print(f"machine: {machine_line()}; preset {args.preset} (chromosomes {', '.join(chromosomes)}), demo settings")
    print("| chromosome | model | " + " | ".join(bins) + " |")
    print("|---|---|" + "---:|" * len(bins))
    for c in chromosomes:
        for how in ("joint", *arms):
            cells = ["-" if v is None else f"{v:.4f}" for v in r2[(how, c)].values()]
            print(f"| {c} | {how} | " + " | ".join(cells) + " |")
    print("| run | training s | launch s |\n|---|---:|---:|")
    for name, (train_s, wall) in runs.items():
        print(f"| {name} | {train_s:.1f} | {wall:.1f} |")
    if args.json:
        print(
            json.dumps(
                {
                    "machine": machine_line(),
                    "preset": args.preset,
                    "r2": {f"{how} {c}": v for (how, c), v in r2.items()},
                    "runs": {k: {"train_s": t, "launch_s": w} for k, (t, w) in runs.items()},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
