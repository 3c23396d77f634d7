"""Whole-scene detection as a chain of plain steps: the tile grid, the tile reader, the per-tile
detection generator, the stitcher, and the frame with its report."""
