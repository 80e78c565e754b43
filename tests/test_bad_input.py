"""The bad-input corpus: every file and flag in it, given to the CLI a user would give it to, must stop with
the exit code of its kind (rag_hpc.errors) and ONE stderr line naming the problem and the fix (no traceback),
leave no partial output, and leave everything built before it (panel, checkpoints, cache, an earlier output)
byte-identical.

Text VCFs and configs are shipped in tests/data/bad/; what must be binary or fit the tiny simulation's
sites (a truncated bgzip, a PNG and an HDF5 file named .vcf.gz, targets that do not fit the panel) is made
once per module. Launch flags go to the SLURM test cluster with --dry-run (sinfo only, nothing submitted).
"""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pytest

from rag_hpc.errors import ClusterError, ConfigError, InputError, UserError
from tests import reliability
from tests.slurm_helpers import as_flags, cli, ensure_cluster, squeue_ids, tiny_sets, train_tiny
from tests.test_impute import write_targets

BAD = Path(__file__).parent / "data" / "bad"
COMPLEMENT = str.maketrans("ACGT", "TGCA")
ALLELE_PAIRS = ("AC", "AG", "CT", "GT", "AT", "CG")


@dataclass(frozen=True)
class Case:
    """One bad input. ``args`` may name {bad} (shipped files), {gen} (made here), {sim} (the tiny simulation),
    {built} (the run built before the corpus), {ckpt} (its checkpoint), {sets} (the run's config flags, spliced
    in) and {out} (this case's own directory). ``prior``: files of {built} copied into {out} first, which must
    survive as they were. ``kind``: the rag_hpc.errors kind it is, whose exit code the CLI must return."""

    name: str
    module: str
    args: tuple[str, ...]
    expect: str  # regex the one stderr line must match: the problem ... the fix
    kind: type[UserError]
    prior: tuple[str, ...] = ()
    slurm: bool = False


def prepare(name: str, vcf: str, expect: str, prior: bool = False) -> Case:
    args = ("--vcf", vcf, "--out", "{out}/panel.h5", "--quiet")
    return Case(name, "prepare", args, expect, InputError, ("panel.h5",) if prior else ())


def impute(name: str, targets: str, expect: str) -> Case:
    args = ("--checkpoint", "{ckpt}", "--targets", targets, "--out", "{out}/imputed.vcf.gz", "--quiet", "{sets}")
    return Case(name, "impute", args, expect, InputError, ("imputed.vcf.gz", "imputed.vcf.gz.tbi"))


def index(name: str, kind: type[UserError], expect: str, *args: str, prior: tuple[str, ...] = ()) -> Case:
    base = ("--quiet", "--set", "data.panel_h5={built}/panel.h5", "--set", "paths.workdir={out}/work")
    return Case(name, "index", (*base, *args), expect, kind, prior)


def launch(name: str, expect: str, *flags: str) -> Case:
    args = (
        "--cluster",
        "slurm",
        "--dry-run",
        "--set",
        "data.panel_h5={built}/panel.h5",
        "--set",
        "paths.workdir={out}/work",
        *flags,
    )
    return Case(name, "launch", args, expect, ClusterError, slurm=True)


