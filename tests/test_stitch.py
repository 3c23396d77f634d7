"""Seam exactness when tiles report different boxes for one object.

A perfect per-tile detector reports, for each object it sees in a tile, the box of that object's
*visible* pixels there. Objects are painted one after another, so later ones partly cover earlier
ones: a tile that sees an object whole and a tile that sees it near its edge can then report
different boxes for it even inside the strip both saw, as a real detector does.
"""


import numpy as np
import pytest
from helpers import (
    PerfectDetector,
    match_counts,
    occluded_ids,
    packed_boxes,
    visible_boxes,
    visible_tile_feeds,
    write_id_scene,
    write_ids_geotiff,
)

from geodet.pipeline.scenes import detect_scene
from geodet.pipeline.grid import TileGrid
from geodet.pipeline.stitch import stitch_detections


@pytest.mark.parametrize(
    "side,n,tile,overlap,max_size,seed",
    [
        (1500, 1300, 256, 48, 40, 0),
        (1500, 1600, 200, 40, 40, 1),
        (1600, 1000, 300, 100, 100, 2),  # objects as large as the overlap
        (1200, 900, 512, 64, 64, 3),
        (1400, 1200, 160, 80, 80, 4),  # overlap half a tile
    ],
)
def test_occluded_objects_no_larger_than_overlap_are_exact(side, n, tile, overlap, max_size, seed):
    ids = occluded_ids(side, side, n, 6, max_size, seed=seed)
    _, truth = visible_boxes(ids)
    grid = TileGrid(side, side, tile, overlap)
    out = stitch_detections(grid, visible_tile_feeds(ids, grid))
    assert match_counts(out.boxes, truth, iou=0.9) == (0, 0)
    assert len(out) == len(truth)
    # the case is real: many tiles report, for objects they see in part, boxes that disagree with
    # the owner's inside the strip they share
    seen = sum(len(b) for _, b, _, _ in visible_tile_feeds(ids, grid))
    assert seen > 1.15 * len(truth)


def test_occluded_objects_up_to_twice_the_overlap():
    """The issue's scene: 3000^2, 512 px tiles with 64 px overlap, objects of 6-128 px.
    Objects larger than the overlap can be seen whole by no tile, and their visible parts can
    fall apart; duplicates plus misses stay under 0.2%."""
    ids = occluded_ids(3000, 3000, 2429, 6, 128, seed=1)
    _, truth = visible_boxes(ids)
    grid = TileGrid(3000, 3000, 512, 64)
    out = stitch_detections(grid, visible_tile_feeds(ids, grid))
    dup, miss = match_counts(out.boxes, truth, iou=0.9)
    assert (dup + miss) / len(truth) <= 0.002, (dup, miss, len(truth))


def test_detect_scene_on_occluded_scene_is_exact(tmp_path):
    """The same through the whole pipeline: GeoTIFF, windowed reads, batches, stitcher."""
    ids = occluded_ids(1100, 900, 900, 6, 48, seed=11)
    _, truth = visible_boxes(ids)
    p = write_ids_geotiff(tmp_path / "ids.tif", ids)
    g = detect_scene(p, PerfectDetector(), tile_size=256, overlap=48, num_workers=0, progress=False, batch_size=4)
    assert match_counts(g[["px_x0", "px_y0", "px_x1", "px_y1"]].to_numpy(), truth, iou=0.9) == (0, 0)
    assert len(g) == len(truth)


def test_box_from_a_tile_that_does_not_own_it_survives_when_the_owner_missed_it():
    """Owner tiles miss half their objects: a neighbour that saw such an object whole keeps it
    (once), while objects the owner did report are never doubled."""
    from helpers import packed_boxes

    rng = np.random.default_rng(5)
    truth = packed_boxes(1200, 1000, 6, 40, seed=5).astype(float)
    grid = TileGrid(1200, 1000, 256, 48)
    cx, cy = (truth[:, 0] + truth[:, 2]) / 2, (truth[:, 1] + truth[:, 3]) / 2
    missed_by_owner = rng.random(len(truth)) < 0.5
    seen_whole_elsewhere = np.zeros(len(truth), bool)

    def feeds():
        for t in grid:
            x0, y0, x1, y1 = t.valid
            owns = (cx >= t.core[0]) & (cx < t.core[2]) & (cy >= t.core[1]) & (cy < t.core[3])
            vis = (truth[:, 2] > x0) & (truth[:, 0] < x1) & (truth[:, 3] > y0) & (truth[:, 1] < y1)
            sel = vis & ~(owns & missed_by_owner)
            inside = (truth[:, 0] >= x0) & (truth[:, 2] <= x1) & (truth[:, 1] >= y0) & (truth[:, 3] <= y1)
            seen_whole_elsewhere[inside & ~owns] = True
            c = np.clip(truth[sel], [x0, y0, x0, y0], [x1, y1, x1, y1]) - [x0, y0, x0, y0]
            yield t, c, np.full(len(c), 0.9), np.zeros(len(c), int)

    out = stitch_detections(grid, feeds())
    import torch
    from torchvision.ops import box_iou

    # objects that only other tiles' cut views show may come out as those views: set them aside
    partial_only = missed_by_owner & ~seen_whole_elsewhere
    touches = box_iou(torch.tensor(out.boxes), torch.tensor(truth[partial_only])).numpy().max(1, initial=0) > 0
    expect = ~missed_by_owner | seen_whole_elsewhere
    dup, miss = match_counts(out.boxes[~touches], truth[expect], iou=0.9)
    assert dup == 0 and miss == 0
    assert (missed_by_owner & seen_whole_elsewhere).sum() > 50  # the rule was exercised


