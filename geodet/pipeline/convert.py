"""A geodet model to a checked ONNX file (fp32, or int8 calibrated on real tiles): the tiles that
calibrate and the tiles that check (never the same tile), the export, and the check against the
torch model that must pass before a file is written.

The check runs the torch model (fp32) and the exported one on the check tiles: fp32 must match
the torch core's logits to ``FP32_MAX_DIFF``; int8 must keep the detections at the model's
operating point (F1 against fp32 of at least ``min_agreement``). The figures are stored in the
file (``geodet.check``), so an int8 file is vouched for by itself. ``geodet export`` and the
on-the-spot models of the backend choice both come through here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import GeodetError
from ..hashing import file_sha256
from ..model.onnx import (FP32_MAX_DIFF, INT8_MIN_AGREEMENT, ExportCore, export_core, now, padded_input,
                          quantize_int8, write_metadata)
from .backends import OnnxDetector, TorchDetector, agreement, check_score, run_tiles, sample_tiles, split_by_content

log = logging.getLogger(__name__)


class CheckInconclusive(GeodetError):
    """An int8 check that could not compare (no detection on the check tiles): a fault of the tiles,
    not of the model, so not remembered as the model's failure."""

# int8 calibrates on some tiles and is checked on others: at least one of each
MIN_INT8_TILES = 2
SYNTHETIC = "a synthetic scene (geodet.synthetic)"


