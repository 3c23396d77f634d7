"""COCO metrics of detections against labels, in map space or in a scene's pixel grid.

AP comes from faster-coco-eval (the same numbers as pycocotools). A whole scene is one image for
COCO's rules; ``maxDets`` is raised to the number of detections so nothing is capped. Dense
scenes are handed to faster-coco-eval as many small images that give the same matches, because
its IoU matrices grow with detections x labels per image (75 s against 2 s for 63k detections).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .errors import GeodetError
from .io.detections import only_scene, read_detections, with_geometry, with_scores
from .io.placement import in_scene_grid, on_the_map
from .io.writers import json_safe

log = logging.getLogger(__name__)
SPLIT_BOXES = 1000  # coco_metrics evaluates more boxes than this as images of about this many
SIZE_RANGES_PX = {"small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, 1e10)}


def _coco(boxes, labels, scores=None, images=None):
    """COCO annotations from [N, 4] xyxy boxes (``images``: each box's image id, default 1)."""
    anns = []
    images = np.ones(len(boxes), np.int64) if images is None else np.asarray(images)
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        w, h = float(b[2] - b[0]), float(b[3] - b[1])
        ann = {"id": i + 1, "image_id": int(images[i]), "category_id": int(lab) + 1, "bbox": [float(b[0]), float(b[1]), w, h],
               "area": w * h, "iscrowd": 0}
        if scores is not None:
            ann["score"] = float(scores[i])
        anns.append(ann)
    return anns


def _touching_pairs(det_boxes, gt_boxes):
    """Every detection-label pair of boxes that touch (an STRtree query), with their intersection
    and union areas: ``(det index, label index, intersection, union)``."""
    import shapely

    tree = shapely.STRtree(shapely.box(*gt_boxes.T))
    d_idx, g_idx = tree.query(shapely.box(*det_boxes.T), predicate="intersects")
    a, b = det_boxes[d_idx], gt_boxes[g_idx]
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return d_idx, g_idx, inter, union


def _split_images(det_boxes, det_labels, det_images, gt_boxes, gt_labels, gt_images, min_iou, max_boxes):
    """COCO image ids that cut a dense scene into small images without changing any match.

    COCO matches detections to labels image by image, greedily in score order, and only pairs
    of one class with IoU >= the threshold can match. So every detection-label pair of one class
    and image with IoU >= ``min_iou`` (the lowest threshold evaluated) is an edge, the connected
    components of that graph are matched independently, and whole components can be packed into
    images of about ``max_boxes`` boxes: each detection meets the same candidate labels in the
    same order as in one big image, while the IoU matrices shrink from detections x labels of
    the scene to those of each image. Returns (det_ids, gt_ids), numbered from 1.
    """
    n_det, n_gt = len(det_boxes), len(gt_boxes)
    orig = np.concatenate([det_images, gt_images]).astype(np.int64)
    parent = np.arange(n_det + n_gt)
    if n_det and n_gt:
        d_idx, g_idx, inter, union = _touching_pairs(det_boxes, gt_boxes)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / union
        # A margin (and degenerate boxes) only join more pairs than needed, which stays exact.
        keep = ((iou >= min_iou - 1e-6) | ~(union > 0)) & (det_labels[d_idx] == gt_labels[g_idx])
        keep &= det_images[d_idx] == gt_images[g_idx]
        u, v = d_idx[keep], g_idx[keep] + n_det
        # Connected components: min-label propagation along the edges with pointer jumping.
        while len(u):
            m = np.minimum(parent[u], parent[v])
            new = parent.copy()
            np.minimum.at(new, u, m)
            np.minimum.at(new, v, m)
            new = new[new]
            new = new[new]
            if np.array_equal(new, parent):
                break
            parent = new
    # Pack whole components into images, never mixing the caller's images.
    order = np.lexsort((np.arange(len(parent)), parent, orig[parent]))
    comp, img = parent[order], orig[order]
    starts = np.r_[True, (comp[1:] != comp[:-1])]
    new_image = np.r_[True, img[1:] != img[:-1]]
    # Running count of boxes since each of the caller's images began, read at component starts.
    pos = np.arange(len(order)) - np.maximum.accumulate(np.where(new_image, np.arange(len(order)), 0))
    first = np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))
    chunk = (pos // max_boxes)[first]  # each component goes whole into the chunk where it starts
    _, ids = np.unique(np.stack([img, chunk]), axis=1, return_inverse=True)
    out = np.empty(len(parent), np.int64)
    out[order] = ids.reshape(-1) + 1
    return out[:n_det], out[n_det:]


def coco_metrics(
    det_boxes, det_scores, det_labels, gt_boxes, gt_labels, classes, iou: float = 0.5, area_scale: float = 1.0,
    det_images=None, gt_images=None, split: bool = True,
) -> dict:
    """COCO AP/AP50/AP75/size APs (the mean over classes) plus the operating point at ``iou``: the
    score threshold of the best F1 of all classes' detections together, and its precision and recall.

    Boxes are xyxy in any common unit; ``area_scale`` converts their area to pixels for the
    size ranges (pixel area = area * area_scale). ``det_images`` / ``gt_images`` give each box's
    image (e.g. one id per validation area; boxes of different images never match); default:
    everything is one image. ``split`` evaluates a dense scene as many small images that give
    the same matches (see ``_split_images``); ``False`` is the plain single-image computation.
    """
    det_boxes = np.asarray(det_boxes, np.float64).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    det_scores = np.asarray(det_scores, np.float64).reshape(-1)
    det_labels = np.asarray(det_labels, np.int64).reshape(-1)
    gt_labels = np.asarray(gt_labels, np.int64).reshape(-1)
    det_images = np.ones(len(det_boxes), np.int64) if det_images is None else np.asarray(det_images, np.int64) + 1
    gt_images = np.ones(len(gt_boxes), np.int64) if gt_images is None else np.asarray(gt_images, np.int64) + 1
    callers = det_images, gt_images  # the operating point matches within the caller's images
    standard = set(np.round(np.linspace(0.5, 0.95, 10), 2).tolist())
    iou_thrs = sorted(standard | {round(iou, 2)})
    if split and len(det_boxes) + len(gt_boxes) > SPLIT_BOXES:
        det_images, gt_images = _split_images(det_boxes, det_labels, det_images, gt_boxes, gt_labels, gt_images,
                                              min(iou_thrs), SPLIT_BOXES)
    out = {"n_detections": int(len(det_boxes)), "n_labels": int(len(gt_boxes)), "iou": iou}
    if len(det_boxes) == 0 or len(gt_boxes) == 0:
        out.update({k: 0.0 for k in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "precision", "recall", "f1")})
        out["score_threshold"] = None
        return Metrics(out)
    prec = _run_cocoeval((det_boxes, det_scores, det_labels, det_images), (gt_boxes, gt_labels, gt_images), classes,
                         iou_thrs, area_scale)
    std = [i for i, t in enumerate(iou_thrs) if round(t, 2) in standard]

    def ap(t_idx, area=0, k=slice(None)):
        p = prec[t_idx, :, k, area, -1]
        p = p[p > -1]
        return float(p.mean()) if p.size else float("nan")

    t50, t75 = iou_thrs.index(0.5), iou_thrs.index(0.75)
    out.update({
        "AP": ap(std), "AP50": ap(t50), "AP75": ap(t75),
        "AP_small": ap(std, 1), "AP_medium": ap(std, 2), "AP_large": ap(std, 3),
    })
    order, matched = _match(det_boxes, det_scores, det_labels, callers[0], gt_boxes, gt_labels, callers[1], iou)
    out.update(_operating_point(det_scores, order, matched, len(gt_boxes)))
    per_class = {}
    for k, name in enumerate(classes):
        if not (gt_labels == k).any() and not (det_labels == k).any():
            continue
        per_class[name] = {
            "AP": ap(std, 0, k), "AP50": ap(t50, 0, k), "AP75": ap(t75, 0, k),
            "n_labels": int((gt_labels == k).sum()), "n_detections": int((det_labels == k).sum()),
        }
    out["per_class"] = per_class
    return Metrics(json_safe(out))  # an AP with nothing to average (a class without labels) is None


