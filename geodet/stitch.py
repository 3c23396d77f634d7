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
        g = self.grid
        wx0 = np.asarray(g.col_offsets, np.float64)[cols]
        wy0 = np.asarray(g.row_offsets, np.float64)[rows]
        windows = np.stack([wx0, wy0, np.minimum(wx0 + g.tile_size, g.width), np.minimum(wy0 + g.tile_size, g.height)], 1)
        edges = _overlapping_pairs(b, lab, tile_id, windows, self.match_iou, g.tile_size)
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


def _bucket_keys(boxes, cell):
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    return np.floor(c / cell).astype(np.int64)


def _overlapping_pairs(b, lab, tile_id, windows, thr, max_cell) -> np.ndarray:
    """Pairs (i, j) from different tiles and the same class that agree where both tiles looked:
    clipped to the intersection of their two tile windows, their IoU is at least ``thr``.

    One object gives the same box there whether a tile saw it whole or cut at its edge, while
    two distinct objects, even overlapping ones, do not.

    Boxes are bucketed by centre on a grid whose cell is the largest box side (so overlapping
    boxes sit in the same or adjacent cells), and candidate pairs come from a vectorised
    sort-and-search join of neighbouring cells: the cost follows local density, never n^2.
    """
    n = len(b)
    if n < 2:
        return np.zeros((0, 2), np.int64)
    side = float(np.max(np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])))
    cell = min(max(side, 1.0), float(max_cell))
    keys = _bucket_keys(b, cell)
    kx, ky = keys[:, 0] - keys[:, 0].min(), keys[:, 1] - keys[:, 1].min()
    width = int(kx.max()) + 3
    flat = ky * width + kx
    order = np.argsort(flat, kind="stable")
    sorted_keys = flat[order]
    pairs = []
    # Each unordered cell pair once: the same cell, right, and the three below.
    for dk in (0, 1, width - 1, width, width + 1):
        lo = np.searchsorted(sorted_keys, flat + dk, side="left")
        hi = np.searchsorted(sorted_keys, flat + dk, side="right")
        counts = hi - lo
        total = int(counts.sum())
        if total == 0:
            continue
        ii = np.repeat(np.arange(n), counts)
        offs = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        jj = order[np.repeat(lo, counts) + offs]
        keep = (ii < jj) if dk == 0 else np.ones(total, bool)
        keep &= (lab[ii] == lab[jj]) & (tile_id[ii] != tile_id[jj])
        ii, jj = ii[keep], jj[keep]
        # the region both tiles saw
        sx0 = np.maximum(windows[ii, 0], windows[jj, 0])
        sy0 = np.maximum(windows[ii, 1], windows[jj, 1])
        sx1 = np.minimum(windows[ii, 2], windows[jj, 2])
        sy1 = np.minimum(windows[ii, 3], windows[jj, 3])
        ax0, ay0 = np.clip(b[ii, 0], sx0, sx1), np.clip(b[ii, 1], sy0, sy1)
        ax1, ay1 = np.clip(b[ii, 2], sx0, sx1), np.clip(b[ii, 3], sy0, sy1)
        bx0, by0 = np.clip(b[jj, 0], sx0, sx1), np.clip(b[jj, 1], sy0, sy1)
        bx1, by1 = np.clip(b[jj, 2], sx0, sx1), np.clip(b[jj, 3], sy0, sy1)
        inter = np.clip(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0, None) * np.clip(
            np.minimum(ay1, by1) - np.maximum(ay0, by0), 0, None
        )
        union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
        iou = inter / np.maximum(union, 1e-12)
        ok = (inter > 0) & (iou >= thr)
        if ok.any():
            pairs.append(np.column_stack([ii[ok], jj[ok], iou[ok]]))
    if not pairs:
        return np.zeros((0, 2), np.int64)
    p = np.concatenate(pairs)
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
