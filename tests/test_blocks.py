"""Detection in blocks of tiles (the engine-neutral core of a distributed run) equals
``detect_scene`` row for row."""

import numpy as np
import pytest
from helpers import PerfectDetector, match_counts, packed_boxes, write_id_scene

from geodet.pipeline.blocks import plan_scene, prepare_detector, reduce_scene, run_block
from geodet.pipeline.detect import detect_scene

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
