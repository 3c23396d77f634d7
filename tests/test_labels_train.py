import csv
import os
import subprocess
import sys

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from conftest import tiny_config
from rasterio.transform import from_origin
from shapely.geometry import Point, Polygon, box

from geodet import GeodetError
from geodet.io.labels import labels_to_boxes, read_labels
from geodet.model import load_model
from geodet.io.scene import Scene
from geodet.training.sampler import augment


def _scene(path, w=200, h=100, t=from_origin(500000, 4600000, 0.5, 0.5), crs="EPSG:32633"):
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8", crs=crs, transform=t) as d:
        d.write(np.zeros((3, h, w), np.uint8))
    return Scene(path)


def test_labels_in_4326_land_on_the_right_pixels(tmp_path):
    sc = _scene(tmp_path / "s.tif")
    t = sc.transform
    px = (10, 20, 30, 26)  # pixel-edge box
    x0, y0 = t * (px[0], px[1])
    x1, y1 = t * (px[2], px[3])
    utm = gpd.GeoDataFrame({"label": ["car"]}, geometry=[box(x0, y1, x1, y0)], crs="EPSG:32633")
    lb = labels_to_boxes(utm.to_crs("EPSG:4326"), sc)
    assert np.allclose(lb.boxes[0], px, atol=0.02)  # reprojection round trip of a polygon's corners


def test_points_become_boxes_of_configured_size(tmp_path):
    sc = _scene(tmp_path / "s.tif")
    cx, cy = sc.transform * (50, 40)
    g = gpd.GeoDataFrame({"label": ["tree"]}, geometry=[Point(cx, cy)], crs="EPSG:32633")
    lb = labels_to_boxes(g, sc, point_box_m=3.0)
    assert np.allclose(lb.boxes[0], [47, 37, 53, 43])  # 3 m = 6 px at 0.5 m
    assert lb.counts["points"] == 1


def test_invalid_and_empty_geometries_counted(tmp_path):
    sc = _scene(tmp_path / "s.tif")
    t = sc.transform
    bow = Polygon([t * (10, 10), t * (20, 20), t * (20, 10), t * (10, 20)])  # self-intersecting
    ok = box(*(t * (50, 30)), *(t * (60, 20)))
    g = gpd.GeoDataFrame({"label": ["a", "a", "a", "a"]}, geometry=[bow, ok, Polygon(), None], crs="EPSG:32633")
    lb = labels_to_boxes(g, sc)
    assert lb.counts["repaired"] == 1 and lb.counts["empty"] == 2 and len(lb) == 2
    assert np.allclose(lb.boxes[0], [10, 10, 20, 20])


def test_labels_outside_scene_clear_error(tmp_path):
    sc = _scene(tmp_path / "s.tif")
    g = gpd.GeoDataFrame({"label": ["a"]}, geometry=[box(0, 0, 10, 10)], crs="EPSG:32633")
    with pytest.raises(GeodetError, match="no label falls inside.*labels extent.*scene extent"):
        labels_to_boxes(g, sc)


def test_missing_class_column_lists_columns(tmp_path):
    g = gpd.GeoDataFrame({"kind": ["a"]}, geometry=[box(0, 0, 1, 1)], crs="EPSG:32633")
    g.to_file(tmp_path / "l.gpkg")
    with pytest.raises(GeodetError, match="available columns: kind"):
        read_labels(tmp_path / "l.gpkg", "label")


def test_augmentations_keep_boxes_on_their_objects():
    rng = np.random.default_rng(0)
    img = np.zeros((3, 64, 48), np.float32)
    boxes = np.array([[5, 7, 15, 12], [30, 40, 44, 60]], float)
    for b in boxes.astype(int):
        img[:, b[1] : b[3], b[0] : b[2]] = 1.0
    for _ in range(20):
        out, ob = augment(img, boxes, rng)
        mask = out[0] > 0.8
        for b in ob.astype(int):
            assert b.min() >= 0
            region = mask[b[1] : b[3], b[0] : b[2]]
            assert region.all() and region.sum() == (b[2] - b[0]) * (b[3] - b[1])
        assert mask.sum() == sum((b[2] - b[0]) * (b[3] - b[1]) for b in ob)


