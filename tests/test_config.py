"""One config tree: YAML < environment < CLI overrides, and errors that name the field."""

from __future__ import annotations

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
