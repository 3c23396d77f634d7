import numpy as np
import pytest
import rasterio
from helpers import write_raster
from rasterio.transform import from_origin

from geodet.io.scene import Scene
from geodet.pipeline.grid import TileGrid


def test_uint16_four_band_scaled_and_nodata_tiles_skipped(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(100, 4000, (4, 300, 300)).astype(np.uint16)
    data[:, :, :150] = 0  # nodata on the left half
    p = write_raster(tmp_path / "s.tif", data, nodata=0)
    sc = Scene(p, bands=[1, 2, 3, 4])
    g = TileGrid(sc.width, sc.height, 128, 16)
    fracs = []
    for t in g:
        img, frac = sc.read_tile(t)
        assert img.dtype == np.float32 and img.shape == (4, 128, 128)
        assert img.min() >= 0 and img.max() <= 1
        fracs.append(frac)
        x0, y0, x1, y1 = t.valid
        if x1 <= 150:
            assert frac == 0 and img.max() == 0  # invalid pixels filled with 0
    assert min(fracs) == 0 and max(fracs) == 1
    from geodet.pipeline.reader import TileDataset, make_collate

    ds = TileDataset(sc, g)
    images, tiles, skipped, failed = make_collate(0.0)([ds[i] for i in range(len(ds))])
    assert failed == []
    assert len(skipped) == sum(f == 0 for f in fracs) > 0
    assert images.shape[0] == len(tiles) == len(g) - len(skipped)
    # percentile limits come from valid pixels only
    assert min(sc.stats["lo"]) > 100


def test_stats_use_decimated_read_not_full_read(tmp_path, monkeypatch):
    data = np.random.default_rng(1).integers(0, 60000, (3, 2000, 2000)).astype(np.uint16)
    p = write_raster(tmp_path / "big.tif", data)
    import geodet.io.scene as scene_mod

    reads = []
    orig = rasterio.io.DatasetReader.read

    def spy(self, *a, **k):
        reads.append(k.get("out_shape"))
        return orig(self, *a, **k)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", spy)
    monkeypatch.setattr(scene_mod, "STATS_MAX_SIDE", 500)
    sc = Scene(p)
    assert not reads  # statistics are computed on first use, not on opening
    lo = sc.stats["lo"]
    assert reads and all(s is not None and s[1] * s[2] <= 500 * 500 for s in reads)
    assert len(lo) == 3 and sc.stats["lo"] is lo  # once


def test_resampled_grid_georeferencing(tmp_path):
    data = np.zeros((3, 400, 600), np.uint8)
    p = write_raster(tmp_path / "s.tif", data, transform=from_origin(300000, 5000000, 0.15, 0.15))
    sc = Scene(p, gsd_m=0.3)
    assert (sc.width, sc.height) == (300, 200)
    assert sc.transform.a == pytest.approx(0.3) and sc.transform.c == 300000 and sc.transform.f == 5000000
    img, frac = sc.read_tile(TileGrid(sc.width, sc.height, 128, 0).tile(0))
    assert img.shape == (3, 128, 128) and frac == 1


def test_a_gsd_finer_than_the_scene_by_far_is_refused_as_a_mistake(synth):
    """--gsd 0.00001 on a 0.3 m scene planned a grid of billions of tiles and ended in MemoryError."""
    from geodet.errors import GeodetError

    with pytest.raises(GeodetError, match=r"from 0\.3 m to 1e-05 m per pixel would make the scene 3e\+04 times "
                                          r"larger per side .* check the GSD"):
        Scene(synth.image, gsd_m=0.00001)
    assert Scene(synth.image, gsd_m=0.3 / 30).width == 30 * synth.width  # a fine but meant GSD still resamples


def test_a_models_gsd_far_finer_than_the_scene_names_the_model(synth, tiny_model, tmp_path):
    """The GSD came from the model's card, not from a flag the user gave: the advice says so."""
    from geodet.errors import GeodetError
    from geodet.model import load_model, save_model
    from geodet.pipeline.job import detect_to_file

    m = load_model(tiny_model)
    m.card.gsd_m = 0.005
    save_model(m, tmp_path / "m.pt")
    with pytest.raises(GeodetError, match=r"the model works at 0\.005 m per pixel \(its card\), 60 times finer than "
                                          r"this scene: use a model trained near"):
        detect_to_file([synth.image], tmp_path / "m.pt", tmp_path / "o.gpkg", progress=False)
    assert not (tmp_path / "o.gpkg").exists()


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


def test_gdal_env_caps_the_block_cache_in_megabytes_not_bytes():
    """rasterio hands an integer GDAL_CACHEMAX to GDALSetCacheMax64 as bytes: a cap written as 128
    was a 128-byte cache, so overlapping tiles decoded their blocks again on every read."""
    from rasterio._env import get_gdal_config

    from geodet.io.scene import GDAL_CACHE_MB, gdal_env

    with gdal_env():
        assert int(get_gdal_config("GDAL_CACHEMAX")) == GDAL_CACHE_MB * 1024 * 1024


@pytest.mark.parametrize("gsd", [None, 0.7])
def test_area_view_of_a_resampled_scene_reads_the_scenes_pixels_there(tmp_path, gsd):
    """Validation, self-training and training read areas of scenes resampled to a model's GSD: an
    area's tile is the scene's tile at the same place, in the resampled grid too; the view shares
    the scene's file handle."""
    from geodet.training.sampler import chip_tile

    rng = np.random.default_rng(0)
    sc = Scene(write_raster(tmp_path / "s.tif", rng.integers(0, 255, (3, 800, 800)).astype(np.uint8)), gsd_m=gsd)
    assert sc.resampled == (gsd is not None)
    view = sc.area(200, 150, 500, 460)
    assert view.handle is sc.handle
    for x, y in ((0, 0), (150, 170)):
        got, _ = view.read_tile(chip_tile(x, y, 128, (0, 0, view.width, view.height)))
        want, _ = sc.read_tile(chip_tile(200 + x, 150 + y, 128, (0, 0, sc.width, sc.height)))
        assert np.array_equal(got, want)
    # a view outlives its scene's handle: it opens its own, and closes it
    sc.close()
    again, _ = view.read_tile(chip_tile(150, 170, 128, (0, 0, view.width, view.height)))
    assert np.array_equal(again, got)
    view.close()
    assert view._handle is None


@pytest.mark.parametrize("shape", [(3, 150, 130), (3, 120, 200)])
@pytest.mark.parametrize("dtype,nodata", [("uint8", True), ("uint8", False), ("uint16", True), ("uint16", False),
                                          ("float32", True), ("float32", False)])
def test_tiles_read_into_a_used_buffer_equal_a_plain_read_of_the_file(tmp_path, dtype, nodata, shape):
    """Tiles are read straight into the caller's buffer (the ring reader's slot, raw or float) or
    a scratch buffer the thread reuses: whatever the buffer held before, every tile (padded past
    the edge of a scene narrower or shorter than a tile, nodata and NaN zeroed) equals a plain
    read of the file, scaled."""
    rng = np.random.default_rng(3)
    data = rng.integers(1, 250, shape).astype(dtype)
    if nodata:
        data[:, :60, :50] = 7  # nodata that is not 0
    if dtype == "float32":
        data[1, 100, 100] = np.nan  # invalid with or without nodata
    sc = Scene(write_raster(tmp_path / "s.tif", data, nodata=7 if nodata else None), bands=[1, 2, 3])
    assert sc.all_valid is not nodata
    g = TileGrid(sc.width, sc.height, 144, 8)  # every tile padded on the right or at the bottom
    assert all(t.valid[2] - t.valid[0] < 144 or t.valid[3] - t.valid[1] < 144 for t in g)
    with rasterio.open(sc.path) as ds:
        pixels = ds.read().astype(np.float64)
        valid = ds.dataset_mask() > 0
    valid &= np.isfinite(pixels).all(0)
    lo, hi = ((0.0, 255.0) if dtype == "uint8" else
              (np.asarray(sc.stats["lo"], np.float64)[:, None, None], np.asarray(sc.stats["hi"], np.float64)[:, None, None]))
    for raw in ([False, True] if dtype == "uint8" else [False]):
        kind = np.uint8 if raw else np.float32
        used = np.full((3, 144, 144), 77, kind)
        for t in list(g) + list(g)[::-1]:
            x0, y0, x1, y1 = t.valid
            want = np.zeros((3, 144, 144))
            part = pixels[:, y0:y1, x0:x1] if raw else np.clip((pixels[:, y0:y1, x0:x1] - lo) / (hi - lo), 0, 1)
            want[:, : y1 - y0, : x1 - x0] = np.where(valid[y0:y1, x0:x1], np.nan_to_num(part), 0)
            plain, frac = sc.read_tile(t, raw=raw)
            got, frac_used = sc.read_tile(t, out=used, raw=raw)
            assert got is used and got.dtype == plain.dtype == kind
            assert np.array_equal(got, plain) and frac == frac_used == pytest.approx(valid[y0:y1, x0:x1].mean())
            np.testing.assert_allclose(got, want, rtol=0, atol=0 if raw else 1e-6)
    with pytest.raises(ValueError, match="float32 buffer"):  # GDAL would fill a uint8 buffer unscaled
        sc.read_tile(g.tile(0), out=np.zeros((3, 144, 144), np.uint8))


def test_a_crs_in_feet_and_non_square_pixels_are_measured_in_metres(tmp_path):
    """GSDs and overlaps are metres whatever the CRS's unit: 0.3 m pixels in US survey feet run at
    0.3 m, not resampled 3.28x; non-square pixels are resampled per axis; point labels are
    point_box_m on the ground. A geographic scene's overlap in metres is refused (pixels work)."""
    import geopandas as gpd
    from rasterio.transform import Affine
    from shapely.geometry import Point

    from geodet.errors import GeodetError
    from geodet.io.labels import labels_to_boxes

    ft = 0.3 / 0.3048006096012192
    p = write_raster(tmp_path / "ft.tif", np.zeros((3, 100, 120), np.uint8), crs="EPSG:2263",
                     transform=Affine(ft, 0, 1_000_000, 0, -ft, 200_000))
    sc = Scene(p, gsd_m=0.3)
    assert not sc.resampled and (sc.width, sc.height) == (120, 100) and sc.pixel_gsd == pytest.approx(0.3)
    assert sc.overlap_px(3.0) == 10
    x, y = sc.transform * (50, 40)
    lb = labels_to_boxes(gpd.GeoDataFrame({"label": ["t"]}, geometry=[Point(x, y)], crs="EPSG:2263"), sc, point_box_m=3.0)
    assert np.allclose(lb.boxes[0], [45, 35, 55, 45])  # 3 m = 10 px of 0.3 m
    nonsq = write_raster(tmp_path / "ns.tif", np.zeros((3, 90, 60), np.uint8),
                         transform=Affine(0.1, 0, 500000, 0, -0.2, 4600000))
    sc = Scene(nonsq, gsd_m=0.3)
    assert (sc.width, sc.height) == (20, 60)  # 6 m x 18 m at 0.3 m
    assert sc.transform.a == pytest.approx(0.3) and sc.transform.e == pytest.approx(-0.3)
    geo = write_raster(tmp_path / "geo.tif", np.zeros((3, 50, 50), np.uint8), crs="EPSG:4326",
                       transform=Affine(2.7e-6, 0, 15, 0, -2.7e-6, 41.5))
    with pytest.raises(GeodetError, match="overlap in metres needs a projected CRS.*--overlap"):
        Scene(geo).overlap_px(5.0)


def test_unreadable_kinds_of_raster_are_one_clear_error(tmp_path):
    """A TIFF cut inside its header (GDAL opens what it can and warns) is damaged, not a scene
    without a CRS; complex pixels (a SAR SLC) are refused, not cast to their real part."""
    from geodet.errors import GeodetError

    full = write_raster(tmp_path / "full.tif", np.zeros((3, 64, 64), np.uint8))
    cut = tmp_path / "cut.tif"
    cut.write_bytes(full.read_bytes()[:300])
    with pytest.raises(GeodetError, match="looks damaged"):
        Scene(cut)
    c = write_raster(tmp_path / "c.tif", np.zeros((1, 8, 8), np.complex64))
    with pytest.raises(GeodetError, match="complex pixels"):
        Scene(c)


def _rgb_with_a_fourth_band(path, w=4, h=4):
    """A TIFF that reads well while libtiff warns on opening it: RGB with a fourth sample and no
    ExtraSamples tag (some RGB+NIR products)."""
    import struct

    spp, data = 4, bytes(range(w * h * 4))
    tags = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, spp, 8 + 2 + 10 * 12 + 4), (259, 3, 1, 1), (262, 3, 1, 2),
            (273, 4, 1, 8 + 2 + 10 * 12 + 4 + 2 * spp), (277, 3, 1, spp), (278, 3, 1, h), (279, 4, 1, len(data)),
            (284, 3, 1, 1)]
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags))
    for tag, typ, cnt, val in tags:
        out += struct.pack("<HHI", tag, typ, cnt) + (struct.pack("<HH", val, 0) if typ == 3 and cnt == 1
                                                     else struct.pack("<I", val))
    path.write_bytes(out + struct.pack("<I", 0) + struct.pack("<" + "H" * spp, *([8] * spp)) + data)
    return path