FIX_FORMAT = r"expected a bgzipped VCF: compress a VCF with `bgzip"
FIX_BUILD = r"different genome builds.*lift the targets"
CORPUS = [
    # -- panel VCFs -> prepare
    prepare(
        "unsorted",
        "{bad}/unsorted.vcf",
        r"21:20 comes after 21:30: positions are not sorted; sort it with `bcftools sort",
        prior=True,
    ),
    prepare("duplicate POS", "{bad}/duplicate_position.vcf", r"21:20: duplicate position .*`bcftools norm -d all`"),
    prepare(
        "multi-allelic",
        "{bad}/multiallelic.vcf",
        r"21:20 is multi-allelic \(REF A, ALT G,T\).*bcftools view -m2 -M2 -v snps.*--skip-non-snps",
        prior=True,
    ),
    prepare("indel", "{bad}/indel.vcf", r"21:20 is not a SNP \(REF AT, ALT A\).*bcftools view -m2 -M2 -v snps.*--skip-non-snps"),
    prepare(
        "unphased panel",
        "{bad}/unphased.vcf",
        r"21:20 sample S2: unphased genotype 0/1; the VCF must be phased: phase it first.*beagle",
        prior=True,
    ),
    prepare(
        "missing call", "{bad}/missing_call.vcf", r"21:20 sample S3: missing genotype.*impute them first.*bcftools view -g \^miss"
    ),
    prepare("missing haploid '.'", "{bad}/missing_haploid_dot.vcf", r"21:20 sample S2: missing genotype"),
    prepare("no GT field", "{bad}/no_gt_field.vcf", r"21:20: no GT field in this record; every record needs phased GT calls"),
    prepare(
        "haploid call",
        "{bad}/haploid.vcf",
        r"21:20 sample S2: haploid genotype; every call must be diploid.*diploid homozygotes",
        prior=True,
    ),
    prepare("all calls haploid", "{bad}/all_haploid.vcf", r"21:10 sample S1: haploid genotype; every call must be diploid"),
    prepare("triploid call", "{bad}/triploid.vcf", r"21:20 sample S2: 3-ploid genotype; every call must be diploid"),
    prepare(
        "several contigs",
        "{bad}/two_contigs.vcf",
        r"22:5: a second contig after 21.*split it with `bcftools view -r 21",
        prior=True,
    ),
    prepare("no samples", "{bad}/no_samples.vcf", r"has no samples \(no columns after FORMAT\): a panel needs phased haplotypes"),
    prepare(
        "duplicate sample IDs",
        "{bad}/duplicate_sample_ids.vcf",
        r"sample ID S1 appears 2 times in the #CHROM line; sample IDs must be unique: rename",
        prior=True,
    ),
    prepare("header only", "{bad}/header_only.vcf", r"holds no variant records \(header only\)"),
    prepare("text, not a VCF", "{bad}/not_a_vcf.vcf", rf"is not a VCF: its first line is not ##fileformat=VCF.*{FIX_FORMAT}"),
    prepare("empty file", "{bad}/empty.vcf.gz", r"is empty \(0 bytes\): expected a bgzipped VCF", prior=True),
    prepare(
        "truncated bgzip",
        "{gen}/truncated.vcf.gz",
        r"is truncated \(the bgzip end-of-file block is missing\).*fetch or write it again",
        prior=True,
    ),
    prepare("PNG named .vcf.gz", "{gen}/image.vcf.gz", rf"is not a VCF: it is a PNG image; {FIX_FORMAT}"),
    prepare(
        "HDF5 named .vcf.gz",
        "{gen}/panel.vcf.gz",
        rf"is not a VCF: it is an HDF5 file \(a prepared panel\? pass the VCF it was made from\); {FIX_FORMAT}",
        prior=True,
    ),
    prepare("VCF that does not exist", "{bad}/absent.vcf.gz", r"absent\.vcf\.gz does not exist"),
    # -- targets -> impute with a trained checkpoint
    impute(
        "REF/ALT fit no panel allele",
        "{gen}/targets.alleles.vcf",
        rf"share a position with the panel but none has the panel's alleles in any orientation.*{FIX_BUILD}",
    ),
    impute(
        "targets on another build", "{gen}/targets.build.vcf.gz", rf"none of its \d+ sites is at a panel position.*{FIX_BUILD}"
    ),
    # (Unphased targets are no bad input: impute phases them, tests/test_phase.py.)
    impute(
        "targets with a missing call",
        "{gen}/targets.missing.vcf",
        r"targets must have no missing calls .*phasing fills them.*impute --phase",
    ),
    # -- configs
    index(
        "an even convolution kernel",
        ConfigError,
        r"^config error: model: kernel \(4\) must be odd, so a site sees as many neighbours on each side",
        "--set",
        "model.kernel=4",
    ),
    index(
        "zero size",
        ConfigError,
        r"^config error: windows.window_size: Input should be greater than 0",
        "--set",
        "windows.window_size=0",
    ),
    index(
        "negative size",
        ConfigError,
        r"^config error: train.batch_size: Input should be greater than 0",
        "--set",
        "train.batch_size=-8",
    ),
    index(
        "unknown key (--set)",
        ConfigError,
        r"^config error: windows.windw_size: unknown key \(check the spelling against configs/default.yaml\)",
        "--set",
        "windows.windw_size=100",
    ),
    index(
        "unknown key (YAML)",
        ConfigError,
        r"^config error: windows.window_sise: unknown key",
        "--config",
        "{bad}/unknown_key.yaml",
    ),
    index(
        "invalid YAML",
        ConfigError,
        r"^config error: .*tab_indented.yaml is not valid YAML at line 2, column 1: .*fix it there",
        "--config",
        "{bad}/tab_indented.yaml",
    ),
    index(
        "config file that does not exist",
        ConfigError,
        r"^config error: config file .*absent.yaml does not exist",
        "--config",
        "{bad}/absent.yaml",
    ),
    index(
        "newline in a path",
        ConfigError,
        r"^config error: paths.cache_dir: .* contains a control character.*use a path without one",
        "--set",
        'paths.cache_dir="{out}/cache\\ntouch {out}/pwned"',
    ),
    # -- paths that cannot be written
    index(
        "workdir under a regular file",
        InputError,
        r"cannot create cache directory .*blocker/work/cache.*Not a directory",
        "--set",
        "paths.workdir={out}/blocker/work",
        prior=("blocker",),
    ),
    index(
        "workdir under /proc",
        InputError,
        r"cannot create cache directory /proc/rag_hpc_bad_input/cache",
        "--set",
        "paths.workdir=/proc/rag_hpc_bad_input",
    ),
    index(
        "panel that does not exist",
        InputError,
        r"prepared panel .*absent.h5 does not exist: run `python -m rag_hpc.prepare` first",
        "--set",
        "data.panel_h5={out}/absent.h5",
    ),
    Case(
        "panel --out under a regular file",
        "prepare",
        ("--vcf", "{sim}/panel.vcf.gz", "--out", "{out}/blocker/panel.h5", "--quiet"),
        r"blocker is a file, not a directory; check that path .*outputs need a writable directory",
        InputError,
        ("blocker",),
    ),
    Case(
        "train workdir under a regular file",
        "train",
        ("{sets}", "--set", "data.panel_h5={built}/panel.h5", "--set", "paths.workdir={out}/blocker/work"),
        r"blocker is a file, not a directory \(needed for .*blocker/work/runs/default\); check that path",
        InputError,
        ("blocker",),
    ),
    # -- launch flags (sinfo only)
    launch(
        "partition that does not exist",
        r"partition 'nosuch' does not exist; partitions here: gpu, urgent: pass one of them with --partition",
        "--partition",
        "nosuch",
    ),
    launch(
        "more GPUs per node than a node has",
        r"--gpus-per-node 8, but nodes of partition gpu have 2 GPU\(s\): ask for at most 2",
        "--gpus-per-node",
        "8",
    ),
]


