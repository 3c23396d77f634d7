"""Whole-scene detection, the API's ``detect_scene`` and ``detect_scenes``: settings resolved once,
the backend chosen once per job (``choice.py``), each scene's tiles through the per-tile loop
(``detect.py``), and the frame with its report."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from ..errors import GeodetError, ReadError
from ..io.writers import crs_text
from .backends import OnnxDetector
from .choice import choose_detector
from .detect import ScenePass, default_workers, detect_tiles, resolve_device, to_frame
from .reader import open_scene, scene_grid
from .settings import DetectSettings, resolve_detect_settings

log = logging.getLogger(__name__)


def _pixel_area(area) -> tuple:
    """``area`` as four whole pixel numbers (x0, y0, x1, y1), or a one-line refusal."""
    try:
        values = tuple(float(v) for v in area)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 4 or not all(v == int(v) for v in values):
        raise GeodetError(f"area must be four whole pixel numbers (x0, y0, x1, y1) of the scene's grid, got {area!r}")
    return tuple(int(v) for v in values)


def detect_scene(scene, detector, *, config=None, progress: bool = True, area=None, **settings):
    """Detect objects over a whole scene (or the pixel ``area`` (x0, y0, x1, y1) of it); returns a
    GeoDataFrame in the scene's CRS. The caller's detector is never changed.

    ``detector`` is a geodet model or any callable of the ``Detector`` protocol. ``settings``
    (tile_size, overlap, overlap_m, score_threshold, nms_iou, detections_per_tile, bands, gsd_m,
    percentiles, min_valid_fraction, batch_size, device, num_workers, match_iou) override
    ``config`` (a ``Config`` whose file set them), which overrides the model card, which overrides
    the defaults (``resolve_detect_settings``). Columns: ``label``, ``score``, ``tile_row``,
    ``tile_col``, ``scene`` (the file name) and the pixel box ``px_x0, px_y0, px_x1, px_y1`` (pixel edges of the possibly resampled grid;
    with ``area``, of the area's grid and tiles: add the area's x0, y0 for the scene's pixels; the geometry is on the map either way);
    ``frame.attrs["report"]`` says what ran, with which settings, and how long each stage took.
    """
    t_start = time.perf_counter()
    detector, config = api_inputs(detector, config)
    detector = with_tta(detector, config, settings)
    card = getattr(detector, "card", None)
    s = resolve_detect_settings(card, config, **settings)
    device = resolve_device(s.device)
    sc = open_scene(scene, s, card)
    if sc is not scene:
        sc.defer_partial_warning = True  # said below, once the tiles have run
    try:
        view = sc.area(*_pixel_area(area)) if area is not None else sc
        grid = scene_grid(view, s)
        runner = choose_detector(detector, device, s, scene=sc, n_tiles=len(grid))
        if isinstance(runner, OnnxDetector):  # ONNX Runtime runs on the CPU
            device = torch.device("cpu")
        timings = {"read_wait": 0.0, "model": 0.0, "stitch": 0.0}
        stages_before = dict(getattr(runner, "timings", {}))
        op = getattr(card, "operating_point", None)
        done = detect_tiles(view, grid, runner, s, device, timings, op, progress)
        frame = to_frame(done.detections, view, card.classes if card is not None else None)
    finally:
        if sc is not scene:
            sc.close()
    for stage in ("core", "decode"):  # the model's own split: network core, and decode + NMS
        if stage in getattr(runner, "timings", {}):
            timings[f"model_{stage}"] = runner.timings[stage] - stages_before.get(stage, 0.0)
    timings["total"] = time.perf_counter() - t_start
    if sc.partly_unreadable and sc.defer_partial_warning:  # (a scene not deferred said it when it met the damage)
        log.warning("%s", sc.damage_note())
    log_losses(Path(sc.path).name, done, s, op)
    source = file_source(runner)
    frame.attrs["report"] = scene_report(view, grid, s, device, done, timings, card, source, area,
                                         getattr(runner, "choice", None))
    frame.attrs["report"]["tta"] = tta_report(runner)
    return frame


def api_inputs(detector, config):
    """The detector and config as a notebook may give them: a model file's path (loaded), a preset's
    name or a YAML path (loaded), a dict of sections; anything else that cannot be one, refused."""
    if isinstance(detector, (str, Path)):
        from .model_files import load_detector_file

        detector = load_detector_file(detector)
    elif not (callable(detector) or hasattr(detector, "card")):  # a geodet model (torch or ONNX), or a callable
        raise GeodetError(f"the detector must be a geodet model (geodet.load_model), a model file's path or a "
                          f"callable of the Detector protocol, got {type(detector).__name__}")
    from .model_files import refuse_backbone

    refuse_backbone(detector)  # one loaded in Python (geodet.load_model) too
    return detector, api_config(config)


def api_config(config):
    """A config as a notebook may give it (``config.as_config``), or None."""
    from ..config import as_config

    return None if config is None else as_config(config)


def scene_paths(scenes) -> list:
    """Scenes given to a many-scene function: a list, or one scene's path alone."""
    if isinstance(scenes, (str, Path)):
        return [scenes]
    if not hasattr(scenes, "__iter__"):
        raise GeodetError(f"scenes must be a list of scene paths, got {type(scenes).__name__}")
    return list(scenes)


def with_tta(detector, config, settings: dict):
    """``detector`` with test-time augmentation (``model/tta.py``) where ``settings["tta"]`` (popped)
    or ``config.detect.tta`` asks for it; TTA runs a geodet model in torch, so an ONNX model, the
    onnx backend and int8 are refused, before any work."""
    from ..model.tta import TtaModel

    tta = settings.pop("tta", None)
    if tta is None:
        tta = bool(config is not None and config.detect.tta)
    if not tta or isinstance(detector, TtaModel) or isinstance(getattr(detector, "model", None), TtaModel):
        return detector
    if getattr(detector, "backend", None) is not None:  # a TorchDetector/OnnxDetector: its model is set
        raise GeodetError("test-time augmentation wraps a geodet model, not a prepared detector: pass the model "
                          "(or its .pt file) with tta, or turn tta off")
    if not hasattr(detector, "net"):
        what = "an ONNX model" if getattr(detector, "backend", None) == "onnx" else "not a geodet .pt model"
        raise GeodetError(f"test-time augmentation (--tta, detect.tta) runs a geodet .pt model in torch, and this "
                          f"detector is {what}: give the model.pt (the one an .onnx was exported from), or turn tta off")
    backend = settings.get("backend") or (config.detect.backend if config is not None else "auto")
    precision = settings.get("precision") or (config.detect.precision if config is not None else "auto")
    if backend == "onnx" or precision == "int8":
        raise GeodetError("test-time augmentation (--tta, detect.tta) runs the model in torch: drop --backend onnx and "
                          "--precision int8, or turn tta off")
    return TtaModel(detector)


def file_source(runner) -> dict | None:
    """The model file a detector runs (path, hash), through its wrappers (TTA, a Torch/OnnxDetector)."""
    for _ in range(4):
        if runner is None or getattr(runner, "source", None):
            return getattr(runner, "source", None)
        runner = getattr(runner, "model", None)
    return None


def tta_report(runner) -> dict | None:
    from ..model.tta import VIEWS_SQUARE, TtaModel

    tta = runner if isinstance(runner, TtaModel) else getattr(runner, "model", None)
    if not isinstance(tta, TtaModel):
        return None
    # geodet's tiles are square (edge tiles padded): all eight views
    measured = tta.model.card.extra.get("tta_operating_point") is not None
    return {"views": len(tta.views or VIEWS_SQUARE), "fuse_iou": tta.fuse_iou,
            "operating_point": "measured with TTA at validation" if measured else
            "the plain model's (this model was trained without train.tta_operating_point): TTA's fused scores run "
            "lower where some views miss an object, so boxes a little under it may be real"}


def log_losses(name: str, done: ScenePass, s: DetectSettings, op: float | None) -> None:
    """Say what the pass lost: tiles at the detection cap, boxes centred on nodata."""
    if done.tiles_lost:
        log.warning("%s: %d of %d tiles returned the maximum of %d detections%s, so some objects may be missing: raise "
                    "--detections-per-tile (detect.detections_per_tile) or lower the tile size", name,
                    done.tiles_lost, done.tiles_run, s.detections_per_tile,
                    f", all scoring at least the operating point {op:.3g}" if op is not None else "")
    elif done.tiles_capped:
        log.debug("%s: %d tile(s) hit the cap of %d detections, only with boxes below the operating point %.3g",
                  name, done.tiles_capped, s.detections_per_tile, op)
    if done.on_nodata:
        log.info("%s: %d detection(s) centred outside the valid pixels (nodata or padding) dropped", name,
                 done.on_nodata)


def scene_report(sc, grid, s: DetectSettings, device, done: ScenePass, timings, card, source, area,
                 choice=None) -> dict:
    return {
        "scene": sc.path,
        "area_px": list(area) if area is not None else None,
        "scene_size_px": [sc.file_width, sc.file_height],
        "grid_size_px": [sc.width, sc.height],
        "resampled_to_gsd_m": sc.gsd_m if sc.resampled else None,
        "crs": crs_text(sc.crs),
        "bands": sc.bands,
        "tile_size": grid.tile_size,
        "overlap": grid.overlap,
        "tiles_total": len(grid),
        "tiles_run": done.tiles_run,
        "tiles_skipped": done.tiles_skipped,
        "tiles_capped": done.tiles_capped,
        "detections_before_stitch": done.n_in,
        "detections": len(done.detections),
        "device": str(device),
        "num_workers": default_workers(device) if s.num_workers is None else s.num_workers,
        "settings": s.to_dict(),
        "settings_from": dict(s.sources),
        "model": {"classes": list(card.classes), "operating_point": card.operating_point, **(source or {})} if card else None,
        "backend": choice.to_dict() if choice is not None else None,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "detections_on_nodata_dropped": done.on_nodata,
        "tiles_unreadable": len(done.unreadable),
        "unreadable_tiles": done.unreadable,
    }


def scene_names(paths: Sequence) -> list[str]:
    """What the ``scene`` column says for each scene: its file name, or, when two scenes share a
    file name, its path (the report always lists full paths)."""
    names = [Path(str(p)).name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]


def job_detector(paths: Sequence, detector, s: DetectSettings, failures: list | None):
    """The detector of a job over ``paths``, its backend chosen once (checked on tiles of the
    first readable scene; an int8 model made on the spot calibrates on the first scene with
    data); a detector whose backend is chosen, or a plain callable, as it is."""
    card = getattr(detector, "card", None)
    first, rest = None, []
    if getattr(detector, "backend", None) is None and hasattr(detector, "card"):
        for i, p in enumerate(paths):
            rest = list(paths[i + 1:])
            try:
                first = open_scene(p, s, card, warn=False)  # detect_scene opens it again and says what matters
                break
            except ReadError:
                if failures is None:
                    raise
    try:
        n_tiles = len(scene_grid(first, s)) * len(paths) if first is not None else 0
        return choose_detector(detector, resolve_device(s.device), s, scene=first, n_tiles=n_tiles, more_scenes=rest)
    finally:
        if first is not None:
            first.close()


def detect_scenes(paths: Sequence, detector, *, per_scene: bool = False, failures: list | None = None, **kwargs):
    """``detect_scene`` over many scenes, with a ``scene`` column. The detector is prepared once
    (one eval copy for a geodet model). With a ``failures`` list, a scene that cannot be read
    (``ReadError``) is appended there as ``{"scene", "error"}`` and the others go on. Returns one
    frame: in the scenes' CRS when they share
    one, else in EPSG:4326 with a ``crs`` column (``io.writers.combine_frames``); with
    ``per_scene=True``, the list of per-scene frames, each in its own CRS."""
    from ..io.writers import combine_frames

    paths = scene_paths(paths)
    if not paths:
        raise GeodetError("no scenes given")
    detector, kwargs["config"] = api_inputs(detector, kwargs.get("config"))
    detector = with_tta(detector, kwargs.get("config"), kwargs)
    card = getattr(detector, "card", None)
    s = resolve_detect_settings(card, kwargs.get("config"), **{k: v for k, v in kwargs.items() if k not in ("config", "progress")})
    kwargs["tta"] = False  # decided here, once: each scene runs the detector as it now is
    if len(paths) > 1:  # a later scene's bands, GSD or overlap that cannot be: refused before the first scene runs
        for p in paths:
            try:
                sc = open_scene(p, s, card, warn=False)
                try:
                    scene_grid(sc, s)
                finally:
                    sc.close()
            except ReadError:  # unreadable: it fails alone when its turn comes
                pass
    detector = job_detector(paths, detector, s, failures)
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
