
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.transform import from_origin
from shapely.geometry import Point, Polygon, box

from geodet import GeodetError
from geodet.io.labels import labels_to_boxes, read_labels
from geodet.io.scene import Scene


def _scene(path, w=200, h=100, t=from_origin(500000, 4600000, 0.5, 0.5), crs="EPSG:32633"):
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8", crs=crs, transform=t) as d:
        d.write(np.zeros((3, h, w), np.uint8))
    return Scene(path)


def test_labels_in_4326_land_on_the_right_pixels(tmp_path):
    sc = _scene(tmp_path / "s.tif")
    t = sc.transform
    px = (10, 20, 30, 26)  # pixel-edge box
    x0, y0 = t * (px[0], px[1])
    x1, y1 = t * (px[2], px[3])
    utm = gpd.GeoDataFrame({"label": ["car"]}, geometry=[box(x0, y1, x1, y0)], crs="EPSG:32633")
    lb = labels_to_boxes(utm.to_crs("EPSG:4326"), sc)
    assert np.allclose(lb.boxes[0], px, atol=0.02)  # reprojection round trip of a polygon's corners


def test_points_become_boxes_of_configured_size(tmp_path):
    sc = _scene(tmp_path / "s.tif")
    cx, cy = sc.transform * (50, 40)
    g = gpd.GeoDataFrame({"label": ["tree"]}, geometry=[Point(cx, cy)], crs="EPSG:32633")
    lb = labels_to_boxes(g, sc, point_box_m=3.0)
    assert np.allclose(lb.boxes[0], [47, 37, 53, 43])  # 3 m = 6 px at 0.5 m
    assert lb.counts["points"] == 1


def test_invalid_and_empty_geometries_counted(tmp_path):
    sc = _scene(tmp_path / "s.tif")
    t = sc.transform
    bow = Polygon([t * (10, 10), t * (20, 20), t * (20, 10), t * (10, 20)])  # self-intersecting
    ok = box(*(t * (50, 30)), *(t * (60, 20)))
    g = gpd.GeoDataFrame({"label": ["a", "a", "a", "a"]}, geometry=[bow, ok, Polygon(), None], crs="EPSG:32633")
    lb = labels_to_boxes(g, sc)
    assert lb.counts["repaired"] == 1 and lb.counts["empty"] == 2 and len(lb) == 2
    assert np.allclose(lb.boxes[0], [10, 10, 20, 20])


def test_a_layer_dissolved_by_class_gives_one_box_per_object(tmp_path, caplog):
    """A MultiPolygon of cars apart (QGIS's Dissolve by class) was one box spanning them all; a
    MultiPoint, one point box at their middle. Parts apart are objects of their own with the row's
    class; a repaired bow-tie's touching halves stay one object."""
    from shapely.geometry import MultiPoint, MultiPolygon

    sc = _scene(tmp_path / "s.tif")
    t = sc.transform

    def px_box(x0, y0, x1, y1):
        return box(*(t * (x0, y1)), *(t * (x1, y0)))

    cars = MultiPolygon([px_box(10, 10, 20, 20), px_box(50, 30, 60, 40), px_box(60, 30, 70, 40)])  # 2 touch
    bow = Polygon([t * (100, 10), t * (110, 20), t * (110, 10), t * (100, 20)])
    trees = MultiPoint([t * (150, 50), t * (180, 80)])
    g = gpd.GeoDataFrame({"label": ["car", "car", "tree"]}, geometry=[cars, bow, trees], crs="EPSG:32633")
    with caplog.at_level("WARNING"):
        lb = labels_to_boxes(g, sc, point_box_m=1.0)
    got = sorted((lb.classes[c], tuple(np.round(b, 6))) for b, c in zip(lb.boxes, lb.labels))
    assert got == [("car", (10, 10, 20, 20)), ("car", (50, 30, 70, 40)), ("car", (100, 10, 110, 20)),
                   ("tree", (149, 49, 151, 51)), ("tree", (179, 79, 181, 81))]
    assert lb.counts["split"] == 2 and "2 multi-part label(s) whose parts lie apart taken as 2 more" in caplog.text


def test_labels_outside_scene_clear_error(tmp_path):
    sc = _scene(tmp_path / "s.tif")
    g = gpd.GeoDataFrame({"label": ["a"]}, geometry=[box(0, 0, 10, 10)], crs="EPSG:32633")
    with pytest.raises(GeodetError, match="no label falls inside.*labels extent.*scene extent"):
        labels_to_boxes(g, sc)


def test_missing_class_column_lists_columns(tmp_path):
    g = gpd.GeoDataFrame({"kind": ["a"]}, geometry=[box(0, 0, 1, 1)], crs="EPSG:32633")
    g.to_file(tmp_path / "l.gpkg")
    with pytest.raises(GeodetError, match="available columns: kind"):
        read_labels(tmp_path / "l.gpkg", "label")


