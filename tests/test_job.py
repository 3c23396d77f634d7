"""A detection job over scenes in several UTM zones: every output keeps each scene where it is."""

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