def _run_cocoeval(dets: tuple, gts: tuple, classes, iou_thrs: list, area_scale: float):
    """faster-coco-eval over ``dets`` (boxes, scores, labels, image ids) and ``gts`` (boxes,
    labels, image ids): COCO's precision array [T, R, K, A, M]."""
    from faster_coco_eval import COCO, COCOeval_faster

    det_boxes, det_scores, det_labels, det_images = dets
    gt_boxes, gt_labels, gt_images = gts
    n_det = len(det_boxes)
    # Shift and scale so COCO's pixel-area size ranges apply to these units.
    s = float(np.sqrt(area_scale))
    origin = np.vstack([det_boxes, gt_boxes]).min(axis=0)[:2]
    shift = np.array([origin[0], origin[1], origin[0], origin[1]])
    ids = sorted(set(det_images.tolist()) | set(gt_images.tolist()) | {1})
    gt = COCO()
    gt.dataset = {"images": [{"id": int(i), "width": 1, "height": 1} for i in ids],
                  "categories": [{"id": i + 1, "name": n} for i, n in enumerate(classes)],
                  "annotations": _coco((gt_boxes - shift) * s, gt_labels, images=gt_images)}
    gt.createIndex()
    # COCO ranks tied scores in input order within an image, but by image across images. Ranks
    # (ties broken by input order) as the scores make the split give exactly the one-image order.
    by_score = np.argsort(-det_scores, kind="stable")
    rank_key = np.empty(n_det)
    rank_key[by_score] = np.arange(n_det, 0, -1)  # n_det for the best, 1 for the worst
    dt = gt.loadRes(_coco((det_boxes - shift) * s, det_labels, rank_key, images=det_images))
    ev = COCOeval_faster(gt, dt, iouType="bbox", print_function=log.debug)
    ev.params.maxDets = [1, 10, max(100, n_det)]
    ev.params.iouThrs = np.array(iou_thrs)
    ev.evaluate()
    ev.accumulate()
    return ev.eval["precision"]


