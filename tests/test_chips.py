import numpy as np
import pytest
import rasterio
from pathlib import Path
from helpers import write_raster
from rasterio.transform import from_origin
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from geodet.pipeline.grid import TileGrid


def test_chip_transforms_match_rasterio_windows(tmp_path):
    from geodet.pipeline.chips import write_chips

    data = np.random.default_rng(2).integers(0, 255, (3, 300, 250)).astype(np.uint8)
    p = write_raster(tmp_path / "s.tif", data)
    write_chips(p, tmp_path / "out", tile_size=128, overlap=20, progress=False)
    import geopandas as gpd

    fp = gpd.read_file(tmp_path / "out" / "chips.gpkg")
    g = TileGrid(250, 300, 128, 20)
    assert len(fp) == len(g)
    with rasterio.open(p) as src:
        for t in g:
            with rasterio.open(tmp_path / "out" / "chips" / f"r{t.row}_c{t.col}.tif") as chip:
                win = Window(t.col_off, t.row_off, 128, 128)
                assert chip.transform == window_transform(win, src.transform)
                assert chip.crs == src.crs and chip.dtypes == src.dtypes
                assert (chip.read() == src.read(window=win)).all()


def test_coco_annotations_are_label_boxes_clipped_to_chips(tmp_path):
    import json

    import geopandas as gpd
    from shapely.geometry import box as sbox

    from geodet.pipeline.chips import write_chips

    t = from_origin(300000, 5000000, 0.5, 0.5)
    p = write_raster(tmp_path / "s.tif", np.full((3, 200, 300), 50, np.uint8), transform=t)
    px = np.array([[10, 10, 20, 16], [120, 40, 140, 60], [95, 95, 125, 105], [280, 190, 300, 200]], float)
    polys = [sbox(*(t * (b[0], b[3])), *(t * (b[2], b[1]))) for b in px]
    gpd.GeoDataFrame({"label": ["car", "truck", "car", "car"]}, geometry=polys, crs="EPSG:32633").to_file(tmp_path / "l.gpkg")
    write_chips(p, tmp_path / "out", tile_size=128, overlap=16, labels=tmp_path / "l.gpkg", progress=False)
    coco = json.loads((tmp_path / "out" / "annotations.json").read_text())
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    assert sorted(cats.values()) == ["car", "truck"]
    g = TileGrid(300, 200, 128, 16)
    for img in coco["images"]:
        tile = g.tile(img["row"] * g.n_cols + img["col"])
        x0, y0, x1, y1 = tile.valid
        expect = []
        for b in px:
            c = np.clip(b, [x0, y0, x0, y0], [x1, y1, x1, y1])
            area = (b[2] - b[0]) * (b[3] - b[1])
            vis = (c[2] - c[0]) * (c[3] - c[1])
            if vis > 0 and vis >= 0.5 * area:
                expect.append([c[0] - x0, c[1] - y0, c[2] - c[0], c[3] - c[1]])
        got = [a["bbox"] for a in coco["annotations"] if a["image_id"] == img["id"]]
        assert sorted(map(tuple, np.round(got, 6))) == sorted(map(tuple, np.round(expect, 6)))


