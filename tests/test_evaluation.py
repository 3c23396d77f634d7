import json

import geopandas as gpd
import numpy as np
import pandas as pd
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


def _naive_counts(case, threshold):
    """True positives among the detections scored >= threshold, matched as COCO matches (per image
    and class, in score order, each to the free label of highest IoU >= the threshold), box by box."""
    keep = np.flatnonzero(case["det_scores"] >= threshold)
    keep = keep[np.argsort(-case["det_scores"][keep], kind="stable")]
    free = np.ones(len(case["gt_boxes"]), bool)
    tp = 0
    for d in keep:
        best, best_iou = -1, min(case["iou"], 1 - 1e-10)
        for g in range(len(case["gt_boxes"])):
            if not free[g] or case["gt_labels"][g] != case["det_labels"][d] or case["gt_images"][g] != case["det_images"][d]:
                continue
            a, b = case["det_boxes"][d], case["gt_boxes"][g]
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            inter = iw * ih
            iou = inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
            if iou >= best_iou:  # COCO's loop: the last label of the best IoU
                best, best_iou = g, iou
        if best >= 0:
            free[best] = False
            tp += 1
    return tp, len(keep)


@pytest.mark.parametrize("seed,iou,ties", [(5, 0.5, False), (6, 0.5, True), (7, 0.3, False)])
def test_the_operating_point_is_what_filtering_at_its_score_gives(seed, iou, ties):
    """precision, recall and F1 are those of keeping the detections scored at or above
    score_threshold (all classes together), and no other threshold has a better F1."""
    case = _dense_case(seed, 40, iou, ties)
    m = coco_metrics(**case)
    best = max((2 * tp / (n + len(case["gt_boxes"])), -t) for t in np.unique(case["det_scores"])
               for tp, n in [_naive_counts(case, t)])
    tp, n = _naive_counts(case, m["score_threshold"])
    assert m["precision"] == pytest.approx(tp / n) and m["recall"] == pytest.approx(tp / len(case["gt_boxes"]))
    assert m["f1"] == pytest.approx(best[0]) and m["score_threshold"] == -best[1]
    assert 0.1 < m["recall"] < 0.95 and 0.1 < m["precision"] < 0.95  # not a trivial case


def test_a_class_never_detected_lowers_recall_not_precision(tmp_path):
    """55 cars found exactly and 6 trucks missed: precision 1 and recall 55/61 at the lowest score,
    not a mean over classes (which made it precision 0.5, recall 1 at a score below every one)."""
    boxes = [(500000 + 10 * i, 4600000, 500000 + 10 * i + 4, 4600004) for i in range(61)]
    gt = _frame(boxes)
    gt["label"] = ["car"] * 55 + ["truck"] * 6
    det = _frame(boxes[:55], scores=list(np.linspace(0.9, 0.5, 55)))
    m = evaluate(det, gt)
    assert (m["precision"], m["recall"], m["score_threshold"]) == (1.0, pytest.approx(55 / 61), pytest.approx(0.5))
    # a class with detections and no label: its APs are None, and the metrics are valid JSON
    det.loc[:5, "label"] = "lorry"
    m = evaluate(det, gt)
    assert m["per_class"]["lorry"]["AP"] is None
    json.dumps(m, allow_nan=False)


def test_detection_files_as_users_have_them(tmp_path):
    """A CSV's CRS is its .prj (as geodet writes it), so labels in another CRS are reprojected; a
    CSV without one is taken to be in the scene's (said); a detection without a geometry is left out
    (said), not a NaN that zeroes every figure; point labels are scored as point_box_m squares as in
    the scene's grid; in the scene's grid a box over its edge is clipped as the labels are."""
    import rasterio
    from rasterio.transform import from_origin

    from geodet.io.writers import write_detections

    boxes = [(500000 + 10 * i, 4600000 - 6, 500000 + 10 * i + 4, 4600000 - 2) for i in range(5)]
    det, gt = _frame(boxes, scores=[0.9, 0.8, 0.7, 0.6, 0.5]), _frame(boxes)
    write_detections(det, tmp_path / "d.csv")
    assert (tmp_path / "d.prj").exists()
    assert evaluate(str(tmp_path / "d.csv"), gt.to_crs("EPSG:4326"))["AP50"] == 1
    scene = tmp_path / "s.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=100, height=40, count=1, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000, 4600000, 0.5, 0.5)) as d:
        d.write(np.zeros((1, 40, 100), np.uint8))
    (tmp_path / "d.prj").unlink()
    assert evaluate(str(tmp_path / "d.csv"), gt, scene=str(scene))["AP50"] == 1
    px = pd.DataFrame({"px_x0": [20.0 * i for i in range(5)], "px_y0": 4.0, "px_x1": [20.0 * i + 8 for i in range(5)],
                       "px_y1": 12.0, "score": 0.9, "label": "car"})
    px.to_csv(tmp_path / "px.csv", index=False)  # pixel boxes only (--csv-geometry pixel), no CRS
    assert evaluate(str(tmp_path / "px.csv"), gt, scene=str(scene))["AP"] == 1
    with_null = det.copy()
    with_null.loc[0, "geometry"] = None
    m = evaluate(with_null, gt)
    assert m["n_detections"] == 4 and m["recall"] == pytest.approx(0.8) and m["precision"] == 1
    points = gt.copy()
    points["geometry"] = gt.geometry.centroid
    squares = det.copy()
    squares["geometry"] = gt.geometry.centroid.buffer(0.5, cap_style="square")
    assert evaluate(squares, points)["AP"] == 1
    assert evaluate(squares, points.to_crs("EPSG:4326"))["AP50"] == 1
    edge = _frame([(499998, 4599990, 500004, 4599996)])
    assert evaluate(edge, edge, scene=str(scene))["AP"] == 1


