"""Validation on held-out areas: the real whole-scene pipeline over each area of its scene (no
copies), scored with COCO AP, one image per area. Where a labelled area is given, only
detections and labels centred inside it count: what lies outside was never labelled."""

from __future__ import annotations

import time

import numpy as np

from ..evaluation import coco_metrics
from ..io.labels import clip_boxes
from ..pipeline.scenes import detect_scene
from .area import centres_inside


def validate(model, val_sets, classes: list[str], overlap: int, device, batch_size: int, min_visibility: float,
             tta: bool = False) -> dict:
    """COCO metrics of ``model`` over ``val_sets`` [(TrainScene, area)], each area its own image
    (with ``tta``, of the model under test-time augmentation).
    Labels count when at least ``min_visibility`` of them lies inside the area; with the
    scene's labelled area (``TrainScene.labelled``), detections and labels centred outside it are
    left out."""
    if not val_sets:
        return {}
    det_b, det_s, det_l, det_i, gt_b, gt_l, gt_i = [], [], [], [], [], [], []
    index = {n: k for k, n in enumerate(classes)}
    if tta:
        from ..model.tta import TtaModel

        model = TtaModel(model)
    for i, (ts, area) in enumerate(val_sets):
        frame = detect_scene(ts.scene, model, area=area, overlap=overlap, device=str(device), num_workers=0,
                             progress=False, batch_size=batch_size)
        boxes = frame[["px_x0", "px_y0", "px_x1", "px_y1"]].to_numpy(np.float64)
        shift = np.array([area[0], area[1], area[0], area[1]], np.float64)
        keep = centres_inside(getattr(ts, "labelled", None), boxes + shift)
        det_b.append(boxes[keep])
        det_s.append(frame["score"].to_numpy()[keep])
        det_l.append(frame["label"].map(index).to_numpy(np.int64)[keep])
        det_i.append(np.full(int(keep.sum()), i))
        boxes, kept = clip_boxes(ts.labels.boxes, area, min_visibility)  # in area pixels, as the detections
        inside = centres_inside(getattr(ts, "labelled", None), boxes + shift)
        gt_b.append(boxes[inside])
        gt_l.append(ts.labels.labels[kept][inside])
        gt_i.append(np.full(int(inside.sum()), i))
    cat = np.concatenate
    return coco_metrics(cat(det_b), cat(det_s), cat(det_l), cat(gt_b), cat(gt_l), classes, iou=0.5,
                        det_images=cat(det_i), gt_images=cat(gt_i))


def tta_operating_point(model, val_sets, classes: list[str], overlap: int, device, cfg) -> tuple:
    """Test-time augmentation's operating point on the validation areas (its fused scores run
    lower than the plain model's): ``(score or None, metrics, seconds)``."""
    t0 = time.perf_counter()
    m = validate(model, val_sets, classes, overlap, device, cfg.detect.batch_size, cfg.train.min_visibility, tta=True)
    return (m.get("score_threshold") if m else None), m, time.perf_counter() - t0
