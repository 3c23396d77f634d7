"""Scenes from a STAC ItemCollection: the asset asked for, as GDAL paths, ids from the items."""

import json

import pytest

from geodet.errors import GeodetError
from geodet.io.stac import stac_scenes


def collection(tmp_path, items):
    p = tmp_path / "sub" / "items.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "stac_version": "1.0.0", "id": i, "geometry": None, "properties": {}, "assets": a}
        for i, a in items]}))
    return p


def test_items_become_gdal_paths_with_their_ids(tmp_path):
    tif = "image/tiff; application=geotiff; profile=cloud-optimized"
    p = collection(tmp_path, [
        ("a", {"visual": {"href": "https://host/a.tif", "type": tif}, "thumb": {"href": "a.png", "type": "image/png"}}),
        ("b", {"visual": {"href": "s3://bucket/b.tif", "type": tif}}),
        ("c", {"visual": {"href": "../c.tif"}}),
        ("d", {"visual": {"href": "gs://g/d.tif", "type": tif}, "nir": {"href": "az://x/d_nir.tif", "type": tif}}),
    ])
    got = stac_scenes(p, "visual")
    assert got == [("a", "/vsicurl/https://host/a.tif"), ("b", "/vsis3/bucket/b.tif"), ("c", str(tmp_path / "c.tif")),
                   ("d", "/vsigs/g/d.tif")]
    # without --asset: each item's one GeoTIFF; item d has two, so it must be named
    with pytest.raises(GeodetError, match=r"item d has 2 GeoTIFF assets \(visual, nir\): name one with --asset"):
        stac_scenes(p)
    with pytest.raises(GeodetError, match=r"item a has no asset 'nir' \(it has: visual, thumb\)"):
        stac_scenes(p, "nir")


def test_bad_stac_files_get_one_line(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(GeodetError, match="not JSON"):
        stac_scenes(bad)
    bad.write_text(json.dumps({"type": "Collection", "id": "c"}))
    with pytest.raises(GeodetError, match="not a STAC ItemCollection or Item"):
        stac_scenes(bad)
    with pytest.raises(GeodetError, match="cannot be read"):
        stac_scenes(tmp_path / "missing.json")
    one = tmp_path / "item.json"
    one.write_text(json.dumps({"type": "Feature", "id": "solo", "assets": {"image": {"href": "/data/s.tif"}}}))
    assert stac_scenes(one) == [("solo", "/data/s.tif")]


def test_the_cli_takes_stac_items(tmp_path, capsys):
    from geodet.cli import main

    p = collection(tmp_path, [("a", {"visual": {"href": "missing.tif"}})])
    assert main(["detect", "--stac", str(p), "--asset", "nope", "-m", "m.pt", "-o", str(tmp_path / "o.gpkg")]) == 2
    assert "has no asset 'nope'" in capsys.readouterr().err
    assert main(["detect", "a.tif", "--asset", "visual", "-m", "m.pt", "-o", str(tmp_path / "o.gpkg")]) == 2
    assert "--asset picks an asset of --stac items" in capsys.readouterr().err
