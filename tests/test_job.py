"""A detection job over scenes in several UTM zones: every output keeps each scene where it is."""

import os

import numpy as np
import pyogrio
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from geodet.errors import GeodetError
from geodet.evaluation import evaluate
from geodet.pipeline.job import detect_to_file


def one_box(batch):
    """The pixel box (10, 20, 30, 40) in every tile."""
    return [{"boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0]]), "scores": torch.tensor([0.9]),
             "labels": torch.tensor([0])} for _ in batch]


@pytest.fixture()
def two_zones(tmp_path):
    paths = []
    for name, epsg in (("west", 32611), ("east", 32617)):  # six zones apart
        p = tmp_path / f"{name}.tif"
        with rasterio.open(p, "w", driver="GTiff", width=100, height=80, count=3, dtype="uint8", crs=f"EPSG:{epsg}",
                           transform=from_origin(400000, 4000000, 0.5, 0.5)) as dst:
            dst.write(np.full((3, 80, 100), 90, np.uint8))
        paths.append(p)
    return paths


def test_geopackage_gets_one_layer_per_crs_each_in_place(tmp_path, two_zones):
    out = tmp_path / "d.gpkg"
    frame = detect_to_file(two_zones, one_box, out, tile_size=128, overlap=16, progress=False)
    layers = sorted(name for name, geom in pyogrio.list_layers(out) if geom)
    assert layers == ["d_32611", "d_32617"]
    for layer, epsg in (("d_32611", 32611), ("d_32617", 32617)):
        info = pyogrio.read_info(out, layer=layer)
        assert info["crs"] == f"EPSG:{epsg}" and info["features"] == 1
        b = pyogrio.read_dataframe(out, layer=layer).total_bounds
        assert b == pytest.approx([400005, 4000000 - 20, 400015, 4000000 - 10])  # exactly its scene's pixels
    assert frame.crs.to_epsg() == 4326 and set(frame["crs"]) == {"EPSG:32611", "EPSG:32617"}
    assert frame.attrs["report"]["output_crs"] == {"layers": ["EPSG:32611", "EPSG:32617"]}


def test_geojson_holds_both_in_lonlat_and_csv_names_each_crs(tmp_path, two_zones):
    detect_to_file(two_zones, one_box, tmp_path / "d.geojson", tile_size=128, overlap=16, progress=False)
    g = pyogrio.read_dataframe(tmp_path / "d.geojson")
    lons = sorted(g.geometry.centroid.x)
    assert -119 < lons[0] < -116 and -83 < lons[1] < -80  # zone 11 and zone 17 central meridians
    detect_to_file(two_zones, one_box, tmp_path / "d.csv", tile_size=128, overlap=16, progress=False)
    import pandas as pd

    df = pd.read_csv(tmp_path / "d.csv")
    assert sorted(df["crs"]) == ["EPSG:32611", "EPSG:32617"] and df["wkt"].str.contains("400005").all()


def test_csv_of_a_scene_without_crs_beside_a_mapped_one_says_so_per_row(tmp_path, two_zones):
    """CSV holds a scene without a CRS (pixel boxes) beside a mapped one: the report says the CRS is
    per row, the pixel rows have an empty crs; the returned frame (EPSG:4326) gives them no geometry
    rather than pixel numbers read as degrees, and geopandas has nothing to warn about."""
    import warnings

    import pandas as pd

    bare = tmp_path / "bare.tif"
    with rasterio.open(bare, "w", driver="GTiff", width=100, height=80, count=3, dtype="uint8") as dst:
        dst.write(np.full((3, 80, 100), 90, np.uint8))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module="geopandas")
        frame = detect_to_file([bare, two_zones[0]], one_box, tmp_path / "d.csv", tile_size=128, overlap=16,
                               progress=False)
    assert frame.attrs["report"]["output_crs"] == "per row (crs column)"
    df = pd.read_csv(tmp_path / "d.csv")
    from shapely import wkt
    from shapely.geometry import box

    assert df["crs"].isna().tolist() == [True, False] and wkt.loads(df["wkt"][0]).equals(box(10, 20, 30, 40))
    assert frame.crs.to_epsg() == 4326 and frame.geometry.isna().tolist() == [True, False]
    assert -119 < frame.geometry[1].centroid.x < -116  # zone 11


