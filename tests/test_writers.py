import warnings
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
    with warnings.catch_warnings(record=True) as said:  # a name without .gpkg (--format gpkg): no GDAL advice
        warnings.simplefilter("always")  # on the temporary file
        write_detections([a, b], tmp_path / "all", "gpkg")
    assert [str(w.message) for w in said] == []
    assert sorted(str(n) for n, g in pyogrio.list_layers(tmp_path / "all") if g) == ["all_32633", "all_32633_2"]


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
    # GDAL's own words (SQLite's "database or disk is full"; FlatGeobuf's "Unexpected I/O failure" where
    # the disk has nothing left) are the same one line; the same words on a disk with room are not
    import os
    from collections import namedtuple

    real = os.statvfs
    for fail, free, said in ((pyogrio.errors.FeatureError("failed to execute insert : database or disk is full"),
                              10 << 30, True),
                             (pyogrio.errors.FeatureError("Unexpected I/O failure: writing feature"), 4096, True),
                             (pyogrio.errors.FeatureError("Unexpected I/O failure: writing feature"), 10 << 30, False)):
        st = namedtuple("st", "f_bavail f_frsize")(free // 4096, 4096)
        monkeypatch.setattr(os, "statvfs", lambda p, _st=st: _st)
        monkeypatch.setattr(pyogrio, "write_dataframe", lambda *a, _f=fail, **k: (_ for _ in ()).throw(_f))
        with pytest.raises(GeodetError if said else pyogrio.errors.FeatureError, match="free some space" if said else
                           "Unexpected"):
            write_detections(frame, tmp_path / "d.fgb")
        monkeypatch.setattr(os, "statvfs", real)
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


def _frame(crs, x0, y0, label="car", n=1, size=2.0):
    from shapely.geometry import box

    text = lambda v: np.full(n, v, dtype=object)  # noqa: E731 (as detection makes them, empty too)
    return gpd.GeoDataFrame({"scene": text("s.tif"), "label": text(label), "score": np.full(n, 0.9)},
                            geometry=[box(x0, y0, x0 + size, y0 + size)] * n, crs=crs)


def test_what_other_tools_read_is_what_was_written(tmp_path, caplog):
    """GIS readers meet each file as it was meant: a CSV rewritten for several CRSs keeps no old
    .prj (GDAL would read every row in it); a FlatGeobuf named x.dat is one file, and a shapefile
    not named .shp is refused; an empty GeoParquet types its text columns; a shapefile's crs column
    holds a CRS that parses (a WKT is 254 bytes too long for it); a box across the antimeridian is
    split there, not 360 degrees wide; GeoJSON keeps 9 decimals; a style shared by two files of one
    stem is said."""
    import pandas as pd
    import pyarrow.parquet as pq
    import pyogrio
    from pyproj import CRS

    from geodet.errors import GeodetError

    lcc = CRS.from_proj4("+proj=lcc +lat_1=33 +lat_2=45 +lat_0=40 +lon_0=-100 +ellps=GRS80 +units=m +no_defs")
    write_detections(_frame("EPSG:32617", 400000, 4000000), tmp_path / "c.csv")
    assert (tmp_path / "c.prj").exists()
    write_detections([_frame("EPSG:32611", 400000, 4000000), _frame(lcc, 0, 0)], tmp_path / "c.csv")
    assert not (tmp_path / "c.prj").exists() and pyogrio.read_info(tmp_path / "c.csv")["crs"] is None
    _frame("EPSG:32617", 400000, 4000000).to_file(tmp_path / "roads.shp")  # the user's shapefile of that stem
    write_detections([_frame("EPSG:32611", 400000, 4000000), _frame(lcc, 0, 0)], tmp_path / "roads.csv")
    assert (tmp_path / "roads.prj").exists()  # its .prj is not the CSV's to remove
    write_detections(_frame("EPSG:32617", 400000, 4000000), tmp_path / "x.dat", fmt="fgb")
    assert (tmp_path / "x.dat").is_file() and pyogrio.read_info(tmp_path / "x.dat")["features"] == 1
    write_detections(_frame("EPSG:32617", 400000, 4000000), tmp_path / "x.dat", fmt="fgb")  # and again
    with pytest.raises(GeodetError, match=r"a shapefile's name ends in \.shp"):
        write_detections(_frame("EPSG:32617", 400000, 4000000), tmp_path / "y.dat", fmt="shp")
    write_detections(_frame("EPSG:32617", 400000, 4000000, n=0), tmp_path / "e.parquet")
    schema = pq.read_schema(tmp_path / "e.parquet")
    assert str(schema.field("label").type) in ("string", "large_string") and str(schema.field("scene").type) != "null"
    write_detections([_frame("EPSG:32611", 400000, 4000000), _frame(lcc, 0, 0)], tmp_path / "m.shp")
    crs = list(gpd.read_file(tmp_path / "m.shp")["crs"])
    assert crs[0] == "EPSG:32611" and CRS.from_user_input(crs[1]).equals(lcc)
    with pytest.raises(GeodetError, match="longer than a shapefile's text field"):
        write_detections(_frame("EPSG:32617", 400000, 4000000, label="x" * 300), tmp_path / "l.shp")
    # the 180th meridian runs through this box (zone 60's central meridian is 177 E)
    from pyproj import Transformer

    x, y = Transformer.from_crs(4326, 32660, always_xy=True).transform(180.0, 0.001)
    for ext in ("fgb", "parquet", "geojson"):
        write_detections([_frame("EPSG:32660", x - 1, y - 1), _frame("EPSG:32611", 400000, 4000000)],
                         tmp_path / f"a.{ext}")
        g = gpd.read_parquet(tmp_path / "a.parquet") if ext == "parquet" else gpd.read_file(tmp_path / f"a.{ext}")
        crossing = g.geometry[g["crs"] == "EPSG:32660"].iloc[0]
        assert crossing.geom_type == "MultiPolygon" and all(p.bounds[2] - p.bounds[0] < 1e-3 for p in crossing.geoms)
    write_detections(_frame("EPSG:32617", 400000.123, 4000000), tmp_path / "p.geojson")
    text = (tmp_path / "p.geojson").read_text()
    coords = json.loads(text)["features"][0]["geometry"]["coordinates"][0]
    assert max(len(str(c[0]).split(".")[1]) for c in coords) >= 8
    write_detections(_frame("EPSG:32617", 400000, 4000000, label="tree"), tmp_path / "p.fgb")
    assert "p.qml now styles p.geojson too" in caplog.text
    assert isinstance(pd.read_csv(tmp_path / "c.csv"), pd.DataFrame)


def test_names_that_cannot_be_written_beside_are_refused_before_any_work(tmp_path):
    """A legal name whose report (OUT.report.json) would pass the file system's limit, and a
    GeoPackage whose layer (named after the file) GDAL refuses: one line first, not a traceback
    once the detections are made."""
    from geodet.errors import GeodetError
    from geodet.io.writers import check_output_path

    with pytest.raises(GeodetError, match=r"the name is too long \(245 bytes\) for the files written beside it"):
        check_output_path(tmp_path / ("b" * 240 + ".gpkg"), "gpkg")
    with pytest.raises(GeodetError, match="GDAL refuses a GeoPackage layer name that begins with '-'"):
        check_output_path(tmp_path / "-out.gpkg", "gpkg")
    check_output_path(tmp_path / ("b" * 230 + ".gpkg"), "gpkg")
    check_output_path(tmp_path / "-out.fgb", "fgb")


def test_a_killed_runs_temporary_folders_are_swept_by_a_later_run(tmp_path):
    """SIGKILL leaves the temporary folder of a write (.STEM.xxxxxxxx) or a tile run (.geodet-tile-*,
    gigabytes of chips): a later run into the same place removes those untouched for six hours, and
    never a live run's (touched lately) or a folder of another name."""
    import os
    import time

    from geodet.pipeline.chips import write_chips
    from helpers import write_raster

    old = time.time() - 7 * 3600
    stale = [tmp_path / ".d.geodet-k3j2h1g0", tmp_path / ".geodet-tile-abcdefgh"]
    live, other = tmp_path / ".d.geodet-zzzzzzzz", tmp_path / ".d.backup01"  # the last the user's own
    for d in [*stale, live, other]:
        (d / "chips").mkdir(parents=True)
        (d / "chips" / "x.tif").write_bytes(b"x")
    for d in [*stale, other]:
        for p in (d / "chips" / "x.tif", d / "chips", d):
            os.utime(p, (old, old))
    write_detections(_frame("EPSG:32617", 400000, 4000000), tmp_path / "d.gpkg")
    assert not stale[0].exists() and live.exists() and other.exists() and stale[1].exists()
    scene = write_raster(tmp_path / "s.tif", np.zeros((3, 64, 64), np.uint8) + 9)
    write_chips(scene, tmp_path, tile_size=64, overlap=0, progress=False)
    assert not stale[1].exists() and live.exists() and other.exists()