def _match(det_boxes, det_scores, det_labels, det_images, gt_boxes, gt_labels, gt_images, iou: float):
    """COCO's greedy matching at one IoU threshold: in rank order (score, ties in input order), each
    detection takes the unmatched label of its class and image with the highest IoU >= ``iou``
    (of labels with equal IoU, the later one, as COCO's loop keeps the last it finds).
    Returns (each detection's rank order, whether each detection matched)."""
    order = np.argsort(-det_scores, kind="stable")
    matched = np.zeros(len(det_boxes), bool)
    if not len(det_boxes) or not len(gt_boxes):
        return order, matched
    d_idx, g_idx, inter, union = _touching_pairs(det_boxes, gt_boxes)
    with np.errstate(divide="ignore", invalid="ignore"):
        ious = np.where(union > 0, inter / union, 0.0)
    keep = (ious >= min(iou, 1 - 1e-10)) & (det_labels[d_idx] == gt_labels[g_idx])
    keep &= det_images[d_idx] == gt_images[g_idx]
    d_idx, g_idx, ious = d_idx[keep], g_idx[keep], ious[keep]
    rank = np.empty(len(det_boxes), np.int64)
    rank[order] = np.arange(len(det_boxes))
    pairs = np.lexsort((-g_idx, -ious, rank[d_idx]))  # by detection rank, best IoU first, ties to the later label
    taken = np.zeros(len(gt_boxes), bool)
    done = -1
    for d, g in zip(d_idx[pairs].tolist(), g_idx[pairs].tolist()):
        if d == done or taken[g]:
            continue
        taken[g] = matched[d] = True
        done = d
    return order, matched


def _operating_point(det_scores, order, matched, n_gt: int) -> dict:
    """The best-F1 score threshold of the detections of all classes together, and the precision,
    recall and F1 that keeping the detections scored at or above it gives (a real operating point:
    filter at ``score_threshold`` and these are the figures); the PR curve of that pooled ranking
    (precision interpolated at COCO's 101 recall points)."""
    s = det_scores[order]
    tp = np.cumsum(matched[order])
    if not tp[-1]:  # no detection found an object: no score separates them, so there is no operating point
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "score_threshold": None,
                "pr_curve": {"recall": np.linspace(0, 1, 101).tolist(), "precision": [0.0] * 101}}
    k = np.arange(1, len(s) + 1)
    cut = np.r_[s[1:] != s[:-1], True]  # a threshold keeps every detection of a tied score
    prec, rec = tp / k, tp / max(n_gt, 1)
    f1 = 2 * prec * rec / np.maximum(prec + rec, 1e-12)
    best = int(np.flatnonzero(cut)[np.argmax(f1[cut])])
    rec_thrs = np.linspace(0, 1, 101)
    envelope = np.maximum.accumulate(prec[cut][::-1])[::-1]  # best precision at this recall or beyond
    at = np.searchsorted(rec[cut], rec_thrs - 1e-12, side="left")
    curve = np.where(at < len(envelope), envelope[np.minimum(at, len(envelope) - 1)], 0.0)
    return {"precision": float(prec[best]), "recall": float(rec[best]), "f1": float(f1[best]),
            "score_threshold": float(s[best]), "pr_curve": {"recall": rec_thrs.tolist(), "precision": curve.tolist()}}


