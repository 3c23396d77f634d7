"""Tile geometry: ``TileGrid`` and ``Tile``, pure integer arithmetic with no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import GeodetError
from ..io.raster import overlap_pixels  # noqa: F401 (an overlap in metres: with the scene that knows them)


@dataclass(frozen=True)
class Tile:
    """One tile of a grid. All values are integer pixel-edge coordinates of the scene.

    ``col_off, row_off, width, height``: the window read for the tile (always tile_size square;
    it reaches past the scene only when the scene is smaller than a tile, and is then padded).
    ``core``: (x0, y0, x1, y1), the part of the scene this tile owns; the cores partition the scene.
    ``valid``: (x0, y0, x1, y1), the part of the window that lies inside the scene.
    """

    index: int
    row: int
    col: int
    col_off: int
    row_off: int
    width: int
    height: int
    core: tuple[int, int, int, int]
    valid: tuple[int, int, int, int]

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        return (self.col_off, self.row_off, self.col_off + self.width, self.row_off + self.height)

    def window(self):
        """The tile's in-scene part as a rasterio Window."""
        from rasterio.windows import Window

        x0, y0, x1, y1 = self.valid
        return Window(x0, y0, x1 - x0, y1 - y0)


def _axis(length: int, tile: int, overlap: int) -> tuple[list[int], list[int]]:
    """Offsets of tiles along one axis, evenly spaced, and the core boundaries between them."""
    if length <= tile:
        return [0], [0, length]
    stride = tile - overlap
    n = math.ceil((length - overlap) / stride)
    n = max(n, 2)
    span = length - tile
    # Even spacing; the last tile ends exactly at the scene edge.
    offsets = [(i * span) // (n - 1) for i in range(n)]
    # The boundary between tile i and i+1 is the middle of their shared strip.
    cuts = [0] + [(offsets[i + 1] + offsets[i] + tile) // 2 for i in range(n - 1)] + [length]
    return offsets, cuts


class TileGrid:
    """Overlapping square tiles over a ``width`` x ``height`` scene, in row-major order.

    Tiles are spaced evenly with at least ``overlap`` pixels shared between neighbours; the last
    row and column end exactly at the scene's edge. A scene (axis) smaller than a tile gets one
    tile there, padded past the edge.
    """

    def __init__(self, width: int, height: int, tile_size: int, overlap: int):
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise GeodetError(f"scene {name} must be a positive number of pixels, got {value}")
        if not isinstance(tile_size, (int, np.integer)) or tile_size <= 0:
            raise GeodetError(f"tile size must be a positive number of pixels, got {tile_size}")
        if not isinstance(overlap, (int, np.integer)) or overlap < 0:
            raise GeodetError(f"overlap must be zero or a positive number of pixels, got {overlap}")
        if overlap >= tile_size:
            raise GeodetError(
                f"overlap ({overlap} px) must be smaller than the tile size ({tile_size} px): "
                "lower --overlap or raise --tile-size"
            )
        self.width, self.height = int(width), int(height)
        self.tile_size, self.overlap = int(tile_size), int(overlap)
        self.col_offsets, self.col_cuts = _axis(self.width, self.tile_size, self.overlap)
        self.row_offsets, self.row_cuts = _axis(self.height, self.tile_size, self.overlap)

    @property
    def n_rows(self) -> int:
        return len(self.row_offsets)

    @property
    def n_cols(self) -> int:
        return len(self.col_offsets)

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    def tile(self, index: int) -> Tile:
        if not 0 <= index < len(self):
            raise IndexError(index)
        row, col = divmod(index, self.n_cols)
        x, y = self.col_offsets[col], self.row_offsets[row]
        t = self.tile_size
        core = (self.col_cuts[col], self.row_cuts[row], self.col_cuts[col + 1], self.row_cuts[row + 1])
        valid = (x, y, min(x + t, self.width), min(y + t, self.height))
        return Tile(index, row, col, x, y, t, t, core, valid)

    def windows(self) -> Iterator[Tile]:
        for i in range(len(self)):
            yield self.tile(i)

    __iter__ = windows

    def __repr__(self) -> str:
        return (
            f"TileGrid({self.width}x{self.height}, tile_size={self.tile_size}, overlap={self.overlap}: "
            f"{self.n_rows} rows x {self.n_cols} cols)"
        )
