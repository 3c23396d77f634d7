"""A detection job as the ``geodet detect`` command runs it, for the Python API too: checks
before any work, detection over every scene, the output file, its report and quicklooks."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Sequence

from ..errors import GeodetError, ReadError, brief
from .model_files import load_detector_file

log = logging.getLogger(__name__)


def check_job(scenes: Sequence, out, cfg, fmt: str | None = None, quicklook=None, device: str | None = None, model=None):
    """The checks ``detect_to_file`` makes before any work (scenes given, output folder and
    format, quicklook paths, the scenes' CRS, the device): ``(fmt, out, quicklook paths, readable
    scenes, failures)``; a job that prepares its model first (``detect --adapt``) makes them too.
    ``model`` (its file, or a loaded model) may not be named as an output either."""
    from ..io.writers import check_output_path, output_format
    from .detect import resolve_device

    if not scenes:
        raise GeodetError("no scenes given")
    check_each_scene_once(scenes, "its detections would be written twice")
    fmt = output_format(out, fmt or cfg.output.format)
    out = check_output_path(out, fmt)
    looks = _quicklook_paths(quicklook, scenes) if quicklook else []
    for p in looks:
        check_output_path(p, suffixes=(".png",), example="quicklook.png")
    _check_no_overwrite(scenes, out, fmt, looks, _model_file(model))
    readable, failures = _readable_scenes(scenes, fmt)
    resolve_device(device or cfg.detect.device)
    return fmt, out, looks, readable, failures


def detect_to_file(scenes: Sequence, model, out, *, config=None, fmt: str | None = None, csv_geometry: str | None = None,
                   quicklook=None, quicklook_min_score: float | None = None, progress: bool = True,
                   **settings):
    """Detect over ``scenes`` with ``model`` (a model file path or a loaded geodet model) and
    write ``out`` (format from ``fmt`` or the extension) plus ``OUT.report.json``; with
    ``quicklook`` also a PNG per scene, drawing boxes scoring ``quicklook_min_score`` or more
    (default: the card's operating point). Every check (output folder, format, scene CRS, device,
    bands) runs before any work. Returns the frame; ``frame.attrs["report"]`` is the report.

    Damaged or unreachable input: with ``on_read_error="skip"`` unreadable tiles are skipped and
    listed; in a job of several scenes, a scene that cannot be read fails alone (listed in the
    report's ``failed_scenes``) and the others are written. ``report["partial"]`` says so."""
    from ..config import load_config
    from ..io.writers import check_shapefile_classes, combine_frames, write_detections
    from .scenes import api_config, detect_scenes, scene_paths

    scenes = scene_paths(scenes)
    cfg = api_config(config) if config is not None else load_config()
    fmt, out, looks, readable, failures = check_job(scenes, out, cfg, fmt, quicklook, settings.get("device"), model)
    if isinstance(model, (str, Path)):
        model = load_detector_file(model)
    if fmt == "shp" and getattr(model, "card", None) is not None:  # before the work, not once it is done
        check_shapefile_classes(model.card.classes)
    t0 = time.perf_counter()
    frames = detect_scenes(readable, model, config=cfg, progress=progress, per_scene=True,
                           failures=failures if len(scenes) > 1 else None, **settings) if readable else []
    if not frames:
        raise GeodetError("no scene could be read; nothing was written: " + " | ".join(f["error"] for f in failures))
    frame = combine_frames(frames)
    t1 = time.perf_counter()
    card = getattr(model, "card", None)
    # the operating point of what ran (with --tta, the card's TTA operating point where it has one)
    ran = frames[0].attrs["report"].get("model") or {}
    op = ran.get("operating_point", card.operating_point if card is not None else None)
    report = _job_report(out, fmt, model, scenes, frames, failures, len(frame))
    if looks:  # before the output, so the report that lands with it names only quicklooks that exist
        min_score = quicklook_min_score if quicklook_min_score is not None else op
        report["quicklooks"] = _draw_quicklooks(scenes, looks, frames, card, min_score)
    t2 = time.perf_counter()

    def finished():
        report["seconds"] = {"detect": round(t1 - t0, 3), "write": round(time.perf_counter() - t2, 3)}
        return report

    # the report lands with the output (one rename after the other), never an old one beside a new output
    write_detections(frames, out, fmt, csv_geometry or cfg.output.csv_geometry, style_min_score=op, report=finished)
    frame.attrs["report"] = report
    return frame


def check_each_scene_once(scenes: Sequence, why: str) -> None:
    """Refuse a scene named twice (two names of one file included), saying ``why`` it matters."""
    from ..io.outputs import scene_key

    seen = {}
    for s in scenes:
        key = scene_key(s)
        if key in seen:
            also = "" if str(seen[key]) == str(s) else f" (as {seen[key]} too)"
            raise GeodetError(f"{s} is given twice{also}: {why}; name each scene once")
        seen[key] = s


def _model_file(model):
    """The file a model was given as (a path, a run folder's model.pt, a loaded model's source)."""
    path = model if isinstance(model, (str, Path)) else (getattr(model, "source", None) or {}).get("path")
    if not path or str(path).startswith("hf://"):
        return None
    path = Path(str(path))
    return path / "model.pt" if path.is_dir() else path


def _check_no_overwrite(scenes: Sequence, out: Path, fmt: str, looks: list, model_file=None) -> None:
    """Refuse, before any work, an output or quicklook that would replace a scene of the job or
    one another (``-o scene.tif --format gpkg``, ``--quicklook`` named as the output)."""
    from ..io.writers import report_path, same_file_key

    sidecars = {"csv": (".prj", ".csvt", ".qml"), "shp": (".shx", ".dbf", ".prj", ".cpg", ".qml"), "gpkg": ()}
    files = [(out, "the output"), (report_path(out), "the output's report")]
    files += [(out.with_suffix(x), f"the output's {x} file") for x in sidecars.get(fmt, (".qml",))]
    files += [(p, "a quicklook") for p in looks]
    written = {}
    for p, what in files:
        key = same_file_key(p)
        if key in written:
            raise GeodetError(f"{p} would be written as {what} and as {written[key][1]}: give them different names")
        written[key] = (p, what)
    if model_file is not None and same_file_key(model_file) in written:
        raise GeodetError(f"{model_file} is the model of this job: writing {written[same_file_key(model_file)][1]} "
                          "there would replace it; choose another output name")
    for s in scenes:
        hit = written.get(same_file_key(s))
        if hit:
            raise GeodetError(f"{s} is a scene of this job: writing {hit[1]} there would replace it; choose another "
                              "output name")


def _readable_scenes(scenes: Sequence, fmt: str) -> tuple[list, list[dict]]:
    """The scenes that open, and the failures of those that do not (a remote scene that cannot be
    reached fails alone in a job of several; alone, it fails the job). A scene without a CRS
    fails the job unless the output is CSV (pixel boxes)."""
    from ..io.raster import georeference_advice, grid_crs, open_raster
    from ..io.writers import SINGLE_CRS, check_reaches_wgs84, distinct_crss

    crss, failures, readable, places = [], [], [], []
    for s in scenes:
        try:
            src = open_raster(s)
        except (ReadError, GeodetError) as exc:  # missing, not a raster, damaged, unreachable
            if len(scenes) == 1:
                raise
            failures.append({"scene": str(s), "error": str(exc)})
            continue
        readable.append(s)
        with src:
            crs = grid_crs(src)
            if fmt != "csv" and crs is None:
                what = "no CRS" if src.crs is None else "a CRS but no geotransform (no place in it)"
                raise GeodetError(
                    f"{s}: the scene has {what}, so {fmt} output cannot be georeferenced: write CSV (-o out.csv) "
                    f"for pixel boxes, or {georeference_advice(src)}"
                )
            crss.append(crs)
            places.append((s, crs, src.bounds))
    several = len(distinct_crss(crss)) > 1
    for s, crs, b in places:  # GeoJSON, and a one-CRS file of several CRSs, are written in WGS 84
        if crs is not None and (fmt == "geojson" or fmt in SINGLE_CRS and several):
            check_reaches_wgs84(crs, ((b.left + b.right) / 2, (b.bottom + b.top) / 2), fmt, str(s))
    if several and fmt in SINGLE_CRS:
        log.info("the scenes are in %d CRSs and a %s file holds one: it is written in EPSG:4326, with a crs column "
                 "naming each row's scene CRS (.gpkg keeps each CRS in a layer of its own)", len(distinct_crss(crss)), fmt)
    return readable, failures


def _job_report(out, fmt: str, model, scenes: Sequence, frames: list, failures: list, n_detections: int) -> dict:
    """The job's report: output, model, inputs, each scene's report, what failed."""
    card = getattr(model, "card", None)
    adapted = (card.extra.get("adapted_to") if card is not None else None) or None
    # an adapted (AdaBN) copy has no file of its own: the report names the file it was made from
    source = getattr(model, "source", None) or (adapted or {}).get("model") or {}
    return {
        "output": str(out), "format": fmt, "detections": n_detections,
        "model": {"path": source.get("path"), "sha256": source.get("sha256"),
                  "backend": (frames[0].attrs["report"].get("backend") if frames else None),
                  "classes": list(card.classes) if card else None,
                  "operating_point": ((frames[0].attrs["report"].get("model") or {}).get("operating_point") if frames
                                      else None) if card else None,
                  "tta": (frames[0].attrs["report"].get("tta") if frames else None) or False,  # views when on
                  "adapted_to": adapted},
        "inputs": [_input(s) for s in scenes],
        "output_crs": report_crs(fmt, frames),
        "scenes": [f.attrs["report"] for f in frames],
        "failed_scenes": failures,
        "tiles_unreadable": sum(f.attrs["report"].get("tiles_unreadable", 0) for f in frames),
        "partial": bool(failures) or any(f.attrs["report"].get("tiles_unreadable", 0) for f in frames),
    }


def _draw_quicklooks(scenes: Sequence, looks: list, frames: list, card, min_score: float | None) -> list[str]:
    """A PNG per scene that ran (``looks``: one path per scene), boxes from ``min_score``."""
    from ..io.quicklook import quicklook as draw

    ran = {f.attrs["report"]["scene"] for f in frames}
    pairs = [(x, p) for x, p in zip(scenes, looks) if str(x) in ran]
    drawn = []
    for (scene, png), f in zip(pairs, frames):
        try:
            draw(scene, f, png, classes=card.classes if card else None, min_score=min_score)
            drawn.append(str(png))
        except Exception as exc:  # a picture's failure (a damaged overview, a full disk) never costs the detections
            log.warning("quicklook %s not drawn: %s", png, brief(exc))
    return drawn


def report_crs(fmt: str, frames) -> str | dict | None:
    """The output file's CRS as the report states it (per layer for a multi-CRS GeoPackage)."""
    if fmt == "geojson":
        return "EPSG:4326"
    crss = []
    for f in frames:
        if f.crs is not None and all(f.crs != c for c in crss):
            crss.append(f.crs)
    if len(crss) + any(f.crs is None for f in frames) <= 1:  # pixel rows beside mapped ones: per row
        return crss[0].to_string() if crss else None
    if fmt == "gpkg":
        return {"layers": [c.to_string() for c in crss]}
    return "per row (crs column)" if fmt == "csv" else "EPSG:4326 (crs column: each row's scene CRS)"


def _quicklook_paths(path, scenes) -> list[Path]:
    """One PNG per scene: ``path`` itself for one scene, ``STEM_<scene>.png`` beside it for several
    (``STEM_<scene>_<n>.png``, n its place in the job, for scenes of one name in different folders)."""
    path = Path(path)
    if len(scenes) == 1:
        return [path]
    stems = [Path(str(s).split("?", 1)[0]).stem for s in scenes]
    folded = [s.casefold() for s in stems]  # S.tif and s.tif are one name on macOS and Windows
    names, taken = [], set()
    for i, stem in enumerate(stems):
        name = f"{path.stem}_{stem}{f'_{i + 1}' if folded.count(stem.casefold()) > 1 else ''}"
        unique, n = name, 1
        while unique.casefold() in taken:  # a scene named s_1 beside the first of two named s
            n += 1
            unique = f"{name}_{n}"
        taken.add(unique.casefold())
        names.append(path.with_name(unique + (path.suffix or ".png")))
    return names


def _input(s) -> dict:
    p = str(s)
    if os.path.exists(p):
        return {"path": p, "bytes": os.path.getsize(p), "mtime": os.path.getmtime(p)}
    return {"path": p}
