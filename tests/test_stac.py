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
    with pytest.raises(GeodetError, match=r"item d has 2 GeoTIFF assets \(visual, nir\): name the one to read with --asset"):
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


def test_stac_items_as_editors_and_catalogues_write_them(tmp_path):
    """Hrefs are URI references (percent-escaped, file://localhost), a thumbnail TIFF is never the
    scene, a BOM is read, and malformed items or a remote --stac get one line."""
    folder = tmp_path / "sub dir"
    folder.mkdir()
    (folder / "scène a.tif").write_bytes(b"")
    p = collection(tmp_path, [
        ("rel", {"image": {"href": "../sub%20dir/sc%C3%A8ne%20a.tif"}}),
        ("abs", {"image": {"href": f"file://localhost{folder}/sc%C3%A8ne%20a.tif"}}),
        ("three", {"image": {"href": f"file://{folder}/scène a.tif"}}),
    ])
    assert {path for _, path in stac_scenes(p)} == {str(folder / "scène a.tif")}
    # the data is a JPEG 2000 and the only TIFF a thumbnail: asked for, not read silently
    thumb = collection(tmp_path, [("t", {"image": {"href": "x.jp2", "type": "image/jp2", "roles": ["data"]},
                                         "thumbnail": {"href": "t.tif", "type": "image/tiff", "roles": ["thumbnail"]}})])
    with pytest.raises(GeodetError, match=r"0 GeoTIFF assets \(none; thumbnail only a preview\): name the one"):
        stac_scenes(thumb)
    both = collection(tmp_path, [("v", {"visual": {"href": "v.tif", "type": "image/tiff"},
                                        "overview": {"href": "o.tif", "type": "image/tiff", "roles": ["overview"]}})])
    assert stac_scenes(both)[0][1].endswith("v.tif")
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"type": "Feature", "id": "s", "assets": {"i": {"href": "/d/s.tif"}}})
                    .encode())
    assert stac_scenes(bom) == [("s", "/d/s.tif")]
    for doc, says in [({"type": "Feature", "id": "s", "assets": [{"href": "a.tif"}]}, "'assets' must be an object"),
                      ({"type": "Feature", "id": "s", "assets": {"i": "a.tif"}}, "'assets' must be an object"),
                      ({"type": "FeatureCollection", "features": ["a"]}, "'features' must be a list of STAC Items"),
                      ({"type": "Feature", "id": "s", "assets": {"i": {"href": 5}}}, "has no href")]:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(doc))
        with pytest.raises(GeodetError, match=says):
            stac_scenes(bad, "i")
    with pytest.raises(GeodetError, match="an address, and this must be a local file: download it first"):
        stac_scenes("https://earth-search.example/items/S2B_1")


def test_a_scene_list_as_windows_editors_write_it_names_files_beside_it(tmp_path, monkeypatch):
    """A list saved with a BOM and CRLF (Notepad, PowerShell) or as UTF-16 (PowerShell 5's
    Out-File) keeps its first scene; relative entries name files beside the list, from any folder."""
    from argparse import Namespace

    from geodet.cli.detect import scene_list

    (tmp_path / "scenes").mkdir()
    for n in ("a.tif", "b.tif"):
        (tmp_path / "scenes" / n).write_bytes(b"")
    listing = tmp_path / "scenes" / "list.txt"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    def listed(raw: bytes):
        listing.write_bytes(raw)
        return scene_list(Namespace(scenes=[], stac=None, asset=None, scene_list=str(listing)))[0]

    want = [str(tmp_path / "scenes" / "a.tif"), "/vsicurl/https://h/c.tif"]
    assert listed(b"\xef\xbb\xbfa.tif\r\n# a note\r\n/vsicurl/https://h/c.tif\r\n") == want
    assert listed("a.tif\n/vsicurl/https://h/c.tif\n".encode("utf-16")) == want
    with pytest.raises(GeodetError, match=r"list\.txt: not UTF-8 text \(byte 0\): save it as UTF-8"):
        listed("é.tif\n".encode("latin-1"))
    (elsewhere / "b.tif").write_bytes(b"")  # b.tif both here and beside the list: which one is not guessed
    with pytest.raises(GeodetError, match="names .* from the working folder and .* beside the list: write the path"):
        listed(b"b.tif\n")
    with pytest.raises(GeodetError, match="--scene-list https://h/l.txt: an address"):
        scene_list(Namespace(scenes=[], stac=None, asset=None, scene_list="https://h/l.txt"))