def test_labels_with_an_empty_class_are_left_out_and_counted(tmp_path, caplog):
    sc = _scene(tmp_path / "s.tif")
    t = sc.transform
    boxes = [box(*(t * (10 + 20 * i, 30)), *(t * (20 + 20 * i, 20))) for i in range(4)]
    g = gpd.GeoDataFrame({"label": ["car", None, "  ", "truck"]}, geometry=boxes, crs="EPSG:32633")
    g.to_file(tmp_path / "l.gpkg")  # read back as a file: pandas' string column, nulls as NaN
    lb = labels_to_boxes(read_labels(tmp_path / "l.gpkg", "label"), sc, unknown="keep")
    assert lb.classes == ["car", "truck"] and lb.counts["no_class"] == 2 and len(lb) == 2
    assert np.allclose(lb.boxes[:, 0], [10, 70])
    assert "2 label(s) with an empty 'label' left out" in caplog.text
    g.assign(label=None).to_file(tmp_path / "none.gpkg")
    with pytest.raises(GeodetError, match="every label's 'label' is empty.*--class-column ''"):
        labels_to_boxes(read_labels(tmp_path / "none.gpkg", "label"), sc)


def test_labels_on_a_rotated_scene_are_the_boxes_of_their_pixels(tmp_path):
    """On a rotated grid each label's box is that of its vertices in pixels, as on a north-up
    grid: not the pixel box of its map bounds (inflated by the rotation)."""
    from rasterio.transform import Affine

    from geodet.evaluation import evaluate
    from geodet.io.writers import boxes_to_polygons

    t = from_origin(500000, 4600000, 0.5, 0.5) * Affine.rotation(20)
    sc = _scene(tmp_path / "s.tif", t=t)
    px = np.array([[10, 20, 30, 26], [100, 50, 104, 58], [140, 40, 170, 70]], float)  # the last 30 x 30 px
    g = gpd.GeoDataFrame({"label": ["car"] * 3}, geometry=boxes_to_polygons(px, t), crs="EPSG:32633")
    lb = labels_to_boxes(g, sc)
    np.testing.assert_allclose(lb.boxes, px, atol=1e-6)
    cx, cy = t * (50, 40)
    pts = labels_to_boxes(gpd.GeoDataFrame({"label": ["tree"]}, geometry=[Point(cx, cy)], crs="EPSG:32633"), sc,
                          point_box_m=3.0)
    np.testing.assert_allclose(pts.boxes[0], [47, 37, 53, 43], atol=1e-6)
    # sizes are the pixels' too: every box is small (under 32^2 px; the map bounds made the 30 x 30 px
    # box 38.5 px a side, a medium one)
    m = evaluate(g.assign(score=0.9), g, scene=sc)
    assert m["AP_small"] == pytest.approx(1.0) and m["AP_medium"] is None


def test_projected_coordinates_in_a_file_read_as_degrees_are_refused(tmp_path):
    g = gpd.GeoDataFrame({"label": ["car"]}, geometry=[box(500010, 4599990, 500012, 4599992)])
    g.to_file(tmp_path / "n.geojson", driver="GeoJSON")  # no CRS written: readers take it as WGS 84
    with pytest.raises(GeodetError, match="are not degrees.*assign its real CRS"):
        read_labels(tmp_path / "n.geojson", "label")


def test_evaluate_scores_labels_without_a_class_as_the_detections_class_allows(tmp_path):
    """A one-class model's detections are scored class-agnostically, so a label with an empty class
    still counts; scored per class, such a label belongs to no class and is left out."""
    from geodet.evaluation import evaluate

    boxes = [box(500000 + 10 * i, 4600000, 500005 + 10 * i, 4600005) for i in range(4)]
    gpd.GeoDataFrame({"label": ["tree", None, "", "tree"]}, geometry=boxes, crs="EPSG:32633").to_file(tmp_path / "l.gpkg")
    one = gpd.GeoDataFrame({"label": ["object"] * 4, "score": [0.9] * 4}, geometry=boxes, crs="EPSG:32633")
    m = evaluate(one, tmp_path / "l.gpkg")
    assert m["n_labels"] == 4 and m["AP50"] == pytest.approx(1.0)
    per_class = one.assign(label=["tree", "tree", "bush", "tree"])
    m = evaluate(per_class, tmp_path / "l.gpkg")
    assert m["n_labels"] == 2 and m["per_class"]["tree"]["n_labels"] == 2


