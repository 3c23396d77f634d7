"""Merging tile detections into scene detections: core ownership plus a seam-only merge.

Each detection belongs to the tile whose core holds its box centre; when objects are no larger
than the overlap that keeps each object exactly once, in O(n). Boxes cut by an internal tile edge,
and boxes reaching into a strip shared with a neighbour, also enter a merge that runs only among
seam boxes (``seams.py``):

1. Two boxes from different tiles are one object when they agree inside the region both tiles
   saw (IoU of the boxes clipped to the two windows' intersection) and are each other's best
   match there; a merged object never holds two boxes of one tile.
2. Each merged object is represented by a box from a tile that saw all of it, owned by that tile,
   whole, best scoring, in that order; when no tile saw all of it, by the union of its boxes.
3. A merged object is dropped when it is a partial view of an object another tile saw better: a
   tile that saw its whole area, and reported none of its boxes, owns a larger object holding
   most of it. Views differ this way when an object is partly covered by another (cars, crowns):
   a tile that sees it near its edge reports the box of its visible part there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .grid import Tile, TileGrid
from .seams import candidate_pairs, components, inside, mutual_best, one_box_per_tile, seen_better, tile_windows

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
        g = self.grid
        tile_id = rows.astype(np.int64) * g.n_cols + cols
        pairs = candidate_pairs(b, lab, rows, cols, tile_id, g, self.match_iou)
        edges, weights, best = mutual_best(n, pairs, tile_id, len(g))
        comp = one_box_per_tile(components(n, edges), edges, weights, tile_id)
        win = tile_windows(g, rows, cols)
        # The box of each component's members together, and whether a member's tile saw all of it.
        ncomp = int(comp.max()) + 1
        ub = np.empty((ncomp, 4))
        ub[:, :2], ub[:, 2:] = np.inf, -np.inf
        np.minimum.at(ub[:, 0], comp, b[:, 0])
        np.minimum.at(ub[:, 1], comp, b[:, 1])
        np.maximum.at(ub[:, 2], comp, b[:, 2])
        np.maximum.at(ub[:, 3], comp, b[:, 3])
        sees_all = inside(ub[comp], win)
        # Per component: a box from a tile that saw the whole component, owned by its tile, whole,
        # best scoring, in that order; with no whole box, the union of the fragments.
        order = np.lexsort((-s, ~owned, ~whole, ~sees_all, comp))
        first = np.ones(n, bool)
        first[1:] = comp[order][1:] != comp[order][:-1]
        rep = order[first]
        out_b = b[rep].copy()
        out_s = s[rep].copy()
        # no whole box, or none from a tile that saw all the merged boxes: their union
        frag = ~whole[rep] | ~sees_all[rep]
        if frag.any():
            smax = np.full(ncomp, -np.inf, np.float32)
            np.maximum.at(smax, comp, s)
            c = comp[rep][frag]
            out_b[frag] = ub[c]
            out_s[frag] = smax[c]
        comp_owned = np.zeros(ncomp, bool)
        comp_owned[comp[whole & owned]] = True
        gone = seen_better(rep, out_b, comp, comp_owned, b, lab, tile_id, owned, win, best, g)
        rep, out_b, out_s = rep[~gone], out_b[~gone], out_s[~gone]
        return out_b, out_s, lab[rep], rows[rep], cols[rep]


def stitch_detections(grid: TileGrid, tile_results, match_iou: float = 0.5) -> SceneDetections:
    """Stitch an iterable of ``(tile, boxes, scores, labels)`` (boxes in tile pixels)."""
    st = Stitcher(grid, match_iou)
    for tile, boxes, scores, labels in tile_results:
        st.add(tile, boxes, scores, labels)
    return st.finish()
