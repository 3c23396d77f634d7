import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geodet import GeodetError
from geodet.pipeline.grid import TileGrid, overlap_pixels


@settings(max_examples=200, deadline=None)
@given(w=st.integers(1, 3000), h=st.integers(1, 3000), tile=st.integers(8, 700), frac=st.floats(0, 0.9))
def test_grid_covers_and_cores_partition(w, h, tile, frac):
    overlap = int(tile * frac)
    # at most ~150 tiles a side: more only repeats the same steps (and half a million small
    # windows took most of this test's time)
    step = max(1, tile - overlap)
    cap = tile + 150 * step
    w, h = (v if v <= cap else cap + (v - tile) % step for v in (w, h))  # the same remainder: uneven spacing kept
    g = TileGrid(w, h, tile, overlap)
    wins = list(g.windows())
    assert all(t.width == t.height == tile for t in wins)
    # the windows are every column span with every row span, so covering and partitioning the
    # scene is covering and partitioning each axis
    col = {t: (t.col_off, t.valid[0], t.valid[2], t.core[0], t.core[2]) for t in wins}
    row = {t: (t.row_off, t.valid[1], t.valid[3], t.core[1], t.core[3]) for t in wins}
    cols, rows = sorted(set(col.values())), sorted(set(row.values()))
    assert len(wins) == len(cols) * len(rows) == len({(col[t], row[t]) for t in wins})
    for spans, size in ((cols, w), (rows, h)):
        cover, core = np.zeros(size, np.int32), np.zeros(size, np.int32)
        for off, v0, v1, c0, c1 in spans:
            assert 0 <= v0 <= c0 < c1 <= v1 <= size  # a core, not empty, inside its tile's part of the scene
            if size >= tile:
                assert off + tile <= size  # last tiles moved inside, never padded
            cover[v0:v1] += 1
            core[c0:c1] += 1
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
