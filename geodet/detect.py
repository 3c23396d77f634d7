"""Whole-scene detection: tiles stream through a DataLoader, a batched detector and the stitcher.

No stage holds the whole scene: windows are read by workers, each batch's detections go to the
stitcher as soon as the batch is done, and only detections accumulate.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import GeodetError
from .progress import progress_bar
from .scene import Scene
from .stitch import Stitcher
from .tiling import TileDataset, TileGrid, make_collate, overlap_pixels, read_batches, worker_init

log = logging.getLogger(__name__)


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
    in-process costs a few percent. With CUDA, readers overlap I/O with the GPU."""
    cores = os.cpu_count() or 1
    if device is not None and device.type == "cpu":
        return 0 if cores <= 2 else min(2, cores // 4)
    return max(0, min(4, cores - 1))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _card(detector) -> dict:
    return getattr(detector, "card", None) or {}


def open_scene_for(scene, detector, bands=None, gsd_m=None, percentiles=None) -> Scene:
    """Open ``scene`` with the bands, GSD and scaling the detector's card asks for."""
    if isinstance(scene, Scene):
        return scene
    from .scene import open_raster

    card = _card(detector)
    want = list(bands) if bands else card.get("bands")
    path = str(scene)
    with open_raster(path) as src:
        count, projected = src.count, src.crs is not None and src.crs.is_projected
    if card and want:
        model_n = len(card["bands"])
        if len(want) != model_n or max(want) > count:
            listed = ",".join(str(b) for b in card["bands"])
            raise GeodetError(
                f"model expects {model_n} band(s) ({listed}); scene {Path(path).name} has {count}: pass --bands "
                f"with {model_n} band number(s) from 1 to {count}"
            )
    if gsd_m is None and card.get("gsd_m"):
        gsd_m = card["gsd_m"]
        if not projected:
            # The card's GSD is in metres; a scene without a projected CRS cannot be resampled
            # to it, so it runs at its own resolution (an explicit --gsd still fails clearly).
            log.warning("%s has no projected CRS: running at its native resolution, not the model's %.3g m", path, gsd_m)
            gsd_m = None
    return Scene(
        path,
        bands=want or (1, 2, 3),
        gsd_m=gsd_m,
        percentiles=percentiles or card.get("percentiles") or (2.0, 98.0),
    )


def detect_scene(
    scene,
    detector: Callable,
    *,
    tile_size: int | None = None,
    overlap: int | None = None,
    overlap_m: float | None = None,
    batch_size: int = 8,
    score_threshold: float | None = None,
    device: str = "auto",
    num_workers: int | None = None,
    progress: bool = True,
    bands: Sequence[int] | None = None,
    gsd_m: float | None = None,
    min_valid_fraction: float = 0.0,
    match_iou: float = 0.5,
):
    """Detect objects over a whole scene; returns a GeoDataFrame in the scene's CRS.

    ``detector`` is a geodet model or any callable ``batch [B, C, H, W] -> [{boxes, scores,
    labels}]`` with boxes in tile pixels. Settings left as None come from the model card.
    Columns: ``label`` (class name), ``score``, ``tile_row``, ``tile_col`` and the pixel box
    ``x0, y0, x1, y1`` (pixel edges of the possibly resampled grid). ``frame.attrs["report"]``
    holds tiles run and skipped and seconds per stage.
    """
    import geopandas as gpd

    from .export import boxes_to_polygons

    t_start = time.perf_counter()
    card = _card(detector)
    if batch_size < 1:
        raise GeodetError(f"batch size must be at least 1, got {batch_size}")
    dev = resolve_device(device)
    sc = open_scene_for(scene, detector, bands=bands, gsd_m=gsd_m)
    tile_size = int(tile_size or card.get("tile_size") or 512)
    if overlap_m is not None:
        overlap = overlap_pixels(overlap_m, sc.pixel_gsd)
    overlap = int(overlap if overlap is not None else card.get("overlap", 64))
    grid = TileGrid(sc.width, sc.height, tile_size, overlap)
    classes = list(card.get("classes") or [])
    is_module = isinstance(detector, torch.nn.Module)
    if is_module:
        detector.eval().to(dev)
        if dev.type == "cuda":
            detector.to(memory_format=torch.channels_last)
        if score_threshold is not None and hasattr(detector, "set_thresholds"):
            detector.set_thresholds(score_threshold=score_threshold)
    workers = default_workers(dev) if num_workers is None else int(num_workers)
    if workers == 0 and dev.type == "cpu":
        # in-process reading into one reused batch buffer (the model consumes each batch
        # before the next is read; on CUDA the copy to the GPU may still be running)
        loader = read_batches(sc, grid, batch_size, min_valid_fraction)
    else:
        loader = torch.utils.data.DataLoader(
            TileDataset(sc, grid),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=make_collate(min_valid_fraction),
            pin_memory=dev.type == "cuda",
            worker_init_fn=worker_init if workers > 0 else None,
            prefetch_factor=2 if workers > 0 else None,
        )
    stitcher = Stitcher(grid, match_iou)
    timings = {"read_wait": 0.0, "model": 0.0, "stitch": 0.0}
    n_run = n_skipped = 0
    bar = progress_bar(total=len(grid), desc=f"detect {Path(sc.path).name}", unit="tile", enabled=progress)
    try:
        t0 = time.perf_counter()
        for images, tiles, skipped in loader:
            t1 = time.perf_counter()
            timings["read_wait"] += t1 - t0
            n_skipped += len(skipped)
            if images is not None:
                images = images.to(dev, non_blocking=True)
                if dev.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode(), torch.autocast(dev.type, enabled=dev.type == "cuda"):
                    outputs = detector(images)
                t2 = time.perf_counter()
                timings["model"] += t2 - t1
                for tile, out in zip(tiles, outputs):
                    boxes = out["boxes"].float().cpu().numpy()
                    scores = out["scores"].float().cpu().numpy()
                    labels = out["labels"].cpu().numpy()
                    if score_threshold is not None and not is_module:
                        keep = scores >= score_threshold
                        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
                    stitcher.add(tile, boxes, scores, labels)
                timings["stitch"] += time.perf_counter() - t2
                n_run += len(tiles)
            bar.update(len(tiles) + len(skipped))
            t0 = time.perf_counter()
    finally:
        bar.close()
    t3 = time.perf_counter()
    det = stitcher.finish()
    timings["stitch"] += time.perf_counter() - t3
    names = np.array(classes or [], dtype=object)
    if len(names) and len(det) and det.labels.max() >= len(names):
        raise GeodetError(f"detector returned label {int(det.labels.max())} but its card names {len(names)} classes")
    label_col = names[det.labels] if len(names) else det.labels.astype(str)
    frame = gpd.GeoDataFrame(
        {
            "label": np.asarray(label_col, dtype=object),
            "score": det.scores.astype(np.float64),
            "tile_row": det.tile_row,
            "tile_col": det.tile_col,
            "x0": det.boxes[:, 0], "y0": det.boxes[:, 1], "x1": det.boxes[:, 2], "y1": det.boxes[:, 3],
        },
        geometry=boxes_to_polygons(det.boxes, sc.transform),
        crs=sc.crs,
    )
    timings["total"] = time.perf_counter() - t_start
    frame.attrs["report"] = {
        "scene": sc.path,
        "scene_size_px": [sc.file_width, sc.file_height],
        "grid_size_px": [sc.width, sc.height],
        "resampled_to_gsd_m": sc.gsd_m if sc.resampled else None,
        "crs": sc.crs.to_string() if sc.crs else None,
        "bands": sc.bands,
        "tile_size": tile_size,
        "overlap": overlap,
        "tiles_total": len(grid),
        "tiles_run": n_run,
        "tiles_skipped": n_skipped,
        "detections_before_stitch": stitcher.n_in,
        "detections": len(det),
        "device": str(dev),
        "batch_size": batch_size,
        "num_workers": workers,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
    }
    sc.close()
    return frame


def detect_scenes(paths: Sequence, detector, **kwargs):
    """``detect_scene`` over many scenes: one frame with a ``scene`` column.

    Scenes in different CRSs are brought to the first scene's CRS.
    """
    import pandas as pd

    frames = []
    for p in paths:
        f = detect_scene(p, detector, **kwargs)
        f.insert(0, "scene", str(p))
        frames.append(f)
    if not frames:
        raise GeodetError("no scenes given")
    crs = frames[0].crs
    frames = [f.to_crs(crs) if (crs is not None and f.crs is not None and f.crs != crs) else f for f in frames]
    out = pd.concat(frames, ignore_index=True)
    out.attrs["report"] = {"scenes": [f.attrs["report"] for f in frames]}
    return out
