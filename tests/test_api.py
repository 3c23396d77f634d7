"""The Python API as a notebook meets it: the inputs it is given the way people give them, and a
GeodetError that says what to pass for those it cannot take (never a TypeError deep in torch)."""

import numpy as np
import pytest
import torch

import geodet
from geodet import GeodetError


def one_box(batch):
    return [{"boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0]]), "scores": torch.tensor([0.9]),
             "labels": torch.tensor([0])} for _ in batch]


def test_detection_takes_a_model_path_a_preset_name_and_one_scene_alone(tmp_path, synth, tiny_model):
    f = geodet.detect_scene(synth.image, str(tiny_model), config="cpu", progress=False, tile_size=128, overlap=16)
    assert f.attrs["report"]["tile_size"] == 128
    out = geodet.detect_to_file(str(synth.image), one_box, tmp_path / "d.gpkg", tile_size=128, overlap=16,
                                progress=False)  # one scene, not a list of its characters
    assert set(out["scene"]) == {synth.image.name}
    assert len(geodet.detect_scenes(synth.image, one_box, tile_size=128, overlap=16, progress=False)) == len(out)
    for bad, match in ((None, "the detector must be a geodet model"), (3, "the detector must be")):
        with pytest.raises(GeodetError, match=match):
            geodet.detect_scene(synth.image, bad, progress=False)
    with pytest.raises(GeodetError, match="config must be a geodet Config"):
        geodet.detect_scene(synth.image, one_box, config=[("tiling.tile_size", 64)], progress=False)
    # what a notebook may pass by mistake: one line that says what goes there
    import numpy as np

    for scene, said in ((np.zeros((3, 64, 64), np.float32), "a scene is a raster file's path .*not ndarray: write"),
                        (None, "not NoneType"), ([synth.image, synth.image], "use detect_scenes for several")):
        with pytest.raises(GeodetError, match=said):
            geodet.detect_scene(scene, one_box, progress=False)
    for area in ((10, 10), (0, 0, 64.5, 64), "0,0,64,64"):
        with pytest.raises(GeodetError, match="area must be four whole pixel numbers"):
            geodet.detect_scene(synth.image, one_box, progress=False, area=area)
    with pytest.raises(GeodetError, match=r"unknown detection setting\(s\): tile_sise \(did you mean tile_size\?\)"):
        geodet.detect_scene(synth.image, one_box, progress=False, tile_sise=64)
    model = geodet.load_model(tiny_model.parent)  # a training run's folder, as -m takes it
    assert model.source["path"] == str(tiny_model)
    for bad, said in ((None, "takes a model file's path .*not NoneType"), (3, "not int"),
                      (model, "already loaded: use it as it is"), (tmp_path, "is a folder without a model.pt")):
        with pytest.raises(GeodetError, match=said):
            geodet.load_model(bad)
    with pytest.raises(GeodetError, match="load_config takes a preset name or a YAML file's path"):
        geodet.load_config(3)


def test_a_config_set_by_assignment_is_honoured_as_one_loaded_from_yaml(synth, tiny_model):
    """cfg.tiling.tile_size = 64 (as the README's training example sets values) beats the model
    card, as the same value written in YAML does."""
    model = geodet.load_model(tiny_model)
    cfg = geodet.load_config()
    cfg.tiling.tile_size, cfg.tiling.overlap = 96, 8
    r = geodet.detect_scene(synth.image, model, config=cfg, progress=False).attrs["report"]
    assert (r["tile_size"], r["overlap"]) == (96, 8) and r["settings_from"]["tile_size"] == "config"
    r = geodet.detect_scene(synth.image, model, config=geodet.load_config(), progress=False).attrs["report"]
    assert r["tile_size"] == model.card.tile_size  # nothing set: the card's
    cfg = geodet.load_config()
    cfg.scene.bands = np.array([3, 2, 1])  # numpy, as a notebook may assign it
    r = geodet.detect_scene(synth.image, model, config=cfg, progress=False).attrs["report"]
    assert r["bands"] == [3, 2, 1]


@pytest.mark.parametrize("setting, match", [
    ({"min_valid_fraction": 2.0}, "min_valid_fraction must be a share from 0 to 1"),
    ({"gsd_m": float("nan")}, "gsd_m must be a finite number"),
    ({"gsd_m": -1.0}, "gsd_m must be a positive number"),
    ({"tile_size": 128.7}, "tile_size must be a whole number"),
    ({"num_workers": -1}, "num_workers must be zero or more"),
    ({"overlap_m": float("nan")}, "overlap_m must be a finite number"),
    ({"bands": "1,2,3"}, "bands must be a list of numbers"),
    ({"bands": [0]}, "bands are numbered from 1"),
])
def test_detection_settings_out_of_range_are_refused(synth, setting, match):
    with pytest.raises(GeodetError, match=match):
        geodet.detect_scene(synth.image, one_box, progress=False, **setting)


def test_one_band_number_is_a_list_of_one(synth):
    r = geodet.detect_scene(synth.image, one_box, progress=False, bands=1, tile_size=128, overlap=16)
    assert r.attrs["report"]["bands"] == [1]