# ------------------------------------------------------------------------------------------------ inputs


def _edit_records(src: Path, dst: Path, edit: Callable[[int, list[str]], list[str]]) -> Path:
    """A plain-text copy of a bgzipped VCF with ``edit(record_number, fields)`` applied to each record."""
    with gzip.open(src, "rt") as fh:
        lines = fh.read().splitlines()
    header = [line for line in lines if line.startswith("#")]
    records = [line.split("\t") for line in lines if not line.startswith("#")]
    dst.write_text("\n".join(header + ["\t".join(edit(i, fields)) for i, fields in enumerate(records)]) + "\n")
    return dst


def _alleles_of_no_orientation(fields: list[str]) -> list[str]:
    """REF/ALT that match the record's alleles neither as they are, swapped, nor on the other strand."""
    taken = {frozenset(fields[3] + fields[4]), frozenset((fields[3] + fields[4]).translate(COMPLEMENT))}
    pair = next(p for p in ALLELE_PAIRS if frozenset(p) not in taken)
    return [*fields[:3], pair[0], pair[1], *fields[5:]]


@pytest.fixture(scope="module")
def built(tiny_simulation: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What exists before the corpus runs: a prepared panel, a trained run with its cache and checkpoints,
    an imputed VCF, and the generated bad inputs."""
    root = tmp_path_factory.mktemp("bad_input")
    work = root / "built"
    ckpt = train_tiny(tiny_simulation, work)
    good = cli(
        "impute",
        "--checkpoint",
        str(ckpt),
        "--targets",
        str(tiny_simulation / "targets.array.vcf.gz"),
        "--out",
        str(work / "imputed.vcf.gz"),
        "--quiet",
        *as_flags(tiny_sets(tiny_simulation, work)),
    )
    assert good.returncode == 0, good.stderr[-3000:]
    shutil.copy(work / "panel.h5", work / "blocker")  # a plain file that paths must not pass through

    gen = root / "generated"
    gen.mkdir()
    data = (tiny_simulation / "panel.vcf.gz").read_bytes()
    (gen / "truncated.vcf.gz").write_bytes(data[: len(data) // 2])
    shutil.copy(Path(matplotlib.get_data_path()) / "images" / "home.png", gen / "image.vcf.gz")
    shutil.copy(work / "panel.h5", gen / "panel.vcf.gz")
    targets = tiny_simulation / "targets.array.vcf.gz"
    _edit_records(targets, gen / "targets.alleles.vcf", lambda _, f: _alleles_of_no_orientation(f))
    _edit_records(targets, gen / "targets.missing.vcf", lambda i, f: [*f[:10], ".|.", *f[11:]] if i == 3 else f)
    write_targets(targets, gen / "targets.build.vcf.gz", pos_shift=10_000_000)
    return {"built": work, "ckpt": ckpt, "gen": gen, "sim": tiny_simulation}


def _snapshot(directory: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (and '' for every directory) under ``directory``."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(directory.rglob("*"))
    }


def _argv(case: Case, places: dict[str, str], sets: list[str]) -> list[str]:
    argv: list[str] = []
    for arg in case.args:
        argv += sets if arg == "{sets}" else [arg.format(**places)]
    return argv


def _slurm_available() -> bool:
    """ensure_cluster, but a skip (no cluster, not CI) only leaves the launch cases out; under CI it fails."""
    try:
        ensure_cluster()
    except pytest.skip.Exception:
        return False
    return True


# ------------------------------------------------------------------------------------------------ the test


@pytest.mark.slow
def test_every_bad_input_fails_with_one_clear_line_leaves_no_output_and_loses_nothing(
    built: dict[str, Path], tmp_path: Path
) -> None:
    with_slurm = _slurm_available()
    cases = [c for c in CORPUS if with_slurm or not c.slurm]
    sets = as_flags(tiny_sets(built["sim"], built["built"]))
    before_built = _snapshot(built["built"])
    jobs_before = squeue_ids() if any(c.slurm for c in cases) else set()
    failures: list[str] = []
    survived = lost = 0
    for i, case in enumerate(cases):
        out = tmp_path / f"case{i:02d}"
        out.mkdir()
        for name in case.prior:
            shutil.copy(built["built"] / name, out / name)
        before_out = _snapshot(out)
        places = {
            "bad": str(BAD),
            "gen": str(built["gen"]),
            "built": str(built["built"]),
            "ckpt": str(built["ckpt"]),
            "sim": str(built["sim"]),
            "out": str(out),
        }
        proc = cli(case.module, *_argv(case, places, sets))
        lines = proc.stderr.strip().splitlines()
        problems = []
        if proc.returncode != case.kind.exit_code:
            problems.append(f"exit code {proc.returncode}, not {case.kind.exit_code} ({case.kind.__name__})")
        if len(lines) != 1 or "Traceback" in proc.stderr:
            problems.append(f"stderr is {len(lines)} lines, not one")
        elif not re.match(r"(config )?error: ", lines[0]) or not re.search(case.expect, lines[0]):
            problems.append(f"the line does not match {case.expect!r}")
        after_out, after_built = _snapshot(out), _snapshot(built["built"])
        if after_out != before_out:
            new = sorted(set(after_out) - set(before_out))
            changed = sorted(k for k in before_out if after_out.get(k) != before_out[k])
            problems.append(f"output dir changed: new {new}, changed or gone {changed}")
        if after_built != before_built:
            problems.append("files built before the corpus changed")
        if any(after_out.get(k) != before_out[k] for k in case.prior) or after_built != before_built:
            lost += 1
        if case.slurm and not squeue_ids() <= jobs_before:
            problems.append(f"new jobs in squeue: {sorted(squeue_ids() - jobs_before)}")
        if problems:
            stderr = proc.stderr.strip()[-1500:]
            failures.append(f"{case.name} (python -m rag_hpc.{case.module}): {'; '.join(problems)}\n    stderr: {stderr}")
        else:
            survived += 1
    left_out = len(CORPUS) - len(cases)
    note = "one clear line, no partial output, earlier outputs intact"
    reliability.record(
        f"bad input (corpus of {len(cases)} files/flags)",
        trials=len(cases),
        survived=survived,
        data_lost=lost,
        note=note + (f"; {left_out} launch cases left out: no SLURM" if left_out else ""),
    )
    assert not failures, "\n".join(failures)
    assert survived == len(cases) and lost == 0
