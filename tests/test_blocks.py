"""Detection in blocks of tiles (the engine-neutral core of a distributed run) equals
``detect_scene`` row for row."""

import numpy as np
import pytest
from helpers import PerfectDetector, match_counts, noisy_tile_views, packed_boxes, write_id_scene

from geodet.pipeline.blocks import plan_scene, prepare_detector, reduce_scene, run_block
from geodet.pipeline.scenes import detect_scene
from geodet.pipeline.grid import TileGrid
from geodet.pipeline.stitch import Stitcher, reduce_blocks, stitch_block

COLS = ["px_x0", "px_y0", "px_x1", "px_y1", "score", "label", "tile_row", "tile_col"]


@pytest.mark.parametrize("tile,overlap,block", [(128, 24, 2), (160, 90, 3), (256, 32, 1)])
def test_blocks_then_reduce_equal_detect_scene(tmp_path, tile, overlap, block):
    boxes = packed_boxes(900, 700, 4, overlap or 8, seed=tile)
    scene = write_id_scene(tmp_path / "s.tif", boxes, 900, 700)
    det = PerfectDetector()
    ref = detect_scene(str(scene), det, tile_size=tile, overlap=overlap, score_threshold=0.5, progress=False)
    plan = plan_scene(str(scene), det, block_tiles=block, tile_size=tile, overlap=overlap, score_threshold=0.5)
    assert len(plan.blocks) > 1
    assert sorted(t for b in plan.blocks for t in b.tiles) == list(range(len(plan.grid)))  # each tile once
    results = [run_block(plan, b, det) for b in reversed(plan.blocks)]  # any order, any worker
    got = reduce_scene(plan, results)
    assert len(got) == len(ref)
    for c in COLS:
        assert (got[c].to_numpy() == ref[c].to_numpy()).all(), c
    assert got.geometry.geom_equals(ref.geometry).all()
    dup, miss = match_counts(got[COLS[:4]].to_numpy(), boxes)
    assert (dup, miss) == (0, 0)


def test_blocks_with_a_model_equal_detect_scene(tiny_model, synth):
    from geodet.model import load_model

    model = load_model(tiny_model)
    ref = detect_scene(synth.image, model, progress=False, backend="torch", precision="fp32", score_threshold=0.3)
    plan = plan_scene(synth.image, model, block_tiles=2, backend="torch", precision="fp32", score_threshold=0.3)
    runner = prepare_detector(model, plan)
    got = reduce_scene(plan, [run_block(plan, b, runner) for b in plan.blocks], classes=model.card.classes)
    assert len(got) == len(ref) > 0
    np.testing.assert_array_equal(got[COLS[:4]].to_numpy(), ref[COLS[:4]].to_numpy())
    assert got.attrs["report"]["fingerprint"] == plan.fingerprint


def test_a_missing_block_is_named(tmp_path):
    from geodet.errors import GeodetError

    boxes = packed_boxes(400, 400, 4, 16, seed=1)
    scene = write_id_scene(tmp_path / "s.tif", boxes, 400, 400)
    det = PerfectDetector()
    plan = plan_scene(str(scene), det, block_tiles=1, tile_size=128, overlap=16)
    results = [run_block(plan, b, det) for b in plan.blocks[1:]]
    with pytest.raises(GeodetError, match=r"blocks \[0\] have no result"):
        reduce_scene(plan, results)