def test_single_crs_formats_hold_both_in_lonlat_with_a_crs_column(tmp_path, two_zones):
    import geopandas as gpd

    for ext in ("fgb", "shp", "parquet"):
        out = tmp_path / f"d.{ext}"
        frame = detect_to_file(two_zones, one_box, out, tile_size=128, overlap=16, progress=False)
        g = gpd.read_parquet(out) if ext == "parquet" else gpd.read_file(out)
        assert g.crs.to_epsg() == 4326 and sorted(g["crs"]) == ["EPSG:32611", "EPSG:32617"]
        lons = sorted(g.geometry.centroid.x)
        assert -119 < lons[0] < -116 and -83 < lons[1] < -80
        assert frame.attrs["report"]["output_crs"].startswith("EPSG:4326")
        assert (tmp_path / f"d.qml").exists()


def test_evaluate_with_scene_counts_only_that_scenes_detections(tmp_path, two_zones):
    out = tmp_path / "d.gpkg"
    detect_to_file(two_zones, one_box, out, tile_size=128, overlap=16, progress=False)
    import geopandas as gpd
    from shapely.geometry import box

    labels = gpd.GeoDataFrame({"label": ["0"]}, geometry=[box(400005, 3999980, 400015, 3999990)], crs="EPSG:32617")
    m = evaluate(out, labels, scene=two_zones[1])
    assert m["n_detections"] == 1 and m["AP50"] == 1.0
    with pytest.raises(GeodetError, match="none of the detections come from"):
        evaluate(out, labels, scene=tmp_path / "other.tif")


def test_outputs_never_replace_a_scene_or_one_another(tmp_path, two_zones):
    """Refused before any work: an output named as a scene (-o scene.tif --format gpkg), a
    quicklook named as the output, a scene given twice (its detections would be written twice).
    Scenes of one name in different folders get a quicklook each; the report lists them."""
    west, east = two_zones
    for out, kw, match in [(west, {"fmt": "gpkg"}, "is a scene of this job"),
                           (tmp_path / "x.png", {"fmt": "gpkg", "quicklook": tmp_path / "x.png"},
                            "as a quicklook and as the output")]:
        with pytest.raises(GeodetError, match=match):
            detect_to_file([west], one_box, out, tile_size=128, overlap=16, progress=False, **kw)
    with pytest.raises(GeodetError, match="given twice"):
        detect_to_file([west, tmp_path / "." / west.name], one_box, tmp_path / "d.gpkg", tile_size=128, overlap=16,
                       progress=False)
    (tmp_path / "run").mkdir()
    model_file = tmp_path / "run" / "model.pt"
    model_file.write_bytes(b"a model")
    for model in (model_file, tmp_path / "run"):  # the model, given as its file or its run folder
        with pytest.raises(GeodetError, match="model.pt is the model of this job: writing the output there"):
            detect_to_file([west], model, model_file, fmt="csv", progress=False)
    assert model_file.read_bytes() == b"a model"
    assert west.read_bytes()[:2] in (b"II", b"MM")  # still the GeoTIFF
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    same = [tmp_path / "a" / "x.tif", tmp_path / "b" / "x.tif"]
    for src, dst in zip(two_zones, same):
        dst.write_bytes(src.read_bytes())
    frame = detect_to_file(same, one_box, tmp_path / "d.gpkg", tile_size=128, overlap=16, progress=False,
                           quicklook=tmp_path / "q.png")
    looks = frame.attrs["report"]["quicklooks"]
    assert looks == [str(tmp_path / "q_x_1.png"), str(tmp_path / "q_x_2.png")] and all(map(os.path.exists, looks))