def test_no_detection_that_finds_an_object_gives_no_operating_point():
    """Detections that match nothing have no score that separates right from wrong: the operating
    point is None (a model card then has none, and suggest refuses it), not the top score."""
    far = [(x0 + 100, y0, x1 + 100, y1) for x0, y0, x1, y1 in BOXES]
    m = evaluate(_frame(far, scores=[0.9, 0.8, 0.7, 0.6, 0.5]), _frame(BOXES))
    assert m["score_threshold"] is None and m["f1"] == 0 and m["AP50"] == 0


def test_detection_files_that_cannot_be_what_they_are_said_to_be(tmp_path, caplog):
    """A GeoPackage of a user's layers (detections beside labels) is read by the layer named, not
    merged; a damaged one is one line; a file without scores, and labels nowhere near the
    detections, are said. geodet's own layers by CRS (each with a score) still read as one."""
    from geodet.errors import GeodetError

    boxes = [(500000 + 10 * i, 4600000 - 6, 500000 + 10 * i + 4, 4600000 - 2) for i in range(5)]
    det, gt = _frame(boxes), _frame(boxes).drop(columns="score")
    f = tmp_path / "m.gpkg"
    det.to_file(f, layer="dets")
    gt.to_file(f, layer="truth")
    with pytest.raises(GeodetError, match=r"m.gpkg holds 2 layers \(dets, truth\): name the one with the detections "
                                          r"as '.*m.gpkg\|layername=dets'"):
        evaluate(str(f), gt)
    assert evaluate(f"{f}|layername=dets", gt)["AP50"] == 1
    by_crs = tmp_path / "c.gpkg"  # geodet's output for scenes in two UTM zones
    det.iloc[:3].to_file(by_crs, layer="c_32633")
    det.iloc[3:].to_crs("EPSG:32632").to_file(by_crs, layer="c_32632")
    assert evaluate(str(by_crs), gt)["AP50"] == 1
    (tmp_path / "cut.gpkg").write_bytes(f.read_bytes()[:3000])
    with pytest.raises(GeodetError, match="cut.gpkg: not a GeoPackage that OGR can read"):
        evaluate(str(tmp_path / "cut.gpkg"), gt)
    gt.to_file(tmp_path / "labels.gpkg")
    with caplog.at_level("WARNING"):
        evaluate(str(tmp_path / "labels.gpkg"), gt)
    assert "labels.gpkg: no score column" in caplog.text
    caplog.clear()
    far = gt.copy()
    far["geometry"] = gt.geometry.translate(100_000, 0)
    with caplog.at_level("WARNING"):
        m = evaluate(det, far)
    assert m["AP50"] == 0 and "no label lies within the detections' extent" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        evaluate(det, gt)
    assert "extent" not in caplog.text


def test_a_pixel_csv_is_scored_in_the_grid_it_was_detected_in(synth, tiny_model, tmp_path):
    """Pixel boxes of a model run at another GSD are in its resampled grid: with the report beside
    them they score as the same detections with map geometry do; without a scene they are refused,
    not compared with map coordinates."""
    from geodet.errors import GeodetError
    from geodet.pipeline.job import detect_to_file

    for name, geometry in (("wkt.csv", None), ("px.csv", "pixel")):
        detect_to_file([synth.image], str(tiny_model), tmp_path / name, csv_geometry=geometry, progress=False,
                       gsd_m=0.6)
    report = json.loads((tmp_path / "px.csv.report.json").read_text())["scenes"][0]
    assert report["grid_size_px"][0] * 2 == pytest.approx(report["scene_size_px"][0], abs=1)
    want = evaluate(str(tmp_path / "wkt.csv"), synth.labels, scene=str(synth.image), class_column="")
    got = evaluate(str(tmp_path / "px.csv"), synth.labels, scene=str(synth.image), class_column="")
    assert want["n_detections"] > 10 and want["AP50"] > 0
    for k in ("AP", "AP50", "AP_small", "precision", "recall", "n_detections"):
        assert got[k] == pytest.approx(want[k], abs=1e-6), k
    with pytest.raises(GeodetError, match="pixel boxes and the labels are on a map: pass --scene"):
        evaluate(str(tmp_path / "px.csv"), synth.labels)