class Metrics(dict):
    """The metrics dict; printed, it shows the figures and summarises the PR curve."""

    def __repr__(self) -> str:
        shown = {k: (f"<{len(v['recall'])} points>" if k == "pr_curve" and v else v) for k, v in self.items()}
        return repr(shown)


def _class_names(det, gt, labels, class_column: str):
    """The detections' and labels' class names as they will be scored: per class, or one class
    ('object') when asked (``class_column=""``) or when no detection class is a label class and
    the detections hold at most one. Returns (the labels frame, det names, label names, label class column
    or None, agnostic, the note or warning to report or None)."""
    from .io.labels import class_values, drop_unclassed, integer_name

    # An empty class column means class-agnostic: every label and detection is one class.
    agnostic = not class_column
    class_column_gt = None if agnostic or class_column not in gt.columns else class_column
    det_names = det["label"].fillna("").astype(str).to_numpy() if "label" in det.columns else np.full(len(det), "object", dtype=object)
    gt_names = class_values(gt[class_column_gt]) if class_column_gt else np.full(len(gt), "object")
    named = {n for n in gt_names if n is not None}  # labels with an empty class name none
    # a model trained before integer classes kept their names read 1.0 where the labels now read 1
    renamed = {n: integer_name(n) for n in set(det_names) if n not in named and integer_name(n) in named}
    if renamed:
        det_names = np.array([renamed.get(n, n) for n in det_names], dtype=object)
    mismatch = None
    det_classes = sorted(set(det_names))
    if not agnostic and len(gt_names) and (det_classes or not named) and not set(det_classes) & named:
        if len(det_classes) <= 1:
            # one class (a one-class model, e.g. the trees preset's 'object'), or none and no label
            # names one: every label is one of them
            what = f"one class ('{det_classes[0]}')" if det_classes else "no class (no detection)"
            mismatch = (f"the detections hold {what} that no label has "
                        f"({', '.join(sorted(named)[:5]) or 'every class empty'}): scored class-agnostically")
            agnostic = True
            log.info(mismatch)
        elif named:  # (with every label's class empty, drop_unclassed below says so)
            mismatch = (f"no detection class ({', '.join(sorted(set(det_names))[:5])}) matches a label class "
                        f"({', '.join(sorted(named)[:5]) or 'every class empty'}), so every AP is 0: pass --class-column '' to "
                        "evaluate class-agnostically")
            log.warning(mismatch)
    if agnostic:
        class_column_gt = None
        det_names = np.full(len(det), "object", dtype=object)
        gt_names = np.full(len(gt), "object", dtype=object)
    elif class_column_gt:  # scored per class: a label without a class belongs to none
        gt, _ = drop_unclassed(gt, class_column_gt, labels if isinstance(labels, (str, Path)) else "labels")
        gt_names = class_values(gt[class_column_gt])
    return gt, det_names, gt_names, class_column_gt, agnostic, mismatch


def _check_inputs(detections, labels, iou) -> None:
    import geopandas as gpd

    if not (isinstance(iou, (int, float, np.number)) and 0 < iou <= 1):
        raise GeodetError(f"iou must be a number in (0, 1], got {iou!r}")
    for name, v in (("detections", detections), ("labels", labels)):
        if not isinstance(v, (gpd.GeoDataFrame, str, Path)):
            raise GeodetError(f"{name} must be a GeoDataFrame or a vector file's path, got {type(v).__name__}")