def calibration_tiles(model, scenes: Sequence, n: int, settings, int8: bool = True,
                      warn: bool = True) -> tuple[list, list, list[dict], list[str]]:
    """Up to ``n`` calibration and ``n`` check tiles from ``scenes`` (read as the model reads
    them), dealt by content into two disjoint sets; plus fp32 reference detections of the check
    tiles and the scene names. Without ``int8`` nothing calibrates, so a lone tile may check.
    int8 with fewer than ``MIN_INT8_TILES`` tiles is refused: it could only be checked on the tile
    it was calibrated on. ``warn``: ``open_scene``'s (off for a job's scenes, opened again to
    run)."""
    tiles = []
    per_scene = max(1, -(-2 * n // max(1, len(scenes))))
    for s in scenes:
        tiles.extend(sample_tiles(s, settings, model.card, per_scene, warn=warn))
    names = [str(getattr(s, "path", s)) for s in scenes]
    if not tiles:
        raise GeodetError("the calibration scenes have no tile with valid pixels")
    if int8 and len(tiles) < MIN_INT8_TILES:
        raise GeodetError(
            f"int8 needs at least {MIN_INT8_TILES} tiles with valid pixels from the calibration scenes (some calibrate, "
            f"others check; never the same tile), and {', '.join(Path(x).name for x in names)} gave {len(tiles)}: "
            "add scenes, or use fp32 (export without --int8, or detect without --precision int8)")
    torch_det = TorchDetector(model, torch.device("cpu"), settings)
    ref = run_tiles(torch_det, tiles, settings.batch_size)
    cal_idx, chk_idx = split_by_content(ref, check_score(model.card))
    if not int8:
        cal_idx, chk_idx = [], chk_idx or cal_idx  # nothing calibrates: a lone tile checks
    return ([tiles[i] for i in cal_idx[:n]], [tiles[i] for i in chk_idx[:n]], [ref[i] for i in chk_idx[:n]], names)


def synthetic_check_tiles(model, settings, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` tiles of a synthetic scene (roads, lots and vehicles; ``geodet.synthetic``) at the
    model's GSD, read as the model reads its scenes: what checks an export when no scene is
    given, an image rather than noise. A synthetic scene has 1, 3 or 4 bands; a model of another
    band count reads its 3 bands in turn."""
    from ..synthetic import make_scene

    card = model.card
    k = card.n_bands if card.n_bands in (1, 3, 4) else 3
    bands = tuple(i % k + 1 for i in range(card.n_bands))
    with tempfile.TemporaryDirectory(prefix="geodet-check-") as tmp:
        made = make_scene(Path(tmp) / "check.tif", Path(tmp) / "check.gpkg", size=2 * card.tile_size,
                          gsd_m=card.gsd_m or 0.3, seed=seed, bands=k)
        return sample_tiles(made.image, dataclasses.replace(settings, bands=bands), card, n)


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
               reference: list[dict] | None = None, tick=None) -> dict:
    """Export ``model`` to ``out`` at ``precision`` (fp32 or int8, calibrated on ``calib``), check
    it on ``check`` tiles, and write it (atomically) only if it passes. Returns the check.
    ``tick(1)`` is called as each stage ends (fp32 made and checked; int8 made and checked)."""
    tick = tick or (lambda n: None)
    out = Path(out)
    if not len(check):
        raise GeodetError("no tile to check the export on; no file written")
    ref = reference if reference is not None else run_tiles(TorchDetector(model, torch.device("cpu"), settings), check,
                                                            settings.batch_size)
    from ..io.writers import sweep_leftovers

    sweep_leftovers(out.parent, r"geodet-export-[a-z0-9_]{8}")  # of a killed export (SIGKILL)
    with tempfile.TemporaryDirectory(prefix="geodet-export-", dir=out.parent) as tmp:
        fp32 = os.path.join(tmp, "fp32.onnx")
        export_core(model, fp32)
        result = _check_fp32(model, load_onnx_unchecked(fp32, model.card, "fp32"), check, ref, settings)
        tick(1)
        path, float_nodes = fp32, []
        if precision == "int8":
            int8 = os.path.join(tmp, "int8.onnx")
            result["int8"], float_nodes = _quantize_and_check(model, fp32, int8, calib, check, ref, settings,
                                                              min_agreement)
            path = int8
            tick(1)
        result["passed"] = True
        from .. import __version__

        source = getattr(model, "source", None) or {}
        meta = {"precision": precision, "source_sha256": source.get("sha256"), "source_path": source.get("path"),
                "check": result, "created": now(), "float_nodes": float_nodes}
        meta.update(extra_meta or {})
        meta["geodet_version"] = __version__
        write_metadata(path, model.card, meta)
        tmp_out = out.with_name(f".{out.name}.tmp{os.getpid()}")
        os.replace(path, tmp_out)
        os.replace(tmp_out, out)
        result["sha256"] = file_sha256(out)
    return result


def _check_fp32(model, fp32_model, check, ref, settings) -> dict:
    """The fp32 export against the torch core (logits) and the torch detections; refused when the
    logits differ by more than ``FP32_MAX_DIFF``."""
    diff = core_difference(model, fp32_model, check)
    fp32_dets = run_tiles(OnnxDetector(fp32_model, settings), check, settings.batch_size)
    result = {"tiles": len(check), "fp32": {**{k: float(f"{v:.3g}") for k, v in diff.items()}, "limit": FP32_MAX_DIFF,
                                            "detections": agreement(ref, fp32_dets, check_score(model.card))}}
    if diff["max_relative_logit_diff"] > FP32_MAX_DIFF:
        raise GeodetError(
            f"export check failed: the ONNX fp32 core differs from torch by {diff['max_relative_logit_diff']:.2g} "
            f"in the logits (relative to each logit's size, floor 1; limit {FP32_MAX_DIFF:g}); no file written. "
            "Report this with the model's card")
    return result


def _quantize_and_check(model, fp32: str, int8: str, calib, check, ref, settings, min_agreement: float):
    """int8 calibrated on ``calib`` and checked on ``check`` (the caller keeps them apart):
    ``(its check, the nodes kept in float)``; refused when it loses detections."""
    if not calib:
        raise GeodetError("int8 needs calibration tiles: pass --calibrate SCENE (scenes like those the model "
                          "will run on)")
    min_score = check_score(model.card)
    batches = [padded_input(np.stack(calib[s : s + 4]).astype(np.float32), model.card.mean)
               for s in range(0, len(calib), 4)]
    float_nodes = quantize_int8(fp32, int8, batches)
    int8_dets = run_tiles(OnnxDetector(load_onnx_unchecked(int8, model.card, "int8"), settings), check,
                          settings.batch_size)
    agree = agreement(ref, int8_dets, min_score)
    if agree["f1"] is None:
        raise CheckInconclusive(
            f"export check inconclusive: neither fp32 nor int8 finds an object at score >= {min_score:.3g} on "
            f"the {len(check)} check tile(s), so int8's accuracy cannot be checked: give more tiles (--calib-tiles) "
            "of scenes with the objects in them, or use fp32 (export without --int8, or detect without --precision "
            "int8)")
    if agree["f1"] < min_agreement:
        raise GeodetError(
            f"export check failed: int8 keeps only F1 {agree['f1']:.3f} of the fp32 detections at score "
            f">= {min_score:.3g} on {len(check)} check tiles (needs {min_agreement}); no file written. "
            "Calibrate on more representative scenes, or use fp32")
    return {"detections": agree, "min_agreement": min_agreement, "calibration_tiles": len(calib),
            "check_tiles": len(check), "float_nodes": float_nodes}, float_nodes


def load_onnx_unchecked(path, card, precision: str):
    """An ONNX file geodet has just written, before its metadata exists (the card is the
    torch model's)."""
    from ..model.onnx import OnnxModel, require_onnxruntime, session_options

    ort = require_onnxruntime()
    session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    return OnnxModel(session, card, precision)
