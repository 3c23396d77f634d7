"""Merging tile detections into scene detections: core ownership plus a seam-only merge.

Each detection belongs to the tile whose core holds its box centre; when objects are no larger
than the overlap that keeps each object exactly once, in O(n). Boxes cut by an internal tile edge,
and whole boxes near a seam, also enter a merge that runs only among seam boxes, in spatial
buckets, per class. Two boxes from different tiles are one object when they agree inside the
region both tiles saw (IoU of the boxes clipped to the two windows' intersection): a fragment cut
at one tile's edge and the neighbour's whole box coincide there, while distinct objects, even
overlapping ones, do not. Links are mutual best matches between tiles. A cut fragment is dropped
when a whole box of the same object exists; fragments with no whole box are joined into one box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tiling import Tile, TileGrid

EDGE_EPS = 1.0  # a box within this many pixels of an internal tile edge is cut by it


@dataclass
class SceneDetections:
    boxes: np.ndarray  # [N, 4] float64 pixel-edge boxes in scene coordinates
    scores: np.ndarray  # [N] float32
    labels: np.ndarray  # [N] int64
    tile_row: np.ndarray  # [N] int32
    tile_col: np.ndarray  # [N] int32

    def __len__(self) -> int:
        return len(self.scores)


class Stitcher:
    """Receives each tile's detections as it is done; ``finish()`` gives the scene's."""

    def __init__(self, grid: TileGrid, match_iou: float = 0.5):
        self.grid = grid
        self.match_iou = match_iou
        self._final: list[tuple] = []
        self._seam: list[tuple] = []  # (boxes, scores, labels, rows, cols, whole, owned)
        self.n_in = 0

    def add(self, tile: Tile, boxes, scores, labels) -> None:
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        n = len(boxes)
        self.n_in += n
        if n == 0:
            return
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        g = self.grid
        vx0, vy0, vx1, vy1 = tile.valid
        b = boxes + [tile.col_off, tile.row_off, tile.col_off, tile.row_off]
        # Nothing past the scene edge (padded tiles).
        np.clip(b[:, 0::2], vx0, vx1, out=b[:, 0::2])
        np.clip(b[:, 1::2], vy0, vy1, out=b[:, 1::2])
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        b, scores, labels = b[keep], scores[keep], labels[keep]
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        cx0, cy0, cx1, cy1 = tile.core
        owned = (cx >= cx0) & (cx < cx1) & (cy >= cy0) & (cy < cy1)
        # Which edges of this tile face another tile, and which boxes they cut.
        left, top = tile.col > 0, tile.row > 0
        right, bottom = tile.col < g.n_cols - 1, tile.row < g.n_rows - 1
        x_end, y_end = tile.col_off + tile.width, tile.row_off + tile.height
        cut = np.zeros(len(b), bool)
        if left:
            cut |= b[:, 0] <= tile.col_off + EDGE_EPS
        if top:
            cut |= b[:, 1] <= tile.row_off + EDGE_EPS
        if right:
            cut |= b[:, 2] >= x_end - EDGE_EPS
        if bottom:
            cut |= b[:, 3] >= y_end - EDGE_EPS
        # Boxes reaching into a strip this tile shares with a neighbour can meet that
        # neighbour's copy there (strips can be wider than ``overlap`` with even spacing).
        near = np.zeros(len(b), bool)
        if left:
            near |= b[:, 0] < g.col_offsets[tile.col - 1] + g.tile_size
        if top:
            near |= b[:, 1] < g.row_offsets[tile.row - 1] + g.tile_size
        if right:
            near |= b[:, 2] > g.col_offsets[tile.col + 1]
        if bottom:
            near |= b[:, 3] > g.row_offsets[tile.row + 1]
        whole = ~cut
        rows = np.full(len(b), tile.row, np.int32)
        cols = np.full(len(b), tile.col, np.int32)
        final = whole & owned & ~near
        # Whole boxes centred in another core always reach into a shared strip, so they meet
        # the owner's copy in the merge (and stand alone only where the owner missed them).
        seam = ~final
        if final.any():
            self._final.append((b[final], scores[final], labels[final], rows[final], cols[final]))
        if seam.any():
            self._seam.append(
                (b[seam], scores[seam], labels[seam], rows[seam], cols[seam], whole[seam], owned[seam])
            )

    def finish(self) -> SceneDetections:
        parts = list(self._final)
        if self._seam:
            parts.append(self._merge_seams())
        if not parts:
            return SceneDetections(
                np.zeros((0, 4)), np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32)
            )
        cat = [np.concatenate([p[i] for p in parts]) for i in range(5)]
        return SceneDetections(*cat)

    def _merge_seams(self):
        b, s, lab, rows, cols, whole, owned = (np.concatenate([p[i] for p in self._seam]) for i in range(7))
        n = len(b)
        tile_id = rows.astype(np.int64) * self.grid.n_cols + cols
        edges = _overlapping_pairs(b, lab, rows, cols, tile_id, self.grid, self.match_iou)
        comp = _components(n, edges)
        # Per component: the best whole box that some tile owns, else the best whole box,
        # else the union of the fragments.
        order = np.lexsort((-s, ~owned, ~whole, comp))
        first = np.ones(n, bool)
        first[1:] = comp[order][1:] != comp[order][:-1]
        rep = order[first]
        rep_comp = comp[rep]
        out_b = b[rep].copy()
        out_s = s[rep].copy()
        frag = ~whole[rep]
        if frag.any():
            ux0 = np.full(comp.max() + 1, np.inf)
            uy0 = np.full(comp.max() + 1, np.inf)
            ux1 = np.full(comp.max() + 1, -np.inf)
            uy1 = np.full(comp.max() + 1, -np.inf)
            smax = np.full(comp.max() + 1, -np.inf, np.float32)
            np.minimum.at(ux0, comp, b[:, 0])
            np.minimum.at(uy0, comp, b[:, 1])
            np.maximum.at(ux1, comp, b[:, 2])
            np.maximum.at(uy1, comp, b[:, 3])
            np.maximum.at(smax, comp, s)
            c = rep_comp[frag]
            out_b[frag] = np.column_stack([ux0[c], uy0[c], ux1[c], uy1[c]])
            out_s[frag] = smax[c]
        return out_b, out_s, lab[rep], rows[rep], cols[rep]


def _reach(offsets, tile_size: int) -> int:
    """How many tiles apart two tiles along an axis can be and still share pixels."""
    off = np.asarray(offsets, np.int64)
    k = 0
    while k + 1 < len(off) and (off[k + 1 :] - off[: -(k + 1)]).min() < tile_size:
        k += 1
    return k


def _candidate_pairs(b, lab, rows, cols, tile_id, grid: TileGrid, thr: float) -> np.ndarray:
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
    g = grid
    ts = int(g.tile_size)
    col_off = np.asarray(g.col_offsets, np.float64)
    row_off = np.asarray(g.row_offsets, np.float64)
    n_labels = int(lab.max()) + 1
    C = ts + 3  # cells per axis inside a shared window (cell >= 1 px), with a margin each side
    # IoU >= t needs |centre distance| <= (1 - t) * longest side on each axis.
    slack = 1.0 - min(max(float(thr), 0.0), 1.0)
    kr, kc = _reach(g.row_offsets, ts), _reach(g.col_offsets, ts)

    def shared(r, c, dr, dc):
        """The window tiles (r, c) and (r + dr, c + dc) both saw, per box."""
        x0 = np.maximum(col_off[c], col_off[c + dc])
        y0 = np.maximum(row_off[r], row_off[r + dr])
        x1 = np.minimum(np.minimum(col_off[c], col_off[c + dc]) + ts, g.width)
        y1 = np.minimum(np.minimum(row_off[r], row_off[r + dr]) + ts, g.height)
        return np.column_stack([x0, y0, x1, y1])

    def clipped(idx, win):
        cb = np.minimum(np.maximum(b[idx], np.tile(win[:, :2], 2)), np.tile(win[:, 2:], 2))
        ok = (cb[:, 2] > cb[:, 0]) & (cb[:, 3] > cb[:, 1])
        return idx[ok], cb[ok], win[ok]

    pairs = []
    for dr in range(0, kr + 1):
        for dc in range(-kc, kc + 1):
            if dr == 0 and dc <= 0:
                continue
            # side a: boxes whose tile has a partner at (+dr, +dc); side b: at (-dr, -dc)
            ia = np.flatnonzero((rows + dr < g.n_rows) & (cols + dc >= 0) & (cols + dc < g.n_cols))
            ib = np.flatnonzero((rows - dr >= 0) & (cols - dc >= 0) & (cols - dc < g.n_cols))
            if len(ia) == 0 or len(ib) == 0:
                continue
            ia, ca, wa = clipped(ia, shared(rows[ia], cols[ia], dr, dc))
            pb_r, pb_c = rows[ib] - dr, cols[ib] - dc  # the pair's a-side tile
            ib, cb, wb = clipped(ib, shared(pb_r, pb_c, dr, dc))
            if len(ia) == 0 or len(ib) == 0:
                continue
            pair_a = tile_id[ia]
            pair_b = tile_id[ib] - (dr * g.n_cols + dc)
            side = max(np.max(ca[:, 2:] - ca[:, :2]), np.max(cb[:, 2:] - cb[:, :2]))
            cell = max(slack * float(side) * 1.001 + 1e-9, 1.0)

            def keys(cbox, win, pair, labels):
                cx = np.floor(((cbox[:, 0] + cbox[:, 2]) / 2 - win[:, 0]) / cell).astype(np.int64) + 1
                cy = np.floor(((cbox[:, 1] + cbox[:, 3]) / 2 - win[:, 1]) / cell).astype(np.int64) + 1
                return ((pair * n_labels + labels) * C + cy) * C + cx

            ka = keys(ca, wa, pair_a, lab[ia])
            kb = keys(cb, wb, pair_b, lab[ib])
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
                    ai = np.repeat(np.arange(len(ia)), counts)
                    bj = order[np.repeat(start, counts) + np.arange(total)]
                    A, B = ca[ai], cb[bj]
                    inter = np.clip(np.minimum(A[:, 2], B[:, 2]) - np.maximum(A[:, 0], B[:, 0]), 0, None) * np.clip(
                        np.minimum(A[:, 3], B[:, 3]) - np.maximum(A[:, 1], B[:, 1]), 0, None
                    )
                    union = (A[:, 2] - A[:, 0]) * (A[:, 3] - A[:, 1]) + (B[:, 2] - B[:, 0]) * (B[:, 3] - B[:, 1]) - inter
                    iou = inter / np.maximum(union, 1e-12)
                    ok = (inter > 0) & (iou >= thr)
                    if ok.any():
                        pairs.append(np.column_stack([ia[ai[ok]], ib[bj[ok]], iou[ok]]))
    return np.concatenate(pairs) if pairs else np.zeros((0, 3))


def _overlapping_pairs(b, lab, rows, cols, tile_id, grid: TileGrid, thr: float) -> np.ndarray:
    """Edges (i, j) between boxes that are one object: candidate pairs (``_candidate_pairs``)
    that are each other's best match in the other's tile."""
    n = len(b)
    p = _candidate_pairs(b, lab, rows, cols, tile_id, grid, thr)
    if len(p) == 0:
        return np.zeros((0, 2), np.int64)
    p = np.concatenate([p, p[:, [1, 0, 2]]])  # both directions
    i, j, w = p[:, 0].astype(np.int64), p[:, 1].astype(np.int64), p[:, 2]
    # Keep, for each box and each other tile, only its best partner there; an edge stays when
    # it is the best for both ends, so overlapping distinct objects never chain together.
    order = np.lexsort((-w, tile_id[j], i))
    i, j, w = i[order], j[order], w[order]
    first = np.ones(len(i), bool)
    first[1:] = (i[1:] != i[:-1]) | (tile_id[j][1:] != tile_id[j][:-1])
    bi, bj = i[first], j[first]
    # mutual: (a, c) and (c, a) both best; find by sorting encoded pairs
    code = bi * n + bj
    rev = bj * n + bi
    sorted_code = np.sort(code)
    pos = np.clip(np.searchsorted(sorted_code, rev), 0, len(sorted_code) - 1)
    mutual = (sorted_code[pos] == rev) & (bi < bj)
    return np.column_stack([bi[mutual], bj[mutual]]).astype(np.int64)


def _components(n: int, edges: np.ndarray) -> np.ndarray:
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


def stitch_detections(grid: TileGrid, tile_results, match_iou: float = 0.5) -> SceneDetections:
    """Stitch an iterable of ``(tile, boxes, scores, labels)`` (boxes in tile pixels)."""
    st = Stitcher(grid, match_iou)
    for tile, boxes, scores, labels in tile_results:
        st.add(tile, boxes, scores, labels)
    return st.finish()
