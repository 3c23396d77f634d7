"""The seam merge's parts: which boxes of neighbouring tiles are one object (candidate pairs in
the region both tiles saw, mutual best matches, components with one box per tile), and which
merged objects are partial views of an object another tile saw better.

All joins are vectorised sort-and-search or STRtree queries: the cost follows local density,
never n^2.
"""

from __future__ import annotations

import numpy as np

from .grid import TileGrid

COVER = 0.5  # a box is inside another when at least this share of its area lies in it


def _search(a: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``np.searchsorted(a, v)``, the queries sorted first where there are many: numpy's binary
    search is about 10x faster on sorted queries (it starts each from the last)."""
    if len(v) < 4096:
        return np.searchsorted(a, v)
    order = np.argsort(v, kind="stable")
    out = np.empty(len(v), np.intp)
    out[order] = np.searchsorted(a, v[order])
    return out


def tile_windows(grid: TileGrid, rows, cols) -> np.ndarray:
    """Each box's tile window (x0, y0, x1, y1), clipped to the scene."""
    x0 = np.asarray(grid.col_offsets, np.float64)[cols]
    y0 = np.asarray(grid.row_offsets, np.float64)[rows]
    return np.column_stack([x0, y0, np.minimum(x0 + grid.tile_size, grid.width), np.minimum(y0 + grid.tile_size, grid.height)])


def inside(boxes, windows, eps: float = 1e-6) -> np.ndarray:
    return np.all(boxes[:, :2] >= windows[:, :2] - eps, axis=1) & np.all(boxes[:, 2:] <= windows[:, 2:] + eps, axis=1)


def _windows_holding(boxes: np.ndarray, grid: TileGrid):
    """The tiles whose windows hold each box whole, as ranges ``(first_col, last_col, first_row,
    last_row)`` (windows along an axis are sorted, so those holding an interval are consecutive)."""
    out = []
    for lo_col, hi_col, offsets, length in ((0, 2, grid.col_offsets, grid.width), (1, 3, grid.row_offsets, grid.height)):
        off = np.asarray(offsets, np.float64)
        end = np.minimum(off + grid.tile_size, length)
        out.append(np.searchsorted(end, boxes[:, hi_col] - 1e-6, side="left"))
        out.append(np.searchsorted(off, boxes[:, lo_col] + 1e-6, side="right") - 1)
    return out


def _n_windows_holding(boxes: np.ndarray, grid: TileGrid) -> np.ndarray:
    c0, c1, r0, r1 = _windows_holding(boxes, grid)
    return np.maximum(c1 - c0 + 1, 0) * np.maximum(r1 - r0 + 1, 0)


def seen_better(rep, out_b, comp, comp_owned, b, lab, tile_id, owned, win, best, grid: TileGrid) -> np.ndarray:
    """True for each merged object (representative ``rep``, box ``out_b``) that is a partial view
    of an object another tile reported better: a tile that reported none of the merged boxes,
    though it saw the object's whole box, reported a box there that it owns (its centre lies in
    that tile's core), and that box's merged object is at least as large and holds most of this
    one (``COVER``). A box's visible part can depend on pixels outside the strip two tiles share
    (an object partly covered by another), so such views need not agree inside the strip.

    An object that no tile owns whole (its centre lies in another tile's core, or it is cut) goes
    to any such object. One that some tile owns whole goes only to one reaching past the window
    of its representative's tile (that tile then saw only part of the object), from a tile where
    the representative had no other match candidate (that tile did not report it separately).
    """
    import shapely

    n_tiles = len(grid)
    gone = np.zeros(len(rep), bool)
    slot = np.full(int(comp.max()) + 1, -1)
    slot[comp[rep]] = np.arange(len(rep))
    # Only an object inside the window of a tile that reported none of its boxes can be seen
    # better, and most objects are in no such window: find those first, cheaply.
    holders = np.bincount(slot[comp], weights=inside(out_b[slot[comp]], win), minlength=len(rep))
    q = np.flatnonzero(_n_windows_holding(out_b, grid) > holders + 0.5)
    if len(q) == 0:
        return gone
    # candidates: owned boxes of the tiles whose windows hold a queried object (a 2-D prefix sum
    # over each query's block of tiles)
    c0, c1, r0, r1 = _windows_holding(out_b[q], grid)
    diff = np.zeros((grid.n_rows + 1, grid.n_cols + 1), np.int64)
    for rr, cc, sign in ((r0, c0, 1), (r0, c1 + 1, -1), (r1 + 1, c0, -1), (r1 + 1, c1 + 1, 1)):
        np.add.at(diff, (rr, cc), sign)
    near = (diff.cumsum(0).cumsum(1)[: grid.n_rows, : grid.n_cols] > 0).ravel()
    cand = np.flatnonzero(owned & near[tile_id])
    if len(cand) == 0:
        return gone
    # one candidate per (merged object, tile): the merged object each owned box belongs to
    vbox = out_b[slot[comp[cand]]]
    area = (out_b[:, 2] - out_b[:, 0]) * (out_b[:, 3] - out_b[:, 1])
    # a box holding half of another's area holds its centre (each side of their intersection is
    # at least half the other's side), so candidates are the boxes around each queried centre
    tree = shapely.STRtree(shapely.box(*vbox.T))
    centres = shapely.points((out_b[q, 0] + out_b[q, 2]) / 2, (out_b[q, 1] + out_b[q, 3]) / 2)
    qi, ci = tree.query(centres, predicate="intersects")
    qi = q[qi]
    v = cand[ci]
    r = rep[qi]
    c, d = comp[r], comp[v]
    # cheap tests first: same class, another object, at least as large
    area_o, area_v = area[qi], area[slot[d]]
    ok = (lab[r] == lab[v]) & (d != c) & ((area_v > area_o) | ((area_v == area_o) & (d < c)))
    qi, v, r, c, area_o = qi[ok], v[ok], r[ok], c[ok], area_o[ok]
    # the covering box's tile reported none of the merged boxes
    member = np.sort(comp * n_tiles + tile_id)
    code = c * n_tiles + tile_id[v]
    pos = np.clip(_search(member, code), 0, len(member) - 1)
    ok = member[pos] != code
    qi, v, r, c, area_o = qi[ok], v[ok], r[ok], c[ok], area_o[ok]
    o, vb = out_b[qi], out_b[slot[comp[v]]]
    inter = np.clip(np.minimum(o[:, 2], vb[:, 2]) - np.maximum(o[:, 0], vb[:, 0]), 0, None) * np.clip(
        np.minimum(o[:, 3], vb[:, 3]) - np.maximum(o[:, 1], vb[:, 1]), 0, None
    )
    ok = (inter >= COVER * area_o) & inside(o, win[v])
    beyond = ~inside(vb, win[r])
    key = r * n_tiles + tile_id[v]
    if len(best[0]):
        pos = np.clip(_search(best[0], key), 0, len(best[0]) - 1)
        other = (best[0][pos] == key) & (best[1][pos] != v)
    else:
        other = np.zeros(len(key), bool)
    ok &= ~comp_owned[c] | (beyond & ~other)
    gone[qi[ok]] = True
    return gone


def _reach(offsets, tile_size: int) -> int:
    """How many tiles apart two tiles along an axis can be and still share pixels."""
    off = np.asarray(offsets, np.int64)
    k = 0
    while k + 1 < len(off) and (off[k + 1 :] - off[: -(k + 1)]).min() < tile_size:
        k += 1
    return k


def candidate_pairs(b, lab, rows, cols, tile_id, grid: TileGrid, thr: float) -> np.ndarray:
    """Rows (i, j, iou) for every pair of boxes from different tiles and the same class that
    agree where both tiles looked: clipped to the intersection of their two tile windows, they
    intersect and their IoU is at least ``thr``. Each unordered pair appears once.

    One object gives the same box there whether a tile saw it whole or cut at its edge, while
    two distinct objects, even overlapping ones, do not.

    Tile pairs are taken one direction at a time (right, down-left, down, down-right, and further
    when the overlap is over half a tile). In a direction each box has one shared window and one
    clipped box; candidates are the partner tile's clipped boxes of the same class in the 3 x 3
    neighbouring cells of a grid whose cell bounds the centre distance of any pair with IoU >=
    ``thr``. Joins are vectorised sort-and-search: the cost follows local density, never n^2.
    """
    if len(b) < 2:
        return np.zeros((0, 3))
    kr, kc = _reach(grid.row_offsets, int(grid.tile_size)), _reach(grid.col_offsets, int(grid.tile_size))
    pairs = []
    for dr in range(0, kr + 1):
        for dc in range(-kc, kc + 1):
            if dr == 0 and dc <= 0:
                continue
            pairs += _direction_pairs(b, lab, rows, cols, tile_id, grid, thr, dr, dc)
    return np.concatenate(pairs) if pairs else np.zeros((0, 3))


def _shared_windows(grid: TileGrid, r, c, dr: int, dc: int) -> np.ndarray:
    """Per box, the window that tiles (r, c) and (r + dr, c + dc) both saw."""
    ts = int(grid.tile_size)
    col_off = np.asarray(grid.col_offsets, np.float64)
    row_off = np.asarray(grid.row_offsets, np.float64)
    x0 = np.maximum(col_off[c], col_off[c + dc])
    y0 = np.maximum(row_off[r], row_off[r + dr])
    x1 = np.minimum(np.minimum(col_off[c], col_off[c + dc]) + ts, grid.width)
    y1 = np.minimum(np.minimum(row_off[r], row_off[r + dr]) + ts, grid.height)
    return np.column_stack([x0, y0, x1, y1])


def _reaching(b, idx, grid: TileGrid, r, c, dr: int, dc: int):
    """Of the boxes ``idx`` (tile (``r``, ``c``) paired with its partner at (+dr, +dc)), those
    overlapping the window both tiles saw: the ones ``_clipped`` keeps, in their order, found
    with cheap 1-D tests before any window is built."""
    ts = int(grid.tile_size)
    col_off = np.asarray(grid.col_offsets, np.float64)
    row_off = np.asarray(grid.row_offsets, np.float64)
    a, p = col_off[c], col_off[c + dc]
    bx = b[idx]
    keep = (bx[:, 2] > np.maximum(a, p)) & (bx[:, 0] < np.minimum(np.minimum(a, p) + ts, grid.width))
    a, p = row_off[r], row_off[r + dr]
    keep &= (bx[:, 3] > np.maximum(a, p)) & (bx[:, 1] < np.minimum(np.minimum(a, p) + ts, grid.height))
    return idx[keep]


def _clipped(b, idx, win):
    """Boxes ``idx`` clipped to their windows ``win``; those left with no area dropped."""
    cb = np.minimum(np.maximum(b[idx], np.tile(win[:, :2], 2)), np.tile(win[:, 2:], 2))
    ok = (cb[:, 2] > cb[:, 0]) & (cb[:, 3] > cb[:, 1])
    return idx[ok], cb[ok], win[ok]


def _direction_pairs(b, lab, rows, cols, tile_id, grid: TileGrid, thr: float, dr: int, dc: int) -> list:
    """``candidate_pairs`` between each tile and its partner at (+dr, +dc), in no particular order
    (the merge's choices depend on box order alone: ``mutual_best``). The join runs on grids per
    size class (``_size_class_matches``): one grid sized by the longest box made its cells large
    and the join near-quadratic along the strips."""
    g = grid
    # side a: boxes whose tile has a partner at (+dr, +dc); side b: at (-dr, -dc)
    ia = np.flatnonzero((rows + dr < g.n_rows) & (cols + dc >= 0) & (cols + dc < g.n_cols))
    ib = np.flatnonzero((rows - dr >= 0) & (cols - dc >= 0) & (cols - dc < g.n_cols))
    ia = _reaching(b, ia, g, rows[ia], cols[ia], dr, dc)  # most seam boxes are in another strip
    ib = _reaching(b, ib, g, rows[ib] - dr, cols[ib] - dc, dr, dc)
    if len(ia) == 0 or len(ib) == 0:
        return []
    ia, ca, wa = _clipped(b, ia, _shared_windows(g, rows[ia], cols[ia], dr, dc))
    ib, cb, wb = _clipped(b, ib, _shared_windows(g, rows[ib] - dr, cols[ib] - dc, dr, dc))  # the pair's a-side tile
    if len(ia) == 0 or len(ib) == 0:
        return []
    n_labels = int(lab.max()) + 1
    C = int(g.tile_size) + 3  # cells per axis inside a shared window (cell >= 1 px), with a margin each side
    ga = tile_id[ia] * n_labels + lab[ia]  # (pair, class) of each box
    gb = (tile_id[ib] - (dr * g.n_cols + dc)) * n_labels + lab[ib]
    ai, bj, iou = _size_class_matches(ca, cb, wa, wb, ga, gb, thr, C)
    if len(ai) == 0:
        return []
    return [np.column_stack([ia[ai], ib[bj], iou])]


def _size_class_matches(ca, cb, wa, wb, ga, gb, thr: float, C: int):
    """``(a index, b index, iou)`` of the clipped boxes ``ca`` and ``cb`` of one group (``ga``,
    ``gb``) that intersect with IoU >= ``thr``, in no particular order.

    IoU >= t needs, on each axis, an overlap of at least t times the longer side: the sides
    differ by less than a factor 1/t, and the centres by at most (1 - t) times the longer side.
    So boxes go in size classes a factor R >= 1/t wide (longest side), partners are in the same
    or a neighbouring class, and a grid per class k, with cells (1 - t) times the longest side
    in classes up to k, puts partners of classes k and k - 1 in neighbouring cells. Each b box is
    in its class's grid twice, as itself and as a partner of the class above."""
    slack = 1.0 - min(max(float(thr), 0.0), 1.0)
    sa = np.max(ca[:, 2:] - ca[:, :2], axis=1)
    sb = np.max(cb[:, 2:] - cb[:, :2], axis=1)
    r = max(1.001 / max(float(thr), 1e-9), 1.1)
    lo = np.log(max(min(sa.min(), sb.min()), 1e-12))

    def size_class(sides):
        return np.floor((np.log(np.maximum(sides, 1e-12)) - lo) / np.log(r)).astype(np.int64)

    la, lb = size_class(sa), size_class(sb)
    nk = int(max(la.max(), lb.max())) + 2
    top = np.zeros(nk)
    np.maximum.at(top, la, sa)
    np.maximum.at(top, lb, sb)
    cell = np.maximum(slack * np.maximum.accumulate(top) * 1.001 + 1e-9, 1.0)  # cell of class k's grid

    def keys(cbox, win, group, k, kind):
        cx = np.floor(((cbox[:, 0] + cbox[:, 2]) / 2 - win[:, 0]) / cell[k]).astype(np.int64) + 1
        cy = np.floor(((cbox[:, 1] + cbox[:, 3]) / 2 - win[:, 1]) / cell[k]).astype(np.int64) + 1
        return ((((group * nk + k) * 2 + kind) * C + cy) * C + cx)

    kb = np.concatenate([keys(cb, wb, gb, lb, 0), keys(cb, wb, gb, lb + 1, 1)])  # as itself; for the class above
    owner = np.concatenate([np.arange(len(cb)), np.arange(len(cb))])
    order = np.argsort(kb, kind="stable")
    kb_sorted, owner = kb[order], owner[order]
    out_a, out_b, out_iou = [], [], []
    for k, kind in ((la, 0), (la, 1), (la + 1, 0)):  # b in a's class, the class below, the class above
        base = keys(ca, wa, ga, k, kind)
        by_key = np.argsort(base, kind="stable")  # sorted queries: numpy's search is ~10x faster on them
        base = base[by_key]
        for dy in (-1, 0, 1):
            row = base + dy * C
            first = np.searchsorted(kb_sorted, row - 1, side="left")
            counts = np.searchsorted(kb_sorted, row + 1, side="right") - first
            total = int(counts.sum())
            if total == 0:
                continue
            ai = np.repeat(by_key, counts)
            bj = owner[np.repeat(first - (np.cumsum(counts) - counts), counts) + np.arange(total)]
            A, B = ca[ai], cb[bj]
            inter = np.clip(np.minimum(A[:, 2], B[:, 2]) - np.maximum(A[:, 0], B[:, 0]), 0, None) * np.clip(
                np.minimum(A[:, 3], B[:, 3]) - np.maximum(A[:, 1], B[:, 1]), 0, None
            )
            union = (A[:, 2] - A[:, 0]) * (A[:, 3] - A[:, 1]) + (B[:, 2] - B[:, 0]) * (B[:, 3] - B[:, 1]) - inter
            iou = inter / np.maximum(union, 1e-12)
            ok = (inter > 0) & (iou >= thr)
            out_a.append(ai[ok])
            out_b.append(bj[ok])
            out_iou.append(iou[ok])
    if not out_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_iou)


