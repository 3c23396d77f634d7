"""The per-tile loop: tiles streamed through a ready detector in batches, each tile's detections
yielded as soon as its batch is done and fed to the stitcher, and the stitched detections as a
frame.

No stage holds the whole scene: windows are read one batch at a time, each batch's detections
go to the stitcher as soon as the batch is done, and only detections accumulate. Which backend
runs is decided above this loop (``choice.py``); the loop takes any detector.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch

from ..errors import GeodetError, ReadError
from ..io.scene import Scene, gdal_env
from ..progress import progress_bar
from .grid import Tile, TileGrid
from .batches import finish_batch, model_input, start_batch
from .reader import TileDataset, make_collate, read_batches, worker_init
from .ring import ring_available, ring_batches
from .settings import DetectSettings
from .bands import BandStitcher
from .stitch import SceneDetections, Stitcher

log = logging.getLogger(__name__)


class Detector(Protocol):
    """The detector protocol: a float batch ``[B, C, H, W]`` (scaled as the tile reader does) to
    one ``{"boxes" [N, 4] tile pixels, "scores" [N], "labels" [N]}`` per tile. A ``card``
    attribute (a ``ModelCard``), when present, supplies settings the caller leaves out."""

    def __call__(self, batch: torch.Tensor) -> list[dict[str, torch.Tensor]]: ...


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else the CPU; an explicit CUDA request without CUDA fails."""
    device = (device or "auto").lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GeodetError(f"device '{device}' requested but CUDA is not available here: use --device cpu or auto")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise GeodetError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N")


