"""One config tree: YAML < environment < CLI overrides, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from rag_hpc.config import ConfigError, load_config, parse_overrides


def test_defaults_match_the_design():
    cfg = load_config()
    assert cfg.windows.window_size == 511 and cfg.masks.array_density == 0.025
    assert (cfg.donors.ne, cfg.donors.error, cfg.model.k) == (1e6, 0.01, 64)
    assert cfg.paths.cache == cfg.paths.workdir / "cache"


def test_cli_beats_environment_beats_yaml(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dims: 64\n  k: 2\nwindows:\n  window_size: 100\n")
    monkeypatch.setenv("RAG_HPC_MODEL__K", "4")
    monkeypatch.setenv("RAG_HPC_WINDOWS__WINDOW_SIZE", "200")
    cfg = load_config(path, ["windows.window_size=300"])
    assert cfg.model.dims == 64  # YAML
    assert cfg.model.k == 4  # env over YAML
    assert cfg.windows.window_size == 300  # CLI over env


def test_config_file_can_come_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  k: 3\n")
    monkeypatch.setenv("RAG_HPC_CONFIG", str(path))
    assert load_config().model.k == 3


def test_the_shipped_configs_load():
    from pathlib import Path

    configs = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))
    assert configs, "configs/ holds no YAML files"
    for path in configs:
        load_config(path)


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        (["windows.window_size=0"], "windows.window_size", "greater than 0"),
        (["model.dims=-8"], "model.dims", "greater than 0"),
        (["model.kernel=4"], "model", "kernel (4) must be odd"),
        (["donors.error=0.6"], "donors.error", "less than 0.5"),
        (["masks.array_density=0"], "masks.array_density", "greater than 0"),
        (["data.val_fraction=1.0"], "data.val_fraction", "less than 1"),
        (["windows.windw=5"], "windows.windw", "unknown key"),
        (["nosuchsection.x=1"], "nosuchsection", "unknown key"),
        (["index.windows_per_task=0"], "index.windows_per_task", "greater than 0"),
        # The per-window FAISS index is gone: an old config that still tunes it is told so by name.
        (["index.kind=flat"], "index.kind", "unknown key"),
        # A genome: one file per chromosome, named by {chrom}, and the list of chromosomes, or neither.
        (["data.panel_vcf=p/chr{chrom}.vcf.gz"], "data", "names {chrom} but data.chromosomes is not set"),
        (["data.chromosomes=1..3", "data.panel_vcf=p.vcf.gz"], "data", "panel_vcf must name {chrom}"),
        (["data.chromosomes=[1, 1]", "data.panel_vcf=p{chrom}.vcf.gz"], "data", "distinct names"),
        (["data.chromosomes=3..1"], "data.chromosomes", "FIRST <= LAST"),
    ],
)
def test_a_config_that_cannot_work_is_refused_naming_the_field(overrides, field, words):
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=overrides)
    assert f"config error: {field}: " in str(exc.value)
    assert words in str(exc.value)


def test_missing_or_malformed_config_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(listing)


def test_overrides_parse_yaml_scalars_and_reject_garbage():
    assert parse_overrides(["a.b=3", "a.c=[1, 2]", "d=x y"]) == {"a": {"b": 3, "c": [1, 2]}, "d": "x y"}
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_overrides(["novalue"])


def test_a_genome_config_names_one_file_per_chromosome_and_each_stage_gets_its_chromosomes_config():
    config = load_config(
        overrides=[
            "data.chromosomes=chr1..chr3",
            "data.panel_vcf=panels/{chrom}.vcf.gz",
            "data.targets_vcf=array/{chrom}.vcf.gz",
            "data.populations=pop.tsv",
            "paths.workdir=/w",
        ]
    )
    assert config.data.chromosomes == ["chr1", "chr2", "chr3"]
    genome = config.genome()
    assert [name for name, _ in genome] == ["chr1", "chr2", "chr3"]
    one = config.chromosome("chr2")
    assert one.data.chromosomes is None and one == genome[1][1]
    assert (one.data.panel_vcf, one.data.targets_vcf, one.panel_h5) == (
        Path("panels/chr2.vcf.gz"),
        Path("array/chr2.vcf.gz"),
        Path("/w/panel.chr2.h5"),
    )
    assert one.data.populations == Path("pop.tsv") and one.data.truth_vcf is None  # shared, and unset, stay so
    # YAML's numbers are chromosome names too; a single name is a list of one.
    assert load_config(overrides=["data.chromosomes=[20, 21]", "data.panel_vcf=p{chrom}"]).data.chromosomes == ["20", "21"]
    assert load_config(overrides=["data.chromosomes=X", "data.panel_vcf=p{chrom}"]).data.chromosomes == ["X"]
    with pytest.raises(ConfigError, match="name it with --chromosome"):
        config.chromosome(None)
    with pytest.raises(ConfigError, match="not 'chr9'"):
        config.chromosome("chr9")
    with pytest.raises(ConfigError, match=r"data\.chromosomes is not set"):
        load_config().chromosome("1")
    assert load_config().genome() == [(None, load_config())]
