"""Detection split into blocks of tiles, for engines that spread a scene over workers: plan a
scene into blocks, run a block anywhere, reduce a scene. Runs in-process without any engine;
a distributed runner only moves the plan's blocks and their results.

- ``plan_scene`` opens the scene once: the tile grid ``detect_scene`` would build (after GSD
  resampling), the scaling statistics (computed once, so every block scales pixels identically)
  and k x k blocks of tiles, with a fingerprint of everything that decides the result.
- ``run_block`` runs the per-tile detection generator over one block's tiles and stitches them
  (``stitch.stitch_block``): boxes no tile outside the block can change are final there; seam
  boxes that could meet a tile outside it are deferred.
- ``reduce_scene`` merges the deferred seam boxes of all blocks with the same seam merge, and
  puts the scene together: the frame is identical to ``detect_scene``'s row for row, and no tile
  is inferred twice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import GeodetError
from .grid import TileGrid
from .settings import DetectSettings, resolve_detect_settings
from .stitch import BlockStitch, reduce_blocks, stitch_block


@dataclass(frozen=True)
class Block:
    """A k x k group of tiles of a scene's grid: ``tiles`` are grid indices."""

    scene: str
    index: int
    row0: int
    col0: int
    tiles: tuple


@dataclass
class ScenePlan:
    scene: str
    settings: DetectSettings
    width: int
    height: int
    overlap: int
    stats: dict | None
    blocks: list = field(default_factory=list)
    fingerprint: str = ""
    transform: object = None  # of the grid's pixels (after GSD resampling), for georeferencing parts
    crs: object = None

    @property
    def grid(self) -> TileGrid:
        return TileGrid(self.width, self.height, self.settings.tile_size, self.overlap)

    def open(self, card=None):
        """The scene as every worker opens it: the plan's bands, GSD, percentiles and statistics."""
        from ..io.scene import Scene
        from .reader import open_scene

        sc = open_scene(self.scene, self.settings, card)
        if self.stats is not None and sc._stats is None:
            sc._stats = {"lo": list(self.stats["lo"]), "hi": list(self.stats["hi"])}
        if (sc.width, sc.height) != (self.width, self.height):
            raise GeodetError(f"{self.scene}: the scene changed since it was planned ({sc.width} x {sc.height} px, "
                              f"planned {self.width} x {self.height}); plan it again")
        assert isinstance(sc, Scene)
        return sc


@dataclass
class BlockResult:
    scene: str
    block: int
    stitch: BlockStitch  # the block's own stitch: kept boxes, objects merged inside it, deferred seam boxes
    tiles_run: list  # grid indices of the tiles the detector ran on
    tiles_capped: list  # of those, the ones that hit the per-tile detection cap
    skipped: list  # tile indices without valid pixels
    unreadable: list  # report entries of tiles that could not be read (on_read_error="skip")
    on_nodata: int = 0  # detections dropped because their centre lies on nodata


def plan_scene(scene, detector=None, *, block_tiles: int = 8, config=None, **settings) -> ScenePlan:
    """Plan ``scene`` (a path) into ``block_tiles`` x ``block_tiles`` blocks of its tile grid,
    with the settings ``detect_scene`` would resolve for ``detector`` (its card), ``config`` and
    ``settings``."""
    from .reader import open_scene

    if block_tiles < 1:
        raise GeodetError(f"block size must be at least 1 tile, got {block_tiles}")
    card = getattr(detector, "card", None)
    s = resolve_detect_settings(card, config, **settings)
    sc = open_scene(scene, s, card)
    try:
        overlap = sc.overlap_px(s.overlap_m, s.tile_size) if s.overlap_m is not None else s.overlap
        grid = TileGrid(sc.width, sc.height, s.tile_size, overlap)
        stats = sc.stats if sc.dtype != np.uint8 else None
        plan = ScenePlan(str(scene), s, sc.width, sc.height, overlap, stats, transform=sc.transform, crs=sc.crs)
    finally:
        sc.close()
    index = 0
    for r0 in range(0, grid.n_rows, block_tiles):
        for c0 in range(0, grid.n_cols, block_tiles):
            tiles = tuple(r * grid.n_cols + c for r in range(r0, min(r0 + block_tiles, grid.n_rows))
                          for c in range(c0, min(c0 + block_tiles, grid.n_cols)))
            plan.blocks.append(Block(str(scene), index, r0, c0, tiles))
            index += 1
    source = getattr(detector, "source", None) or {}
    key = {"scene": str(scene), "settings": s.to_dict(), "grid": [sc.width, sc.height, s.tile_size, overlap],
           "stats": stats, "model": source.get("sha256"), "block_tiles": block_tiles, "parts": 3}
    plan.fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return plan


