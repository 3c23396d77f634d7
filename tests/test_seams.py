
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


def _direction_pairs_one_grid(b, lab, rows, cols, tile_id, grid, thr, dr, dc):
    """The seam join as it was before size classes: one grid (cells from the longest side of all
    boxes), one search per neighbouring cell. The reference for the pairs and their order, which
    the merge's tie-breaking follows."""
    from geodet.pipeline.seams import _clipped, _shared_windows

    g = grid
    ia = np.flatnonzero((rows + dr < g.n_rows) & (cols + dc >= 0) & (cols + dc < g.n_cols))
    ib = np.flatnonzero((rows - dr >= 0) & (cols - dc >= 0) & (cols - dc < g.n_cols))
    if len(ia) == 0 or len(ib) == 0:
        return []
    ia, ca, wa = _clipped(b, ia, _shared_windows(g, rows[ia], cols[ia], dr, dc))
    ib, cb, wb = _clipped(b, ib, _shared_windows(g, rows[ib] - dr, cols[ib] - dc, dr, dc))
    if len(ia) == 0 or len(ib) == 0:
        return []
    n_labels = int(lab.max()) + 1
    C = int(g.tile_size) + 3
    slack = 1.0 - min(max(float(thr), 0.0), 1.0)
    side = max(np.max(ca[:, 2:] - ca[:, :2]), np.max(cb[:, 2:] - cb[:, :2]))
    cell = max(slack * float(side) * 1.001 + 1e-9, 1.0)

    def keys(cbox, win, pair, labels):
        cx = np.floor(((cbox[:, 0] + cbox[:, 2]) / 2 - win[:, 0]) / cell).astype(np.int64) + 1
        cy = np.floor(((cbox[:, 1] + cbox[:, 3]) / 2 - win[:, 1]) / cell).astype(np.int64) + 1
        return ((pair * n_labels + labels) * C + cy) * C + cx

    ka = keys(ca, wa, tile_id[ia], lab[ia])
    kb = keys(cb, wb, tile_id[ib] - (dr * g.n_cols + dc), lab[ib])
    return [np.column_stack([ia[ai], ib[bj], iou]) for ai, bj, iou in _nine_searches(ka, kb, ca, cb, C, thr)]


def _nine_searches(ka, kb, ca, cb, C, thr):
    order = np.argsort(kb, kind="stable")
    kb_sorted = kb[order]
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            target = ka + dy * C + dx
            lo = np.searchsorted(kb_sorted, target, side="left")
            counts = np.searchsorted(kb_sorted, target, side="right") - lo
            total = int(counts.sum())
            if total == 0:
                continue
            start = lo - (np.cumsum(counts) - counts)
            ai = np.repeat(np.arange(len(ka)), counts)
            bj = order[np.repeat(start, counts) + np.arange(total)]
            A, B = ca[ai], cb[bj]
            inter = np.clip(np.minimum(A[:, 2], B[:, 2]) - np.maximum(A[:, 0], B[:, 0]), 0, None) * np.clip(
                np.minimum(A[:, 3], B[:, 3]) - np.maximum(A[:, 1], B[:, 1]), 0, None)
            union = (A[:, 2] - A[:, 0]) * (A[:, 3] - A[:, 1]) + (B[:, 2] - B[:, 0]) * (B[:, 3] - B[:, 1]) - inter
            iou = inter / np.maximum(union, 1e-12)
            ok = (inter > 0) & (iou >= thr)
            if ok.any():
                yield ai[ok], bj[ok], iou[ok]


@pytest.mark.parametrize("seed,tile,overlap,max_size", [(0, 128, 24, 30), (1, 96, 60, 40), (2, 64, 8, 12)])
def test_seam_pairs_equal_the_one_grid_join_and_their_order_decides_nothing(monkeypatch, seed, tile, overlap,
                                                                           max_size):
    """The same pairs and IoUs as the join on one grid (the false positives here reach half a
    tile, so that grid's cells are large); and the stitched rows do not depend on the order the
    pairs come in (ties go by box order), which lets a block or a cluster merge apart."""
    from helpers import noisy_tile_views

    import geodet.pipeline.seams as seams
    import geodet.pipeline.stitch as stitch

    grid = TileGrid(700, 520, tile, overlap)
    st = stitch.Stitcher(grid, 0.5)
    for v in noisy_tile_views(grid, seed, 2500, 1.0, max_size=max_size):
        st.add(*v)
    b, _, lab, rows, cols = st.seam_boxes()[:5]
    tile_id = rows.astype(np.int64) * grid.n_cols + cols
    got = seams.candidate_pairs(b, lab, rows, cols, tile_id, grid, 0.5)
    before = st.finish()
    with monkeypatch.context() as mp:
        mp.setattr(seams, "_direction_pairs", _direction_pairs_one_grid)
        want = seams.candidate_pairs(b, lab, rows, cols, tile_id, grid, 0.5)
    assert len(want) > 500 and len(got) == len(want)
    key = lambda p: {(int(i), int(j)): w for i, j, w in p}  # noqa: E731
    assert key(got) == pytest.approx(key(want))
    shuffled = seams.candidate_pairs

    def candidate_pairs(*a, **k):
        p = shuffled(*a, **k)
        return p[np.random.default_rng(seed).permutation(len(p))]

    monkeypatch.setattr(stitch, "candidate_pairs", candidate_pairs)
    after = st.finish()
    for f in ("boxes", "scores", "labels", "tile_row", "tile_col"):
        assert np.array_equal(getattr(before, f), getattr(after, f)), f


def test_equal_ious_go_to_the_partner_first_in_box_order():
    """Two partners with exactly the same IoU: the match is the box first in add order, whatever
    else is in the scene (a far-away tall box once changed the pairs' order, and with it the
    match, between one stitcher and the bands)."""
    from geodet.pipeline.bands import BandStitcher
    from geodet.pipeline.stitch import Stitcher

    grid = TileGrid(160, 600, 100, 40)
    scene = {(0, 0): [[70, 60, 90, 80]], (0, 1): [[72, 60, 92, 80], [68, 60, 88, 80]],
             (grid.n_rows - 1, 0): [[60, 500, 100, 600]]}
    views = []
    for t in grid:
        b = np.array(scene.get((t.row, t.col), []), float).reshape(-1, 4) - [t.col_off, t.row_off, t.col_off, t.row_off]
        views.append((t, b, np.full(len(b), 0.9, np.float32), np.zeros(len(b), np.int64)))
    one = Stitcher(grid)
    for v in views:
        one.add(*v)
    a = one.finish()
    # (70..90) matches both (72..92) and (68..88) with the same IoU: the first of them, 72..92
    assert sorted(a.boxes[:, 0].tolist()) == [60.0, 68.0, 72.0]
    for rows in (1, 2, 4):
        bands = BandStitcher(grid, 0.5, rows_per_band=rows, threads=1)
        for v in views:
            bands.add(*v)
        b = bands.finish()
        assert np.array_equal(a.boxes, b.boxes), rows
