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
        keys = tile.index * KEY_STRIDE + np.flatnonzero(keep).astype(np.int64)  # the scene-wide add order
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
            self._final.append((b[final], scores[final], labels[final], rows[final], cols[final], keys[final]))
        if seam.any():
            self._seam.append(
                (b[seam], scores[seam], labels[seam], rows[seam], cols[seam], whole[seam], owned[seam], keys[seam])
            )

    def finish(self) -> SceneDetections:
        parts = [p[:5] for p in self._final]
        if self._seam:
            parts.append(merge_seams(*self.seam_boxes()[:7], self.grid, self.match_iou)[:5])
        if not parts:
            return _empty()
        cat = [np.concatenate([p[i] for p in parts]) for i in range(5)]
        return SceneDetections(*cat)

    def final_boxes(self) -> tuple:
        """The boxes kept as they are: (boxes, scores, labels, rows, cols, keys), in add order."""
        return _cat(self._final, 6)

    def seam_boxes(self) -> tuple:
        """The boxes that enter the seam merge: (boxes, scores, labels, rows, cols, whole, owned,
        keys), in add order."""
        return _cat(self._seam, 8)


KEY_STRIDE = 1 << 32  # a box's key: its tile's index x KEY_STRIDE + its position in the tile's detections
_DTYPES = (np.float64, np.float32, np.int64, np.int32, np.int32, bool, bool, np.int64)


def _empty() -> SceneDetections:
    return SceneDetections(np.zeros((0, 4)), np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.int32),
                           np.zeros(0, np.int32))


def _cat(parts: list, n: int) -> tuple:
    if not parts:
        dt = _DTYPES[:5] + _DTYPES[7:] if n == 6 else _DTYPES
        return tuple(np.zeros((0, 4)) if i == 0 else np.zeros(0, d) for i, d in enumerate(dt))
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(n))


def seam_components(b, lab, rows, cols, grid: TileGrid, match_iou: float):
    """The seam merge's grouping of boxes into objects: (candidate pairs, best matches, object of
    each box (its smallest member's index), tile of each box, each box's component of matches
    before a component holding two boxes of one tile is split)."""
    n = len(b)
    tile_id = rows.astype(np.int64) * grid.n_cols + cols
    pairs = candidate_pairs(b, lab, rows, cols, tile_id, grid, match_iou)
    edges, weights, best = mutual_best(n, pairs, tile_id, len(grid))
    joined = components(n, edges)
    comp = one_box_per_tile(joined, edges, weights, tile_id)
    return pairs, best, comp, tile_id, joined


def merge_seams(b, s, lab, rows, cols, whole, owned, grid: TileGrid, match_iou: float, found=None):
    """The seam merge (module docstring) over boxes in add order: one row per object, ordered by
    its smallest member's index: (boxes, scores, labels, rows, cols, smallest member index).
    ``found``: these boxes' ``seam_components``, when the caller has them already."""
    _, best, comp, tile_id, _ = found or seam_components(b, lab, rows, cols, grid, match_iou)
    win = tile_windows(grid, rows, cols)
    rep, out_b, out_s = representatives(b, s, whole, owned, comp, win)
    comp_owned = np.zeros(len(comp), bool)
    comp_owned[comp[whole & owned]] = True
    gone = seen_better(rep, out_b, comp, comp_owned, b, lab, tile_id, owned, win, best, grid)
    rep, out_b, out_s = rep[~gone], out_b[~gone], out_s[~gone]
    return out_b, out_s, lab[rep], rows[rep], cols[rep], comp[rep]