def run_block(plan: ScenePlan, block: Block, detector, device: str | torch.device | None = None) -> BlockResult:
    """Run ``detector`` (a geodet model, ONNX model or plain callable; prepared once per worker
    with ``prepare_detector``) over ``block``'s tiles; raw per-tile detections."""
    from ..io.scene import gdal_env
    from .detect import resolve_device, tile_detections

    dev = resolve_device(str(device) if device is not None else plan.settings.device)
    card = getattr(detector, "card", None)
    sc = plan.open(card)
    grid = plan.grid
    run, capped, skipped, unreadable, found = [], [], [], [], []
    on_nodata = 0
    results = tile_detections(sc, grid, detector, plan.settings, dev, indices=block.tiles)
    try:
        with gdal_env():
            for r in results:
                if r.unreadable is not None:
                    unreadable.append(r.unreadable)
                elif r.boxes is None:
                    skipped.append(r.tile.index)
                else:
                    run.append(r.tile.index)
                    on_nodata += r.on_nodata
                    if r.capped:
                        capped.append(r.tile.index)
                    found.append((r.tile, r.boxes, r.scores, r.labels))
    finally:
        try:
            results.close()  # its reader processes end now, also on an error
        finally:
            sc.close()
    rows = [t // grid.n_cols for t in block.tiles]
    cols = [t % grid.n_cols for t in block.tiles]
    stitch = stitch_block(grid, (min(rows), max(rows)), (min(cols), max(cols)), found, plan.settings.match_iou)
    return BlockResult(plan.scene, block.index, stitch, sorted(run), sorted(capped), sorted(skipped), unreadable,
                       on_nodata)


def prepare_detector(detector, plan: ScenePlan, device=None, chosen=None):
    """The detector a worker runs, prepared once: the backend ``chosen`` for the whole job
    (a ``choice.JobChoice``), else chosen as ``detect_scene`` would (on tiles of the plan's scene)."""
    from .choice import choose_detector
    from .detect import resolve_device

    if chosen is not None:  # chosen for CPU workers: on the CPU, whatever this worker can see
        return chosen.detector(detector, plan.settings)
    dev = resolve_device(str(device) if device is not None else plan.settings.device)
    sc = plan.open(getattr(detector, "card", None))
    try:
        return choose_detector(detector, dev, plan.settings, scene=sc, n_tiles=len(plan.grid))
    finally:
        sc.close()


def reduce_scene(plan: ScenePlan, results, classes=None):
    """Merge every block's stitch (only the seam boxes a block deferred are merged here) into the
    scene's frame, in the scene's CRS: identical, row for row, to ``detect_scene``.
    ``frame.attrs["report"]`` counts tiles and detections."""
    from .detect import to_frame

    results = list(results)
    seen = sorted(b.block for b in results)
    if seen != list(range(len(plan.blocks))):
        missing = sorted(set(range(len(plan.blocks))) - set(seen))
        raise GeodetError(f"{plan.scene}: blocks {missing[:10]} have no result, or a block came twice; run them first")
    grid = plan.grid
    det = reduce_blocks(grid, [b.stitch for b in results], plan.settings.match_iou)
    sc = plan.open()
    try:
        frame = to_frame(det, sc, classes)
    finally:
        sc.close()
    frame["scene"] = Path(plan.scene).name
    frame.attrs["report"] = {
        "scene": plan.scene, "fingerprint": plan.fingerprint, "blocks": len(plan.blocks), "tiles_total": len(grid),
        "tiles_run": sum(len(b.tiles_run) for b in results), "tiles_skipped": sum(len(b.skipped) for b in results),
        "tiles_capped": sum(len(b.tiles_capped) for b in results),
        "detections_on_nodata_dropped": sum(b.on_nodata for b in results),
        "unreadable_tiles": [u for b in results for u in b.unreadable],
        "detections_before_stitch": sum(b.stitch.n_in for b in results),
        "boxes_decided_in_reduce": sum(int(b.stitch.deferred[8].sum()) for b in results),
        "boxes_sent_to_reduce": sum(b.stitch.n_deferred for b in results),
        "detections": len(det), "settings": plan.settings.to_dict(),
    }
    return frame