def test_detections_outside_the_scene_and_odd_columns(tmp_path, caplog):
    """In a scene's grid, detections wholly outside it are left out as labels there are (not
    slivers counted as false positives); a detection without a label, scene or score is handled
    or left out and counted; a score column of words is one line, not a traceback."""
    import rasterio
    from rasterio.transform import from_origin

    from geodet.errors import GeodetError

    scene = tmp_path / "s.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=100, height=40, count=1, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000, 4600000, 0.5, 0.5)) as d:
        d.write(np.zeros((1, 40, 100), np.uint8))
    inside = [(500000 + 10 * i, 4600000 - 6, 500000 + 10 * i + 4, 4600000 - 2) for i in range(5)]
    outside = [(500100 + 10 * i, 4600000 - 6, 500100 + 10 * i + 4, 4600000 - 2) for i in range(5)]
    both = _frame(inside + outside, scores=[0.5] * 5 + [0.9] * 5)
    m = evaluate(both, both, scene=str(scene))
    assert m["AP50"] == 1 and m["precision"] == 1 and m["n_detections"] == m["n_labels"] == 5
    assert "5 detection(s) lie wholly outside s.tif: left out" in caplog.text
    odd = _frame(inside, scores=[0.9, 0.8, 0.7, 0.6, 0.5])
    odd["label"], odd["scene"] = [None, "car", "car", "car", "car"], [None, "s.tif", "s.tif", "s.tif", "s.tif"]
    assert evaluate(odd, _frame(inside), class_column="")["AP50"] == 1
    assert evaluate(odd, _frame(inside), scene=str(scene), class_column="")["n_detections"] == 4
    nan = _frame(inside, scores=[0.9, np.nan, 0.7, 0.6, 0.5])
    m = evaluate(nan, _frame(inside))
    assert m["n_detections"] == 4 and m["recall"] == pytest.approx(0.8) and m["score_threshold"] == 0.5
    assert "1 detection(s) without a finite score left out" in caplog.text
    words = _frame(inside).astype({"score": object})
    words.loc[2, "score"] = "high"
    with pytest.raises(GeodetError, match="the score column holds 'high', not a number"):
        evaluate(words, _frame(inside))


def test_size_ranges_from_a_geojson_in_degrees_are_in_pixels(tmp_path):
    """geodet's GeoJSON (EPSG:4326) carries pixel boxes: AP by size is that of the same boxes in
    the scene's CRS, not every box 'small' in square degrees."""
    from geodet.io.writers import write_detections

    sizes = [10, 40, 120]  # pixels at 0.5 m: one small, one medium, one large
    boxes, px = [], []
    for i, n in enumerate(sizes):
        x0, y0 = 500000 + 100 * i, 4600000 - 80
        boxes.append((x0, y0, x0 + n * 0.5, y0 + n * 0.5))
        px.append((200 * i, 0, 200 * i + n, n))
    det = _frame(boxes, scores=[0.9, 0.8, 0.7])
    det["px_x0"], det["px_y0"], det["px_x1"], det["px_y1"] = (np.array(px, float)[:, k] for k in range(4))
    write_detections(det, tmp_path / "d.gpkg")
    write_detections(det, tmp_path / "d.geojson")
    a, b = (evaluate(str(tmp_path / f), _frame(boxes)) for f in ("d.gpkg", "d.geojson"))
    assert a["AP_small"] == a["AP_medium"] == a["AP_large"] == 1
    assert [b[k] for k in ("AP_small", "AP_medium", "AP_large")] == [1, 1, 1]


def test_pixel_grids_of_two_scenes_of_one_name_are_not_guessed(tmp_path):
    """A report of a/x.tif and b/x.tif (one job, two folders): each scene's own factors by its
    path; by its name alone neither; a report without the sizes gives none, not a traceback."""
    from geodet.io.detections import pixel_grid_scale

    rows = [{"scene": str(tmp_path / "a" / "x.tif"), "scene_size_px": [200, 200], "grid_size_px": [100, 100]},
            {"scene": str(tmp_path / "b" / "x.tif"), "scene_size_px": [200, 200], "grid_size_px": [200, 200]}]
    (tmp_path / "d.csv.report.json").write_text(json.dumps({"scenes": rows}))
    csv = tmp_path / "d.csv"
    assert pixel_grid_scale(csv, tmp_path / "a" / "x.tif") == (2.0, 2.0)
    assert pixel_grid_scale(csv, tmp_path / "b" / "x.tif") == (1.0, 1.0)
    assert pixel_grid_scale(csv, tmp_path / "c" / "x.tif") is None
    (tmp_path / "d.csv.report.json").write_text(json.dumps({"scenes": [{"scene": "x.tif"}]}))
    assert pixel_grid_scale(csv, tmp_path / "x.tif") is None


