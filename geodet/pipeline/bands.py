"""Stitching that keeps up with the tiles: the scene's rows of tiles are stitched in bands, in
background threads as soon as a band's last tile arrives, while the model runs the next tiles.

A band is a block of whole grid rows, so this is the block stitch of the Ray engine
(``stitch.stitch_block``), whose result is one ``Stitcher``'s, row for row. What a band defers
(the seam boxes that may meet another band's) is reduced as soon as it can be: boxes interact in
the merge only where they overlap, so the deferred boxes fall into clusters of overlapping
y-ranges; a cluster is complete once every band that could add a box overlapping it is stitched,
and is then reduced in the background too (``stitch.reduce_deferred``). So ``finish`` has the last
band and the clusters along its top edge left to do, not a merge of everything deferred.

Numpy and shapely release the GIL in their loops, so the threads' work overlaps the per-tile
loop's waits on the card and on the readers, and bands run side by side on a host with cores.
"""

from __future__ import annotations

import bisect
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .grid import Tile, TileGrid
from .stitch import BlockStitch, SceneDetections, assemble, reduce_deferred, stitch_block

# Rows per band: a band defers the seam boxes near its top and bottom edges (and those they can
# meet) to the reduce, so thin bands repeat work, and where a band's two edges' deferred boxes
# meet, the clusters of neighbouring bands join and wait for each other. Bands are at least
# MIN_ROWS rows and about ROWS_SHARE of the scene, but for the first and the last, whose top or
# bottom is the scene's (nothing deferred there): the first takes what is left over, the last is
# one row (LAST_ROWS): with the clusters along its top edge, it is what is left to stitch after
# the last tile (benchmarks/bench_stitch.py).
MIN_ROWS = 4
ROWS_SHARE = 1 / 8
LAST_ROWS = 1