@pytest.mark.parametrize(
    "w,h,tile,overlap,max_size",
    [(700, 600, 128, 32, 32), (900, 850, 256, 64, 64), (640, 512, 200, 50, 50), (100, 90, 128, 32, 32), (513, 257, 256, 16, 16)],
)
def test_seams_no_duplicates_no_misses(tmp_path, w, h, tile, overlap, max_size):
    boxes = packed_boxes(w, h, 3, max_size, seed=w)
    p = write_id_scene(tmp_path / "id.tif", boxes, w, h)
    g = detect_scene(p, PerfectDetector(), tile_size=tile, overlap=overlap, num_workers=0, progress=False, batch_size=4)
    pred = g[["px_x0", "px_y0", "px_x1", "px_y1"]].to_numpy()
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
    dup, miss = match_counts(g[["px_x0", "px_y0", "px_x1", "px_y1"]].to_numpy(), boxes, iou=0.9)
    assert (dup + miss) / len(boxes) < 0.01


@pytest.mark.parametrize("tile,overlap,max_size", [(256, 48, 40), (200, 32, 64)])
def test_overlapping_distinct_objects_stay_distinct(tile, overlap, max_size):
    """Objects that overlap each other (crowns, packed cars seen obliquely): each tile reports every
    object it sees, cut at its edge; the stitched result has each object exactly once."""
    from geodet.pipeline.grid import TileGrid
    from geodet.pipeline.stitch import stitch_detections

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


def test_band_stitcher_equals_one_stitcher_row_for_row():
    """CUDA's stitcher (bands of grid rows stitched in threads as their tiles come, the clusters
    of seam boxes they defer reduced as soon as complete) gives one Stitcher's rows exactly: any
    grid, overlap (past half a tile), band heights, threads (bands done out of order), an
    imperfect detector, tiles without detections left out."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from helpers import noisy_tile_views

    from geodet.pipeline.bands import BandStitcher
    from geodet.pipeline.stitch import Stitcher

    @settings(max_examples=40, deadline=None)
    @given(w=st.integers(40, 700), h=st.integers(40, 900), tile=st.integers(32, 200), frac=st.floats(0.0, 0.7),
           rows=st.integers(1, 5), last=st.integers(1, 3), threads=st.integers(1, 3), n=st.integers(0, 400),
           seed=st.integers(0, 2**31))
    def check(w, h, tile, frac, rows, last, threads, n, seed):
        grid = TileGrid(w, h, tile, min(int(tile * frac), tile - 4))
        views = [v for v in noisy_tile_views(grid, seed, n, 1.0) if len(v[1]) or v[0].index % 3]
        one = Stitcher(grid, 0.5)
        bands = BandStitcher(grid, 0.5, rows_per_band=rows, last_rows=last, threads=threads)
        for v in views:
            one.add(*v)
            bands.add(*v)
        a, b = one.finish(), bands.finish()
        assert bands.n_in == one.n_in
        for f in ("boxes", "scores", "labels", "tile_row", "tile_col"):
            assert np.array_equal(getattr(a, f), getattr(b, f)), f

    check()


def test_band_stitcher_reduces_deferred_boxes_before_the_last_tile():
    """What shows after the last tile is the last band and the boxes deferred along its top edge:
    the clusters of deferred boxes that no later band can reach are reduced while tiles still
    come (with everything reduced at the end, a dense scene's whole merge showed)."""
    from helpers import noisy_tile_views

    from geodet.pipeline.bands import BandStitcher
    from geodet.pipeline.stitch import Stitcher

    grid = TileGrid(2400, 2400, 160, 20)
    views = noisy_tile_views(grid, 3, 6000, 1.0)
    one, bands = Stitcher(grid, 0.5), BandStitcher(grid, 0.5, rows_per_band=5, last_rows=2, threads=2)
    assert len(bands.starts) >= 4
    for v in views:
        one.add(*v)
        bands.add(*v)
    bands.wait()
    assert bands.n_deferred > 1000
    assert 0 < bands.open_deferred < 0.3 * bands.n_deferred
    a, b = one.finish(), bands.finish()
    for f in ("boxes", "scores", "labels", "tile_row", "tile_col"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f


def test_band_stitcher_refuses_tiles_out_of_grid_order():
    from geodet.pipeline.bands import BandStitcher

    grid = TileGrid(400, 400, 100, 10)
    st = BandStitcher(grid, 0.5, rows_per_band=1)
    box = np.array([[1.0, 1.0, 5.0, 5.0]])
    st.add(grid.tile(grid.n_cols), box, [0.9], [0])
    with pytest.raises(ValueError, match="grid order"):
        st.add(grid.tile(0), box, [0.9], [0])
    st.close()