def test_short_run_lowers_loss_and_writes_loadable_model(tiny_model):
    model = load_model(tiny_model)
    assert model.card.classes == ["car", "truck"]
    assert model.card.trained_on and "AP50" in model.card.metrics
    rows = list(csv.DictReader(open(tiny_model.parent / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert any(r["val_AP50"] for r in rows)


def test_resume_continues_from_same_step(tmp_path, synth):
    from geodet.training.trainer import train

    cfg = tiny_config(synth.image, synth.labels, epochs=1, val_fraction=0.0)
    train(cfg, tmp_path, progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["step"] == 6
    cfg2 = tiny_config(synth.image, synth.labels, epochs=2, val_fraction=0.0)
    train(cfg2, tmp_path, resume=True, progress=False)
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r["loss"]]
    assert steps == list(range(1, 13))  # 1..6, then 7..12 after resuming
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 12


def test_deterministic_on_cpu(tmp_path, synth):
    from geodet.training.trainer import train

    for d in ("a", "b"):
        train(tiny_config(synth.image, synth.labels, epochs=1, val_fraction=0.0), tmp_path / d, progress=False)
    la = [r["loss"] for r in csv.DictReader(open(tmp_path / "a" / "metrics.csv"))]
    lb = [r["loss"] for r in csv.DictReader(open(tmp_path / "b" / "metrics.csv"))]
    assert la == lb


def test_ddp_two_cpu_processes(tmp_path, synth):
    from geodet.config import save_config

    cfg = tiny_config(synth.image, synth.labels, epochs=1, steps_per_epoch=3, val_fraction=0.0)
    save_config(cfg, tmp_path / "c.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GEODET_NO_PROGRESS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "-m",
         "geodet.cli", "train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "model.pt").exists()
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 3


def test_area_view_reads_the_scene_exactly(synth):
    """Validation detects over an area of its scene in place: the view's transform and tiles are
    exactly the scene's pixels there, scaled as the whole scene is."""
    from rasterio.windows import Window
    from rasterio.windows import transform as window_transform

    from geodet.pipeline.grid import TileGrid

    sc = Scene(synth.image)
    view = sc.area(300, 17, 384, 384)
    assert (view.width, view.height) == (84, 367)
    assert view.transform == window_transform(Window(300, 17, 84, 367), sc.transform)
    grid = TileGrid(view.width, view.height, 64, 8)
    tile = grid.tile(len(grid) - 1)
    got, _ = view.read_tile(tile)
    with rasterio.open(synth.image) as src:
        x0, y0, x1, y1 = tile.valid
        want = src.read(window=Window(300 + x0, 17 + y0, x1 - x0, y1 - y0)) * np.float32(1 / 255)
    assert np.array_equal(got[:, : y1 - y0, : x1 - x0], want)
    view.close()
    assert sc.read_tile(tile)[0].shape == got.shape  # closing the view left the scene open


def test_chip_windows_stay_inside_their_area():
    from geodet.training.sampler import ChipWindows

    rng = np.random.default_rng(0)
    boxes = np.array([[10, 10, 20, 20], [250, 5, 260, 15], [500, 500, 510, 510]], float)
    w = ChipWindows([(0, 0, 300, 200)], [boxes], 128, negative_fraction=0.3)
    for _ in range(500):
        k, t = w.draw(rng)
        assert k == 0 and 0 <= t.col_off and t.col_off + 128 <= 300 and 0 <= t.row_off and t.row_off + 128 <= 200
    assert len(w.inside[0]) == 2  # the box outside the area is never a chip centre