@pytest.mark.parametrize("georef", ["transform only", "crs only", "gcps only"])
def test_a_scene_without_crs_tiles_and_says_so_once(tmp_path, caplog, georef):
    """A transform without a CRS, or a CRS without a transform (GDAL's identity: pixel coordinates,
    which once went out as map coordinates of that CRS, far from the scene): chips without a CRS."""
    import warnings

    import pyogrio
    import rasterio

    from geodet.pipeline.chips import write_chips

    p = tmp_path / "nocrs.tif"
    from rasterio.control import GroundControlPoint

    gcps = [GroundControlPoint(r, c, 500000 + c * 0.3, 4600000 - r * 0.3) for r, c in ((0, 0), (0, 99), (79, 0))]
    place = ({"transform": from_origin(500000, 4600000, 0.3, 0.3)} if georef == "transform only"
             else {"crs": "EPSG:32633"} if georef == "crs only" else {"gcps": gcps, "crs": "EPSG:32633"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rasterio's NotGeoreferencedWarning
        with rasterio.open(p, "w", driver="GTiff", width=100, height=80, count=3, dtype="uint8", **place) as d:
            d.write(np.full((3, 80, 100), 50, np.uint8))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*crs.*not provided")  # pyogrio's own warning fails here
        write_chips(p, tmp_path / "out", 64, 8, progress=False)
    assert (tmp_path / "out" / "chips.gpkg").exists()
    assert pyogrio.read_info(tmp_path / "out" / "chips.gpkg")["crs"] is None
    assert caplog.text.count("nocrs.tif has no georeferencing (no CRS, or no geotransform), so chips.gpkg has no "
                             "CRS either") == 1
    # ground control points only: warped to a grid first, not given corners by hand
    assert ("georeferenced by 3 ground control points only: warp it" in caplog.text) == (georef == "gcps only")


def test_nan_pixels_are_no_data_in_chips_as_in_detection(tmp_path):
    """A float scene with NaN where it has no data, and no nodata declared: its NaN chips counted as
    full of data (valid_fraction 1.0; --min-valid ignored them) where detection skips them."""
    import geopandas as gpd

    from geodet.pipeline.chips import write_chips

    data = np.random.default_rng(0).random((3, 64, 128)).astype(np.float32)
    data[:, :, 64:] = np.nan  # the right half
    p = tmp_path / "f.tif"
    with rasterio.open(p, "w", driver="GTiff", width=128, height=64, count=3, dtype="float32", crs="EPSG:32633",
                       transform=from_origin(500000, 4600000, 0.3, 0.3)) as d:
        d.write(data)
    write_chips(p, tmp_path / "out", 64, 0, progress=False, min_valid_fraction=0.5)
    chips = gpd.read_file(tmp_path / "out" / "chips.gpkg")
    assert list(zip(chips["col"], chips["valid_fraction"])) == [(0, 1.0)]  # the NaN half's chip skipped
    data[:, :, 60:] = np.nan
    with rasterio.open(p, "r+") as d:
        d.write(data)
    write_chips(p, tmp_path / "out", 64, 0, progress=False)
    chips = gpd.read_file(tmp_path / "out" / "chips.gpkg").sort_values("col")
    assert list(chips["valid_fraction"]) == [60 / 64]  # the all-NaN chip is empty, the other partly
    with rasterio.open(tmp_path / "out" / chips["path"].iloc[0]) as c:
        assert (c.dataset_mask()[:, 60:] == 0).all() and (c.dataset_mask()[:, :60] == 255).all()


def test_a_rerun_replaces_the_folder_whole_and_a_failed_one_leaves_it(tmp_path, monkeypatch):
    """Tiles of a rerun into the same folder never mix with the last run's (chips, chips.gpkg and
    annotations.json are of one run); a rerun that fails or is interrupted leaves the last run as it was."""
    import geopandas as gpd
    from shapely.geometry import box

    from geodet.io.scene import Scene
    from geodet.pipeline.chips import write_chips

    data = np.random.default_rng(3).integers(0, 255, (3, 200, 200)).astype(np.uint8)
    p = write_raster(tmp_path / "s.tif", data)
    x0, y0 = 300000, 5000000
    labels = gpd.GeoDataFrame({"label": ["car"]}, geometry=[box(x0 + 5, y0 - 15, x0 + 15, y0 - 5)], crs="EPSG:32633")
    labels.to_file(tmp_path / "l.gpkg")
    out = tmp_path / "out"
    write_chips(p, out, tile_size=50, overlap=0, labels=tmp_path / "l.gpkg", progress=False)
    assert len(list((out / "chips").iterdir())) == 16 and (out / "annotations.json").exists()
    write_chips(p, out, tile_size=100, overlap=0, progress=False)  # no labels this time
    assert sorted(f.name for f in (out / "chips").iterdir()) == ["r0_c0.tif", "r0_c1.tif", "r1_c0.tif", "r1_c1.tif"]
    assert not (out / "annotations.json").exists() and len(gpd.read_file(out / "chips.gpkg")) == 4
    before = {f.name: f.read_bytes() for f in (out / "chips").iterdir()}
    calls = []
    real = Scene.read_raw

    def interrupted(self, window):
        calls.append(window)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, window)

    monkeypatch.setattr(Scene, "read_raw", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_chips(p, out, tile_size=40, overlap=0, progress=False)
    assert {f.name: f.read_bytes() for f in (out / "chips").iterdir()} == before
    assert len(gpd.read_file(out / "chips.gpkg")) == 4 and sorted(f.name for f in out.iterdir()) == ["chips", "chips.gpkg"]
    monkeypatch.undo()
    # what geodet did not write is never deleted: a scene, labels or notes kept in chips/ (the scene
    # tiled may be one of them), a COCO file of the user's in a folder never tiled into; refused first
    from geodet.errors import GeodetError

    (out / "chips" / "r0_c0.tif.aux.xml").write_text("<PAMDataset/>")  # GDAL's statistics beside a chip: geodet's
    for junk in (".DS_Store", "._r0_c0.tif", "r0_c0.tif.ovr"):  # a file browser's, QGIS's overviews: not the user's
        (out / "chips" / junk).write_bytes(b"x")
    (out / "chips" / "notes.txt").write_text("mine")
    with pytest.raises(GeodetError, match=r"holds files that are not chips \(notes\.txt\).*move them out"):
        write_chips(p, out, tile_size=100, overlap=0, progress=False)
    assert (out / "chips" / "notes.txt").read_text() == "mine"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "annotations.json").write_text("{}")
    with pytest.raises(GeodetError, match="is not from a geodet tile run"):
        write_chips(p, mine, tile_size=100, overlap=0, progress=False)
    assert sorted(f.name for f in mine.iterdir()) == ["annotations.json"]


def test_tile_numbers_are_checked_and_a_small_tile_gets_a_smaller_overlap(tmp_path, capsys, caplog, monkeypatch):
    from geodet.cli import main

    p = write_raster(tmp_path / "s.tif", np.zeros((3, 160, 160), np.uint8))
    for flag, value, said in [("--overlap-m", "nan", "finite number"), ("--gsd", "inf", "finite number"),
                              ("--min-visibility", "1.5", "at most 1"), ("--min-valid", "1", "less than 1")]:
        with pytest.raises(SystemExit) as stop:  # a usage error, as argparse ends it
            main(["tile", str(p), "-o", str(tmp_path / "x"), flag, value])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    # an overlap given in metres that is not smaller than the tile names the flag the user gave
    assert main(["tile", str(p), "-o", str(tmp_path / "x"), "--tile-size", "64", "--overlap-m", "100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lower --overlap-m (tiling.overlap_m) or raise --tile-size" in err[0], err
    assert not (tmp_path / "x").exists()
    # the default overlap (64 px) with a tile of 80 would step 16 px: 10 px instead, said
    assert main(["tile", str(p), "-o", str(tmp_path / "t"), "--tile-size", "80", "-q"]) == 0
    assert "overlap 10 px instead" in caplog.text
    assert len(list((tmp_path / "t" / "chips").iterdir())) == 9  # 80 px tiles stepping 70 px over 160 px (36 stepping 16 px)
    # both overlaps given: one line, not the metres silently winning
    assert main(["tile", str(p), "-o", str(tmp_path / "y"), "--overlap", "8", "--overlap-m", "2"]) == 2
    assert "--overlap and --overlap-m both set the overlap" in capsys.readouterr().err
    # an overlap stepping a few pixels (a mistyped one) writes thousands of chips: said first
    big = write_raster(tmp_path / "big.tif", np.zeros((1, 400, 400), np.uint8))
    from geodet.pipeline import chips

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(chips, "_write", stop)  # said before the first chip is written
    with pytest.raises(Stop):
        chips.write_chips(big, tmp_path / "z", tile_size=32, overlap=30, progress=False)
    assert "steps 2 px: each pixel is in about 256 chips" in caplog.text


def test_a_run_never_replaces_its_own_inputs_or_what_is_not_its_own_and_a_failed_swap_undoes_itself(tmp_path,
                                                                                                    monkeypatch):
    """The labels or scene of the run kept where a run writes (OUT/chips.gpkg, a chip in OUT/chips/),
    a chips.gpkg of the user's, a folder named chips.gpkg or a file named chips: refused before any
    work. A rename that fails while the run is swapped in puts the folder's last run back whole."""
    import os
    import shutil

    import geopandas as gpd
    from shapely.geometry import box

    from geodet.errors import GeodetError
    from geodet.pipeline.chips import write_chips

    data = np.random.default_rng(4).integers(0, 255, (3, 200, 200)).astype(np.uint8)
    p = write_raster(tmp_path / "s.tif", data)
    x0, y0 = 300000, 5000000
    labels = gpd.GeoDataFrame({"label": ["car"]}, geometry=[box(x0 + 5, y0 - 15, x0 + 15, y0 - 5)], crs="EPSG:32633")
    proj = tmp_path / "proj"
    proj.mkdir()
    labels.to_file(proj / "chips.gpkg")
    with pytest.raises(GeodetError, match="chips.gpkg is the labels of this run, and the run replaces"):
        write_chips(p, proj, tile_size=100, overlap=0, labels=proj / "chips.gpkg", progress=False)
    with pytest.raises(GeodetError, match="chips.gpkg is not the chip footprints of a geodet tile run"):
        write_chips(p, proj, tile_size=100, overlap=0, labels=None, progress=False)
    assert len(gpd.read_file(proj / "chips.gpkg")) == 1 and sorted(os.listdir(proj)) == ["chips.gpkg"]
    out = tmp_path / "out"
    write_chips(p, out, tile_size=100, overlap=0, progress=False)
    chip = out / "chips" / "r1_c1.tif"
    before = chip.read_bytes()
    with pytest.raises(GeodetError, match="r1_c1.tif is the scene of this run"):
        write_chips(chip, out, tile_size=50, overlap=0, progress=False)
    assert chip.read_bytes() == before and len(os.listdir(out / "chips")) == 4
    for name, make in (("chips.gpkg", os.mkdir), ("chips", lambda q: q.write_text("x"))):
        odd = tmp_path / f"odd_{name}"
        odd.mkdir()
        make(odd / name)
        with pytest.raises(GeodetError, match=f"{name} is (a folder|not a folder), where a run writes"):
            write_chips(p, odd, tile_size=100, overlap=0, progress=False)
    labels.to_file(tmp_path / "l.gpkg")
    write_chips(p, out, tile_size=100, overlap=0, labels=tmp_path / "l.gpkg", progress=False)
    last = {q.relative_to(out): q.read_bytes() for q in sorted(out.rglob("*")) if q.is_file()}
    real = os.replace

    def failing(src, dst):
        if str(dst).endswith("annotations.json") and Path(src).parent.name.startswith(".geodet-tile-"):  # the new run's
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="No space"):
        write_chips(p, out, tile_size=50, overlap=0, labels=tmp_path / "l.gpkg", progress=False)
    monkeypatch.undo()
    assert {q.relative_to(out): q.read_bytes() for q in sorted(out.rglob("*")) if q.is_file()} == last
    shutil.rmtree(out)
