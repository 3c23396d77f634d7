"""Stitching that keeps up with the tiles: the scene's rows of tiles are stitched in bands, each
in a background thread as soon as its last tile arrives, while the model runs the next tiles;
``finish`` merges only what the bands deferred (the seam boxes that may meet another band's).

A band is a block of whole grid rows, so this is the block stitch of the Ray engine
(``stitch.stitch_block`` and ``reduce_blocks``), whose result is one ``Stitcher``'s, row for row.
Numpy and shapely release the GIL in their loops, so the thread's work overlaps the per-tile
loop's waits on the card and on the readers.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

from .grid import Tile, TileGrid
from .stitch import SceneDetections, reduce_blocks, stitch_block

# Bands per scene, and rows per band at least: more, thinner bands leave less to stitch after the
# last tile, but each band defers the seam boxes of its top and bottom rows of tiles to the merge
# (a band of 2 rows defers half its seam boxes, one of 8 a sixth: benchmarks/bench_stitch.py).
BANDS = 4
MIN_ROWS = 3


class BandStitcher:
    """``Stitcher``'s interface (``add``, ``finish``, ``n_in``) for tiles added in grid order."""

    def __init__(self, grid: TileGrid, match_iou: float = 0.5, rows_per_band: int | None = None):
        self.grid = grid
        self.match_iou = match_iou
        self.rows = max(1, rows_per_band or max(MIN_ROWS, math.ceil(grid.n_rows / BANDS)))
        self.n_in = 0
        self._band = -1
        self._tiles: list[tuple] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="geodet-stitch")
        self._done: list = []

    def add(self, tile: Tile, boxes, scores, labels) -> None:
        band = tile.row // self.rows
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
        r0 = self._band * self.rows
        rows = (r0, min(r0 + self.rows, self.grid.n_rows) - 1)
        self._done.append(self._pool.submit(stitch_block, self.grid, rows, (0, self.grid.n_cols - 1), self._tiles,
                                            self.match_iou))
        self._tiles = []

    def wait(self) -> None:
        """Block until the bands whose tiles have all come are stitched (what ``finish`` then
        has left is the last band and the merge)."""
        for f in self._done:
            f.result()

    def finish(self) -> SceneDetections:
        try:
            self._submit()
            return reduce_blocks(self.grid, [f.result() for f in self._done], self.match_iou)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Drop the work in flight (a run that stopped early)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
