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


def test_a_key_given_twice_or_a_folder_is_one_clear_error(tmp_path):
    """PyYAML keeps the last of two equal keys without a word (a pasted ``lr:`` would win): refused
    with both lines; a folder given as the config is named as one, not "not found"."""
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.01\n  epochs: 3\n  lr: 0.5\n")
    with pytest.raises(GeodetError, match=r"c\.yaml: 'lr' is given twice \(lines 2 and 4\): keep one"):
        load_config(p)
    p.write_text("train:\n  lr: 0.01\nmodel:\n  lr: 0.5\n")  # one key in two sections is no repeat
    with pytest.raises(GeodetError, match="model.lr"):  # (an unknown key there, said as such)
        load_config(p)
    with pytest.raises(GeodetError, match="is a folder: give a YAML file in it"):
        load_config(tmp_path)
    p.write_text("train: {lr: 0.01, lr: 0.5}\n")  # on one line too
    with pytest.raises(GeodetError, match="'lr' is given twice"):
        load_config(p)
    # YAML's anchors and merge keys share values between scenes: a merged key given again is no repeat
    p.write_text("train:\n  scenes:\n    - &s {scene: a.tif, labels: a.gpkg}\n    - <<: *s\n      scene: b.tif\n")
    assert [(x.scene, x.labels) for x in load_config(p).train.scenes] == [("a.tif", "a.gpkg"), ("b.tif", "a.gpkg")]


def test_a_folder_named_as_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    (tmp_path / "trees").mkdir()  # a data folder named after the preset
    monkeypatch.chdir(tmp_path)
    assert load_config("trees").tiling.tile_size == load_config(config_dir() / "trees.yaml").tiling.tile_size


def test_a_configs_relative_paths_name_files_beside_it(tmp_path, monkeypatch):
    """A project folder's config names its scenes relative to itself: the run is the same from any
    working folder; a path found only from the working folder works as before; one naming two
    different files is refused."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    for name in ("a.tif", "a.gpkg", "u.tif"):
        (project / "data" / name).write_bytes(b"x")
    cfg_file = project / "run.yaml"
    cfg_file.write_text("train:\n  scenes:\n    - {scene: data/a.tif, labels: data/a.gpkg}\n  unlabelled: [data/u.tif]\n"
                        "  val_scenes:\n    - {scene: elsewhere.tif, labels: /abs/l.gpkg}\n")
    monkeypatch.chdir(tmp_path)
    t = load_config(cfg_file).train
    assert t.scenes[0].scene == str(project / "data" / "a.tif") and t.scenes[0].labels == str(project / "data" / "a.gpkg")
    assert t.unlabelled == [str(project / "data" / "u.tif")] and t.scenes[0].labelled_area is None
    assert t.val_scenes[0].scene == "elsewhere.tif" and t.val_scenes[0].labels == "/abs/l.gpkg"  # as given
    monkeypatch.chdir(project)  # from the project folder: the same files
    assert load_config("run.yaml").train.scenes[0].scene == "data/a.tif"  # one file from both: as written
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.tif").write_bytes(b"y")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GeodetError, match=r"data/a\.tif names .* from the working folder and .* beside the config"):
        load_config(cfg_file)