def representatives(b, s, whole, owned, comp, win):
    """Each component's box (in the order of its label): a box from a tile that saw the whole
    component, owned by its tile, whole, best scoring, in that order; with no whole box, or none
    from a tile that saw all the merged boxes, the union of the boxes with their best score.
    Returns (representative index, box, score); each depends on its component alone."""
    n = len(b)
    ncomp = int(comp.max()) + 1
    # The box of each component's members together, and whether a member's tile saw all of it.
    ub = np.empty((ncomp, 4))
    ub[:, :2], ub[:, 2:] = np.inf, -np.inf
    np.minimum.at(ub[:, 0], comp, b[:, 0])
    np.minimum.at(ub[:, 1], comp, b[:, 1])
    np.maximum.at(ub[:, 2], comp, b[:, 2])
    np.maximum.at(ub[:, 3], comp, b[:, 3])
    sees_all = inside(ub[comp], win)
    order = np.lexsort((-s, ~owned, ~whole, ~sees_all, comp))
    first = np.ones(n, bool)
    first[1:] = comp[order][1:] != comp[order][:-1]
    rep = order[first]
    out_b = b[rep].copy()
    out_s = s[rep].copy()
    frag = ~whole[rep] | ~sees_all[rep]
    if frag.any():
        smax = np.full(ncomp, -np.inf, np.float32)
        np.maximum.at(smax, comp, s)
        c = comp[rep][frag]
        out_b[frag] = ub[c]
        out_s[frag] = smax[c]
    return rep, out_b, out_s


def stitch_detections(grid: TileGrid, tile_results, match_iou: float = 0.5) -> SceneDetections:
    """Stitch an iterable of ``(tile, boxes, scores, labels)`` (boxes in tile pixels)."""
    st = Stitcher(grid, match_iou)
    for tile, boxes, scores, labels in tile_results:
        st.add(tile, boxes, scores, labels)
    return st.finish()


# ---------------------------------------------------------------------------------------------
# Stitching in blocks (a scene spread over workers): each block stitches its own tiles, keeps
# what no tile outside it can change, and defers the rest to one reduce per scene.


@dataclass
class BlockStitch:
    """One block's stitch: ``final``, the boxes kept as they are, and ``merged``, the objects
    decided inside the block (boxes, scores, labels, rows, cols, keys); ``deferred``, the seam
    boxes the reduce needs (boxes, scores, labels, rows, cols, whole, owned, keys, decide): with
    ``decide``, objects the reduce decides; without, objects already decided here that the
    reduce's decisions look at. ``keys`` give the scene-wide order (``KEY_STRIDE``; a merged
    object's is its first box's); ``n_in`` counts the detections the block's tiles gave."""

    final: tuple
    merged: tuple
    deferred: tuple
    n_in: int

    @property
    def n_deferred(self) -> int:
        return len(self.deferred[0])


def block_interior(grid: TileGrid, r0: int, r1: int, c0: int, c1: int) -> tuple[float, float, float, float]:
    """The part of the scene no tile outside rows r0..r1 and columns c0..c1 sees (a rectangle:
    a point is seen only by the block's tiles when the rows and the columns seeing it are all
    the block's)."""
    ts = grid.tile_size
    x0 = min(grid.col_offsets[c0 - 1] + ts, grid.width) if c0 > 0 else -np.inf
    y0 = min(grid.row_offsets[r0 - 1] + ts, grid.height) if r0 > 0 else -np.inf
    x1 = grid.col_offsets[c1 + 1] if c1 < grid.n_cols - 1 else np.inf
    y1 = grid.row_offsets[r1 + 1] if r1 < grid.n_rows - 1 else np.inf
    return x0, y0, x1, y1


def _sorted_by_key(arrays: tuple, key: int = -1) -> tuple:
    k = arrays[key]
    if len(k) < 2 or bool(np.all(k[1:] >= k[:-1])):  # often in order already (blocks come in order)
        return arrays
    order = np.argsort(k, kind="stable")
    return tuple(a[order] for a in arrays)


