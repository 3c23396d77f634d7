
import geopandas as gpd
import numpy as np
import pytest
from shapely.geometry import box

from geodet.evaluation import coco_metrics, evaluate


def _frame(boxes, crs="EPSG:32633", scores=None):
    return gpd.GeoDataFrame({"label": ["car"] * len(boxes), "score": scores if scores is not None else [0.9] * len(boxes)},
                            geometry=[box(*b) for b in boxes], crs=crs)


BOXES = [(500000 + 10 * i, 4600000, 500000 + 10 * i + 4, 4600004) for i in range(5)]


def test_perfect_match_is_ap_one():
    m = evaluate(_frame(BOXES), _frame(BOXES))
    assert m["AP"] == 1 and m["AP50"] == 1 and m["precision"] == 1 and m["recall"] == 1 and m["f1"] == 1
    assert m["n_detections"] == 5 and m["n_labels"] == 5


def test_shifted_set_gives_computed_ap():
    # 3 of 5 detections exact (highest scores), 2 shifted by half a box (IoU 1/3 < 0.5)
    det = BOXES[:3] + [(x0 + 2, y0, x1 + 2, y1) for x0, y0, x1, y1 in BOXES[3:]]
    m = evaluate(_frame(det, scores=[0.9, 0.8, 0.7, 0.6, 0.5]), _frame(BOXES))
    # precision 1 up to recall 0.6: 61 of COCO's 101 recall points
    assert m["AP50"] == pytest.approx(61 / 101)
    assert m["recall"] == pytest.approx(0.6) and m["precision"] == 1


def test_labels_in_another_crs_give_the_same_result():
    det = _frame(BOXES, scores=[0.9, 0.8, 0.7, 0.6, 0.5])
    a = evaluate(det, _frame(BOXES))
    b = evaluate(det, _frame(BOXES).to_crs("EPSG:4326"))
    assert b["AP50"] == pytest.approx(a["AP50"]) and b["AP"] == pytest.approx(a["AP"], abs=0.02)


def test_many_detections_not_capped_at_100():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 10000, (3000, 2))
    b = np.hstack([xy, xy + 5])
    m = coco_metrics(b, np.linspace(1, 0.1, 3000), np.zeros(3000, int), b, np.zeros(3000, int), ["a"])
    assert m["AP50"] == 1 and m["recall"] == 1


def test_class_names_that_never_meet_are_reported():
    """A one-class 'Tree' model against 'Dead'/'Alive' labels is scored class-agnostically, with a
    note that says so; detections of several classes that no label has score AP 0, with a warning
    that says why and what to pass."""
    det = _frame(BOXES, scores=[0.9] * 5)
    det["label"] = "Tree"
    gt = _frame(BOXES)
    gt["label"] = ["Dead", "Alive", "Dead", "Dead", "Alive"]
    m = evaluate(det, gt)
    assert m["AP50"] == pytest.approx(1.0) and "class-agnostically" in m["note"] and "warning" not in m
    det["label"] = ["Oak", "Pine", "Oak", "Pine", "Oak"]
    m = evaluate(det, gt)
    assert m["AP50"] == 0 and "--class-column ''" in m["warning"]
    m2 = evaluate(det, gt, class_column="")
    assert m2["AP50"] == pytest.approx(1.0) and "warning" not in m2


def test_printed_metrics_summarise_the_pr_curve():
    m = evaluate(_frame(BOXES), _frame(BOXES))
    assert len(m["pr_curve"]["recall"]) == 101  # the data is all there
    assert "points>" in repr(m) and len(repr(m)) < 1500


