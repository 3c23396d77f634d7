import json
import subprocess
import sys
import textwrap

import geopandas as gpd
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import PerfectDetector, match_counts, packed_boxes, write_id_scene
from rasterio.transform import from_origin

from geodet.pipeline.detect import detect_scene
from geodet.pipeline.grid import TileGrid
from geodet.io.writers import write_detections


@pytest.mark.parametrize(
    "w,h,tile,overlap,max_size",
    [(700, 600, 128, 32, 32), (900, 850, 256, 64, 64), (640, 512, 200, 50, 50), (100, 90, 128, 32, 32), (513, 257, 256, 16, 16)],
)
def test_seams_no_duplicates_no_misses(tmp_path, w, h, tile, overlap, max_size):
    boxes = packed_boxes(w, h, 3, max_size, seed=w)
    p = write_id_scene(tmp_path / "id.tif", boxes, w, h)
    g = detect_scene(p, PerfectDetector(), tile_size=tile, overlap=overlap, num_workers=0, progress=False, batch_size=4)
    pred = g[["x0", "y0", "x1", "y1"]].to_numpy()
    dup, miss = match_counts(pred, boxes, iou=0.9)
    assert (dup, miss) == (0, 0)
    assert len(g) == len(boxes)
    # many objects really lie across seams
    from geodet.pipeline.grid import TileGrid

    cuts = TileGrid(w, h, tile, overlap).col_cuts[1:-1]
    if cuts:
        assert sum(((boxes[:, 0] < c) & (boxes[:, 2] > c)).sum() for c in cuts) > 3


def test_objects_up_to_twice_the_overlap(tmp_path):
    w, h, tile, overlap = 900, 800, 160, 32
    boxes = packed_boxes(w, h, 4, 2 * overlap, seed=5)
    p = write_id_scene(tmp_path / "id.tif", boxes, w, h)
    g = detect_scene(p, PerfectDetector(), tile_size=tile, overlap=overlap, num_workers=0, progress=False)
    dup, miss = match_counts(g[["x0", "y0", "x1", "y1"]].to_numpy(), boxes, iou=0.9)
    assert (dup + miss) / len(boxes) < 0.01


def test_workers_give_the_same_result(tmp_path):
    boxes = packed_boxes(600, 500, 3, 24, seed=3)
    p = write_id_scene(tmp_path / "id.tif", boxes, 600, 500)
    a = detect_scene(p, PerfectDetector(), tile_size=128, overlap=24, num_workers=0, progress=False)
    b = detect_scene(p, PerfectDetector(), tile_size=128, overlap=24, num_workers=2, progress=False)
    ka = np.sort(a[["x0", "y0", "x1", "y1"]].to_numpy(), axis=0)
    kb = np.sort(b[["x0", "y0", "x1", "y1"]].to_numpy(), axis=0)
    assert np.array_equal(ka, kb)


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


def test_memory_flat_on_6000px_scene(tmp_path):
    """Perfect detector over a 6000^2 scene: peak RSS stays under 1.5 GB (the scene alone is 108 MB
    of pixels; the stitcher holds only detections)."""
    boxes = packed_boxes(6000, 6000, 4, 24, seed=9, gap_choices=(20, 40, 60))
    p = write_id_scene(tmp_path / "big.tif", boxes, 6000, 6000)
    code = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str((__import__('pathlib').Path(__file__).parent))!r})
        from helpers import PerfectDetector
        import geodet
        from geodet.pipeline.detect import detect_scene
        geodet.tune_memory()
        g = detect_scene({str(p)!r}, PerfectDetector(), tile_size=512, overlap=64, num_workers=0, progress=False)
        # VmHWM is this address space's peak; ru_maxrss would carry pytest's peak across exec
        hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
        print(len(g), hwm)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    n, peak_kb = int(out[0]), int(out[1])
    assert n == len(boxes)
    assert peak_kb < 1_500_000


