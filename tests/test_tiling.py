import numpy as np
import pytest
import rasterio
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.transform import from_origin
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from geodet import GeodetError
from geodet.io.scene import Scene
from geodet.pipeline.grid import TileGrid, overlap_pixels


@settings(max_examples=200, deadline=None)
@given(w=st.integers(1, 3000), h=st.integers(1, 3000), tile=st.integers(8, 700), frac=st.floats(0, 0.9))
def test_grid_covers_and_cores_partition(w, h, tile, frac):
    overlap = int(tile * frac)
    g = TileGrid(w, h, tile, overlap)
    cover = np.zeros((h, w), np.int32)
    core = np.zeros((h, w), np.int32)
    for t in g.windows():
        assert t.width == t.height == tile
        x0, y0, x1, y1 = t.valid
        cover[y0:y1, x0:x1] += 1
        cx0, cy0, cx1, cy1 = t.core
        core[cy0:cy1, cx0:cx1] += 1
        assert x0 <= cx0 and cx1 <= x1 and y0 <= cy0 and cy1 <= y1  # core inside its tile
        if w >= tile:
            assert t.col_off + tile <= w  # last tiles moved inside, never padded
        if h >= tile:
            assert t.row_off + tile <= h
    assert (cover >= 1).all()
    assert (core == 1).all()  # the cores partition the scene exactly


@settings(max_examples=100, deadline=None)
@given(w=st.integers(50, 5000), tile=st.integers(16, 600), frac=st.floats(0.01, 0.9))
def test_spacing_even_and_overlap_at_least_requested(w, tile, frac):
    overlap = int(tile * frac)
    g = TileGrid(w, 10, tile, overlap)
    offs = np.array(g.col_offsets)
    if len(offs) > 1:
        steps = np.diff(offs)
        assert steps.max() - steps.min() <= 1
        assert (tile - steps >= overlap).all()
        # cores keep at least half the overlap from every internal tile edge
        for c in range(len(offs)):
            if c > 0:
                assert g.col_cuts[c] - offs[c] >= overlap // 2
            if c < len(offs) - 1:
                assert offs[c] + tile - g.col_cuts[c + 1] >= overlap // 2


def test_scene_smaller_than_tile_gives_one_padded_tile():
    g = TileGrid(100, 60, 256, 32)
    assert len(g) == 1
    t = g.tile(0)
    assert t.valid == (0, 0, 100, 60) and t.core == (0, 0, 100, 60) and t.width == 256


@pytest.mark.parametrize("tile,overlap", [(256, 256), (256, 300), (0, 0), (-5, 0), (256, -1)])
def test_invalid_values_raise(tile, overlap):
    with pytest.raises(GeodetError):
        TileGrid(1000, 1000, tile, overlap)


def test_overlap_in_metres():
    assert overlap_pixels(6.0, 0.3) == 20
    assert overlap_pixels(6.1, 0.3) == 21


def _write(path, data, nodata=None, transform=None, crs="EPSG:32633"):
    c, h, w = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=c, dtype=data.dtype.name, crs=crs,
                       transform=transform or from_origin(300000, 5000000, 0.5, 0.5), nodata=nodata) as dst:
        dst.write(data)
    return path


def test_uint16_four_band_scaled_and_nodata_tiles_skipped(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(100, 4000, (4, 300, 300)).astype(np.uint16)
    data[:, :, :150] = 0  # nodata on the left half
    p = _write(tmp_path / "s.tif", data, nodata=0)
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
    images, tiles, skipped = make_collate(0.0)([ds[i] for i in range(len(ds))])
    assert len(skipped) == sum(f == 0 for f in fracs) > 0
    assert images.shape[0] == len(tiles) == len(g) - len(skipped)
    # percentile limits come from valid pixels only
    assert min(sc.stats["lo"]) > 100


@pytest.mark.parametrize("dtype,shape,tile", [("uint8", (3, 300, 260), 128), ("uint16", (4, 300, 300), 128), ("float32", (3, 90, 70), 128)])
def test_in_process_batches_equal_dataloader_batches(tmp_path, dtype, shape, tile):
    """The reused-buffer reader gives the DataLoader's batches: same tiles, same pixels, same
    skipped nodata tiles, padding past the edge of a scene smaller than a tile."""
    import torch

    from geodet.pipeline.reader import TileDataset, make_collate, read_batches

    rng = np.random.default_rng(1)
    data = rng.uniform(1, 250, shape).astype(dtype)
    data[:, :, : shape[2] // 2] = 0  # nodata on the left half
    if dtype == "float32":
        data[0, 5, -5] = np.nan
    sc = Scene(_write(tmp_path / "s.tif", data, nodata=0), bands=list(range(1, shape[0] + 1)))
    g = TileGrid(sc.width, sc.height, tile, 16)
    ref = list(torch.utils.data.DataLoader(TileDataset(sc, g), batch_size=3, collate_fn=make_collate(0.0)))
    got = [(None if im is None else im.clone(), t, s) for im, t, s in read_batches(sc, g, 3, 0.0)]
    assert len(got) == len(ref)
    assert sum(len(s) for _, _, s in got) > 0 or len(g) == 1
    for (ia, ta, sa), (ib, tb, sb) in zip(got, ref):
        assert ta == tb and sa == sb
        assert (ia is None) == (ib is None)
        if ia is not None:
            assert torch.equal(ia, ib)


def test_stats_use_decimated_read_not_full_read(tmp_path, monkeypatch):
    data = np.random.default_rng(1).integers(0, 60000, (3, 2000, 2000)).astype(np.uint16)
    p = _write(tmp_path / "big.tif", data)
    import geodet.io.scene as scene_mod

    reads = []
    orig = rasterio.io.DatasetReader.read

    def spy(self, *a, **k):
        reads.append(k.get("out_shape"))
        return orig(self, *a, **k)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", spy)
    monkeypatch.setattr(scene_mod, "STATS_MAX_SIDE", 500)
    Scene(p)
    assert reads and all(s is not None and s[1] * s[2] <= 500 * 500 for s in reads)


def test_resampled_grid_georeferencing(tmp_path):
    data = np.zeros((3, 400, 600), np.uint8)
    p = _write(tmp_path / "s.tif", data, transform=from_origin(300000, 5000000, 0.15, 0.15))
    sc = Scene(p, gsd_m=0.3)
    assert (sc.width, sc.height) == (300, 200)
    assert sc.transform.a == pytest.approx(0.3) and sc.transform.c == 300000 and sc.transform.f == 5000000
    img, frac = sc.read_tile(TileGrid(sc.width, sc.height, 128, 0).tile(0))
    assert img.shape == (3, 128, 128) and frac == 1


def test_chip_transforms_match_rasterio_windows(tmp_path):
    from geodet.io.chips import write_chips

    data = np.random.default_rng(2).integers(0, 255, (3, 300, 250)).astype(np.uint8)
    p = _write(tmp_path / "s.tif", data)
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

    from geodet.io.chips import write_chips

    t = from_origin(300000, 5000000, 0.5, 0.5)
    p = _write(tmp_path / "s.tif", np.full((3, 200, 300), 50, np.uint8), transform=t)
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
