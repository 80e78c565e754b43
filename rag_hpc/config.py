"""One typed config tree for every stage.

Precedence, highest first: CLI overrides (``--set section.key=value``), environment variables
``RAG_HPC_<SECTION>__<KEY>``, the YAML file (``--config`` or ``RAG_HPC_CONFIG``), built-in defaults.
Unknown keys are errors, and every error names the field it is about, because a typo in a cluster
config otherwise surfaces hours later inside a job.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

# Re-exported: ``from rag_hpc.config import ConfigError`` is where callers have always found it.
from rag_hpc.errors import ConfigError as ConfigError


def _no_control_characters(path: Path) -> Path:
    # A newline in a path would split the #SBATCH line of every job script it is written into.
    if any(ord(c) < 32 or ord(c) == 127 for c in str(path)):
        raise ValueError(f"{str(path)!r} contains a control character (newline, tab, ...); use a path without one")
    return path


# Every path field: they end up in job scripts and container command lines.
ConfigPath = Annotated[Path, AfterValidator(_no_control_characters)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(_Section):
    workdir: ConfigPath = Field(Path("rag_hpc_work"), description="root of everything a run writes")
    cache_dir: ConfigPath | None = Field(None, description="window shards and donor tables (default: workdir/cache)")

    @property
    def cache(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.workdir / "cache"


CHROM = "{chrom}"  # in a data path: the chromosome's name, one file per chromosome of data.chromosomes
_TEMPLATED = ("panel_vcf", "panel_h5", "populations", "targets_vcf", "truth_vcf", "genetic_map")


def _chromosome_list(value: Any) -> Any:
    """'1..22' or 'chr1..chr22' (a range), or 'X' -> a list of names; lists pass through."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]  # YAML reads [1, 2] as numbers
    if not isinstance(value, (str, int)):
        return value
    value = str(value)
    m = re.fullmatch(r"\s*([A-Za-z_]*)(\d+)\s*\.\.\s*([A-Za-z_]*)(\d+)\s*", value)
    if m is None:
        return [value]
    prefix, lo, prefix2, hi = m.groups()
    if prefix != prefix2 or int(lo) > int(hi):
        raise ValueError(f"{value!r}: a range is FIRST..LAST with one prefix and FIRST <= LAST, e.g. 1..22 or chr1..chr22")
    return [f"{prefix}{i}" for i in range(int(lo), int(hi) + 1)]


class DataConfig(_Section):
    panel_vcf: ConfigPath | None = Field(None, description="phased reference panel; None = the simulated demo panel")
    panel_h5: ConfigPath | None = Field(None, description="prepared panel (default: workdir/panel.h5)")
    populations: ConfigPath | None = Field(None, description="TSV 'sample<TAB>population' for per-population AF")
    targets_vcf: ConfigPath | None = Field(None, description="phased targets on array sites")
    truth_vcf: ConfigPath | None = Field(None, description="targets' true genotypes at all sites (evaluation)")
    genetic_map: ConfigPath | None = Field(
        None, description="PLINK map (chrom, id, cM, bp) for phasing unphased targets with Beagle; None: 1 cM/Mb"
    )
    chromosomes: Annotated[list[str] | None, BeforeValidator(_chromosome_list)] = Field(
        None,
        description="a genome in one launch: these chromosomes (a list, or a range such as 1..22 or chr1..chr22), each "
        "with its own files, named by {chrom} in panel_vcf / panel_h5 / targets_vcf / truth_vcf (e.g. "
        "panels/chr{chrom}.vcf.gz); one prebuild over all, one model, imputation and report per chromosome",
    )
    ambiguous: Literal["skip", "keep"] = Field(
        "skip",
        description="strand-ambiguous (A/T, C/G) target sites: skip them, or keep them read as on the panel's strand; "
        "training's array, the targets' donor tables and imputation all use the sites this leaves",
    )
    panel_overlap: Literal["refuse", "exclude"] = Field(
        "refuse",
        description="target samples that are panel samples (same ID, or genotypes agreeing at >= 99.5 % of the typed "
        "sites): refuse them, or exclude their haplotypes from the targets' donors (--exclude-panel-overlap)",
    )
    demo_preset: Literal["demo", "kgp-like", "demo-genome"] = Field(
        "demo", description="the simulated panel when none is given; demo-genome: two chromosomes (a genome launch)"
    )
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="share of panel samples held out for validation")
    split_seed: int = 0
    skip_non_snps: bool = Field(False, description="skip multi-allelic/indel records with a count instead of failing")

    @model_validator(mode="after")
    def _one_file_per_chromosome(self) -> DataConfig:
        templated = [f for f in _TEMPLATED if CHROM in str(getattr(self, f) or "")]
        if self.chromosomes is None:
            if templated:
                raise ValueError(f"{templated[0]} names {CHROM} but data.chromosomes is not set: list the chromosomes")
            return self
        names = self.chromosomes
        if not names or len(set(names)) != len(names) or not all(re.fullmatch(r"[A-Za-z0-9_.-]+", c) for c in names):
            raise ValueError(f"chromosomes {names}: distinct names of letters, digits, '_', '.' or '-', at least one")
        for f in ("panel_vcf", "targets_vcf", "truth_vcf"):
            if getattr(self, f) is not None and f not in templated:
                raise ValueError(f"data.chromosomes is set, so {f} must name {CHROM} (one file per chromosome)")
        if self.panel_vcf is None and "panel_h5" not in templated:
            raise ValueError(f"data.chromosomes is set: panel_vcf (or panel_h5) must name {CHROM}")
        return self