def test_gdal_warnings_of_a_sound_file_or_another_thread_do_not_refuse_a_scene(tmp_path):
    """Only a cut header is 'damaged': a file libtiff warns about but reads is opened; and a damaged
    file opened in another thread at the same moment does not make a sound one look damaged."""
    import threading

    from geodet.errors import GeodetError
    from geodet.io.raster import open_raster

    with open_raster(_rgb_with_a_fourth_band(tmp_path / "rgbn.tif")) as src:
        assert src.count == 4 and src.read().shape == (4, 4, 4)
    full = write_raster(tmp_path / "full.tif", np.zeros((3, 64, 64), np.uint8))
    cut = tmp_path / "cut.tif"
    cut.write_bytes(full.read_bytes()[:300])
    errors, opened = [], []

    def loop(path, n=40):
        for _ in range(n):
            try:
                open_raster(path).close()
                opened.append(path)
            except GeodetError as exc:
                errors.append((path, str(exc)))

    threads = [threading.Thread(target=loop, args=(p,)) for p in (cut, full, cut, full)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {p for p, _ in errors} == {cut} and len(errors) == 80 and opened.count(full) == 80
    import logging

    assert logging.getLogger("rasterio._env").propagate  # left as it was


@pytest.mark.parametrize("dtype, nodata", [("uint8", 0), ("float32", np.nan)])
def test_holds_data_finds_a_valid_area_narrower_than_a_decimated_read_steps_over(tmp_path, dtype, nodata):
    """A scene of nodata but for a 1-pixel-wide sliver: the decimated look misses it, the exact
    one (what decides that an int8 job has nothing to run) finds it; an empty scene is empty."""
    data = np.full((3, 2000, 2000), nodata, dtype)
    empty = Scene(write_raster(tmp_path / "empty.tif", data, nodata=nodata))
    assert not empty.holds_data() and not empty.holds_data(exact=True)
    data[:, :, 1003] = 7  # one column of valid pixels
    sliver = Scene(write_raster(tmp_path / "sliver.tif", data, nodata=nodata))
    assert not sliver.holds_data(max_side=512)  # between the decimated read's samples
    assert sliver.holds_data(max_side=512, exact=True)


def test_a_geopackage_raster_layer_as_qgis_names_it_is_a_scene(synth, tiny_model, tmp_path, capsys):
    """QGIS gives a GeoPackage raster layer as ``GPKG:file:table``: detected as the GeoTIFF is, an output over its file refused, a missing one named, and a STAC JSON given
    as a scene pointed to --stac."""
    import json

    from geodet.cli import main

    gpkg = tmp_path / "r é.gpkg"
    with rasterio.open(synth.image) as src:
        profile = dict(src.profile, driver="GPKG", RASTER_TABLE="scene_tbl")
        profile.pop("tiled", None), profile.pop("blockxsize", None), profile.pop("blockysize", None)
        profile.pop("compress", None), profile.pop("interleave", None), profile.pop("nodata", None)
        with rasterio.open(gpkg, "w", **profile) as dst:
            dst.write(src.read())
    source = f"GPKG:{gpkg}:scene_tbl"
    assert main(["-q", "detect", source, "-m", str(tiny_model), "-o", str(tmp_path / "a.csv")]) == 0
    assert main(["-q", "detect", str(synth.image), "-m", str(tiny_model), "-o", str(tmp_path / "b.csv")]) == 0
    got, want = ((tmp_path / n).read_text().splitlines() for n in ("a.csv", "b.csv"))
    # the same pixels (GeoPackage tiles are lossless PNG), less the GeoTIFF's nodata, which the table lacks
    assert len(want) > 1 and abs(len(got) - len(want)) <= 0.01 * len(want)
    capsys.readouterr()
    before = gpkg.read_bytes()
    assert main(["detect", source, "-m", str(tiny_model), "-o", str(gpkg)]) == 2
    assert "is a scene of this job" in capsys.readouterr().err and gpkg.read_bytes() == before
    assert main(["detect", f"GPKG:{tmp_path / 'gone.gpkg'}:scene_tbl", "-m", str(tiny_model), "-o",
                 str(tmp_path / "c.gpkg")]) == 2
    assert f"scene not found: {tmp_path / 'gone.gpkg'}" in capsys.readouterr().err
    item = tmp_path / "item.json"
    item.write_text(json.dumps({"type": "Feature", "stac_version": "1.0.0", "id": "a",
                                "assets": {"image": {"href": str(synth.image)}}}))
    assert main(["detect", str(item), "-m", str(tiny_model), "-o", str(tmp_path / "c.gpkg")]) == 2
    assert "it is STAC JSON, so give it with --stac" in capsys.readouterr().err


def test_a_model_trained_on_8_bit_scenes_says_so_on_a_16_bit_one(synth, tiny_model, tmp_path, caplog):
    """The card keeps the training scenes' pixel type; a scene of another kind (scaled by its
    percentiles, not 0-255) is said, once, and one of the same kind is not."""
    from geodet.model import load_model
    from geodet.pipeline.scenes import detect_scene

    model = load_model(tiny_model)
    assert model.card.extra["scene_dtypes"] == ["uint8"]
    wide = tmp_path / "s16.tif"
    with rasterio.open(synth.image) as src:
        with rasterio.open(wide, "w", **dict(src.profile, dtype="uint16", nodata=None)) as dst:
            dst.write(src.read().astype(np.uint16) * 64)
    caplog.set_level("WARNING", logger="geodet")
    detect_scene(str(synth.image), model, progress=False)
    assert "model was trained on" not in caplog.text
    detect_scene(str(wide), model, progress=False)
    assert caplog.text.count("s16.tif is uint16 and the model was trained on uint8 scenes") == 1


def test_names_with_colons_are_files_and_tables_of_one_geopackage_are_scenes(synth, tmp_path, monkeypatch):
    """A file named like a timestamp (T10:30.tif) is a path, not a GDAL connection string; two
    raster tables of one GeoPackage are two scenes (not one given twice); a relative connection
    string is made absolute in its file, as a run's marker stores it."""
    import shutil

    from geodet.io.raster import open_raster, split_connection
    from geodet.pipeline import parts
    from geodet.pipeline.job import check_each_scene_once

    monkeypatch.chdir(tmp_path)
    shutil.copy(synth.image, "T10:30.tif")
    with open_raster("T10:30.tif") as src:
        assert src.count == 3
    assert split_connection("T10:30.tif") is None and split_connection("ABC:x.tif") is None
    assert split_connection("GPKG:C:\\d\\x.gpkg:t") == ("GPKG", "C:\\d\\x.gpkg", "t")
    check_each_scene_once(["GPKG:x.gpkg:a", "GPKG:x.gpkg:b"], "why")
    with pytest.raises(Exception, match="given twice"):
        check_each_scene_once(["GPKG:x.gpkg:a", f"GPKG:{tmp_path / 'x.gpkg'}:a"], "why")
    assert parts.scene_path("GPKG:x.gpkg:a") == f"GPKG:{tmp_path / 'x.gpkg'}:a"