def _held_by(boxes: np.ndarray, grid: TileGrid, tiles: np.ndarray) -> np.ndarray:
    """For each box, whether the window of one of ``tiles`` (a mask over the grid) holds it whole."""
    from .seams import _windows_holding

    if len(boxes) == 0 or not tiles.any():
        return np.zeros(len(boxes), bool)
    c0, c1, r0, r1 = _windows_holding(boxes, grid)
    ok = (c1 >= c0) & (r1 >= r0)
    s = np.zeros((grid.n_rows + 1, grid.n_cols + 1), np.int64)
    s[1:, 1:] = tiles.reshape(grid.n_rows, grid.n_cols).cumsum(0).cumsum(1)
    c0, c1, r0, r1 = (np.clip(a, 0, n - 1) for a, n in ((c0, grid.n_cols), (c1, grid.n_cols), (r0, grid.n_rows),
                                                        (r1, grid.n_rows)))
    total = s[r1 + 1, c1 + 1] - s[r0, c1 + 1] - s[r1 + 1, c0] + s[r0, c0]
    return ok & (total > 0)


def _holding(boxes: np.ndarray, grid: TileGrid) -> np.ndarray:
    """A mask over the grid: the tiles whose windows hold one of ``boxes`` whole."""
    from .seams import _windows_holding

    mask = np.zeros((grid.n_rows + 1, grid.n_cols + 1), np.int64)
    if len(boxes):
        c0, c1, r0, r1 = _windows_holding(boxes, grid)
        ok = (c1 >= c0) & (r1 >= r0)
        for rr, cc, sign in ((r0, c0, 1), (r0, c1 + 1, -1), (r1 + 1, c0, -1), (r1 + 1, c1 + 1, 1)):
            np.add.at(mask, (rr[ok], cc[ok]), sign)
    return (mask.cumsum(0).cumsum(1)[: grid.n_rows, : grid.n_cols] > 0).ravel()


def _spread(mask: np.ndarray, by: np.ndarray) -> np.ndarray:
    """``mask`` spread to every box whose label in ``by`` (one per box) a box in ``mask`` has."""
    g = np.zeros(len(by), bool)
    g[by[mask]] = True
    return g[by]


