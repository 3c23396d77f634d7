import json

import geopandas as gpd
import numpy as np
import pytest
from rasterio.transform import from_origin

from geodet.io.writers import write_detections
from geodet.pipeline.scenes import detect_scene


class OneBox:
    """Returns the pixel box (3, 5, 4, 6) in the first tile only."""

    def __call__(self, batch):
        import torch

        out = []
        for i in range(len(batch)):
            out.append({"boxes": torch.tensor([[3.0, 5.0, 4.0, 6.0]]), "scores": torch.tensor([0.9]),
                        "labels": torch.tensor([0])})
        return out


def _plain_scene(path, crs, transform, w=64, h=48):
    import rasterio

    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8", crs=crs,
                       transform=transform) as dst:
        dst.write(np.full((3, h, w), 100, np.uint8))
    return path


def test_pixel_box_maps_to_exact_pixel_footprint(tmp_path):
    t = from_origin(431234.5, 5123456.25, 0.3, 0.3)
    p = _plain_scene(tmp_path / "s.tif", "EPSG:32633", t)
    g = detect_scene(p, OneBox(), tile_size=128, overlap=16, num_workers=0, progress=False)
    assert len(g) == 1
    write_detections(g, tmp_path / "d.gpkg")
    back = gpd.read_file(tmp_path / "d.gpkg")
    assert back.crs.to_epsg() == 32633
    x0, y0 = t * (3, 5)
    x1, y1 = t * (4, 6)
    assert back.geometry[0].bounds == pytest.approx((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), abs=1e-9)
    assert back.geometry[0].area == pytest.approx(0.09, rel=1e-9)


def test_two_crss_of_one_epsg_code_get_a_layer_each(tmp_path):
    """'+proj=utm +zone=33 +ellps=WGS84' is not EPSG:32633 but names that code: its rows were appended
    to the other CRS's layer under that layer's declaration. Each CRS gets a layer of its own."""
    import pyogrio
    from rasterio.crs import CRS

    from geodet.io.writers import check_output_path

    t = from_origin(431234.5, 5123456.25, 0.3, 0.3)
    a = detect_scene(_plain_scene(tmp_path / "a.tif", "EPSG:32633", t), OneBox(), tile_size=128, overlap=16,
                     num_workers=0, progress=False)
    other = CRS.from_proj4("+proj=utm +zone=33 +ellps=WGS84 +units=m +no_defs")
    b = detect_scene(_plain_scene(tmp_path / "b.tif", other, t), OneBox(), tile_size=128, overlap=16,
                     num_workers=0, progress=False)
    assert a.crs != b.crs and b.crs.to_epsg() == 32633
    write_detections([a, b], tmp_path / "d.gpkg")
    layers = sorted(str(n) for n, g in pyogrio.list_layers(tmp_path / "d.gpkg") if g)
    assert layers == ["d_32633", "d_32633_2"]
    assert [len(gpd.read_file(tmp_path / "d.gpkg", layer=n)) for n in layers] == [1, 1]
    check_output_path(tmp_path / "d.gpkg", "gpkg")  # geodet's own layers: a rerun replaces the file


def test_geojson_is_lonlat_with_ccw_rings(tmp_path):
    from shapely.geometry import shape

    p = _plain_scene(tmp_path / "s.tif", "EPSG:32633", from_origin(500000, 4600000, 0.3, 0.3))
    g = detect_scene(p, OneBox(), tile_size=128, overlap=16, num_workers=0, progress=False)
    write_detections(g, tmp_path / "d.geojson")
    data = json.loads((tmp_path / "d.geojson").read_text())
    assert "crs" not in data  # RFC 7946: WGS84 lon/lat only
    geom = shape(data["features"][0]["geometry"])
    lon, lat = geom.exterior.coords[0]
    assert 14.9 < lon < 15.1 and 41 < lat < 42  # UTM 33N, x=500000 is 15 E
    assert geom.exterior.is_ccw
    assert data["features"][0]["properties"]["label"] == "0"


def test_scene_in_epsg4326(tmp_path):
    t = from_origin(10.0, 50.0, 1e-5, 1e-5)
    p = _plain_scene(tmp_path / "s.tif", "EPSG:4326", t)
    g = detect_scene(p, OneBox(), tile_size=128, overlap=16, num_workers=0, progress=False)
    write_detections(g, tmp_path / "d.geojson")
    geom = gpd.read_file(tmp_path / "d.geojson").geometry[0]
    assert geom.bounds == pytest.approx((10.0 + 3e-5, 50.0 - 6e-5, 10.0 + 4e-5, 50.0 - 5e-5), abs=1e-12)


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import pyogrio

    from geodet import GeodetError

    frame = gpd.GeoDataFrame({"score": [0.5]}, geometry=gpd.points_from_xy([500000.0], [4600000.0]).buffer(1),
                             crs="EPSG:32633")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    for name, fail in (("d.gpkg", full), ("d.geojson", pyogrio.errors.FeatureError("Failed to write: No space left"))):
        def raising(*args, _fail=fail, **kwargs):
            if callable(_fail):
                _fail()
            raise _fail

        monkeypatch.setattr(pyogrio, "write_dataframe", raising)
        with pytest.raises(GeodetError, match=f"cannot write .*{name}: .*No space left.*free some space"):
            write_detections(frame, tmp_path / name)
        assert list(tmp_path.iterdir()) == []


def test_brief_cuts_at_a_word():
    from geodet.errors import brief

    assert brief(ValueError("short\nsecond line")) == "short"
    assert brief(ValueError("")) == "ValueError"
    text = brief(ValueError("word " * 60), 40)
    assert text.endswith("word...") and len(text) <= 43


def test_a_failed_write_removes_the_folders_it_made(tmp_path):
    from geodet.io.writers import atomic_path

    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "a" / "b" / "f.json") as tmp:
            tmp.write_text("{}")
            raise ValueError("the check failed")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()  # the user's (empty) folder, named through one that does not exist
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "new" / ".." / "mine" / "f.json") as tmp:
            raise ValueError("the check failed")
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    (tmp_path / "mine").rmdir()
    with atomic_path(tmp_path / "a" / "f.json") as tmp:
        tmp.write_text("{}")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["f.json"]
