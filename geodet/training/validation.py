"""Validation on held-out areas: the real whole-scene pipeline over each area of its scene (no
copies), scored with COCO AP, one image per area."""

from __future__ import annotations

import numpy as np

from ..evaluation import coco_metrics
from ..io.labels import clip_boxes
from ..pipeline.detect import detect_scene


def validate(model, val_sets, classes: list[str], overlap: int, device, batch_size: int, min_visibility: float) -> dict:
    """COCO metrics of ``model`` over ``val_sets`` [(TrainScene, area)], each area its own image.
    Labels count when at least ``min_visibility`` of them lies inside the area."""
    if not val_sets:
        return {}
    det_b, det_s, det_l, det_i, gt_b, gt_l, gt_i = [], [], [], [], [], [], []
    index = {n: k for k, n in enumerate(classes)}
    for i, (ts, area) in enumerate(val_sets):
        frame = detect_scene(ts.scene, model, area=area, overlap=overlap, device=str(device), num_workers=0,
                             progress=False, batch_size=batch_size)
        det_b.append(frame[["px_x0", "px_y0", "px_x1", "px_y1"]].to_numpy(np.float64))
        det_s.append(frame["score"].to_numpy())
        det_l.append(frame["label"].map(index).to_numpy(np.int64))
        det_i.append(np.full(len(frame), i))
        boxes, keep = clip_boxes(ts.labels.boxes, area, min_visibility)  # in area pixels, as the detections
        gt_b.append(boxes)
        gt_l.append(ts.labels.labels[keep])
        gt_i.append(np.full(len(boxes), i))
    cat = np.concatenate
    return coco_metrics(cat(det_b), cat(det_s), cat(det_l), cat(gt_b), cat(gt_l), classes, iou=0.5,
                        det_images=cat(det_i), gt_images=cat(gt_i))
