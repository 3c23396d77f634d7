import dataclasses

import pytest
import yaml

from geodet import GeodetError
from geodet.config import Config, config_dir, load_config


def test_defaults_yaml_equals_code_defaults():
    assert load_config(config_dir() / "default.yaml").to_dict() == Config().to_dict()


@pytest.mark.parametrize("name", ["default", "small_objects", "trees", "cpu", "stock"])
def test_shipped_configs_load_and_build(name):
    from geodet.model import anchor_generator

    cfg = load_config(name)
    anchor_generator(cfg.model)  # one anchor size per level


def test_yaml_then_cli_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("tiling: {tile_size: 256, overlap: 16}\nmodel: {classes: [a, b]}\n")
    cfg = load_config(f, {"tiling.overlap": 32, "train.lr": None})
    assert cfg.tiling.tile_size == 256 and cfg.tiling.overlap == 32
    assert cfg.model.classes == ["a", "b"]
    assert cfg.train.lr == Config().train.lr


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  levles: [2, 5]\n")
    with pytest.raises(GeodetError, match=r"bad\.yaml.*model\.levles"):
        load_config(f)


def test_wrong_type_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("tiling:\n  tile_size: big\n")
    with pytest.raises(GeodetError, match=r"bad\.yaml.*tiling\.tile_size.*int"):
        load_config(f)
    f.write_text("scene:\n  bands: [1, x]\n")
    with pytest.raises(GeodetError, match=r"scene\.bands\[1\]"):
        load_config(f)


def test_bool_is_not_an_int(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  epochs: true\n")
    with pytest.raises(GeodetError, match="train.epochs"):
        load_config(f)


def test_malformed_yaml_is_one_clear_error(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("tiling: [unclosed\n")
    with pytest.raises(GeodetError, match="not valid YAML"):
        load_config(f)


def test_missing_config_lists_builtin_names():
    with pytest.raises(GeodetError, match="trees"):
        load_config("no_such_config")


def test_every_section_is_typed():
    for f in dataclasses.fields(Config):
        assert dataclasses.is_dataclass(f.default_factory())
    assert yaml.safe_dump(Config().to_dict())
