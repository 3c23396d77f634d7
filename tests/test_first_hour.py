"""What a new user meets in the first hour (issue: 'A GIS analyst's first hour, second pass'), each
through the real entry point: the ``geodet`` command in this process (``cli.main``), or the API
it calls."""

import json
import sqlite3

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from geodet.cli import main
from geodet.errors import GeodetError
from geodet.pipeline.job import detect_to_file


def boxes_at(*boxes, score=0.9):
    def det(batch):
        b = torch.tensor(boxes, dtype=torch.float32)
        return [{"boxes": b, "scores": torch.full((len(boxes),), score), "labels": torch.zeros(len(boxes), dtype=torch.long)}
                for _ in batch]

    return det


@pytest.fixture()
def scene(tmp_path):
    p = tmp_path / "s.tif"
    with rasterio.open(p, "w", driver="GTiff", width=200, height=100, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(431234.5, 5123456.25, 0.5, 0.5)) as dst:
        dst.write(np.full((3, 100, 200), 90, np.uint8))
    return p


def _labels(tmp_path, scene, boxes, name="l.gpkg", label="car"):
    import geopandas as gpd
    from shapely.geometry import box

    with rasterio.open(scene) as src:
        t, crs = src.transform, src.crs
    polys = [box(*(t * (x0, y1)), *(t * (x1, y0))) for x0, y0, x1, y1 in boxes]
    gpd.GeoDataFrame({"label": [label] * len(polys)}, geometry=polys, crs=crs).to_file(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("ext", ["gpkg", "geojson", "fgb", "shp", "csv", "parquet"])
def test_evaluate_and_merge_read_every_format_detect_writes(tmp_path, scene, ext):
    from geodet.evaluation import evaluate
    from geodet.pipeline.ray_engine import merge_outputs

    det = boxes_at([10.0, 20.0, 30.0, 40.0], [60.0, 20.0, 80.0, 40.0])
    labels = _labels(tmp_path, scene, [(10, 20, 30, 40), (60, 20, 80, 40)])
    out = tmp_path / f"d.{ext}"
    detect_to_file([scene], det, out, tile_size=256, overlap=16, progress=False)
    m = evaluate(out, labels, scene=scene)
    assert m["n_detections"] == 2 and m["AP50"] == 1.0
    # merge: a ray output folder of finished scenes, written to this format
    folder = tmp_path / "ray"
    for name in ("a", "b"):
        d = folder / f"scene={name}"
        d.mkdir(parents=True)
        frame = detect_to_file([scene], det, tmp_path / f"{name}.parquet", tile_size=256, overlap=16, progress=False)
        frame.assign(scene=f"{name}.tif").to_parquet(d / "detections.parquet")
        (d / "_SUCCESS.json").write_text("{}")
    merged = tmp_path / f"merged.{ext}"
    merge_outputs(folder, merged)
    from geodet.io.detections import read_detections

    back = read_detections(merged)
    assert len(back) == 4 and sorted(set(back["scene"])) == ["a.tif", "b.tif"]
    if ext == "gpkg":  # older markers of two scenes of one file name (STAC items' visual.tif): told apart
        for name in ("a", "b"):
            f = read_detections(folder / f"scene={name}" / "detections.parquet")
            f.assign(scene="visual.tif").to_parquet(folder / f"scene={name}" / "detections.parquet")
        merge_outputs(folder, tmp_path / "m2.gpkg")
        back = read_detections(tmp_path / "m2.gpkg")
        assert sorted(set(back["scene"])) == ["scene=a", "scene=b"]


def test_merge_refuses_scenes_detected_with_other_settings(tmp_path, scene, capsys):
    """Two runs into one folder with other thresholds: merged as one file they would mix two
    operating points silently; refused in one line naming the setting, before any output."""
    folder = tmp_path / "ray"
    frame = detect_to_file([scene], boxes_at([10.0, 20.0, 30.0, 40.0]), tmp_path / "d.parquet", tile_size=256,
                           overlap=16, progress=False)
    settings = {"tile_size": 256, "overlap": 16, "score_threshold": 0.5, "bands": [1, 2, 3]}
    for name, threshold in (("a", 0.5), ("b", 0.5), ("c", 0.2)):
        d = folder / f"scene={name}"
        d.mkdir(parents=True)
        frame.assign(scene=f"{name}.tif").to_parquet(d / "detections.parquet")
        marker = {"model_sha256": "m", "settings": {**settings, "score_threshold": threshold}}
        (d / "_SUCCESS.json").write_text(json.dumps(marker))
    assert main(["merge", str(folder), "-o", str(tmp_path / "all.gpkg")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "different score_threshold (0.5 in scene=a, scene=b; 0.2 in scene=c)" in err, err
    assert not (tmp_path / "all.gpkg").exists()
    # the same settings, or a marker of an older run without them: merged
    (folder / "scene=c" / "_SUCCESS.json").write_text(json.dumps({"model_sha256": "m"}))
    assert main(["merge", str(folder), "-o", str(tmp_path / "all.gpkg")]) == 0
    assert len(gpd.read_file(tmp_path / "all.gpkg", layer="all")) == 3


def test_evaluate_refuses_a_multi_scene_file_without_scene(tmp_path, scene, capsys):
    import geopandas as gpd

    labels = _labels(tmp_path, scene, [(10, 20, 30, 40)])
    f = detect_to_file([scene], boxes_at([10.0, 20.0, 30.0, 40.0]), tmp_path / "d.gpkg", tile_size=256, overlap=16,
                       progress=False)
    two = gpd.GeoDataFrame(pd_concat([f, f.assign(scene="other.tif")]), crs=f.crs)
    two.to_file(tmp_path / "two.gpkg")
    assert main(["evaluate", str(tmp_path / "two.gpkg"), str(labels)]) == 2
    err = capsys.readouterr().err
    assert "come from 2 scenes" in err and "--scene" in err


def pd_concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def test_one_class_detections_are_scored_class_agnostically(tmp_path, scene):
    from geodet.evaluation import evaluate

    labels = _labels(tmp_path, scene, [(10, 20, 30, 40)], label="Tree")
    out = tmp_path / "d.gpkg"
    detect_to_file([scene], boxes_at([10.0, 20.0, 30.0, 40.0]), out, tile_size=256, overlap=16, progress=False)
    m = evaluate(out, labels, scene=scene)  # detections say "0", labels "Tree"
    assert m["AP50"] == 1.0 and "class-agnostically" in m["note"]


def test_truncated_geotiff_train_and_tile_one_line_and_nothing_written(tmp_path, capsys):
    from geodet.synthetic import make_scene

    s = make_scene(tmp_path / "s.tif", tmp_path / "s.gpkg", size=512, seed=5)
    data = s.image.read_bytes()
    bad = tmp_path / "bad.tif"
    bad.write_bytes(data[: len(data) * 2 // 3])
    for argv, out in ((["train", str(bad), "--config", "cpu", "--labels", str(s.labels), "--max-steps", "2",
                        "--tile-size", "128"], tmp_path / "runs" / "r"),
                      (["tile", str(bad), "--tile-size", "128", "--overlap", "0"], tmp_path / "chips")):
        rc = main([*argv, "-o", str(out), "-q"])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert err.startswith("geodet: error:") and len(err.strip().splitlines()) == 1
        assert "bad.tif: cannot read rows" in err and "--on-read-error" not in err
        assert not out.exists() and not (tmp_path / "runs").exists()


def test_no_label_inside_the_scene_names_its_extent_as_x_then_y(tmp_path, scene):
    import geopandas as gpd
    from shapely.geometry import box

    from geodet.io.labels import labels_to_boxes
    from geodet.io.scene import Scene

    far = gpd.GeoDataFrame({"label": ["car"]}, geometry=[box(0, 0, 5, 5)], crs="EPSG:32633")
    with pytest.raises(GeodetError) as e:
        labels_to_boxes(far, Scene(scene))
    # west, south, east, north of the scene: x 431234.5..431334.5, y 5123406.25..5123456.25
    assert "scene extent (431234.50, 5123406.25, 431334.50, 5123456.25)" in str(e.value)


def test_a_check_with_nothing_to_compare_is_inconclusive():
    from geodet.pipeline.backends import agreement, conclusive, describe_agreement

    empty = {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    a = agreement([empty, empty], [empty, empty], 0.3)
    assert a["f1"] is None and not conclusive(a) and "inconclusive" in describe_agreement(a)
    assert not conclusive({"f1": 1.0, "reference": 0, "candidate": 0})  # as cards before this fix stored it


def test_int8_export_with_no_detection_to_check_writes_nothing(tmp_path, tiny_model, synth):
    from geodet.pipeline.export import export_model

    # a score threshold no box reaches: neither fp32 nor int8 finds anything on the check tiles
    from geodet.model import load_model, save_model

    m = load_model(tiny_model)
    m.card.operating_point = 0.999999
    m.card.model.score_threshold = 0.999999
    save_model(m, tmp_path / "m.pt")
    with pytest.raises(GeodetError, match="inconclusive"):
        export_model(tmp_path / "m.pt", tmp_path / "m.onnx", int8=True, calibrate=[synth.image], calib_tiles=4)
    assert not (tmp_path / "m.onnx").exists()


def test_detect_warns_when_tiles_hit_the_cap(tmp_path, scene, caplog):
    with caplog.at_level("WARNING"):
        detect_to_file([scene], boxes_at(*[[float(i), 0.0, i + 5.0, 5.0] for i in range(3)]), tmp_path / "d.gpkg",
                       tile_size=256, overlap=16, detections_per_tile=3, progress=False)
    assert "returned the maximum of 3 detections" in caplog.text and "--detections-per-tile" in caplog.text


def test_boxes_centred_on_nodata_are_dropped_and_counted(tmp_path, caplog):
    p = tmp_path / "warped.tif"
    data = np.full((3, 100, 200), 90, np.uint8)
    data[:, :, 100:] = 0  # the right half is nodata (a warped scene's corner)
    with rasterio.open(p, "w", driver="GTiff", width=200, height=100, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(0, 100, 1, 1), nodata=0) as dst:
        dst.write(data)
    frame = detect_to_file([p], boxes_at([10.0, 10.0, 20.0, 20.0], [150.0, 10.0, 160.0, 20.0], [95.0, 50.0, 104.0, 60.0]),
                           tmp_path / "d.gpkg", tile_size=256, overlap=16, progress=False)
    assert sorted(frame["px_x0"]) == [10.0, 95.0]  # centres at x 15 and 99.5 are on data; 155 is not
    assert frame.attrs["report"]["scenes"][0]["detections_on_nodata_dropped"] == 1
    # boxes on nodata that fill the tile's cap took the places of objects beside them: said, though the tile
    # kept none (it was silent); a scene of a few pixels has no room for an object, whatever its padding gave
    with caplog.at_level("WARNING"):
        detect_to_file([p], boxes_at(*[[150.0 + i, 10.0, 160.0 + i, 20.0] for i in range(3)]), tmp_path / "c.gpkg",
                       tile_size=256, overlap=16, detections_per_tile=3, progress=False)
    assert "1 of 1 tiles returned the maximum of 3 detections" in caplog.text
    caplog.clear()
    tiny = tmp_path / "tiny.tif"
    with rasterio.open(tiny, "w", driver="GTiff", width=3, height=2, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(0, 100, 1, 1)) as dst:
        dst.write(np.full((3, 2, 3), 90, np.uint8))
    with caplog.at_level("WARNING"):
        detect_to_file([tiny], boxes_at(*[[150.0 + i, 10.0, 160.0 + i, 20.0] for i in range(3)]), tmp_path / "t.gpkg",
                       tile_size=256, overlap=16, detections_per_tile=3, progress=False)
    assert "maximum" not in caplog.text


def test_output_errors_are_one_line(tmp_path, scene, tiny_model, capsys):
    for out, msg in ((tmp_path / "x.shp", "--format gpkg but the file name x.shp says shp"),
                     ("/proc/x.gpkg", "cannot write in /proc")):
        rc = main(["detect", str(scene), "-m", str(tiny_model), "-o", str(out), "--format", "gpkg", "-q"]
                  if str(out).endswith(".shp") else ["detect", str(scene), "-m", str(tiny_model), "-o", str(out), "-q"])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1
    # a missing output folder is made, as train makes its run folder
    assert main(["detect", str(scene), "-m", str(tiny_model), "-o", str(tmp_path / "new" / "d.gpkg"), "-q"]) == 0
    assert (tmp_path / "new" / "d.gpkg").exists()


def test_shapefile_and_csv_never_share_sidecars(tmp_path, scene):
    det = boxes_at([10.0, 20.0, 30.0, 40.0])
    detect_to_file([scene], det, tmp_path / "out.shp", tile_size=256, overlap=16, progress=False)
    prj = (tmp_path / "out.prj").read_text()
    with pytest.raises(GeodetError, match="would share out.prj and out.qml"):
        detect_to_file([scene], det, tmp_path / "out.csv", tile_size=256, overlap=16, progress=False)
    assert (tmp_path / "out.prj").read_text() == prj and not (tmp_path / "out.csv").exists()


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["detect", "--batch-size", "zero"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "see 'geodet detect --help'" in err


def test_a_closed_pipe_ends_quietly(tmp_path, scene):
    import subprocess
    import sys

    labels = _labels(tmp_path, scene, [(10, 20, 30, 40)])
    detect_to_file([scene], boxes_at([10.0, 20.0, 30.0, 40.0]), tmp_path / "d.gpkg", tile_size=256, overlap=16,
                   progress=False)
    r = subprocess.run(f"{sys.executable} -m geodet.cli evaluate {tmp_path / 'd.gpkg'} {labels} | head -1",
                       shell=True, capture_output=True, text=True)
    assert r.stdout.strip().startswith("AP") or r.stdout.split()[0] == "AP"
    assert "Error" not in r.stderr and "error" not in r.stderr


def test_the_sample_data_and_the_offline_hf_message(tmp_path, monkeypatch):
    from geodet.data import write_sample
    from geodet.io.labels import read_labels
    from geodet.io.scene import Scene

    paths = write_sample("trees", tmp_path / "sample")
    for scene, p in paths.items():
        assert Scene(p["scene"]).crs is not None and len(read_labels(p["labels"], "label")) > 30
    assert "CC0" in (tmp_path / "sample" / "README.txt").read_text()
    # written again over labels the user fixed: theirs kept (said), the untouched files as they were
    edited = paths["osbs_029"]["labels"]
    edited.write_text(edited.read_text().replace('"Tree"', '"tree"'))
    mine = edited.read_bytes()
    write_sample("trees", tmp_path / "sample")
    assert edited.read_bytes() == mine
    with pytest.raises(GeodetError, match="no folder given for the sample"):
        write_sample("trees", "")
    from geodet.model.imports import _hf_folder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(GeodetError, match="'hf download weecology/none'"):
        _hf_folder("weecology/none")
