
import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from shapely.geometry import Point, Polygon, box

from geodet import GeodetError
from geodet.io.labels import labels_to_boxes, read_labels
from geodet.io.scene import Scene


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
