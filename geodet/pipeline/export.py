"""``geodet export``: a geodet model to a self-describing ONNX file (fp32, or int8 calibrated on
real tiles), refused unless it passes the export check against the torch model.

The check runs the torch model (fp32) and the exported one on tiles read from the calibration
scenes: fp32 must match the torch core's logits to ``FP32_MAX_DIFF``; int8 must keep the
detections at the model's operating point (F1 against fp32 of at least ``min_agreement``). The
figures are stored in the file (``geodet.check``), so an int8 file is vouched for by itself.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import GeodetError
from ..model.onnx import (FP32_MAX_DIFF, INT8_MIN_AGREEMENT, ExportCore, export_core, now, padded_input,
                          quantize_int8, write_metadata)
from .backends import OnnxDetector, TorchDetector, agreement, check_score, run_tiles, sample_tiles, split_by_content
from .settings import resolve_detect_settings

log = logging.getLogger(__name__)


def core_difference(model, onnx_model, tiles: Sequence[np.ndarray], batch_size: int = 4) -> dict:
    """Largest absolute differences between the torch core and the ONNX core on ``tiles``."""
    core = ExportCore(model).eval().cpu()
    d_cls = d_rel = d_reg = peak = 0.0
    for s in range(0, len(tiles), batch_size):
        x = padded_input(np.stack(tiles[s : s + batch_size]).astype(np.float32), model.card.mean)
        with torch.inference_mode():
            t_cls, t_reg = (t.numpy() for t in core(torch.from_numpy(x)))
        o_cls, o_reg = onnx_model.core(x)
        diff = np.abs(o_cls - t_cls)
        d_cls = max(d_cls, float(diff.max()))
        d_rel = max(d_rel, float((diff / np.maximum(1.0, np.abs(t_cls))).max()))
        d_reg = max(d_reg, float(np.abs(o_reg - t_reg).max()))
        peak = max(peak, float(np.abs(t_cls).max()))
    return {"max_logit_diff": d_cls, "max_relative_logit_diff": d_rel, "max_box_regression_diff": d_reg,
            "max_abs_logit": peak}


def build_onnx(model, out: str | Path, precision: str, calib: Sequence[np.ndarray], check: Sequence[np.ndarray],
               settings, min_agreement: float = INT8_MIN_AGREEMENT, extra_meta: dict | None = None,
               reference: list[dict] | None = None) -> dict:
    """Export ``model`` to ``out`` at ``precision`` (fp32 or int8, calibrated on ``calib``), check
    it on ``check`` tiles, and write it (atomically) only if it passes. Returns the check."""
    out = Path(out)
    torch_det = TorchDetector(model, torch.device("cpu"), settings)
    ref = reference if reference is not None else run_tiles(torch_det, check, settings.batch_size)
    min_score = check_score(model.card)
    with tempfile.TemporaryDirectory(prefix="geodet-export-", dir=out.parent) as tmp:
        fp32 = os.path.join(tmp, "fp32.onnx")
        export_core(model, fp32)
        fp32_model = load_onnx_unchecked(fp32, model.card, "fp32")
        diff = core_difference(model, fp32_model, check)
        fp32_dets = run_tiles(OnnxDetector(fp32_model, settings), check, settings.batch_size)
        result = {"tiles": len(check), "fp32": {**{k: float(f"{v:.3g}") for k, v in diff.items()},
                                                "limit": FP32_MAX_DIFF,
                                                "detections": agreement(ref, fp32_dets, min_score)}}
        if diff["max_relative_logit_diff"] > FP32_MAX_DIFF:
            raise GeodetError(
                f"export check failed: the ONNX fp32 core differs from torch by {diff['max_relative_logit_diff']:.2g} "
                f"in the logits (relative to each logit's size, floor 1; limit {FP32_MAX_DIFF:g}); no file written. "
                "Report this with the model's card")
        path, float_nodes = fp32, []
        if precision == "int8":
            if not calib:
                raise GeodetError("int8 needs calibration tiles: pass --calibrate SCENE (scenes like those the model "
                                  "will run on)")
            int8 = os.path.join(tmp, "int8.onnx")
            batches = [padded_input(np.stack(calib[s : s + 4]).astype(np.float32), model.card.mean)
                       for s in range(0, len(calib), 4)]
            float_nodes = quantize_int8(fp32, int8, batches)
            int8_model = load_onnx_unchecked(int8, model.card, "int8")
            int8_dets = run_tiles(OnnxDetector(int8_model, settings), check, settings.batch_size)
            agree = agreement(ref, int8_dets, min_score)
            result["int8"] = {"detections": agree, "min_agreement": min_agreement, "calibration_tiles": len(calib),
                              "float_nodes": float_nodes}
            if agree["f1"] is None:
                raise GeodetError(
                    f"export check inconclusive: neither fp32 nor int8 finds an object at score >= {min_score:.3g} on "
                    f"the {len(check)} check tiles, so int8's accuracy cannot be checked; no file written. Calibrate "
                    "on scenes with the objects in them, or export fp32")
            if agree["f1"] < min_agreement:
                raise GeodetError(
                    f"export check failed: int8 keeps only F1 {agree['f1']:.3f} of the fp32 detections at score "
                    f">= {min_score:.3g} on {len(check)} check tiles (needs {min_agreement}); no file written. "
                    "Calibrate on more representative scenes, or use fp32")
            path = int8
        result["passed"] = True
        from ..hashing import file_sha256

        source = getattr(model, "source", None) or {}
        meta = {"precision": precision, "source_sha256": source.get("sha256"), "source_path": source.get("path"),
                "check": result, "created": now(), "float_nodes": float_nodes}
        meta.update(extra_meta or {})
        from .. import __version__

        meta["geodet_version"] = __version__
        write_metadata(path, model.card, meta)
        tmp_out = out.with_name(f".{out.name}.tmp{os.getpid()}")
        os.replace(path, tmp_out)
        os.replace(tmp_out, out)
        result["sha256"] = file_sha256(out)
    return result


def load_onnx_unchecked(path, card, precision: str):
    """An ONNX file geodet has just written, before its metadata exists (the card is the
    torch model's)."""
    from ..model.onnx import OnnxModel, require_onnxruntime, session_options

    ort = require_onnxruntime()
    session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    return OnnxModel(session, card, precision)


def calibration_tiles(model, scenes: Sequence, n: int, settings) -> tuple[list, list, list[dict], list[str]]:
    """``n`` calibration and ``n`` check tiles from ``scenes`` (read as the model reads them),
    dealt by content; plus fp32 reference detections of the check tiles and the scene names."""
    tiles = []
    per_scene = max(1, -(-2 * n // max(1, len(scenes))))
    for s in scenes:
        tiles.extend(sample_tiles(s, settings, model.card, per_scene))
    if not tiles:
        raise GeodetError("the calibration scenes have no tile with valid pixels")
    torch_det = TorchDetector(model, torch.device("cpu"), settings)
    ref = run_tiles(torch_det, tiles, settings.batch_size)
    cal_idx, chk_idx = split_by_content(ref, check_score(model.card))
    if not chk_idx:
        chk_idx = cal_idx
    return ([tiles[i] for i in cal_idx[:n]], [tiles[i] for i in chk_idx[:n]], [ref[i] for i in chk_idx[:n]],
            [str(s) for s in scenes])


def export_model(model, out, *, int8: bool = False, calibrate: Sequence = (), calib_tiles: int = 32,
                 check_scene=None, check_labels=None, min_agreement: float = INT8_MIN_AGREEMENT, seed: int = 0,
                 class_column: str = "label") -> dict:
    """Export ``model`` (a geodet model or its file) to ``out`` (``.onnx``): fp32, or int8
    calibrated on ``calib_tiles`` tiles of ``calibrate`` scenes. Refused, with no file written,
    when the export check fails. With ``check_labels`` (labels of ``check_scene``, default the
    first calibration scene) it also reports AP50 of torch fp32 and the export there. Returns
    the check (also stored in the file)."""
    from ..io.writers import check_output_path
    from ..model import load_model

    out = check_output_path(out)
    if out.suffix.lower() != ".onnx":
        raise GeodetError(f"export writes an .onnx file, got '{out.name}': use -o MODEL.onnx")
    if isinstance(model, (str, Path)):
        model = load_model(model)
    settings = resolve_detect_settings(model.card, device="cpu")
    scenes = list(calibrate)
    if scenes:
        calib, check, ref, names = calibration_tiles(model, scenes, calib_tiles, settings)
    else:
        if int8:
            raise GeodetError("--int8 needs --calibrate SCENE: int8 is calibrated on real tiles like those the model "
                              "will run on")
        rng = np.random.default_rng(seed)
        size = model.card.tile_size
        calib, ref, names = [], None, []
        check = [rng.random((model.card.n_bands, size, size), dtype=np.float32) for _ in range(4)]
    meta = {"calibration": {"scenes": names, "tiles": len(calib), "method": "minmax", "per_channel": True,
                            "format": "QDQ"} if int8 else None,
            "check_tiles_from": names or "random noise (no --calibrate scene given)"}
    result = build_onnx(model, out, "int8" if int8 else "fp32", calib, check, settings, min_agreement, meta, ref)
    if check_labels:
        result["labels_check"] = labels_check(model, out, check_scene or (scenes[0] if scenes else None), check_labels,
                                              class_column)
    return result


def labels_check(model, onnx_path, scene, labels, class_column: str = "label") -> dict:
    """AP50 of the torch fp32 model and of the exported file on a labelled scene (classes by
    ``class_column``; a one-class model is scored class-agnostically)."""
    from ..evaluation import evaluate
    from ..model.onnx import load_onnx
    from .detect import detect_scene

    if scene is None:
        raise GeodetError("--check-labels needs the labelled scene: pass --check-scene SCENE (or --calibrate SCENE)")
    out = {}
    for name, det in (("torch_fp32", model), ("export", load_onnx(onnx_path))):
        frame = detect_scene(scene, det, progress=False, backend="torch" if name == "torch_fp32" else "onnx",
                             precision="fp32" if name == "torch_fp32" else None)
        m = evaluate(frame, labels, scene=scene, class_column=class_column)
        out[name] = {"ap50": round(float(m["AP50"]), 4), "ap": round(float(m["AP"]), 4), "detections": len(frame)}
    return out