def default_workers(device: torch.device | None = None) -> int:
    """Tile-reading workers. On the CPU the model wants every core: with 2 cores a reader process
    beside 2 torch threads slowed the model 1.7x (docs/benchmarks.md), while reading all tiles
    in-process costs a few percent. With CUDA, readers overlap I/O with the GPU: on an H200 with
    16 cores, 8 readers ran the CPU preset at 969 tiles/s against 674 with 4 (docs/benchmarks.md,
    "GPU"); half the cores leaves the other half to decoding, stitching and the GPU's feeding."""
    cores = os.cpu_count() or 1
    if device is not None and device.type == "cpu":
        return 0 if cores <= 2 else min(2, cores // 4)
    return min(8, cores // 2)


ROOM = 16  # px: a tile whose part of the scene is narrower holds no object a capped tile could lose


@dataclass
class TileResult:
    """One tile's detections in tile pixels (``boxes`` is None for a skipped, empty tile)."""

    tile: Tile
    boxes: np.ndarray | None
    scores: np.ndarray | None
    labels: np.ndarray | None
    capped: bool = False  # the detector returned its maximum number of boxes for this tile
    unreadable: dict | None = None  # a tile GDAL could not read (on_read_error="skip"): window, error
    on_nodata: int = 0  # detections dropped because their centre lies on nodata (or past the scene)
    floor: float | None = None  # the lowest score the detector returned (before those on nodata were dropped)


def tile_detections(scene: Scene, grid: TileGrid, detector, settings: DetectSettings, device: torch.device,
                    indices: Iterable[int] | None = None, timings: dict | None = None) -> Iterator[TileResult]:
    """Run ``detector`` over the tiles ``indices`` (default: all) of ``grid``, in batches, and
    yield each tile's detections as soon as its batch is done. Skipped tiles (no valid pixels)
    are yielded with ``boxes=None``. ``timings`` collects seconds of read wait and model.

    One batch is in flight: the next batch's core is started (asynchronous on CUDA) before the
    previous batch's tiles are handed out, so the card computes while the caller stitches."""
    timings = timings if timings is not None else {}
    for k in ("read_wait", "model"):
        timings.setdefault(k, 0.0)
    batches = tile_batches(scene, grid, settings, device, indices)
    try:
        yield from _run_batches(scene, batches, detector, settings, device, timings)
    finally:
        close = getattr(batches, "close", None)  # reader processes end now, not when collected
        if close is not None:
            close()


def _run_batches(scene, batches, detector, settings, device, timings):
    """``tile_detections``'s loop over the reader's ``batches``."""
    prev = None
    t0 = time.perf_counter()
    for images, tiles, skipped, failed in batches:
        t1 = time.perf_counter()
        timings["read_wait"] += t1 - t0
        for tile, message, info in failed:
            if settings.on_read_error == "fail":
                raise ReadError(message, info)
        started = start_batch(detector, model_input(images, device), device) if images is not None else None
        timings["model"] += time.perf_counter() - t1
        if prev is not None:
            yield from batch_results(scene, settings, *prev, timings)
        t2 = time.perf_counter()
        pending = finish_batch(detector, started) if started is not None else None
        timings["model"] += time.perf_counter() - t2
        prev = (tiles, skipped, failed, pending)
        t0 = time.perf_counter()
    if prev is not None:
        yield from batch_results(scene, settings, *prev, timings)


def tile_batches(scene: Scene, grid: TileGrid, settings: DetectSettings, device: torch.device, indices=None):
    """The batches ``(images, tiles, skipped, failed)`` of the tiles ``indices``: read in this
    process into one reused buffer (the CPU without workers), or by worker processes (the ring
    reader on Linux, DataLoader workers elsewhere; pinned memory on CUDA, where uint8 scenes
    travel as uint8)."""
    workers = default_workers(device) if settings.num_workers is None else settings.num_workers
    if workers == 0 and device.type == "cpu":
        # in-process reading into one reused batch buffer (the model consumes each batch
        # before the next is read; on CUDA the copy to the GPU may still be running)
        return read_batches(scene, grid, settings.batch_size, settings.min_valid_fraction, indices,
                            settings.on_read_error)
    raw = device.type == "cuda" and scene.dtype == np.uint8
    prefetch = 4 if device.type == "cuda" else 2
    if workers > 0 and ring_available():
        # workers write into shared batch buffers: no per-batch shared-memory segment or pinning thread
        return ring_batches(scene, grid, settings.batch_size, workers, settings.min_valid_fraction, indices,
                            settings.on_read_error, raw=raw, pin=device.type == "cuda", prefetch=prefetch)
    data = TileDataset(scene, grid, indices, settings.on_read_error, raw=raw)
    return torch.utils.data.DataLoader(
        data, batch_size=settings.batch_size, num_workers=workers, collate_fn=make_collate(settings.min_valid_fraction),
        pin_memory=device.type == "cuda", worker_init_fn=worker_init if workers > 0 else None,
        prefetch_factor=prefetch if workers > 0 else None,
    )


def batch_results(scene: Scene, settings: DetectSettings, tiles, skipped, failed, pending,
                  timings: dict) -> Iterator[TileResult]:
    """A batch's tile results, in the order they always came: skipped, unreadable, then the tiles run."""
    for tile in skipped:
        yield TileResult(tile, None, None, None)
    for tile, message, info in failed:
        log.warning("skipping an unreadable tile: %s", message)
        yield TileResult(tile, None, None, None, unreadable={"tile_row": tile.row, "tile_col": tile.col, **info})
    if pending is None:
        return
    t0 = time.perf_counter()
    per_tile = pending.per_tile()  # waits for the batch's copy to the host, if it is still on its way
    timings["model"] += time.perf_counter() - t0
    for tile, (boxes, scores, labels) in zip(tiles, per_tile):
        keep = scores >= settings.score_threshold  # plain detectors get the threshold here
        n = int(keep.sum())
        if n:
            # a box centred where the scene has no data (a warped scene's corners, padding) is no object
            b = boxes[keep]
            keep[keep] = scene.valid_at(tile, (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2)
        yield TileResult(tile, boxes[keep], scores[keep], labels[keep],
                         capped=len(scores) >= settings.detections_per_tile, on_nodata=n - int(keep.sum()),
                         floor=float(scores.min()) if len(scores) else None)


def to_frame(det: SceneDetections, scene: Scene, classes: Sequence[str] | None):
    """Stitched detections as a GeoDataFrame in the scene's CRS (polygons from pixel edges)."""
    import geopandas as gpd

    from ..io.writers import boxes_to_polygons

    names = np.array(list(classes or []), dtype=object)
    if len(names) and len(det) and det.labels.max() >= len(names):
        raise GeodetError(f"detector returned label {int(det.labels.max())} but its card names {len(names)} classes")
    label_col = names[det.labels] if len(names) else det.labels.astype(str)
    return gpd.GeoDataFrame(
        {
            "scene": np.full(len(det), Path(scene.path).name, dtype=object),
            "label": np.asarray(label_col, dtype=object),
            "score": det.scores.astype(np.float64),
            "tile_row": det.tile_row,
            "tile_col": det.tile_col,
            "px_x0": det.boxes[:, 0], "px_y0": det.boxes[:, 1], "px_x1": det.boxes[:, 2], "px_y1": det.boxes[:, 3],
        },
        geometry=boxes_to_polygons(det.boxes, scene.transform),
        crs=scene.crs,
    )


@dataclass
class ScenePass:
    """One pass of a grid's tiles through a detector: the stitched detections and the counts the
    scene's report carries."""

    detections: SceneDetections
    n_in: int  # detections that went into the stitcher
    tiles_run: int = 0
    tiles_skipped: int = 0  # no valid pixels
    tiles_capped: int = 0  # returned the detector's maximum of boxes
    tiles_lost: int = 0  # capped with every kept box at or above the operating point: objects may be missing
    on_nodata: int = 0  # detections dropped because their centre lies on nodata
    unreadable: list = field(default_factory=list)


def detect_tiles(scene: Scene, grid: TileGrid, detector, settings: DetectSettings, device: torch.device,
                 timings: dict, operating_point: float | None = None, progress: bool = True) -> ScenePass:
    """Every tile of ``grid`` through ``detector`` (ready to run: see ``choice.choose_detector``)
    and into the stitcher, with a progress bar; ``timings`` gains the seconds of read wait, model
    and stitch."""
    # on CUDA the card leaves the host free: bands of rows are stitched in threads as they come
    stitcher = BandStitcher(grid, settings.match_iou) if device.type == "cuda" else Stitcher(grid, settings.match_iou)
    counts = dict(tiles_run=0, tiles_skipped=0, tiles_capped=0, tiles_lost=0, on_nodata=0)
    unreadable: list[dict] = []
    timings.setdefault("stitch", 0.0)
    bar = progress_bar(total=len(grid), desc=f"detect {Path(scene.path).name}", unit="tile", enabled=progress)
    results = tile_detections(scene, grid, detector, settings, device, timings=timings)
    try:
        with gdal_env():  # GDAL's block cache capped while the scene streams through
            for r in results:
                t0 = time.perf_counter()
                if r.unreadable is not None:
                    unreadable.append(r.unreadable)
                elif r.boxes is None:
                    counts["tiles_skipped"] += 1
                else:
                    counts["tiles_run"] += 1
                    counts["tiles_capped"] += r.capped
                    # a capped tile loses objects that matter only if the lowest score it returned is at
                    # or above the operating point: below it, only boxes the model ranks as noise were cut.
                    # Boxes on nodata count: they took places under the cap from objects beside them. A
                    # scene of a few pixels has no room for an object, whatever its padding gave.
                    x0, y0, x1, y1 = r.tile.valid
                    counts["tiles_lost"] += r.capped and r.floor is not None and min(x1 - x0, y1 - y0) >= ROOM and (
                        operating_point is None or r.floor >= operating_point)
                    counts["on_nodata"] += r.on_nodata
                    stitcher.add(r.tile, r.boxes, r.scores, r.labels)
                timings["stitch"] += time.perf_counter() - t0
                bar.update(1)
        t0 = time.perf_counter()
        det = stitcher.finish()
        timings["stitch"] += time.perf_counter() - t0
    finally:
        try:
            results.close()  # the readers end now, also when a tile failed the scene
        finally:
            bar.close()
            if isinstance(stitcher, BandStitcher):
                stitcher.close()
    return ScenePass(det, stitcher.n_in, unreadable=unreadable, **counts)
