"""What a GIS user opens: every output read back with GDAL (pyogrio), sqlite3 or pyarrow, never
with geodet's own reader."""

import json
import sqlite3
import xml.etree.ElementTree as ET

import numpy as np
import pyogrio
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from geodet.pipeline.job import detect_to_file

SCORE = 0.123456789


def two_classes(batch):
    """Two boxes per tile, classes 0 and 1, with a score of many digits."""
    b = torch.tensor([[10.0, 20.0, 30.0, 40.0], [50.0, 20.0, 70.0, 40.0]])
    return [{"boxes": b, "scores": torch.tensor([SCORE, 0.9]), "labels": torch.tensor([0, 1])} for _ in batch]


two_classes.card = None


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    d = tmp_path_factory.mktemp("gis")
    p = d / "field_07.tif"
    with rasterio.open(p, "w", driver="GTiff", width=200, height=100, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(431234.5, 5123456.25, 0.3, 0.3)) as dst:
        dst.write(np.full((3, 100, 200), 90, np.uint8))
    return p


def run(scene, out, **kw):
    return detect_to_file([scene], two_classes, out, tile_size=256, overlap=16, progress=False, **kw)


def test_geopackage_is_version_1_2_with_a_default_style(tmp_path, scene):
    out = tmp_path / "d.gpkg"
    run(scene, out)
    con = sqlite3.connect(out)
    user_version = con.execute("PRAGMA user_version").fetchone()[0]
    rows = con.execute("SELECT f_table_name, useAsDefault, styleQML FROM layer_styles").fetchall()
    registered = con.execute("SELECT data_type FROM gpkg_contents WHERE table_name = 'layer_styles'").fetchone()
    con.close()
    assert user_version == 10200  # GeoPackage 1.2: no "partially supported" warning in GDAL 3.6 / QGIS 3.22
    assert registered == ("attributes",)
    ((layer, default, qml),) = rows
    assert layer == "d" and default == 1
    root = ET.fromstring(qml.split("\n", 1)[1])
    renderer = root.find("renderer-v2")
    assert renderer.get("type") == "categorizedSymbol" and renderer.get("attr") == "label"
    assert sorted(c.get("value") for c in renderer.iter("category")) == ["0", "1"]
    styles = {p.get("v") for p in root.iter("prop") if p.get("k") == "style"}
    assert styles == {"no"}  # outlines only: the objects stay visible
    assert "score" in qml


def test_columns_types_and_names(tmp_path, scene):
    run(scene, tmp_path / "d.gpkg")
    info = pyogrio.read_info(tmp_path / "d.gpkg", layer="d")
    fields = dict(zip(info["fields"], info["dtypes"]))
    assert {"px_x0", "px_y0", "px_x1", "px_y1"} <= set(fields) and "x0" not in fields
    assert fields["tile_row"] == fields["tile_col"] == "int32"
    df = pyogrio.read_dataframe(tmp_path / "d.gpkg", layer="d")
    assert set(df["scene"]) == {"field_07.tif"}  # a name per feature; the paths are in the report
    from geodet.pipeline.chips import write_chips

    write_chips(scene, tmp_path / "chips", 128, 16, progress=False)
    chips_info = pyogrio.read_info(tmp_path / "chips" / "chips.gpkg", layer="chips")
    chips = dict(zip(chips_info["fields"], chips_info["dtypes"]))
    assert chips["row"] == chips["col"] == fields["tile_row"]


def test_geojson_scores_rounded_and_style_sidecar(tmp_path, scene):
    run(scene, tmp_path / "d.geojson")
    text = (tmp_path / "d.geojson").read_text()
    scores = [f["properties"]["score"] for f in json.loads(text)["features"]]
    assert sorted(set(scores)) == [0.1235, 0.9] and "0.123456789" not in text
    for ext in ("fgb", "shp"):
        run(scene, tmp_path / f"d_{ext}.{ext}")
        assert (tmp_path / f"d_{ext}.qml").read_text().count("<category ") == 2
    assert (tmp_path / "d.qml").exists()


def test_csv_has_crs_types_and_full_precision(tmp_path, scene):
    run(scene, tmp_path / "d.csv")
    run(scene, tmp_path / "d.gpkg")
    assert (tmp_path / "d.prj").exists() and (tmp_path / "d.csvt").exists()
    info = pyogrio.read_info(tmp_path / "d.csv")
    assert info["crs"] == "EPSG:32633"  # from the .prj: never mistaken for lon/lat
    fields = dict(zip(info["fields"], info["dtypes"]))
    assert fields["score"] == "float64" and fields["tile_row"] in ("int32", "int64") and fields["label"] == "object"
    a = pyogrio.read_dataframe(tmp_path / "d.csv").sort_values("px_x0").geometry.to_numpy()
    b = pyogrio.read_dataframe(tmp_path / "d.gpkg", layer="d").sort_values("px_x0").geometry.to_numpy()
    assert all(x.equals_exact(y, 1e-9) for x, y in zip(a, b))  # full precision: no 6-decimal rounding


def test_geoparquet_and_report_crs(tmp_path, scene):
    import pyarrow.parquet as pq

    frame = run(scene, tmp_path / "d.parquet")
    meta = json.loads(pq.read_schema(tmp_path / "d.parquet").metadata[b"geo"])
    col = meta["columns"][meta["primary_column"]]
    assert "32633" in json.dumps(col["crs"]) and pq.read_table(tmp_path / "d.parquet").num_rows == 2
    report = json.loads((tmp_path / "d.parquet.report.json").read_text())
    assert report["output_crs"] == "EPSG:32633" and report == json.loads(json.dumps(frame.attrs["report"], default=str))
    assert report["inputs"][0]["path"] == str(scene)


@pytest.mark.parametrize("ext,crs", [("gpkg", "EPSG:32633"), ("fgb", "EPSG:32633"), ("shp", "EPSG:32633"),
                                     ("geojson", "EPSG:4326"), ("csv", "EPSG:32633")])
def test_every_format_states_its_crs_to_gdal(tmp_path, scene, ext, crs):
    out = tmp_path / f"d.{ext}"
    frame = run(scene, out)
    info = pyogrio.read_info(out, layer="d" if ext == "gpkg" else None)
    assert info["crs"] == crs and info["features"] == 2
    assert frame.attrs["report"]["output_crs"] == crs