def evaluate(detections, labels, scene=None, iou: float = 0.5, class_column: str = "label", bands=None,
             point_box_m: float = 1.0) -> dict:
    """Evaluate detections (a frame or any file geodet writes) against labels (a frame or any
    OGR vector). With ``scene`` both go to its pixel grid, so size ranges are in its pixels;
    otherwise labels are reprojected to the detections' CRS. ``class_column=""`` ignores classes.
    Point labels are squares of ``point_box_m`` metres (as training's ``train.point_box_m``)."""
    import geopandas as gpd

    from .io.labels import read_labels

    _check_inputs(detections, labels, iou)
    det = detections if isinstance(detections, gpd.GeoDataFrame) else read_detections(detections)
    # a CSV of pixel boxes alone (no map geometry), and whether a .prj beside it says its scene had a place
    pixel_only, placed = bool(det.attrs.get("pixel_boxes")), bool(det.attrs.get("prj"))
    if scene is not None:
        det = only_scene(det, scene if not hasattr(scene, "path") else scene.path)
    elif "scene" in det.columns and det["scene"].nunique() > 1:
        names = ", ".join(sorted(det["scene"].fillna("").astype(str).unique())[:5])
        raise GeodetError(f"the detections come from {det['scene'].nunique()} scenes ({names}): pass --scene with the "
                          "one the labels are drawn on, so other scenes' detections do not count as false positives")
    det = with_scores(with_geometry(det, detections), detections)
    gt = labels if isinstance(labels, gpd.GeoDataFrame) else read_labels(labels, class_column, allow_empty=True)
    if not len(gt):  # a scene without objects: every detection is a false positive
        return _without_labels(det, labels, iou)
    gt, det_names, gt_names, class_column_gt, agnostic, mismatch = _class_names(det, gt, labels, class_column)
    classes = sorted(set(gt_names) | set(det_names))
    lookup = {n: i for i, n in enumerate(classes)}
    scores = det["score"].to_numpy(np.float64) if "score" in det.columns else np.ones(len(det))
    if "score" not in det.columns and len(det):
        log.warning("%s: no score column, so every detection counts with score 1 and AP is that of an unranked "
                    "set (is it a labels file?)", detections if isinstance(detections, (str, Path)) else "detections")
    area_scale = 1.0
    if scene is not None:
        gt_boxes, gt_labels, det_boxes, det_names, scores = in_scene_grid(
            det, gt, scene, detections, classes, class_column_gt, det_names, scores, point_box_m, placed)
    else:
        if det.crs is None and gt.crs is not None and len(det) and pixel_only:
            raise GeodetError("the detections are pixel boxes and the labels are on a map: pass --scene with the "
                              "scene they were detected on")
        gt_boxes, gt_names, det_boxes, area_scale = on_the_map(det, gt, labels, class_column_gt, point_box_m)
        gt_labels = np.array([lookup[n] for n in gt_names], np.int64)
    det_labels = np.array([lookup[n] for n in det_names], np.int64)
    m = coco_metrics(det_boxes, scores, det_labels, gt_boxes, gt_labels, classes, iou=iou,
                     area_scale=1.0 if area_scale is None else area_scale)
    if area_scale is None:  # boxes on the map with no pixel size: COCO's size ranges (in pixels) unknown
        m.update(AP_small=None, AP_medium=None, AP_large=None)
        m["size_ranges"] = "not measured: the detections have no pixel boxes (px_x0 ...); pass --scene"
    if mismatch:
        m["warning" if not agnostic else "note"] = mismatch
    return m


def _without_labels(det, labels, iou: float) -> dict:
    """Metrics against labels that hold no object: AP and recall are undefined (None), precision
    is 0 where there is a detection (each a false positive)."""
    name = labels if isinstance(labels, (str, Path)) else "labels"
    log.warning("%s: no labels, so every detection counts as a false positive (AP and recall are undefined)", name)
    m = {"n_detections": int(len(det)), "n_labels": 0, "iou": iou, "false_positives": int(len(det))}
    m.update({k: None for k in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "recall", "f1")})
    m["precision"] = 0.0 if len(det) else None
    return Metrics(m)


def format_table(m: dict) -> str:
    def f(v):
        return "  -  " if v is None else f"{v:.3f}"

    lines = [
        f"{'':12s} {'AP':>6s} {'AP50':>6s} {'AP75':>6s} {'labels':>7s} {'dets':>7s}",
        f"{'all':12s} {f(m['AP']):>6s} {f(m['AP50']):>6s} {f(m['AP75']):>6s} {m['n_labels']:7d} {m['n_detections']:7d}",
    ]
    for name, c in (m.get("per_class") or {}).items():
        lines.append(f"{name[:12]:12s} {f(c['AP']):>6s} {f(c['AP50']):>6s} {f(c['AP75']):>6s} {c['n_labels']:7d} {c['n_detections']:7d}")
    lines.append(
        f"AP small/medium/large: {f(m['AP_small'])} / {f(m['AP_medium'])} / {f(m['AP_large'])}; at IoU {m['iou']}: "
        f"precision {f(m['precision'])}, recall {f(m['recall'])}, F1 {f(m['f1'])}"
        + (f" (score >= {m['score_threshold']:.3f})" if m.get("score_threshold") is not None else "")
    )
    return "\n".join(lines)


def plot_pr(m: dict, path) -> None:
    """A precision-recall plot (PNG); drawn with matplotlib's Figure API, so the process's
    pyplot backend is left as it was."""
    from matplotlib.figure import Figure

    from .io.writers import atomic_path

    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    if m.get("pr_curve"):
        ax.plot(m["pr_curve"]["recall"], m["pr_curve"]["precision"])
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"PR at IoU {m['iou']}: AP50 {m['AP50'] or 0:.3f}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