def test_a_scene_named_by_two_folders_is_scored_alone_and_a_name_alone_is_not_guessed(tmp_path, capsys):
    """Two scenes of one file name (dupA/s.tif, dupB/s.tif in the scene column, as detect names
    them): --scene dupA/s.tif scores dupA's detections only; a path that names neither folder is
    refused rather than scoring both."""
    from geodet.cli import main

    good = _frame(BOXES).assign(scene="dupA/s.tif")
    bad = _frame([(x0 + 100, y0, x1 + 100, y1) for x0, y0, x1, y1 in BOXES]).assign(scene="dupB/s.tif")
    both = gpd.GeoDataFrame(pd.concat([good, bad]), crs=good.crs)
    both.to_file(tmp_path / "d.gpkg")
    _frame(BOXES).to_file(tmp_path / "l.gpkg")
    for folder in ("dupA", "dupB"):
        (tmp_path / folder).mkdir()
        with open(tmp_path / folder / "s.tif", "wb"):
            pass
    from geodet.io.detections import only_scene

    assert len(only_scene(both, str(tmp_path / "dupA" / "s.tif"))) == 5
    assert set(only_scene(both, "elsewhere/dupB/s.tif")["scene"]) == {"dupB/s.tif"}
    with pytest.raises(Exception, match="2 scenes named s.tif .*pass --scene as the path that names one"):
        only_scene(both, str(tmp_path / "dupC" / "s.tif"))
    assert main(["evaluate", str(tmp_path / "d.gpkg"), str(tmp_path / "l.gpkg"), "--scene",
                 str(tmp_path / "dupC" / "s.tif")]) == 2
    assert "come from 2 scenes named s.tif" in capsys.readouterr().err
    # ./dupA/s.tif is dupA/s.tif
    assert set(only_scene(both, "./dupA/s.tif")["scene"]) == {"dupA/s.tif"}
    also = gpd.GeoDataFrame(pd.concat([good, bad.assign(scene="x/dupA/s.tif")]), crs=good.crs)
    assert set(only_scene(also, "./dupA/s.tif")["scene"]) == {"dupA/s.tif"}


def test_labels_drawn_twice_count_once_on_the_map_as_in_a_scene(caplog):
    twice = gpd.GeoDataFrame(pd.concat([_frame(BOXES), _frame(BOXES)]), crs="EPSG:32633")
    m = evaluate(_frame(BOXES), twice)
    assert m["n_labels"] == 5 and m["AP"] == 1 and m["recall"] == 1
    assert "5 label(s) drawn twice" in caplog.text
    # boxes a hair apart are one box drawn twice; a class of its own is another label
    near = twice.copy()
    near.geometry = near.geometry.translate(1e-6, 0)
    other = _frame(BOXES).assign(label="truck")
    m = evaluate(_frame(BOXES), gpd.GeoDataFrame(pd.concat([_frame(BOXES), near.iloc[:5], other]), crs=twice.crs))
    assert m["n_labels"] == 10 and m["per_class"]["car"]["n_labels"] == 5


def test_labels_of_a_scene_without_objects_make_every_detection_a_false_positive(tmp_path, caplog):
    from geodet.cli import main

    _frame(BOXES).iloc[:0].to_file(tmp_path / "none.gpkg")
    m = evaluate(_frame(BOXES), tmp_path / "none.gpkg")
    assert m["n_labels"] == 0 and m["false_positives"] == 5 and m["precision"] == 0
    assert m["AP"] is None and m["recall"] is None
    _frame(BOXES).to_file(tmp_path / "d.gpkg")
    assert main(["evaluate", str(tmp_path / "d.gpkg"), str(tmp_path / "none.gpkg"), "-o", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["false_positives"] == 5
    assert "every detection counts as a false positive" in caplog.text


def test_size_ranges_need_pixel_sizes():
    """Boxes on a map without pixel columns: COCO's small/medium/large (in pixels) are not
    measured in square metres as if they were pixels."""
    m = evaluate(_frame(BOXES), _frame(BOXES))
    assert m["AP"] == 1 and m["AP_small"] is None and m["AP_large"] is None and "--scene" in m["size_ranges"]