def test_anchors_evaluate_and_writers_refuse_what_they_cannot_take(tmp_path, synth):
    import pandas as pd

    with pytest.raises(GeodetError, match=r"\(N, 2\) array .* \(boxes x0, y0, x1, y1\?"):
        geodet.fit_anchors(np.array([[10, 10, 40, 40], [100, 100, 130, 150]]), [2, 5])
    with pytest.raises(GeodetError, match="levels must be the first and last pyramid level"):
        geodet.fit_anchors(np.array([[10, 12], [20, 30]]), [2])
    assert geodet.fit_anchors(np.array([[10, 12], [20, 30], [14, 15]]), [2, 4]).coverage > 0
    for iou in (1.5, 0):
        with pytest.raises(GeodetError, match=r"iou must be a number in \(0, 1\]"):
            geodet.evaluate(synth.labels, synth.labels, iou=iou)
    with pytest.raises(GeodetError, match="detections must be a GeoDataFrame or a vector file's path"):
        geodet.evaluate(pd.DataFrame({"score": [0.5]}), synth.labels)
    f = geodet.detect_scene(synth.image, one_box, tile_size=128, overlap=16, progress=False)
    with pytest.raises(GeodetError, match="csv_geometry must be wkt or pixel"):
        geodet.write_detections(f, tmp_path / "d.csv", csv_geometry="bogus")
    with pytest.raises(GeodetError, match="takes detections as a GeoDataFrame"):
        geodet.write_detections(pd.DataFrame(f.drop(columns="geometry")), tmp_path / "d.gpkg")
    assert list(tmp_path.iterdir()) == []


def test_training_and_model_files_take_a_notebooks_inputs_or_say_what_to_pass(tmp_path, synth):
    from conftest import tiny_config

    cfg = tiny_config(synth.image, synth.labels, epochs=1, steps_per_epoch=2, val_fraction=0.0)
    cfg.train.scenes = [(str(synth.image), str(synth.labels))]  # a pair, as a notebook writes it
    model = geodet.load_model(geodet.train(cfg, tmp_path / "run", progress=False))
    assert model.card.trained_steps == 2
    (tmp_path / "afile").write_text("x")
    for config, out, match in ((cfg, tmp_path / "afile", "must be a folder, but .* is a file"),
                               (None, tmp_path / "r2", "config must be a geodet Config")):
        with pytest.raises(GeodetError, match=match):
            geodet.train(config, out, progress=False)
    cfg.train.scenes = [42]
    with pytest.raises(GeodetError, match=r"train.scenes entries are SceneLabels"):
        geodet.train(cfg, tmp_path / "r3", progress=False)
    with pytest.raises(GeodetError, match="is a folder: give the model file's name"):
        geodet.save_model(model, tmp_path)
    with pytest.raises(GeodetError, match="save_model takes a geodet model"):
        geodet.save_model(model.net, tmp_path / "m.pt")
    with pytest.raises(GeodetError, match=r"cannot write .*m\.pt"):
        geodet.save_model(model, tmp_path / "afile" / "m.pt")
    # starting from that model with a tile size assigned in Python: this run's, not the start model's card's
    cfg = tiny_config(synth.image, synth.labels, epochs=1, steps_per_epoch=1, val_fraction=0.0)
    cfg.train.init = str(tmp_path / "run" / "model.pt")
    cfg.tiling.tile_size = 96
    assert geodet.load_model(geodet.train(cfg, tmp_path / "again", progress=False)).card.tile_size == 96
    # the run fills in its start model's card on its own copy: the caller's Config is as it was written
    assert cfg.tiling.tile_size == 96 and cfg.train.init == str(tmp_path / "run" / "model.pt")
    assert cfg.model.classes == geodet.load_config().model.classes
    c = geodet.load_config()
    with pytest.raises(GeodetError, match=r"takes the model section of a config \(cfg.model\) \(pass its .model"):
        geodet.build_model(c)
    for kw, match in (({"normalisation": {"mean": [0, 0, 0]}}, "a dict with 'mean' and 'std'"),
                      ({"bands": [0]}, "bands are numbered from 1"), ({"tile_size": 0}, "tile_size must be positive"),
                      ({"percentiles": [99, 1]}, "percentiles must be two numbers")):
        with pytest.raises(GeodetError, match=match):
            geodet.build_model(c.model, load_pretrained=False, **kw)


def test_a_class_name_a_shapefile_cannot_hold_is_refused_before_detection(tmp_path, synth, monkeypatch):
    from geodet.pipeline import scenes

    c = geodet.load_config("cpu")
    c.model.classes = ["a" * 300]
    model = geodet.build_model(c.model, load_pretrained=False, tile_size=128, overlap=16)
    monkeypatch.setattr(scenes, "detect_scene", lambda *a, **k: pytest.fail("detection ran"))
    with pytest.raises(GeodetError, match="longer than a shapefile's text field"):
        geodet.detect_to_file([synth.image], model, tmp_path / "d.shp", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_pretrained_backbone_loaded_in_python_is_refused_as_a_detector(synth, tiny_model):
    """geodet.load_model reads a `geodet pretrain` backbone (train --init takes it), but its head
    never learned objects: detection refuses it, as the command line does, rather than 0 boxes."""
    import geodet
    from geodet.errors import GeodetError

    model = geodet.load_model(tiny_model)
    model.card.extra["pretrain_only"] = True  # as geodet pretrain writes its backbones
    with pytest.raises(GeodetError, match="is a pretrained backbone .* not a detector"):
        geodet.detect_scene(str(synth.image), model, progress=False)