def default_threads() -> int:
    """Stitch threads: a quarter of the usable cores (the readers and the loop need the rest), 1 to 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores // 4))


def band_starts(n_rows: int, rows: int, last: int) -> list[int]:
    """The first grid row of each band: a last band of ``last`` rows, bands of ``rows`` rows
    before it, and what is left in the first band (its top is the scene's: it defers nothing
    there)."""
    if n_rows <= rows:
        return [0]
    starts = [max(0, n_rows - max(1, last))]
    while starts[0] > 0:
        starts.insert(0, max(0, starts[0] - rows))
    return starts


def _pieces(d: tuple) -> list:
    """The deferred boxes ``d`` (``BlockStitch.deferred``) split where their y-ranges leave a gap:
    ``(y_min, y_max, part)`` per piece, in y order. Pieces never overlap, so they never interact."""
    y0, y1 = d[0][:, 1], d[0][:, 3]
    if len(y0) == 0:
        return []
    order = np.argsort(y0, kind="stable")
    reach = np.maximum.accumulate(y1[order])
    cut = np.flatnonzero(y0[order][1:] > reach[:-1]) + 1
    out = []
    for idx in np.split(order, cut):
        idx = np.sort(idx)  # keep the band's order
        out.append((float(y0[idx].min()), float(y1[idx].max()), tuple(a[idx] for a in d)))
    return out


class BandStitcher:
    """``Stitcher``'s interface (``add``, ``finish``, ``n_in``) for tiles added in grid order."""

    def __init__(self, grid: TileGrid, match_iou: float = 0.5, rows_per_band: int | None = None,
                 threads: int | None = None, last_rows: int | None = None):
        self.grid = grid
        self.match_iou = match_iou
        self.rows = max(1, rows_per_band or max(MIN_ROWS, math.ceil(grid.n_rows * ROWS_SHARE)))
        self.starts = band_starts(grid.n_rows, self.rows, min(self.rows, LAST_ROWS if last_rows is None else last_rows))
        self.n_in = 0
        self._band = -1
        self._tiles: list[tuple] = []
        self._pool = ThreadPoolExecutor(max(1, threads or default_threads()), thread_name_prefix="geodet-stitch")
        self._lock = threading.Lock()
        self._bands: list = []  # futures of the bands' stitches, in band order
        self._waiting: dict[int, BlockStitch] = {}  # stitched bands not yet taken in (an earlier one is running)
        self._order: list[int] = []  # the bands submitted, in order
        self._taken = 0  # how many of them were taken in
        self._blocks: list[BlockStitch] = []
        self._open: list[list] = []  # clusters of deferred boxes still open: [y_min, y_max, parts], by y
        self._reduced: list = []  # futures of the clusters' reduces
        self.n_deferred = 0  # seam boxes the bands deferred (for benchmarks)

    def add(self, tile: Tile, boxes, scores, labels) -> None:
        band = bisect.bisect_right(self.starts, tile.row) - 1
        if band < self._band:
            raise ValueError(f"tile {tile.index} came after the tiles of a later band: tiles must come in grid order")
        if band != self._band:
            self._submit()
            self._band = band
        self.n_in += len(scores)
        self._tiles.append((tile, boxes, scores, labels))

    def _submit(self) -> None:
        if not self._tiles:
            return
        band, tiles = self._band, self._tiles
        self._tiles = []
        with self._lock:
            self._order.append(band)
        self._bands.append(self._pool.submit(self._stitch, band, tiles))

    def _stitch(self, band: int, tiles: list) -> None:
        rows = (self.starts[band], self._end(band) - 1)
        block = stitch_block(self.grid, rows, (0, self.grid.n_cols - 1), tiles, self.match_iou)
        with self._lock:
            self._waiting[band] = block
            self._take_in()

    def _take_in(self, last: bool = False) -> None:
        """Take in the stitched bands in band order; reduce each cluster of deferred boxes that no
        later band can reach (its boxes start below the cluster's y-range). Holds the lock."""
        while self._taken < len(self._order) and self._order[self._taken] in self._waiting:
            band = self._order[self._taken]
            block = self._waiting.pop(band)
            self._taken += 1
            self._blocks.append(block)
            self.n_deferred += block.n_deferred
            for piece in _pieces(block.deferred):
                self._join(*piece)
            nxt = self._end(band)  # later bands' boxes start at or below this row's offset
            self._close_below(self.grid.row_offsets[nxt] if nxt < self.grid.n_rows else math.inf)
        if last:
            self._close_below(math.inf)

    def _end(self, band: int) -> int:
        return self.starts[band + 1] if band + 1 < len(self.starts) else self.grid.n_rows

    def _join(self, lo: float, hi: float, part: tuple) -> None:
        parts = [part]
        keep = []
        for c in self._open:
            if c[0] <= hi and lo <= c[1]:  # closed ranges: touching counts as overlapping
                lo, hi = min(lo, c[0]), max(hi, c[1])
                parts += c[2]
            else:
                keep.append(c)
        keep.append([lo, hi, parts])
        keep.sort(key=lambda c: c[0])
        self._open = keep

    def _close_below(self, y: float) -> None:
        still = []
        for lo, hi, parts in self._open:
            if hi < y:
                d = tuple(np.concatenate([p[i] for p in parts]) for i in range(9))
                self._reduced.append(self._pool.submit(reduce_deferred, self.grid, d, self.match_iou))
            else:
                still.append([lo, hi, parts])
        self._open = still

    @property
    def open_deferred(self) -> int:
        """Deferred seam boxes in clusters not reduced yet (a later band could still reach them)."""
        with self._lock:
            return sum(len(p[0]) for c in self._open for p in c[2])

    def wait(self) -> None:
        """Block until the bands whose tiles have all come, and the clusters they completed, are
        done (what ``finish`` then has left is the last band and the clusters it completes)."""
        for f in list(self._bands):
            f.result()
        with self._lock:
            reduced = list(self._reduced)
        for f in reduced:
            f.result()

    def finish(self) -> SceneDetections:
        try:
            self._submit()
            for f in self._bands:
                f.result()
            with self._lock:
                self._take_in(last=True)
                reduced = list(self._reduced)
            merged = [bl.merged for bl in self._blocks] + [f.result() for f in reduced]
            return assemble([bl.final for bl in self._blocks], merged)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Drop the work in flight (a run that stopped early). A band still running then fails to
        submit its clusters' reduces (the pool is shut): its future holds that error, and nothing
        reads it."""
        self._pool.shutdown(wait=False, cancel_futures=True)
