
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geodet.pipeline.grid import TileGrid


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
    from geodet.pipeline.seams import candidate_pairs

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
    got = candidate_pairs(b, lab, rows, cols, tile_id, grid, thr)
    got_pairs = {(min(int(i), int(j)), max(int(i), int(j))): iou for i, j, iou in got}
    assert len(got_pairs) == len(got)  # each unordered pair once
    assert set(got_pairs) == set(want)
    for k, v in want.items():
        assert got_pairs[k] == pytest.approx(v)