def _dense_case(seed, n_gt, iou, ties):
    """Clustered labels and detections: chains of overlaps above and below the IoU thresholds,
    two classes, two caller images at the same coordinates; scores unique or in 20 tied steps."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 300, (max(1, n_gt // 6), 2))
    xy = centres[rng.integers(0, len(centres), n_gt)] + rng.normal(0, 6, (n_gt, 2))
    wh = rng.uniform(4, 14, (n_gt, 2))
    gt = np.hstack([xy, xy + wh])
    src = rng.integers(0, n_gt, 3 * n_gt)
    jitter = rng.normal(0, rng.choice([0.5, 2.0, 5.0], (len(src), 1)), (len(src), 4))
    det = gt[src] + jitter
    det[:, 2:] = np.maximum(det[:, 2:], det[:, :2] + 0.5)
    fp = rng.uniform(0, 300, (n_gt, 2))
    det = np.vstack([det, np.hstack([fp, fp + rng.uniform(4, 14, (n_gt, 2))])])
    gt_labels = rng.integers(0, 2, n_gt)
    labels = np.r_[np.where(rng.random(len(src)) < 0.9, gt_labels[src], 1 - gt_labels[src]), rng.integers(0, 2, n_gt)]
    quality = np.r_[-np.abs(jitter).mean(axis=1), np.full(n_gt, -3.0)] + rng.normal(0, 1.5, len(det))
    scores = np.empty(len(det))
    scores[np.argsort(quality)] = (np.arange(len(det)) + 1) / len(det)  # unique, ranked by fit
    if ties:
        scores = np.ceil(scores * 20) / 20
    return dict(det_boxes=det, det_scores=scores, det_labels=labels, gt_boxes=gt, gt_labels=gt_labels,
                classes=["car", "truck"], iou=iou, det_images=rng.integers(0, 2, len(det)),
                gt_images=rng.integers(0, 2, n_gt))


@pytest.mark.parametrize("seed,iou,ties", [(0, 0.5, False), (1, 0.3, False), (2, 0.75, True), (3, 0.5, True)])
def test_dense_scene_split_into_images_gives_the_same_metrics(monkeypatch, seed, iou, ties):
    """coco_metrics hands dense scenes to COCO as many small images (connected components of
    the pairs that can match); every figure equals the single-image computation, tied scores
    included (ranked in input order, as COCO ranks them in one image)."""
    import geodet.evaluation as ev

    monkeypatch.setattr(ev, "SPLIT_BOXES", 40)  # small images, so these few hundred boxes make many
    case = _dense_case(seed, 150, iou, ties)
    d, g = ev._split_images(case["det_boxes"], case["det_labels"], case["det_images"] + 1, case["gt_boxes"],
                            case["gt_labels"], case["gt_images"] + 1, 0.5, 40)
    assert len(np.unique(np.r_[d, g])) > 10
    split = ev.coco_metrics(**case)
    whole = ev.coco_metrics(**case, split=False)
    assert 0.05 < whole["AP50"] < 0.95  # a case with misses, false positives and rivals
    for k, v in whole.items():
        if k == "pr_curve":
            assert split[k] == v
        elif k == "per_class":
            assert split[k] == v
        else:
            assert split[k] == v, k


def test_split_keeps_callers_images_apart(monkeypatch):
    """A detection never matches a label of another caller image, even at the same coordinates."""
    import geodet.evaluation as ev

    monkeypatch.setattr(ev, "SPLIT_BOXES", 2)
    b = np.array([[0, 0, 10, 10], [100, 0, 110, 10], [0, 0, 10, 10]], float)
    m = ev.coco_metrics(b, [0.9, 0.8, 0.7], [0, 0, 0], b[:2], [0, 0], ["a"], det_images=[1, 0, 0], gt_images=[0, 0])
    # det 0 (image 1) has no label: a false positive ranked first; dets 1 and 2 find their labels,
    # so precision is 2/3 at every recall point (1 if det 0 had matched the label at its place)
    assert m["recall"] == 1 and m["AP50"] == pytest.approx(2 / 3)
    whole = ev.coco_metrics(b, [0.9, 0.8, 0.7], [0, 0, 0], b[:2], [0, 0], ["a"], det_images=[1, 0, 0],
                            gt_images=[0, 0], split=False)
    assert m["AP50"] == whole["AP50"]