def test_quicklook_names_of_a_job_never_collide():
    """A scene named s_1 beside two scenes named s, or S.tif beside s.tif (one name on macOS and
    Windows): every scene still gets a quicklook of its own."""
    from geodet.pipeline.job import _quicklook_paths

    for scenes in (["a/s.tif", "s_1.tif", "b/s.tif"], ["s_1.tif", "a/s.tif", "b/s.tif"], ["a/S.tif", "b/s.tif"],
                   ["a/s.tif", "b/s.tif", "s_1.tif", "s_1_2.tif", "c/s_1.tif"]):
        names = [p.name.casefold() for p in _quicklook_paths("out/q.png", scenes)]
        assert len(set(names)) == len(scenes), (scenes, names)
    assert [p.name for p in _quicklook_paths("q.png", ["a.tif", "b.tif"])] == ["q_a.png", "q_b.png"]


def test_the_report_lands_with_its_output(tmp_path, two_zones, monkeypatch):
    """The report is renamed into place with the output (an interrupt there is acted on once both
    are in place), so a new output never sits beside the previous run's report; an uppercase .SHP
    is written under the name given."""
    import json
    import signal

    from geodet.io import writers

    real = os.replace
    calls = []

    def replace_then_interrupt(a, b):
        real(a, b)
        calls.append(b)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl+C between the two renames

    out = tmp_path / "d.gpkg"
    # Ctrl+C raises KeyboardInterrupt here (a background job of a non-interactive shell ignores it)
    old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            detect_to_file(two_zones[:1], one_box, out, tile_size=128, overlap=16, progress=False)
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGINT, old_handler)
    assert len(calls) == 2 and out.exists()
    assert json.loads((tmp_path / "d.gpkg.report.json").read_text())["output"] == str(out)
    assert writers.WRITTEN[-1] == out
    shp = tmp_path / "U" / "D.SHP"
    detect_to_file(two_zones[:1], one_box, shp, tile_size=128, overlap=16, progress=False)
    assert pyogrio.read_info(shp)["features"] == 1 and (tmp_path / "U" / "D.SHP.report.json").exists()


def test_a_scene_that_is_no_raster_fails_alone_in_a_job_of_several(tmp_path, two_zones):
    """As a scene that cannot be read: the others are written, the report names it (exit 3 on the
    command line); alone, it fails the job with one line."""
    text = tmp_path / "notes.tif"
    text.write_text("not a raster\n")
    frame = detect_to_file([two_zones[0], text], one_box, tmp_path / "d.gpkg", tile_size=128, overlap=16,
                           progress=False)
    report = frame.attrs["report"]
    assert report["partial"] and [f["scene"] for f in report["failed_scenes"]] == [str(text)]
    assert "not a raster" in report["failed_scenes"][0]["error"] and len(report["scenes"]) == 1
    with pytest.raises(GeodetError, match="not a raster"):
        detect_to_file([text], one_box, tmp_path / "e.gpkg", tile_size=128, overlap=16, progress=False)


def test_a_quicklook_that_fails_never_costs_the_detections(tmp_path, two_zones, monkeypatch, caplog):
    from geodet.io import quicklook

    def broken(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(quicklook, "quicklook", broken)
    out = tmp_path / "d.gpkg"
    frame = detect_to_file(two_zones[:1], one_box, out, tile_size=128, overlap=16, progress=False,
                           quicklook=tmp_path / "q.png")
    assert out.exists() and frame.attrs["report"]["quicklooks"] == [] and len(frame) == 1
    assert "quicklook" in caplog.text and "not drawn" in caplog.text


def test_a_scene_placed_by_ground_control_points_only_is_told_to_warp(tmp_path):
    from rasterio.control import GroundControlPoint
    from rasterio.crs import CRS

    gcps = [GroundControlPoint(r, c, 500000 + c * 0.3, 4600000 - r * 0.3) for r in (0, 100) for c in (0, 100)]
    p = tmp_path / "gcp.tif"
    with rasterio.open(p, "w", driver="GTiff", width=100, height=100, count=3, dtype="uint8", gcps=gcps,
                       crs=CRS.from_epsg(32633)) as dst:
        dst.write(np.zeros((3, 100, 100), np.uint8))
    with pytest.raises(GeodetError, match=r"ground control points only: warp it to a grid first \(gdalwarp -t_srs EPSG:32633"):
        detect_to_file([p], one_box, tmp_path / "d.gpkg", tile_size=128, overlap=16, progress=False)