def test_an_integer_class_column_with_a_null_keeps_integer_names(tmp_path):
    """OGR reads an integer column holding a null as floats: the classes are still '1' and '2'
    (as without the null), not '1.0' and '2.0', so a model trained on either file reads the other."""
    from geodet.io.labels import class_values

    sc = _scene(tmp_path / "s.tif")
    t = sc.transform
    boxes = [box(*(t * (10 + 20 * i, 30)), *(t * (20 + 20 * i, 20))) for i in range(4)]
    gpd.GeoDataFrame({"label": [1, 2, 2, None]}, geometry=boxes, crs="EPSG:32633").to_file(tmp_path / "l.gpkg")
    g = read_labels(tmp_path / "l.gpkg", "label")
    assert g["label"].dtype.kind == "f"  # the reader's doing
    lb = labels_to_boxes(g, sc)
    assert lb.classes == ["1", "2"] and lb.counts["no_class"] == 1 and list(lb.labels) == [0, 1, 1]
    # real fractions stay; a whole number is that number in every file, whatever else the file holds (a
    # file of 1.0 and 2.5 and one of 1 and 2 share class 1), and in a GeoJSON's mixed column
    assert list(class_values(g["label"].astype(float) / 2)) == ["0.5", "1", "1", None]
    assert list(class_values(pd.Series([1, "1", 1.0, "car", 2.0], dtype=object))) == ["1", "1", "1", "car", "2"]


def test_a_column_that_names_no_class_is_refused(tmp_path):
    """--class-column naming a measurement (every label its own class) or the geometry: one line
    that says what to pass, not a model of 109 classes."""
    from geodet.io.labels import class_names

    g = gpd.GeoDataFrame({"label": ["a", "b"] * 30, "area": np.linspace(1, 2, 60), "species": [f"s{i % 25}" for i in range(60)]},
                         geometry=[box(i, 0, i + 1, 1) for i in range(60)], crs="EPSG:32633")
    assert class_names(g, "label") == ["a", "b"] and len(class_names(g, "species")) == 25  # 25 classes of 60: kept
    with pytest.raises(GeodetError, match="'area' gives 60 classes to 60 labels .*it is not a class column"):
        class_names(g, "area")
    with pytest.raises(GeodetError, match="'geometry' is the labels' geometry"):
        class_names(g, "geometry")


def test_a_file_of_several_layers_needs_one_named(tmp_path):
    """A GeoPackage of several layers (a QGIS project's area and labels) is not read by guessing:
    the error lists its layers and how to name one; a named layer is read; a missing one is named."""
    p = tmp_path / "project.gpkg"
    gpd.GeoDataFrame({"name": ["aoi"]}, geometry=[box(0, 0, 100, 100)], crs="EPSG:32633").to_file(p, layer="area")
    gpd.GeoDataFrame({"label": ["car", "car"]}, geometry=[box(1, 1, 2, 2), box(3, 3, 4, 4)],
                     crs="EPSG:32633").to_file(p, layer="labels")
    with pytest.raises(GeodetError, match=r"holds 2 layers \(area, labels\).*project.gpkg\|layername=area"):
        read_labels(p, "label")
    assert len(read_labels(f"{p}|layername=labels", "label")) == 2
    with pytest.raises(GeodetError, match="'lbls' is no such layer .its layers with geometry: area, labels"):
        read_labels(f"{p}|layername=lbls", "label")


def test_lines_and_boxes_without_area_are_left_out_and_every_label_is_counted(tmp_path):
    """A line is no object's outline: lines are left out and counted (a file of only lines is one
    error that says so), as are polygons with no area in the scene's pixels; every label read is
    counted once, as used or as why not."""
    from shapely.geometry import LineString

    from geodet.io.labels import describe_counts

    sc = _scene(tmp_path / "s.tif")
    t = sc.transform

    def px(x0, y0, x1, y1):
        return box(*(t * (x0, y1)), *(t * (x1, y0)))

    geoms = [px(10, 10, 20, 20), LineString([t * (30, 10), t * (40, 20)]), px(50, 10, 60, 20), None,
             Polygon([t * (70, 10), t * (80, 10), t * (80, 10)]), px(500, 10, 510, 20), px(90, 10, 100, 20)]
    g = gpd.GeoDataFrame({"label": ["a", "a", "b", "a", "a", "a", None]}, geometry=geoms, crs="EPSG:32633")
    lb = labels_to_boxes(g, sc, classes=["a"])
    c = lb.counts
    assert (c["used"], c["lines"], c["unknown"], c["empty"], c["no_area"], c["outside"], c["no_class"]) == (1, 1, 1, 1, 1, 1, 1)
    assert sum(c[k] for k in ("used", "lines", "unknown", "empty", "no_area", "outside", "no_class")) == len(g)
    only_lines = g.iloc[[1]]
    with pytest.raises(GeodetError, match=r"no usable label \(used 0; left out: 1 lines \(draw polygons or points\)\)"):
        labels_to_boxes(only_lines, sc)
    assert describe_counts({"used": 3}) == "used 3"


