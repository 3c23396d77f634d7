
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
    """A one-class 'Tree' model against 'Dead'/'Alive' labels: AP 0, and a warning that says why
    and what to pass; class-agnostic evaluation then scores the same boxes."""
    det = _frame(BOXES, scores=[0.9] * 5)
    det["label"] = "Tree"
    gt = _frame(BOXES)
    gt["label"] = ["Dead", "Alive", "Dead", "Dead", "Alive"]
    m = evaluate(det, gt)
    assert m["AP50"] == 0 and "--class-column ''" in m["warning"]
    m2 = evaluate(det, gt, class_column="")
    assert m2["AP50"] == pytest.approx(1.0) and "warning" not in m2


def test_printed_metrics_summarise_the_pr_curve():
    m = evaluate(_frame(BOXES), _frame(BOXES))
    assert len(m["pr_curve"]["recall"]) == 101  # the data is all there
    assert "points>" in repr(m) and len(repr(m)) < 1500