class WindowConfig(_Section):
    window_size: int = Field(511, gt=0, description="sites per window (the last window is shorter)")


class MaskConfig(_Section):
    seed: int = 0
    af_threshold: float = Field(
        0.05, ge=0.0, le=0.5, description="MAF below this is 'rare': the simulated array types only sites at or above it"
    )
    array_density: float = Field(
        0.025,
        gt=0.0,
        le=1.0,
        description="share of sites the simulated array types when no target VCF is configured (common sites only); "
        "training and validation queries see only the array's sites, the way imputation targets do",
    )


MAX_SWEEP_THREADS = 8  # default cap on concurrent HMM sweeps: the guard plans their memory with it


class DonorConfig(_Section):
    """Li–Stephens donor retrieval (``rag_hpc.index.donors``): what the model and the copy predictor read."""

    ne: float = Field(1_000_000.0, gt=0.0, description="effective population size scaling the HMM's jump rate (1 cM/Mb)")
    error: float = Field(0.01, gt=0.0, lt=0.5, description="copying error per typed site (Minimac4's default)")
    train_samples: int = Field(
        384, gt=0, description="train-split samples used as training queries (their donor tables are built once and cached)"
    )
    batch: int = Field(32, gt=0, description="query haplotypes per HMM sweep (memory: batch x reference x typed sites floats)")
    threads: int | None = Field(
        None,
        gt=0,
        description=f"HMM sweeps run at once (each holds its own messages); None: the CPUs this process may use, "
        f"at most {MAX_SWEEP_THREADS}",
    )

    def sweep_threads(self) -> int:
        return self.threads or min(MAX_SWEEP_THREADS, len(os.sched_getaffinity(0)))


