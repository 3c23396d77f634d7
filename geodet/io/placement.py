"""Labels and detections placed in one frame for scoring (``geodet.evaluation``): a scene's pixel
grid, or the map in the detections' CRS, with the labels read as training reads them (repaired,
points as squares, one drawn twice counted once) and what was left out said."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .detections import pixel_columns, pixel_grid_scale, points_as_squares
from .labels import DRAWN_TWICE, drawn_again

log = logging.getLogger(__name__)


def in_scene_grid(det, gt, scene, source, classes, class_column_gt, det_names, scores, point_box_m, placed):
    """Labels and detections as boxes in ``scene``'s pixel grid: (label boxes, label class
    indices, detection boxes, detection names, scores), detections wholly outside left out."""
    from .labels import geoms_to_pixel_boxes, labels_to_boxes
    from .scene import Scene

    sc = scene if isinstance(scene, Scene) else Scene(scene, bands=None)
    lb = labels_to_boxes(gt, sc, class_column_gt, classes=classes, unknown="keep", point_box_m=point_box_m)
    if not len(det):
        return lb.boxes, lb.labels, np.zeros((0, 4)), det_names, scores
    px = pixel_columns(det)
    if det.crs is None and not px and sc.crs is not None:
        log.warning("the detections have no CRS: taken to be in the scene's (%s)", sc.crs.to_string())
        det = det.set_crs(sc.crs)
    if det.crs is not None and sc.crs is not None and det.crs != sc.crs:
        det = det.to_crs(sc.crs)
    if det.crs is not None:
        det_boxes = geoms_to_pixel_boxes(det.geometry.values, sc.transform)
    else:  # pixel boxes alone: in the grid they were detected in (the model's GSD), made the scene's
        det_boxes = np.array(det[px], dtype=np.float64)
        scale = pixel_grid_scale(source, sc.path)
        if scale is None and placed:
            log.warning("%s: pixel boxes without the report geodet wrote beside them: taken to be in the scene's "
                        "own grid (wrong if the model ran at another GSD)", source)
        fx, fy = scale or (1.0, 1.0)
        det_boxes *= np.array([fx, fy, fx, fy])
    det, det_names, scores, det_boxes = _inside_scene(det, det_names, scores, det_boxes, sc)
    return lb.boxes, lb.labels, det_boxes, det_names, scores


def on_the_map(det, gt, labels, class_column_gt, point_box_m):
    """Labels and detections as boxes in the detections' CRS (the labels reprojected): (label
    boxes, label class names, detection boxes, the pixels per map unit squared of the size ranges)."""
    import shapely

    from .labels import class_values, usable_geometries

    if det.crs is None and gt.crs is not None and len(det):
        log.warning("the detections have no CRS: taken to be in the labels' (%s)", gt.crs.to_string())
    if det.crs is not None and gt.crs is not None and det.crs != gt.crs:
        gt = gt.to_crs(det.crs)
    source = str(labels) if isinstance(labels, (str, Path)) else "labels"
    gt, counts = usable_geometries(gt, None, source)
    gt = points_as_squares(gt, point_box_m)
    b = gt.geometry.bounds.to_numpy() if len(gt) else np.zeros((0, 4))
    flat = ~((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]))  # no area (repaired into a line): as in a scene's grid
    counts["no_area"] = counts.get("no_area", 0) + int(flat.sum())
    gt = gt[~flat]
    gt_names = class_values(gt[class_column_gt]) if class_column_gt else np.full(len(gt), "object")
    gt_boxes = shapely.bounds(np.array(gt.geometry.values, dtype=object)).reshape(-1, 4)
    gt_boxes, gt_names = _drawn_once(gt_boxes, gt_names, counts, source)
    det_boxes = shapely.bounds(np.array(det.geometry.values, dtype=object)).reshape(-1, 4) if len(det) else np.zeros((0, 4))
    if len(gt_boxes) and len(det_boxes) and not _extents_meet(gt_boxes, det_boxes):
        log.warning("no label lies within the detections' extent (labels %s, detections %s%s): check that they "
                    "cover the same place, or pass the scene (--scene)", _extent(gt_boxes), _extent(det_boxes),
                    f" in {det.crs.to_string()}" if det.crs is not None else "")
    if det.crs is not None and det.crs.is_geographic:
        log.warning("evaluating in degrees: pass the scene (--scene) for pixel-based IoU and size ranges")
    px = pixel_columns(det)
    # pixel boxes are their own pixel size; boxes on a map carry theirs in pixel columns, else none: no size ranges
    area_scale = 1.0 if det.crs is None and det.attrs.get("pixel_boxes") else None
    if px and len(det) and det.crs is not None:
        # geodet output carries pixel boxes: their areas over the map boxes' give the size ranges in pixels
        # (in metres or in degrees, as a GeoJSON file's)
        px_area = (det[px[2]] - det[px[0]]).to_numpy(np.float64) * (det[px[3]] - det[px[1]]).to_numpy(np.float64)
        map_area = (det_boxes[:, 2] - det_boxes[:, 0]) * (det_boxes[:, 3] - det_boxes[:, 1])
        ok = (px_area > 0) & (map_area > 0)
        if ok.any():
            area_scale = float(np.median(px_area[ok] / map_area[ok]))
    return gt_boxes, gt_names, det_boxes, area_scale


def _drawn_once(boxes: np.ndarray, names: np.ndarray, counts: dict, source: str):
    """Labels on the map as in a scene's grid (``labels_to_boxes``): one drawn twice (the same box,
    to a ten-thousandth of the boxes' typical side, and class) counts once; what was left out or
    repaired is said."""
    if len(boxes):
        side = float(np.median(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]))) or 1.0
        again = drawn_again(np.round(boxes / (side * 1e-4)), np.unique(names.astype(str), return_inverse=True)[1])
        counts["duplicate"] = int(again.sum())
        if counts["duplicate"]:
            log.warning(DRAWN_TWICE, source, counts["duplicate"])
        boxes, names = boxes[~again], names[~again]
    if any(counts.get(k) for k in ("repaired", "empty", "no_class", "lines", "no_area", "duplicate", "split")):
        log.info("%s: %s", source, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return boxes, names


def _inside_scene(det, det_names, scores, boxes: np.ndarray, sc):
    """Detections in ``sc``'s pixel grid as the labels are: a box wholly outside the scene is left
    out and counted, as labels outside it are (no false positive for what nobody could label);
    one past its edge is clipped to the part in it."""
    out = (boxes[:, 2] <= 0) | (boxes[:, 0] >= sc.width) | (boxes[:, 3] <= 0) | (boxes[:, 1] >= sc.height)
    if out.any():
        log.warning("%d detection(s) lie wholly outside %s: left out", int(out.sum()), Path(str(sc.path)).name)
        keep = ~out
        det, det_names, scores, boxes = det[keep], det_names[keep], scores[keep], boxes[keep]
    np.clip(boxes[:, 0::2], 0, sc.width, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0, sc.height, out=boxes[:, 1::2])
    return det, det_names, scores, boxes


def _extent(boxes: np.ndarray) -> str:
    return "({:.2f}, {:.2f}, {:.2f}, {:.2f})".format(*boxes[:, :2].min(0), *boxes[:, 2:].max(0))


def _extents_meet(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the extents of box sets ``a`` and ``b`` [N, 4] overlap."""
    (ax0, ay0), (ax1, ay1) = a[:, :2].min(0), a[:, 2:].max(0)
    (bx0, by0), (bx1, by1) = b[:, :2].min(0), b[:, 2:].max(0)
    return bool(ax0 <= bx1 and bx0 <= ax1 and ay0 <= by1 and by0 <= ay1)