def mutual_best(n: int, p: np.ndarray, tile_id, n_tiles: int):
    """From candidate pairs ``p`` (``candidate_pairs``): the edges (i, j) between boxes that are
    one object, i.e. each other's best candidate in the other's tile, so overlapping distinct
    objects never chain together, with their IoUs; and each box's best candidate per other tile,
    as sorted keys ``i * n_tiles + tile`` with the partner index."""
    if len(p) == 0:
        empty = np.zeros(0, np.int64)
        return np.zeros((0, 2), np.int64), np.zeros(0), (empty, empty)
    p = np.concatenate([p, p[:, [1, 0, 2]]])  # both directions
    i, j, w = p[:, 0].astype(np.int64), p[:, 1].astype(np.int64), p[:, 2]
    # equal IoUs go to the partner first in add order: the order of any subset of the boxes (a
    # block's, a cluster's), so the pairs' own order never decides
    order = np.lexsort((j, -w, tile_id[j], i))
    i, j, w = i[order], j[order], w[order]
    first = np.ones(len(i), bool)
    first[1:] = (i[1:] != i[:-1]) | (tile_id[j][1:] != tile_id[j][:-1])
    bi, bj = i[first], j[first]
    best_key = bi * n_tiles + tile_id[bj]  # sorted: bi, then tile
    # mutual: (a, c) and (c, a) both best; find by sorting encoded pairs
    code = bi * n + bj
    rev = bj * n + bi
    sorted_code = np.sort(code)
    pos = np.clip(_search(sorted_code, rev), 0, len(sorted_code) - 1)
    mutual = (sorted_code[pos] == rev) & (bi < bj)
    edges = np.column_stack([bi[mutual], bj[mutual]]).astype(np.int64)
    return edges, w[first][mutual], (best_key, bj)