def test_labels_without_any_geometry_say_so(tmp_path):
    sc = _scene(tmp_path / "s.tif")
    g = gpd.GeoDataFrame({"label": ["a", "a"]}, geometry=[None, Polygon()], crs="EPSG:32633")
    with pytest.raises(GeodetError, match=r"the labels hold no geometry \(2 null or empty\)"):
        labels_to_boxes(g, sc)


def test_a_model_whose_integer_classes_read_as_floats_still_meets_its_labels(tmp_path):
    """Models trained when an integer class column with a null read '1.0', '2.0' keep meeting labels
    that now read '1', '2': in training's class lookup and in evaluation's class names."""
    from geodet.evaluation import evaluate
    from geodet.io.labels import integer_name

    assert [integer_name(n) for n in ("1.0", "-3.0", "1.5", "car.0", "7")] == ["1", "-3", "1.5", "car.0", "7"]
    sc = _scene(tmp_path / "s.tif")
    t = sc.transform
    boxes = [box(*(t * (10 + 20 * i, 30)), *(t * (20 + 20 * i, 20))) for i in range(3)]
    g = gpd.GeoDataFrame({"label": [1, 2, 2]}, geometry=boxes, crs="EPSG:32633")
    lb = labels_to_boxes(g, sc, classes=["1.0", "2.0"])
    assert lb.classes == ["1.0", "2.0"] and list(lb.labels) == [0, 1, 1] and lb.counts["unknown"] == 0
    det = g.assign(label=["1.0", "2.0", "2.0"], score=0.9)
    m = evaluate(det, g)
    assert m["AP50"] == 1 and "warning" not in m


def test_labels_as_users_draw_them_train_what_they_mean(tmp_path, caplog):
    """A label mostly past the scene's edge is a place to ignore in training, not a sliver taught
    as a whole object; one drawn twice counts once; 'car ' is car, and car/Car are said; a polygon
    collapsed onto a diagonal (repaired into a line) has no box."""
    from geodet.training.sampler import TrainScene

    sc = _scene(tmp_path / "s.tif")  # 200 x 100 px at 0.5 m from (500000, 4600000)
    x0, y0 = 500000, 4600000
    geoms = [box(x0 + 10, y0 - 20, x0 + 14, y0 - 16),                       # a car inside
             box(x0 + 10, y0 - 20, x0 + 14, y0 - 16),                       # the same car again
             box(x0 - 9, y0 - 40, x0 + 1, y0 - 36),                         # 90 % past the left edge
             box(x0 - 1, y0 - 46, x0 + 9, y0 - 42),                         # 90 % inside
             Polygon([(x0 + 30, y0 - 30), (x0 + 34, y0 - 34), (x0 + 30, y0 - 30)]),  # no area
             box(x0 + 50, y0 - 20, x0 + 54, y0 - 16)]
    gdf = gpd.GeoDataFrame({"label": ["car", "car", "car", "car ", "car", "Car"]}, geometry=geoms, crs="EPSG:32633")
    caplog.set_level("INFO", logger="geodet")
    lb = labels_to_boxes(gdf, sc, "label", min_visible=0.5)
    assert lb.classes == ["Car", "car"] and "classes 'Car' and 'car' differ only in case" in caplog.text
    assert lb.counts["duplicate"] == 1 and lb.counts["no_area"] == 1 and len(lb) == 4
    assert lb.cut.tolist() == [False, True, False, False]
    assert lb.boxes[1].tolist() == [0.0, 72.0, 2.0, 80.0]  # its visible part: where training looks away
    ts = TrainScene(sc, lb, (0, 0, 200, 100), "l.gpkg")
    assert ts.training_boxes().tolist() == [True, False, True, True]
    assert len(labels_to_boxes(gdf, sc, "label")) == 4  # evaluation scores every label it holds


def test_labels_beside_a_small_scene_in_degrees_show_extents_that_are_not_points(tmp_path):
    sc = _scene(tmp_path / "g.tif", 400, 400, from_origin(-82.0, 29.7, 1e-6, 1e-6), "EPSG:4326")
    far = gpd.GeoDataFrame({"label": ["tree"]}, geometry=[box(-81.99, 29.69, -81.9899, 29.6901)], crs="EPSG:4326")
    with pytest.raises(GeodetError, match=r"scene extent \(-82.000000, 29.699600, -81.999600, 29.700000\)"):
        labels_to_boxes(far, sc)