def test_blocks_equal_detect_scene_on_random_grids(tmp_path_factory):
    """Property: any grid, overlap (up to more than half a tile) and block size; dense, touching
    boxes. Blocks cover each tile once and the reduce equals one process row for row."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(w=st.integers(90, 520), h=st.integers(90, 520), tile=st.integers(48, 200), frac=st.floats(0.0, 0.6),
           block=st.integers(1, 4), seed=st.integers(0, 10_000))
    def check(w, h, tile, frac, block, seed):
        overlap = min(int(tile * frac), tile - 8)
        d = tmp_path_factory.mktemp("prop")
        boxes = packed_boxes(w, h, 3, max(4, min(overlap, 20)), seed=seed)
        scene = write_id_scene(d / "s.tif", boxes, w, h)
        det = PerfectDetector()
        kw = dict(tile_size=tile, overlap=overlap, score_threshold=0.5)
        ref = detect_scene(str(scene), det, progress=False, **kw)
        plan = plan_scene(str(scene), det, block_tiles=block, **kw)
        assert sorted(t for b in plan.blocks for t in b.tiles) == list(range(len(plan.grid)))
        got = reduce_scene(plan, [run_block(plan, b, det) for b in plan.blocks[::-1]])
        assert len(got) == len(ref)
        for c in COLS:
            assert (got[c].to_numpy() == ref[c].to_numpy()).all(), c

    check()


def _stitch_in_blocks(grid, views, k, rng):
    """Each k x k block stitched on its own from its tiles (in any order), blocks in any order."""
    blocks = []
    for r0 in range(0, grid.n_rows, k):
        for c0 in range(0, grid.n_cols, k):
            r1, c1 = min(r0 + k, grid.n_rows) - 1, min(c0 + k, grid.n_cols) - 1
            own = [v for v in views if r0 <= v[0].row <= r1 and c0 <= v[0].col <= c1]
            rng.shuffle(own)
            blocks.append(stitch_block(grid, (r0, r1), (c0, c1), own, 0.5))
    rng.shuffle(blocks)
    return blocks


def _one_process(grid, views):
    st = Stitcher(grid, 0.5)
    for v in views:
        st.add(*v)
    return st.finish()


def _assert_same(got, ref):
    for f in ("boxes", "scores", "labels", "tile_row", "tile_col"):
        a, b = getattr(got, f), getattr(ref, f)
        assert a.shape == b.shape and (a == b).all(), f


def test_block_stitch_plus_reduce_equals_one_stitcher():
    """Property: an imperfect detector (jitter, misses, partial views, false positives, two
    classes, overlapping objects), any grid, overlap (past half a tile) and block size: each block
    stitched alone, then the reduce of what they deferred, equals one stitcher row for row."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None)
    @given(w=st.integers(40, 700), h=st.integers(40, 700), tile=st.integers(32, 200), frac=st.floats(0.0, 0.7),
           k=st.integers(1, 4), n=st.integers(0, 400), noise=st.floats(0.0, 3.0), seed=st.integers(0, 2**31))
    def check(w, h, tile, frac, k, n, noise, seed):
        grid = TileGrid(w, h, tile, min(int(tile * frac), tile - 4))
        views = noisy_tile_views(grid, seed, n, noise)
        blocks = _stitch_in_blocks(grid, views, k, np.random.default_rng(seed))
        _assert_same(reduce_blocks(grid, blocks, 0.5), _one_process(grid, views))

    check()


@pytest.mark.parametrize("seed", [183, 200, 260, 310, 367, 398, 456, 524])
def test_block_stitch_where_a_moving_object_sees_a_neighbour_better(seed):
    """Cases where an object decided by the reduce (its boxes reach another block) is the better
    view of an object inside one block: the block must leave that one to the reduce as well."""
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(60, 700)), int(rng.integers(60, 700))
    tile = int(rng.integers(32, 200))
    grid = TileGrid(w, h, tile, min(int(tile * rng.uniform(0, 0.7)), tile - 4))
    k = int(rng.integers(1, 4))
    views = noisy_tile_views(grid, seed, int(rng.integers(0, 400)), float(rng.uniform(0, 3)))
    _assert_same(reduce_blocks(grid, _stitch_in_blocks(grid, views, k, rng), 0.5), _one_process(grid, views))


def test_blocks_decide_most_objects_themselves():
    """Blocks of 8 x 8 tiles with a usual overlap keep or merge most detections themselves and
    leave a minority of seam boxes for the reduce to decide, with the same result."""
    grid = TileGrid(4096, 4096, 256, 32)
    views = noisy_tile_views(grid, 3, 15000, 1.0, max_size=30)
    blocks = _stitch_in_blocks(grid, views, 8, np.random.default_rng(0))
    _assert_same(reduce_blocks(grid, blocks, 0.5), _one_process(grid, views))
    n_in = sum(b.n_in for b in blocks)
    decided_in_reduce = sum(int(b.deferred[8].sum()) for b in blocks)
    merged_in_blocks = sum(len(b.merged[0]) for b in blocks)
    assert merged_in_blocks > 0
    assert 0 < decided_in_reduce < 0.4 * n_in


def test_a_chain_around_a_blocks_corner_leaves_its_covered_object_to_the_reduce():
    """A moving object whose boxes reach only a block's top edge can still join, through other
    blocks, boxes past its side edge at any height (above, above-left, left, below-left): the
    union covers an object far below the top, which the reduce must then judge (a per-box
    side test once let the block keep it: a duplicate of the union)."""
    grid = TileGrid(340, 340, 100, 20)
    scene = {(2, 2): [[182, 165, 230, 185]], (1, 2): [[170, 160, 230, 180]], (1, 1): [[100, 160, 180, 180]],
             (2, 1): [[100, 160, 180, 250]], (3, 2): [[190, 243, 220, 249]]}
    views = []
    for t in grid:
        b = np.array(scene.get((t.row, t.col), []), float).reshape(-1, 4) - [t.col_off, t.row_off, t.col_off, t.row_off]
        views.append((t, b, np.full(len(b), 0.9, np.float32), np.zeros(len(b), np.int64)))
    one = _one_process(grid, views)
    assert one.boxes.tolist() == [[100.0, 160.0, 230.0, 250.0]]
    blocks = [stitch_block(grid, (r0, r0 + 1), (c0, c0 + 1),
                           [v for v in views if r0 <= v[0].row <= r0 + 1 and c0 <= v[0].col <= c0 + 1], 0.5)
              for r0 in (0, 2) for c0 in (0, 2)]
    _assert_same(reduce_blocks(grid, blocks, 0.5), one)