def components(n: int, edges: np.ndarray) -> np.ndarray:
    """Connected components (label = smallest member index) by vectorised label propagation."""
    comp = np.arange(n)
    if len(edges) == 0:
        return comp
    i, j = edges[:, 0], edges[:, 1]
    while True:
        m = np.minimum(comp[i], comp[j])
        new = comp.copy()
        np.minimum.at(new, i, m)
        np.minimum.at(new, j, m)
        new = new[new]  # pointer jumping
        if np.array_equal(new, comp):
            return comp
        comp = new


def one_box_per_tile(comp: np.ndarray, edges: np.ndarray, weights: np.ndarray, tile_id: np.ndarray) -> np.ndarray:
    """A tile reports an object once, so a component holding two boxes of one tile joins two
    objects through a chain of pairs (e.g. fragments meeting in a diagonal neighbour's corner).
    Such components (rare) are rebuilt greedily from their best pairs, never joining two groups
    that share a tile; the others stay as they are."""
    if len(edges) == 0:
        return comp
    linked = np.flatnonzero(np.bincount(comp, minlength=len(comp))[comp] > 1)
    n_tiles = int(tile_id.max()) + 1
    key = np.sort(comp[linked] * n_tiles + tile_id[linked])
    bad = np.unique(key[1:][key[1:] == key[:-1]] // n_tiles)
    if len(bad) == 0:
        return comp
    comp = comp.copy()
    in_bad = np.isin(comp[edges[:, 0]], bad) if len(edges) else np.zeros(0, bool)
    sel = np.flatnonzero(in_bad)
    sel = sel[np.argsort(-weights[sel], kind="stable")]
    nodes = np.flatnonzero(np.isin(comp, bad))
    parent = {int(i): int(i) for i in nodes}
    tiles = {int(i): {int(tile_id[i])} for i in nodes}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for e in sel:
        a, b = root(int(edges[e, 0])), root(int(edges[e, 1]))
        if a != b and not (tiles[a] & tiles[b]):
            a, b = min(a, b), max(a, b)
            parent[b] = a
            tiles[a] |= tiles.pop(b)
    for i in nodes:
        comp[i] = root(int(i))
    return comp
