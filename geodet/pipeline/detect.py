"""Whole-scene detection: settings resolved once, tiles streamed through a batched detector, a
per-tile detection generator, the stitcher, and one function that makes the frame.

No stage holds the whole scene: windows are read one batch at a time, each batch's detections
go to the stitcher as soon as the batch is done, and only detections accumulate.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch

from ..errors import GeodetError, ReadError
from ..io.scene import Scene, gdal_env
from ..progress import progress_bar
from .backends import OnnxDetector, TorchDetector, choose_detector  # noqa: F401  (TorchDetector: API)
from .grid import Tile, TileGrid, overlap_pixels
from .reader import TileDataset, make_collate, read_batches, worker_init
from .settings import DetectSettings, resolve_detect_settings
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


def as_detector(detector, device: torch.device, settings: DetectSettings, scene=None, n_tiles: int = 0):
    """A geodet model (or ONNX model) becomes the detector of the chosen backend and precision
    (``backends.choose_detector``); any other callable is used as it is."""
    return choose_detector(detector, device, settings, scene, n_tiles)


def open_scene(scene, settings: DetectSettings, card=None, warn: bool = True) -> Scene:
    """Open ``scene`` (a path or a ``Scene``) with the bands, GSD and scaling of ``settings``
    (``warn``: say when the card's GSD cannot apply; off for a second opening of one scene)."""
    if isinstance(scene, Scene):
        return scene
    from ..io.scene import open_raster

    path = str(scene)
    with open_raster(path) as src:
        count, projected = src.count, src.crs is not None and src.crs.is_projected
    bands = list(settings.bands)
    if card is not None and (len(bands) != card.n_bands or max(bands) > count):
        listed = ",".join(str(b) for b in card.bands)
        raise GeodetError(
            f"model expects {card.n_bands} band(s) ({listed}); scene {Path(path).name} has {count}: pass --bands "
            f"with {card.n_bands} band number(s) from 1 to {count}"
        )
    gsd_m = settings.gsd_m
    if gsd_m is not None and settings.sources.get("gsd_m") == "card" and not projected:
        # The card's GSD is in metres; a scene without a projected CRS cannot be resampled to
        # it, so it runs at its own resolution (an explicit --gsd still fails clearly).
        if warn:
            log.warning("%s has no projected CRS: running at its native resolution, not the model's %.3g m", path, gsd_m)
        gsd_m = None
    return Scene(path, bands=bands, gsd_m=gsd_m, percentiles=settings.percentiles)


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


def tile_detections(scene: Scene, grid: TileGrid, detector, settings: DetectSettings, device: torch.device,
                    indices: Iterable[int] | None = None, timings: dict | None = None) -> Iterator[TileResult]:
    """Run ``detector`` over the tiles ``indices`` (default: all) of ``grid``, in batches, and
    yield each tile's detections as soon as its batch is done. Skipped tiles (no valid pixels)
    are yielded with ``boxes=None``. ``timings`` collects seconds of read wait and model."""
    timings = timings if timings is not None else {}
    for k in ("read_wait", "model"):
        timings.setdefault(k, 0.0)
    workers = default_workers(device) if settings.num_workers is None else settings.num_workers
    if workers == 0 and device.type == "cpu":
        # in-process reading into one reused batch buffer (the model consumes each batch
        # before the next is read; on CUDA the copy to the GPU may still be running)
        batches = read_batches(scene, grid, settings.batch_size, settings.min_valid_fraction, indices,
                               settings.on_read_error)
    else:
        data = TileDataset(scene, grid, indices, settings.on_read_error)
        batches = torch.utils.data.DataLoader(
            data, batch_size=settings.batch_size, num_workers=workers, collate_fn=make_collate(settings.min_valid_fraction),
            pin_memory=device.type == "cuda", worker_init_fn=worker_init if workers > 0 else None,
            prefetch_factor=2 if workers > 0 else None,
        )
    t0 = time.perf_counter()
    for images, tiles, skipped, failed in batches:
        t1 = time.perf_counter()
        timings["read_wait"] += t1 - t0
        for tile in skipped:
            yield TileResult(tile, None, None, None)
        for tile, message, info in failed:
            if settings.on_read_error == "fail":
                raise ReadError(message, info)
            log.warning("skipping an unreadable tile: %s", message)
            yield TileResult(tile, None, None, None, unreadable={"tile_row": tile.row, "tile_col": tile.col, **info})
        if images is not None:
            images = images.to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            # geodet's detectors run their own precision; plain callables get autocast on CUDA
            plain = getattr(detector, "backend", None) is None
            with torch.inference_mode(), torch.autocast(device.type, enabled=plain and device.type == "cuda"):
                outputs = detector(images)
            timings["model"] += time.perf_counter() - t1
            for tile, (boxes, scores, labels) in zip(tiles, batch_to_host(outputs)):
                keep = scores >= settings.score_threshold  # plain detectors get the threshold here
                n = int(keep.sum())
                if n:
                    # a box centred where the scene has no data (a warped scene's corners, padding) is no object
                    b = boxes[keep]
                    keep[keep] = scene.valid_at(tile, (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2)
                yield TileResult(tile, boxes[keep], scores[keep], labels[keep],
                                 capped=len(scores) >= settings.detections_per_tile, on_nodata=n - int(keep.sum()))
        t0 = time.perf_counter()


def batch_to_host(outputs: Sequence[dict]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A batch's detections as numpy ``(boxes float32, scores float32, labels)`` per tile, moved
    off the device in one copy per field rather than three per tile."""
    counts = [len(o["scores"]) for o in outputs]
    if not outputs:
        return []
    boxes = torch.cat([torch.as_tensor(o["boxes"]).reshape(-1, 4).float() for o in outputs]).cpu().numpy()
    scores = torch.cat([torch.as_tensor(o["scores"]).reshape(-1).float() for o in outputs]).cpu().numpy()
    labels = torch.cat([torch.as_tensor(o["labels"]).reshape(-1) for o in outputs]).cpu().numpy()
    cuts = np.cumsum(counts)[:-1]
    return list(zip(np.split(boxes, cuts), np.split(scores, cuts), np.split(labels, cuts)))


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


def detect_scene(scene, detector, *, config=None, progress: bool = True, area=None, **settings):
    """Detect objects over a whole scene (or the pixel ``area`` (x0, y0, x1, y1) of it); returns a
    GeoDataFrame in the scene's CRS. The caller's detector is never changed.

    ``detector`` is a geodet model or any callable of the ``Detector`` protocol. ``settings``
    (tile_size, overlap, overlap_m, score_threshold, nms_iou, detections_per_tile, bands, gsd_m,
    percentiles, min_valid_fraction, batch_size, device, num_workers, match_iou) override
    ``config`` (a ``Config`` whose file set them), which overrides the model card, which overrides
    the defaults (``resolve_detect_settings``). Columns: ``label``, ``score``, ``tile_row``,
    ``tile_col``, ``scene`` (the file name) and the pixel box ``px_x0, px_y0, px_x1, px_y1`` (pixel edges of the possibly resampled grid);
    ``frame.attrs["report"]`` says what ran, with which settings, and how long each stage took.
    """
    t_start = time.perf_counter()
    card = getattr(detector, "card", None)
    s = resolve_detect_settings(card, config, **settings)
    device = resolve_device(s.device)
    sc = open_scene(scene, s, card)
    bar = None
    try:
        view = sc.area(*area) if area is not None else sc
        overlap = overlap_pixels(s.overlap_m, view.pixel_gsd) if s.overlap_m is not None else s.overlap
        grid = TileGrid(view.width, view.height, s.tile_size, overlap)
        runner = as_detector(detector, device, s, scene=sc, n_tiles=len(grid))
        if isinstance(runner, OnnxDetector):
            device = torch.device("cpu")
        stitcher = Stitcher(grid, s.match_iou)
        timings = {"read_wait": 0.0, "model": 0.0, "stitch": 0.0}
        stages_before = dict(getattr(runner, "timings", {}))
        n_run = n_skipped = n_capped = n_nodata = n_lost = 0
        # a capped tile loses objects that matter only if its lowest kept score is at or above the
        # operating point: below it, only boxes the model itself ranks as noise were cut
        op = getattr(card, "operating_point", None)
        unreadable: list[dict] = []
        bar = progress_bar(total=len(grid), desc=f"detect {Path(sc.path).name}", unit="tile", enabled=progress)
        with gdal_env():  # GDAL's block cache capped while the scene streams through
            for r in tile_detections(view, grid, runner, s, device, timings=timings):
                t0 = time.perf_counter()
                if r.unreadable is not None:
                    unreadable.append(r.unreadable)
                elif r.boxes is None:
                    n_skipped += 1
                else:
                    n_run += 1
                    n_capped += r.capped
                    n_lost += r.capped and (op is None or not len(r.scores) or float(r.scores.min()) >= op)
                    n_nodata += r.on_nodata
                    stitcher.add(r.tile, r.boxes, r.scores, r.labels)
                timings["stitch"] += time.perf_counter() - t0
                bar.update(1)
        t0 = time.perf_counter()
        det = stitcher.finish()
        timings["stitch"] += time.perf_counter() - t0
        frame = to_frame(det, view, card.classes if card is not None else None)
    finally:
        if bar is not None:
            bar.close()
        if sc is not scene:
            sc.close()
    for stage in ("core", "decode"):  # the model's own split: network core, and decode + NMS
        if stage in getattr(runner, "timings", {}):
            timings[f"model_{stage}"] = runner.timings[stage] - stages_before.get(stage, 0.0)
    timings["total"] = time.perf_counter() - t_start
    if n_lost:
        log.warning("%s: %d of %d tiles returned the maximum of %d detections%s, so some objects may be missing: raise "
                    "--detections-per-tile (detect.detections_per_tile) or lower the tile size", Path(sc.path).name,
                    n_lost, n_run, s.detections_per_tile,
                    f", all scoring at least the operating point {op:.3g}" if op is not None else "")
    elif n_capped:
        log.debug("%s: %d tile(s) hit the cap of %d detections, only with boxes below the operating point %.3g",
                 Path(sc.path).name, n_capped, s.detections_per_tile, op)
    if n_nodata:
        log.info("%s: %d detection(s) centred outside the valid pixels (nodata or padding) dropped", Path(sc.path).name,
                 n_nodata)
    frame.attrs["report"] = scene_report(view, grid, s, device, (n_run, n_skipped, n_capped), stitcher.n_in, len(det),
                                         timings, card, getattr(runner, "source", None), area,
                                         getattr(runner, "choice", None))
    frame.attrs["report"]["detections_on_nodata_dropped"] = n_nodata
    frame.attrs["report"]["tiles_unreadable"] = len(unreadable)
    frame.attrs["report"]["unreadable_tiles"] = unreadable
    return frame


def scene_report(sc, grid, s: DetectSettings, device, tiles, n_in, n_out, timings, card, source, area,
                 choice=None) -> dict:
    n_run, n_skipped, n_capped = tiles
    return {
        "scene": sc.path,
        "area_px": list(area) if area is not None else None,
        "scene_size_px": [sc.file_width, sc.file_height],
        "grid_size_px": [sc.width, sc.height],
        "resampled_to_gsd_m": sc.gsd_m if sc.resampled else None,
        "crs": sc.crs.to_string() if sc.crs else None,
        "bands": sc.bands,
        "tile_size": grid.tile_size,
        "overlap": grid.overlap,
        "tiles_total": len(grid),
        "tiles_run": n_run,
        "tiles_skipped": n_skipped,
        "tiles_capped": n_capped,
        "detections_before_stitch": n_in,
        "detections": n_out,
        "device": str(device),
        "num_workers": default_workers(device) if s.num_workers is None else s.num_workers,
        "settings": s.to_dict(),
        "settings_from": dict(s.sources),
        "model": {"classes": list(card.classes), "operating_point": card.operating_point, **(source or {})} if card else None,
        "backend": choice.to_dict() if choice is not None else None,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
    }


def scene_names(paths: Sequence) -> list[str]:
    """What the ``scene`` column says for each scene: its file name, or, when two scenes share a
    file name, its path (the report always lists full paths)."""
    names = [Path(str(p)).name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]


def detect_scenes(paths: Sequence, detector, *, per_scene: bool = False, failures: list | None = None, **kwargs):
    """``detect_scene`` over many scenes, with a ``scene`` column. The detector is prepared once
    (one eval copy for a geodet model). With a ``failures`` list, a scene that cannot be read
    (``ReadError``) is appended there as ``{"scene", "error"}`` and the others go on. Returns one
    frame: in the scenes' CRS when they share
    one, else in EPSG:4326 with a ``crs`` column (``io.writers.combine_frames``); with
    ``per_scene=True``, the list of per-scene frames, each in its own CRS."""
    from ..io.writers import combine_frames

    if not paths:
        raise GeodetError("no scenes given")
    card = getattr(detector, "card", None)
    s = resolve_detect_settings(card, kwargs.get("config"), **{k: v for k, v in kwargs.items() if k not in ("config", "progress")})
    first = None
    if getattr(detector, "backend", None) is None and hasattr(detector, "card"):
        # the backend is chosen once for the job, checked on tiles of its first scene
        for p in paths:
            try:
                first = open_scene(p, s, card, warn=False)  # detect_scene opens it again and says what matters
                break
            except ReadError:
                if failures is None:
                    raise
    try:
        n_tiles = 0
        if first is not None:
            overlap = overlap_pixels(s.overlap_m, first.pixel_gsd) if s.overlap_m is not None else s.overlap
            n_tiles = len(TileGrid(first.width, first.height, s.tile_size, overlap)) * len(paths)
        detector = as_detector(detector, resolve_device(s.device), s, scene=first, n_tiles=n_tiles)
    finally:
        if first is not None:
            first.close()
    frames = []
    names = scene_names(paths)
    for p, name in zip(paths, names):
        try:
            f = detect_scene(p, detector, **kwargs)
        except ReadError as exc:
            # with a ``failures`` list, a scene that cannot be read fails alone
            if failures is None:
                raise
            log.error("%s", exc)
            failures.append({"scene": str(p), "error": str(exc)})
            continue
        f["scene"] = name
        frames.append(f)
    if per_scene:
        return frames
    out = combine_frames(frames)
    out.attrs["report"] = {"scenes": [f.attrs["report"] for f in frames]}
    return out