@pytest.mark.parametrize("tile,overlap,max_size", [(256, 48, 40), (200, 32, 64)])
def test_overlapping_distinct_objects_stay_distinct(tile, overlap, max_size):
    """Objects that overlap each other (crowns, packed cars seen obliquely): each tile reports every
    object it sees, cut at its edge; the stitched result has each object exactly once."""
    from geodet.pipeline.stitch import stitch_detections
    from geodet.pipeline.grid import TileGrid

    rng = np.random.default_rng(tile)
    w = h = 1500
    xy = rng.uniform(0, w - max_size, (3000, 2))
    wh = rng.uniform(6, max_size, (3000, 2))
    truth = np.hstack([xy, xy + wh])
    grid = TileGrid(w, h, tile, overlap)

    def feeds():
        for t in grid:
            x0, y0, x1, y1 = t.bounds
            sel = truth[(truth[:, 2] > x0) & (truth[:, 0] < x1) & (truth[:, 3] > y0) & (truth[:, 1] < y1)]
            c = np.clip(sel, [x0, y0, x0, y0], [x1, y1, x1, y1]) - [x0, y0, x0, y0]
            yield t, c, np.full(len(c), 0.9), np.zeros(len(c), int)

    out = stitch_detections(grid, feeds())
    dup, miss = match_counts(out.boxes, truth, iou=0.9)
    assert miss == 0
    assert dup == 0 and len(out) == len(truth)


@settings(max_examples=60, deadline=None)
@given(
    w=st.integers(40, 400),
    h=st.integers(40, 400),
    tile=st.integers(24, 160),
    overlap_share=st.floats(0.0, 0.9),
    n=st.integers(2, 80),
    thr=st.sampled_from([0.1, 0.5, 0.9]),
    seed=st.integers(0, 2**31 - 1),
)
def test_seam_candidate_pairs_equal_brute_force(w, h, tile, overlap_share, n, thr, seed):
    """The sort-and-search join finds exactly the pairs an all-pairs loop finds, for any grid,
    including overlaps over half a tile (tiles two apart then share pixels)."""
    from geodet.pipeline.stitch import _candidate_pairs

    grid = TileGrid(w, h, tile, int(overlap_share * tile))
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, grid.n_rows, n).astype(np.int32)
    cols = rng.integers(0, grid.n_cols, n).astype(np.int32)
    x0 = np.asarray(grid.col_offsets)[cols] + rng.uniform(-4, tile, n)
    y0 = np.asarray(grid.row_offsets)[rows] + rng.uniform(-4, tile, n)
    size = rng.uniform(0.5, tile / 2)
    b = np.column_stack([x0, y0, x0 + rng.uniform(size / 2, size, n), y0 + rng.uniform(size / 2, size, n)])
    # half the boxes are shifted copies of others (one object seen by two tiles), at distances
    # around the largest a match allows
    half = n // 2
    shift = rng.uniform(-1, 1, (n - half, 2)) * size
    b[half:] = b[rng.integers(0, half, n - half)] + np.tile(shift, 2)
    lab = rng.integers(0, 2, n)
    tile_id = rows.astype(np.int64) * grid.n_cols + cols

    def window(r, c):
        x, y = grid.col_offsets[c], grid.row_offsets[r]
        return x, y, min(x + tile, w), min(y + tile, h)

    want = {}
    for i in range(n):
        for j in range(i + 1, n):
            if tile_id[i] == tile_id[j] or lab[i] != lab[j]:
                continue
            wi, wj = window(rows[i], cols[i]), window(rows[j], cols[j])
            s = (max(wi[0], wj[0]), max(wi[1], wj[1]), min(wi[2], wj[2]), min(wi[3], wj[3]))
            A = [min(max(v, s[k % 2]), s[2 + k % 2]) for k, v in enumerate(b[i])]
            B = [min(max(v, s[k % 2]), s[2 + k % 2]) for k, v in enumerate(b[j])]
            inter = max(0.0, min(A[2], B[2]) - max(A[0], B[0])) * max(0.0, min(A[3], B[3]) - max(A[1], B[1]))
            union = (A[2] - A[0]) * (A[3] - A[1]) + (B[2] - B[0]) * (B[3] - B[1]) - inter
            if inter > 0 and inter / max(union, 1e-12) >= thr:
                want[(i, j)] = inter / union
    got = _candidate_pairs(b, lab, rows, cols, tile_id, grid, thr)
    got_pairs = {(min(int(i), int(j)), max(int(i), int(j))): iou for i, j, iou in got}
    assert len(got_pairs) == len(got)  # each unordered pair once
    assert set(got_pairs) == set(want)
    for k, v in want.items():
        assert got_pairs[k] == pytest.approx(v)