class ModelConfig(_Section):
    dims: int = Field(8, gt=0, description="width of the per-site residual network")
    layers: int = Field(1, ge=0, description="residual convolution layers over neighbouring sites")
    kernel: int = Field(5, gt=0, description="sites each residual convolution sees (odd)")
    k: int = Field(
        64, gt=1, description="donors per query haplotype and gap between typed sites (the copy predictor reads it too)"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _odd_kernel(self) -> ModelConfig:
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel ({self.kernel}) must be odd, so a site sees as many neighbours on each side")
        return self


class IndexConfig(_Section):
    """The index-prebuild job array: window shards and the donor-table parts that go with them."""

    windows_per_task: int = Field(
        16, gt=0, description="windows built by one array task (and so the donor-table parts: one per task)"
    )


class ImputeConfig(_Section):
    windows_per_task: int = Field(64, gt=0, description="windows imputed by one task of the imputation array")
    partition: str | None = Field(None, description="partition of the imputation array and merge (default: the training's)")
    gpus: int = Field(0, ge=0, description="GPUs per imputation task (the model imputes on CPU at ~2x Beagle's time)")


class ClusterConfig(_Section):
    kind: Literal["slurm", "local", "debug"] | None = Field(None, description="None: slurm if sbatch exists")
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "24:00:00"
    nodes: int = Field(1, gt=0)
    gpus_per_node: int = Field(1, ge=0)
    array_parallelism: int = Field(32, gt=0)
    container: ConfigPath | None = None


class TrainConfig(_Section):
    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$", description="run name: the run directory is <workdir>/runs/<name>")
    run_dir: ConfigPath | None = Field(None, description="checkpoints, logs, metrics (default: <workdir>/runs/<name>)")
    seed: int = Field(0, description="model init, batch order and dropout; masks have their own masks.seed")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when visible, else CPU")
    batch_size: int = Field(32, gt=0, description="query haplotypes per micro-batch over ALL ranks (split evenly across them)")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    mix_windows: int = Field(4, gt=0, description="windows whose batches are interleaved (their shards stay loaded together)")
    epochs: int = Field(4, gt=0, description="length of the run and of the LR schedule")
    max_steps: int | None = Field(
        None, gt=0, description="stop (with a checkpoint) at this global step; the schedule still spans `epochs`"
    )
    lr: float = Field(3e-4, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cosine decays the LR to lr * min_lr_ratio")
    warmup_steps: int = Field(200, ge=0)
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW decay on matrices only (not biases, norms, embeddings)")
    betas: tuple[float, float] = (0.9, 0.95)
    clip_norm: float | None = Field(1.0, gt=0.0, description="max global grad norm; null = no clipping")
    bf16: bool | None = Field(None, description="bf16 autocast; null = on when training on CUDA")
    val_every: int = Field(1, gt=0, description="validate every this many epochs (and after the last)")
    val_batch_size: int = Field(64, gt=0, description="validation haplotypes per forward pass (per rank)")
    checkpoint_every_steps: int = Field(500, ge=0, description="0 = only at epoch ends, on signals and at the end")
    keep_checkpoints: int = Field(3, gt=0, description="newest checkpoints kept in <run_dir>/checkpoints")
    log_every: int = Field(50, gt=0, description="steps between log lines / TensorBoard scalars")
    progress: bool = Field(True, description="tqdm bar on rank 0")
    tensorboard: bool = Field(True, description="TensorBoard scalars in <run_dir>/tb when the package is installed")
    min_step_seconds: float = Field(
        0.0,
        ge=0.0,
        description="FOR TESTS AND BENCHMARKS ONLY: hold each optimizer step for at least this long (a sleep that changes "
        "no number), so a run outlives a time limit or a signal by construction, whatever the machine's speed",
    )

    def resolved_run_dir(self, workdir: Path) -> Path:
        return self.run_dir if self.run_dir is not None else workdir / "runs" / self.name


class RagConfig(BaseSettings):
    """The whole tree; ``load_config`` is the way to build one."""

    model_config = SettingsConfigDict(
        env_prefix="RAG_HPC_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    paths: PathsConfig = Field(default_factory=PathsConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    windows: WindowConfig = Field(default_factory=WindowConfig)
    masks: MaskConfig = Field(default_factory=MaskConfig)
    donors: DonorConfig = Field(default_factory=DonorConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    impute: ImputeConfig = Field(default_factory=ImputeConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    # Set by load_config for the duration of one construction; a class attribute because
    # pydantic-settings builds sources from the class, not the instance.
    _yaml_file: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=cls._yaml_file))
        return tuple(sources)

    @property
    def panel_h5(self) -> Path:
        return self.data.panel_h5 if self.data.panel_h5 is not None else self.paths.workdir / "panel.h5"

    def absolute(self) -> RagConfig:
        """A copy with every path absolute, as a checkpoint records them: imputing with it from another
        directory finds the run's panel, targets and cache."""
        out = self.model_copy(deep=True)
        for section in (out.paths, out.data, out.train, out.cluster):
            for name in _path_fields(section):
                setattr(section, name, getattr(section, name).absolute())
        return out

    def shaping_differences(self, saved: dict[str, Any], explicit_only: bool = False) -> list[str]:
        """'section.field=ours (the checkpoint's: theirs)' for each value that shaped the model (``SHAPING``)
        where this config and ``saved`` (a checkpoint's config) differ; ``explicit_only``: only values this
        config sets explicitly (file, environment or --set), not its defaults."""
        ours_all = self.model_dump(mode="json")
        out = []
        for section, fields in SHAPING.items():
            given = getattr(self, section)
            for name in fields or type(given).model_fields:
                ours = ours_all[section][name]
                theirs = saved.get(section, {}).get(name, ours)  # a field newer than the checkpoint: ours
                if ours != theirs and (name in given.model_fields_set or not explicit_only):
                    out.append(f"{section}.{name}={ours} (the checkpoint's: {theirs})")
        return out

    def for_checkpoint(self, saved: dict[str, Any]) -> RagConfig:
        """The config to impute with a model trained under ``saved`` (a checkpoint's config): what shaped the
        model (``SHAPING``) from the checkpoint; where the run's panel, targets and cache are from the
        checkpoint unless this config names them; everything else (how to run: cluster, threads, batch) from
        this config. A shaping value this config sets explicitly and the checkpoint contradicts is refused,
        naming both."""
        conflicts = self.shaping_differences(saved, explicit_only=True)
        if conflicts:
            raise ConfigError(
                "the config contradicts what the checkpoint was trained with: "
                + "; ".join(conflicts)
                + ". Drop those settings (imputation takes them from the checkpoint), or use a model trained with them"
            )
        merged = self.model_dump(mode="json")
        for section, fields in SHAPING.items():
            for name in fields or type(getattr(self, section)).model_fields:
                merged[section][name] = saved.get(section, {}).get(name, merged[section][name])
        for section in _LOCATION:
            explicit = getattr(self, section).model_fields_set
            merged[section] = {**saved.get(section, {}), **{k: v for k, v in merged[section].items() if k in explicit}}
        return RagConfig(**merged)

    def chromosome(self, name: str | None) -> RagConfig:
        """The config a per-chromosome stage (prepare, index, impute, evaluate) runs under: ``name``'s of
        data.chromosomes, or this one when there is no chromosome list."""
        if self.data.chromosomes is None:
            if name is not None:
                raise ConfigError(f"--chromosome {name}: data.chromosomes is not set, so the config is one chromosome's")
            return self
        genome = dict(self.genome())
        if name not in genome:
            raise ConfigError(
                f"data.chromosomes lists {', '.join(self.data.chromosomes)}: this stage runs on one of them; "
                f"name it with --chromosome{f' (not {name!r})' if name is not None else ''}"
            )
        return genome[name]

    def genome(self) -> list[tuple[str | None, RagConfig]]:
        """[(chromosome, its config)] of data.chromosomes, in order: each config names that chromosome's files
        (its panel prepared to <workdir>/panel.<chrom>.h5 by default) and no chromosome list, so every
        per-chromosome stage (prepare, prebuild, impute, evaluate) reads it as a one-chromosome run.
        Without data.chromosomes: [(None, self)]."""
        if self.data.chromosomes is None:
            return [(None, self)]
        out = []
        for chrom in self.data.chromosomes:
            files = {f: Path(str(v).replace(CHROM, chrom)) for f in _TEMPLATED if (v := getattr(self.data, f)) is not None}
            files.setdefault("panel_h5", self.paths.workdir / f"panel.{chrom}.h5")
            data = self.data.model_copy(update={**files, "chromosomes": None})
            out.append((chrom, self.model_copy(update={"data": data}, deep=True)))
        return out


# What shaped a trained model (section -> its fields; None: all of them). Imputing with a checkpoint takes
# these from the checkpoint: a config that sets one otherwise is refused (``RagConfig.for_checkpoint``).
SHAPING: dict[str, tuple[str, ...] | None] = {"windows": None, "model": None, "masks": None, "donors": ("ne", "error")}
# Where the run found its panel, targets and cache: the checkpoint's unless the config names them.
_LOCATION = ("paths", "data")


def _path_fields(section: BaseModel) -> list[str]:
    return [name for name, value in section if isinstance(value, Path)]


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["windows.window_size=255", "model.k=4"]`` -> nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. windows.window_size=255")
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is set both as a value and as a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return tree


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against configs/default.yaml)"
        lines.append(f"config error: {field}: {msg}")
    return "\n".join(lines)


def load_config(config_file: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> RagConfig:
    """Build the config from YAML, environment and CLI overrides; raise ConfigError naming the field."""
    if config_file is None and os.environ.get("RAG_HPC_CONFIG"):
        config_file = os.environ["RAG_HPC_CONFIG"]
    path = Path(config_file) if config_file is not None else None
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config error: config file {path} does not exist")
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            # PyYAML's own message spans several lines (it quotes the offending text); keep where and what.
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(
                f"config error: {path} is not valid YAML{where}: {what}; fix it there (configs/default.yaml shows the layout)"
            ) from None
        if content is not None and not isinstance(content, dict):
            raise ConfigError(f"config error: {path} must hold a mapping of sections, got {type(content).__name__}")
    RagConfig._yaml_file = path
    try:
        return RagConfig(**parse_overrides(overrides))
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
    finally:
        RagConfig._yaml_file = None
