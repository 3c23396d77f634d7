"""``geodet export``: a geodet model to a self-describing ONNX file (fp32, or int8 calibrated on
real tiles), refused unless it passes the export check against the torch model (``convert.py``).

The check tiles come from the calibration scenes (int8: tiles other than those that calibrate),
or, with no scene given, from a synthetic scene: an image, never noise. The result says which.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from ..errors import GeodetError
from ..model.onnx import INT8_MIN_AGREEMENT
from .convert import SYNTHETIC, build_onnx, calibration_tiles, synthetic_check_tiles
from .reader import open_scene
from .settings import resolve_detect_settings

log = logging.getLogger(__name__)


def export_model(model, out, *, int8: bool = False, calibrate: Sequence = (), calib_tiles: int = 32,
                 check_scene=None, check_labels=None, min_agreement: float = INT8_MIN_AGREEMENT, seed: int = 0,
                 class_column: str = "label", bands: Sequence[int] | None = None, progress: bool = False) -> dict:
    """Export ``model`` (a geodet model or its file) to ``out`` (``.onnx``): fp32, or int8
    calibrated on ``calib_tiles`` tiles of ``calibrate`` scenes and checked on as many others.
    Without ``calibrate`` (fp32 only) the check runs on tiles of a synthetic scene (``seed``).
    Refused, with no file written, when the export check fails. With ``check_labels`` (labels of
    ``check_scene``, default the first calibration scene) it also reports AP50 of torch fp32 and
    the export there. ``bands`` reads the scenes with other bands than the model's (as
    ``detect --bands`` would). Returns the check (also stored in the file); ``check_tiles_from`` says
    where its tiles came from. ``progress``: a bar over its stages (tiles read, fp32, int8, the labels'
    check)."""
    from ..io.writers import check_output_path
    from ..progress import progress_bar

    from .job import check_each_scene_once
    from .scenes import scene_paths

    out = check_output_path(out, suffixes=(".onnx",), example="model.onnx")
    scenes = scene_paths(calibrate) if calibrate is not None else []  # one scene's path alone is one scene
    check_each_scene_once(scenes, "its tiles would be both calibrated on and checked on")
    check_scene = check_scene or (scenes[0] if scenes else None)
    if isinstance(model, (str, Path)):
        if str(model).lower().endswith(".onnx"):
            raise GeodetError(f"{model} is ONNX already: export the model.pt it came from")
        from .model_files import load_detector_file

        model = load_detector_file(model)  # a run's folder too; a pretrained backbone is refused
    settings = resolve_detect_settings(model.card, device="cpu", bands=bands)
    if bands is not None and not scenes and not check_labels:
        raise GeodetError("--bands picks the bands of the --calibrate (and --check-scene) scenes, and none is given: the "
                          "check runs on a synthetic scene; pass --calibrate SCENE, or drop --bands")
    if check_labels:  # before any work: the labels must be readable and lie on their scene, read with these bands
        _check_labels_input(check_scene, check_labels, class_column, per_class=len(model.card.classes) > 1)
        open_scene(check_scene, settings, model.card, warn=False).close()
    bar = progress_bar(total=2 + int8 + bool(check_labels), desc="export", unit="stage", enabled=progress)
    try:
        return _export(model, out, int8, scenes, calib_tiles, check_scene, check_labels, min_agreement, seed,
                       class_column, bands, settings, bar)
    finally:
        bar.close()


def _export(model, out, int8, scenes, calib_tiles, check_scene, check_labels, min_agreement, seed, class_column, bands,
            settings, bar) -> dict:
    """``export_model``'s stages once its inputs are checked, ``bar`` ticking as each ends."""
    from ..io.writers import atomic_path

    if scenes:
        calib, check, ref, names = calibration_tiles(model, scenes, calib_tiles, settings, int8=int8)
        where = ", ".join(Path(str(n)).name for n in names)
    else:
        if int8:
            raise GeodetError("--int8 needs --calibrate SCENE: int8 is calibrated on real tiles like those the model "
                              "will run on")
        calib, ref, names, where = [], None, [], f"{SYNTHETIC}, no --calibrate scene given"
        check = synthetic_check_tiles(model, settings, 4, seed)
    bar.update(1)
    meta = {"calibration": {"scenes": names, "bands": list(settings.bands), "tiles": len(calib), "method": "minmax",
                            "per_channel": True, "format": "QDQ"} if int8 else None,
            "check_tiles_from": names or where}
    with atomic_path(out) as tmp:  # in place only once every check, the labels' too, has run
        result = build_onnx(model, tmp, "int8" if int8 else "fp32", calib, check, settings, min_agreement, meta, ref,
                            tick=bar.update)
        result["check_tiles_from"] = where
        if check_labels:
            result["labels_check"] = labels_check(model, tmp, check_scene, check_labels, class_column, bands=bands)
            bar.update(1)
    return result


def _check_labels_input(scene, labels, class_column: str, per_class: bool) -> None:
    from ..io.labels import labels_to_boxes, read_labels
    from ..io.scene import Scene

    if scene is None:
        raise GeodetError("--check-labels needs the labelled scene: pass --check-scene SCENE (or --calibrate SCENE)")
    gdf = read_labels(labels, class_column or None)  # readable, with the class column
    with Scene(scene, bands=None) as sc:  # on the scene; by class for a model of several (one: agnostic)
        labels_to_boxes(gdf, sc, (class_column or None) if per_class else None, unknown="keep", source=str(labels))


def labels_check(model, onnx_path, scene, labels, class_column: str = "label", bands=None) -> dict:
    """AP50 of the torch fp32 model and of the exported file on a labelled scene (classes by
    ``class_column``; a one-class model is scored class-agnostically)."""
    from ..evaluation import evaluate
    from ..model.onnx import load_onnx
    from .scenes import detect_scene

    if scene is None:
        raise GeodetError("--check-labels needs the labelled scene: pass --check-scene SCENE (or --calibrate SCENE)")
    out = {}
    for name, det in (("torch_fp32", model), ("export", load_onnx(onnx_path))):
        frame = detect_scene(scene, det, progress=False, backend="torch" if name == "torch_fp32" else "onnx",
                             precision="fp32" if name == "torch_fp32" else None, bands=bands)
        m = evaluate(frame, labels, scene=scene, class_column=class_column)
        out[name] = {"ap50": round(float(m["AP50"]), 4), "ap": round(float(m["AP"]), 4), "detections": len(frame)}
    return out