def _meets(bx: np.ndarray, cls: np.ndarray, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Whether the y-range of each box (of class ``cls``) overlaps or touches its class's reach."""
    return (bx[:, 1] <= top[cls]) | (bx[:, 3] >= bottom[cls])


def _moving_reach(b, lab, joined, moving, interior) -> tuple[np.ndarray, np.ndarray]:
    """Per class, how far down from above (``top``) and up from below (``bottom``) a moving
    object's final box can lie, in y: its boxes here, and beyond the block's edge that they reach.

    Other blocks' boxes lie outside the interior; in a block of whole grid rows (a band) that is
    above it or below it, and a chain of overlapping boxes (a merged object) gets from one to the
    other only through the block's own boxes. With a side edge, the outside goes around the
    block, so a moving object's box can lie at any y. The partial-view test needs a box to
    overlap the object it covers, so only what overlaps these ranges can meet a moving object."""
    x0, y0, x1, y1 = interior
    n, m = len(b), EDGE_EPS  # a margin: touching the boundary counts as reaching past it
    side = np.full(n, bool(np.isfinite(x0) or np.isfinite(x1)))
    lo = np.full(n, np.inf)
    hi = np.full(n, -np.inf)
    np.minimum.at(lo, joined, np.where((b[:, 1] <= y0 + m) | side, -np.inf, b[:, 1]))
    np.maximum.at(hi, joined, np.where((b[:, 3] >= y1 - m) | side, np.inf, b[:, 3]))
    n_lab = int(lab.max()) + 1
    top, bottom = np.full(n_lab, -np.inf), np.full(n_lab, np.inf)
    mv = np.flatnonzero(moving)
    np.maximum.at(top, lab[mv], np.where(lo[joined[mv]] == -np.inf, hi[joined[mv]], -np.inf))
    np.minimum.at(bottom, lab[mv], np.where(hi[joined[mv]] == np.inf, lo[joined[mv]], np.inf))
    return top, bottom


def _pending(grid: TileGrid, obj_box, lab, tile_id, moving, owned, comp, top, bottom) -> np.ndarray:
    """Objects a moving object could see better (a tile owning one of its boxes holds them, they
    meet its reach, and its final box is not known here): the reduce decides them too. Widens
    ``top`` and ``bottom`` in place by them, since what covers one of them overlaps it."""
    pending = np.zeros(len(lab), bool)
    for c in range(len(top)):
        owns = np.zeros(len(grid), bool)
        owns[tile_id[moving & owned & (lab == c)]] = True
        pending |= ~moving & (lab == c) & _held_by(obj_box, grid, owns)
    pending &= _meets(obj_box, lab, top, bottom)
    pending = _spread(pending, comp)
    pb, pl = obj_box[pending], lab[pending]
    np.maximum.at(top, pl, np.where(pb[:, 1] <= top[pl], pb[:, 3], -np.inf))
    np.minimum.at(bottom, pl, np.where(pb[:, 3] >= bottom[pl], pb[:, 1], np.inf))
    return pending


def stitch_block(grid: TileGrid, rows: tuple[int, int], cols: tuple[int, int], tile_results,
                 match_iou: float = 0.5) -> BlockStitch:
    """Stitch the block of tiles in grid rows ``rows`` and columns ``cols`` (inclusive ranges)
    from its ``(tile, boxes, scores, labels)``, as far as its own tiles decide.

    The seam merge looks at candidate pairs (which boxes are one object, each box's best
    partner) and, to judge a partial view, at the objects owned by a tile whose window holds it.
    So, among the block's seam boxes:

    - ``moving``: components of matches with a box reaching where a tile outside the block
      sees: only such a box can be matched to another block's box, so these objects can change
      there, and the reduce decides them (the other objects' matches are final here);
    - ``pending``: objects held whole by the window of a tile owning a moving box of their class
      (the moving object's final box, which could be the better view, is not known here); the
      reduce decides them too;
    - ``context``: boxes owned by a tile whose window could hold an object the reduce decides
      (a tile outside the block sees part of its window, or it holds a moving box or a pending
      object); decided here, and sent along for the reduce to look at.

    Everything sent goes with its whole group of boxes linked by candidate pairs (not only
    chosen matches), so the reduce's best-partner choices are those of one process. The rest is
    decided here, exactly as in one process, since nothing outside the block reaches it.
    """
    st = Stitcher(grid, match_iou)
    for tile, boxes, scores, labels in tile_results:
        st.add(tile, boxes, scores, labels)
    final = _sorted_by_key(st.final_boxes())
    seam = _sorted_by_key(st.seam_boxes())  # the scene-wide order: ties break as in one process
    b, lab, rws, cls, owned = seam[0], seam[2], seam[3], seam[4], seam[6]
    n = len(b)
    empty = tuple(a[:0] for a in final)
    if n == 0:
        return BlockStitch(final, empty, tuple(a[:0] for a in seam) + (np.zeros(0, bool),), st.n_in)
    found = seam_components(b, lab, rws, cls, grid, match_iou)
    pairs, _, comp, tile_id, joined = found
    group = components(n, pairs[:, :2].astype(np.int64))  # linked by candidate pairs

    x0, y0, x1, y1 = block_interior(grid, rows[0], rows[1], cols[0], cols[1])
    m = EDGE_EPS  # a margin: touching the boundary counts as reaching past it

    def reaches_out(bx):
        return (bx[:, 0] <= x0 + m) | (bx[:, 1] <= y0 + m) | (bx[:, 2] >= x1 - m) | (bx[:, 3] >= y1 - m)

    # objects whose matches can take boxes from other blocks: the reduce decides them
    moving = _spread(reaches_out(b), joined)
    win = tile_windows(grid, rws, cls)
    rep, out_b, _ = representatives(b, seam[1], seam[5], owned, comp, win)  # final for the others
    slot = np.full(n, -1)
    slot[comp[rep]] = np.arange(len(rep))
    obj_box = out_b[slot[comp]]  # each box's object's box
    top, bottom = _moving_reach(b, lab, joined, moving, (x0, y0, x1, y1))
    pending = _pending(grid, obj_box, lab, tile_id, moving, owned, comp, top, bottom)
    decide = moving | pending
    # the tiles whose owned boxes the reduce's decisions can look at, and of their boxes, those
    # whose objects meet what the reduce decides
    all_tiles = np.arange(len(grid))
    tr, tc = all_tiles // grid.n_cols, all_tiles % grid.n_cols
    ring = reaches_out(tile_windows(grid, tr, tc)) & (tr >= rows[0]) & (tr <= rows[1]) & (tc >= cols[0]) & (tc <= cols[1])
    looked_at = ring | _holding(b[moving], grid) | _holding(obj_box[pending], grid)
    seen = owned & looked_at[tile_id] & _meets(obj_box, lab, top, bottom)
    context = _spread(decide | seen, group) & ~decide  # whole groups: their matches
    deferred = tuple(a[decide | context] for a in seam) + (decide[decide | context],)
    if (~decide).any():
        ob, os_, olab, orows, ocols, first = merge_seams(*seam[:7], grid, match_iou, found)
        here = ~decide[first]
        merged = (ob[here], os_[here], olab[here], orows[here], ocols[here], seam[7][first[here]])
    else:
        merged = empty
    return BlockStitch(final, merged, deferred, st.n_in)


def reduce_deferred(grid: TileGrid, deferred: tuple, match_iou: float = 0.5) -> tuple:
    """The objects the blocks left to the reduce, from their deferred seam boxes (``BlockStitch.
    deferred``, concatenated in any order): (boxes, scores, labels, rows, cols, keys).

    Boxes interact in the merge only where they overlap (candidate pairs, the partial-view test),
    so deferred boxes that overlap none of another set's can be reduced apart from it, with the
    same objects (``bands.BandStitcher`` reduces each such cluster as soon as it is complete)."""
    d = _sorted_by_key(deferred, key=7)
    if not len(d[0]):
        return tuple(a[:0] for a in d[:5]) + (d[7][:0],)
    ob, os_, olab, orows, ocols, first = merge_seams(*d[:7], grid, match_iou)
    ours = d[8][first]  # objects the blocks left to the reduce; the others are theirs
    return ob[ours], os_[ours], olab[ours], orows[ours], ocols[ours], d[7][first[ours]]


def assemble(finals: list, merged: list) -> SceneDetections:
    """One ``Stitcher``'s rows from the blocks' kept boxes and merged objects (each a tuple of
    boxes, scores, labels, rows, cols, keys): kept boxes in add order, then merged objects in the
    order of their first box."""
    if not finals and not merged:
        return _empty()
    parts = [_sorted_by_key(tuple(np.concatenate([p[i] for p in ps]) for i in range(6)))
             for ps in (finals, merged) if ps]
    return SceneDetections(*(np.concatenate([p[i] for p in parts]) for i in range(5)))


def reduce_blocks(grid: TileGrid, blocks, match_iou: float = 0.5) -> SceneDetections:
    """The scene's detections from every block's ``BlockStitch``: identical, row for row, to
    stitching all tiles in one ``Stitcher`` (kept boxes in add order, then merged objects in the
    order of their first box). Only the seam boxes the blocks deferred are merged here."""
    blocks = list(blocks)
    if not blocks:
        return _empty()
    d = tuple(np.concatenate([bl.deferred[i] for bl in blocks]) for i in range(9))
    merged = [bl.merged for bl in blocks] + [reduce_deferred(grid, d, match_iou)]
    return assemble([bl.final for bl in blocks], merged)
