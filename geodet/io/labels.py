"""Vector labels: reading (any OGR format), reprojection, repair, pixel boxes, clipping to chips."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import GeodetError, brief

log = logging.getLogger(__name__)


@dataclass
class LabelBoxes:
    """Label boxes of one scene in its (possibly resampled) pixel grid."""

    boxes: np.ndarray  # [N, 4] float64 pixel-edge boxes
    labels: np.ndarray  # [N] int64 class indices
    classes: list[str]
    counts: dict = field(default_factory=dict)  # repaired, empty, outside, unknown, points, used
    cut: np.ndarray | None = None  # [N] bool: mostly outside the scene (min_visible), a place to ignore, not teach

    def __len__(self) -> int:
        return len(self.labels)


def layer_source(path) -> tuple[str, str | None]:
    """``(file, layer)`` of a vector source as QGIS names one layer of a file
    (``file.gpkg|layername=NAME``); the layer is None where none is named."""
    path = str(path)
    if "|layername=" not in path:
        return path, None
    path, layer = path.split("|layername=", 1)
    return path, layer.split("|", 1)[0]


def read_labels(path: str | Path, class_column: str | None = None, allow_empty: bool = False, layer: str | None = None,
                what: str = "labels"):
    """Read a vector file with pyogrio (``path|layername=NAME`` picks a layer, as QGIS writes it;
    a file of several layers with geometry needs one named); clear errors for missing, unreadable, empty (unless
    ``allow_empty``: a detection file may hold none) or CRS-less files."""
    import geopandas as gpd
    import pyogrio

    path, named = layer_source(path)  # QGIS's way of naming one layer of a file
    layer = layer if layer is not None else named
    p = Path(path)
    if not p.exists():
        raise GeodetError(f"{what} not found: {path}")
    if p.suffix.lower() == ".parquet":
        gdf = read_geoparquet(p)
        return _checked(gdf, path, class_column, allow_empty, what)
    try:
        if layer is None:  # the one layer with geometry (a GeoPackage may hold a layer_styles table)
            spatial = [name for name, geom in pyogrio.list_layers(p) if geom]
            if len(spatial) > 1:
                shown = ", ".join(spatial[:8]) + (", ..." if len(spatial) > 8 else "")
                raise GeodetError(f"{path} holds {len(spatial)} layers ({shown}): name the one to use as "
                                  f"'{path}|layername={spatial[0]}'")
            layer = spatial[0] if spatial else None
        else:
            kinds = {name: geom for name, geom in pyogrio.list_layers(p)}
            if not kinds.get(layer):
                names = ", ".join(name for name, geom in kinds.items() if geom)
                kind = "a table without geometry" if layer in kinds else "no such layer"
                raise GeodetError(f"{path}: '{layer}' is {kind} (its layers with geometry: {names or 'none'})")
        gdf = gpd.read_file(p, engine="pyogrio", layer=layer)
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, ValueError, OSError) as exc:
        raise GeodetError(
            f"{path}: not a vector file that OGR can read (use a shapefile, GeoPackage or GeoJSON): "
            f"{brief(exc, 120)}"
        ) from None
    return _checked(gdf, path, class_column, allow_empty, what)


def read_geoparquet(path):
    """A GeoParquet file, read with pyarrow as geodet writes it (GDAL reads Parquet only where it
    was built with it, or through ADBC and libduckdb, which most installs lack)."""
    import geopandas as gpd

    try:
        return gpd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise GeodetError(f"{path}: not a GeoParquet file geopandas can read: {brief(exc, 120)}") from None


def _checked(gdf, path, class_column, allow_empty, what: str = "labels"):
    import geopandas as gpd

    if not isinstance(gdf, gpd.GeoDataFrame):  # a CSV without a WKT column, a table without geometry
        raise GeodetError(f"{path}: the {what} file has no geometry (a table, or a CSV without a WKT geometry "
                          "column): save it with its geometry, e.g. a GeoPackage from QGIS, or a CSV with a column "
                          "named WKT")
    if len(gdf) == 0 and not allow_empty:
        raise GeodetError(f"{path}: the {what} file holds no features: give the file (or its |layername=) that holds "
                          "them")
    if gdf.crs is None and len(gdf):
        have = "have" if what.endswith("s") else "has"
        raise GeodetError(f"{path}: the {what} {have} no CRS: assign one (e.g. in QGIS, or ogr2ogr -a_srs EPSG:xxxx)")
    if gdf.crs is not None and gdf.crs.is_geographic and len(gdf):
        x0, y0, x1, y1 = gdf.total_bounds
        if x0 < -360 or x1 > 360 or y0 < -90.5 or y1 > 90.5:
            raise GeodetError(
                f"{path}: coordinates from ({x0:.0f}, {y0:.0f}) to ({x1:.0f}, {y1:.0f}) are not degrees, yet the file's CRS is "
                f"{gdf.crs.name} (a GeoJSON file is read as WGS 84 unless it says otherwise): assign its real CRS "
                "(e.g. ogr2ogr -a_srs EPSG:xxxx) or save it as a GeoPackage")
    if class_column and class_column not in gdf.columns:
        cols = [c for c in gdf.columns if c != gdf.geometry.name]
        raise GeodetError(
            f"{path}: class column '{class_column}' not found; available columns: {', '.join(cols) or '(none)'} "
            "(set train.class_column or pass --class-column)"
        )
    return gdf


def repair_geometries(gdf) -> tuple[object, dict]:
    """Repair invalid geometries with make_valid and drop empty ones; returns counts."""
    import shapely

    geoms = gdf.geometry.values
    missing = np.asarray([g is None for g in geoms], dtype=bool)
    arr = np.array(geoms, dtype=object)
    arr[missing] = shapely.Polygon()
    empty = shapely.is_empty(arr) | missing
    invalid = ~shapely.is_valid(arr) & ~empty
    if invalid.any():
        arr[invalid] = shapely.make_valid(arr[invalid])
    empty |= shapely.is_empty(arr)
    out = gdf.set_geometry(list(arr), crs=gdf.crs)[~empty]
    return out, {"repaired": int(invalid.sum()), "empty": int(empty.sum())}


def map_bounds_to_pixels(bounds: np.ndarray, transform) -> np.ndarray:
    """Map-coordinate bounds [N, 4] (minx, miny, maxx, maxy) to pixel-edge boxes [N, 4]."""
    inv = ~transform
    x0, y0, x1, y1 = np.asarray(bounds, np.float64).reshape(-1, 4).T
    xs = np.stack([x0, x1, x1, x0], 1)
    ys = np.stack([y0, y0, y1, y1], 1)
    cols = inv.a * xs + inv.b * ys + inv.c
    rows = inv.d * xs + inv.e * ys + inv.f
    return np.stack([cols.min(1), rows.min(1), cols.max(1), rows.max(1)], 1)


def geoms_to_pixel_boxes(geoms, transform) -> np.ndarray:
    """Each geometry's box [N, 4] in the pixel grid of ``transform``: its vertices mapped to
    pixels, then their bounds (on a rotated or sheared grid the map bounds' corners would inflate
    every box)."""
    import shapely

    geoms = np.asarray(geoms, dtype=object).reshape(-1)
    if transform.b == 0 and transform.d == 0:  # north-up: the map bounds map exactly
        return map_bounds_to_pixels(shapely.bounds(geoms).reshape(-1, 4), transform)
    inv = ~transform

    def to_pixels(xy):
        return np.stack([inv.a * xy[:, 0] + inv.b * xy[:, 1] + inv.c, inv.d * xy[:, 0] + inv.e * xy[:, 1] + inv.f], 1)

    return shapely.bounds(shapely.transform(geoms, to_pixels)).reshape(-1, 4)


def class_values(column) -> np.ndarray:
    """A class column's values as strings (object array), None where a label has no class (null,
    NaN or blank): such labels name no class, they are not a class of their own."""
    import pandas as pd

    values = np.empty(len(column), dtype=object)
    missing = column.isna().to_numpy()
    present = column[~missing]
    if present.dtype.kind in "fO" and len(present):
        # a whole number read as a float (an integer column with a null, a float column, a GeoJSON's mixed
        # values) is that number: class 1 whether a file holds 1, 1.0 or '1', in every file alike
        present = pd.Series([int(v) if isinstance(v, (float, np.floating)) and float(v).is_integer() else v
                             for v in present], index=present.index, dtype=object)
    text = present.astype(str).str.strip()  # "car " is car: a trailing space is never meant as a class of its own
    vals = np.asarray(text.to_numpy(), dtype=object)
    vals[(text == "").to_numpy()] = None  # names are kept as written otherwise; blank ones name nothing
    values[~missing] = vals
    return values


def drop_unclassed(gdf, class_column: str | None, source: str = "labels") -> tuple[object, int]:
    """``gdf`` without the labels whose class is empty (warned about), and how many; an error
    when every label's is."""
    if not class_column or class_column not in gdf.columns or not len(gdf):
        return gdf, 0
    missing = np.array([v is None for v in class_values(gdf[class_column])], bool)
    if missing.all():
        raise GeodetError(f"{source}: every label's '{class_column}' is empty: fill in the class column, or pass "
                          "--class-column '' for one class")
    if missing.any():
        log.warning("%s: %d label(s) with an empty '%s' left out (fill in their class to use them)",
                    source, int(missing.sum()), class_column)
    return gdf[~missing], int(missing.sum())


def integer_name(name: str) -> str:
    """A class name as an integer column's values now read ('1'), where geodet before read a column
    with a null as floats ('1.0'): models of that time still meet their labels."""
    return name[:-2] if name.endswith(".0") and name[:-2].lstrip("-").isdigit() else name


def class_names(gdf, class_column: str | None) -> list[str]:
    if not class_column:
        return ["object"]
    if class_column == getattr(gdf, "_geometry_column_name", None):
        raise GeodetError(f"'{class_column}' is the labels' geometry, not a class column: pass --class-column with "
                          "the column that names each label's class, or '' for one class")
    values = [v for v in class_values(gdf[class_column]) if v is not None]
    names = sorted(set(values))
    raw = gdf[class_column].dropna()
    measured = raw.dtype.kind == "f" and float((raw != np.round(raw)).mean() if len(raw) else 0) > 0.5
    if measured and len(names) > 20:  # fractions, most labels' their own: a measurement, not class names
        raise GeodetError(f"'{class_column}' gives {len(names)} classes to {len(values)} labels ({', '.join(names[:3])}, "
                          "...): it is not a class column; pass --class-column with the column that names each "
                          "label's class, or '' for one class")
    folded: dict = {}
    for n in names:
        folded.setdefault(n.casefold(), []).append(n)
    for same in (v for v in folded.values() if len(v) > 1):  # each is taught as "not" the other
        log.warning("classes %s differ only in case: they are different classes; if they are one, write them alike "
                    "in '%s'", " and ".join(repr(n) for n in same), class_column)
    return names


def without_lines(gdf, source: str = "labels"):
    """``gdf`` without its lines (a line is no object's outline), and how many there were."""
    import shapely

    kind = shapely.get_type_id(np.array(gdf.geometry.values, dtype=object)) if len(gdf) else np.zeros(0, int)
    lines = np.isin(kind, [1, 2, 5])  # LineString, LinearRing, MultiLineString
    if lines.any() and not lines.all():  # all of them: the caller's error says so
        log.warning("%s: %d line(s) left out: draw each object as a polygon (its box or outline) or a point",
                    source, int(lines.sum()))
    return gdf[~lines], int(lines.sum())


def _touching_groups(parts) -> list:
    """``parts`` grouped where they touch or overlap, each group as one geometry."""
    import shapely

    n = len(parts)
    parent = list(range(n))

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    a, b = shapely.STRtree(parts).query(parts, predicate="intersects")
    for i, j in zip(a, b):
        parent[root(int(i))] = root(int(j))
    groups: dict = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(parts[i])
    out = []
    for g in groups.values():
        kinds = set(shapely.get_type_id(g).tolist())
        out.append(g[0] if len(g) == 1 else shapely.multipolygons(g) if kinds == {3} else
                   shapely.multipoints(g) if kinds == {0} else shapely.geometrycollections(g))
    return out


def split_parts(gdf, source: str = "labels"):
    """One label per object: a multi-part label whose parts lie apart (a layer dissolved by class
    holds one MultiPolygon per class; a MultiPoint, several points) becomes one label per group of
    touching parts, each with the row's attributes; a repaired bow-tie's touching halves stay one.
    Returns the frame and how many labels were split (said)."""
    import shapely

    geoms = np.array(gdf.geometry.values, dtype=object)
    # rows of several parts only: a file's single-part MultiPolygons (as QGIS and OGR write them) cost nothing
    multi = (shapely.get_num_geometries(geoms) > 1) & np.isin(shapely.get_type_id(geoms), [4, 6, 7]) \
        if len(geoms) else np.zeros(0, bool)
    if not multi.any():
        return gdf, 0
    rows, out, split = list(range(len(geoms))), list(geoms), 0
    for i in np.flatnonzero(multi):
        parts = shapely.get_parts(geoms[i])
        while np.isin(shapely.get_type_id(parts), [4, 5, 6, 7]).any():  # a repaired collection nests its parts
            parts = shapely.get_parts(parts)
        parts = parts[~np.isin(shapely.get_type_id(parts), [1, 2, 5]) & ~shapely.is_empty(parts)]  # lines: no outline
        groups = _touching_groups(parts) if len(parts) > 1 else []
        if len(groups) > 1:
            split += 1
            out[i] = groups[0]
            rows += [int(i)] * (len(groups) - 1)
            out += groups[1:]
    if not split:
        return gdf, 0
    n_new = len(out) - len(geoms)
    log.warning("%s: %d multi-part label(s) whose parts lie apart taken as %d more object(s), one per group of "
                "touching parts (a layer dissolved by class holds every object of a class in one feature)", source,
                split, n_new)
    return gdf.iloc[rows].set_geometry(out, crs=gdf.crs).reset_index(drop=True), split


def usable_geometries(gdf, class_column: str | None, source: str = "labels"):
    """The labels with a class (when classes are read), no lines, and repaired geometry, and the
    counts of those left out; an error that says why when none is left."""
    import shapely

    n_read = len(gdf)
    gdf, no_class = drop_unclassed(gdf, class_column, source)
    gdf, n_lines = without_lines(gdf, source)
    gdf, counts = repair_geometries(gdf)
    kind = shapely.get_type_id(np.array(gdf.geometry.values, dtype=object)) if len(gdf) else np.zeros(0, int)
    collapsed = np.isin(kind, [1, 2, 5])  # polygons without an area that repair made lines: no object's box
    gdf, counts["no_area"] = gdf[~collapsed], int(collapsed.sum())
    gdf, counts["split"] = split_parts(gdf, source)
    counts["no_class"], counts["lines"] = no_class, n_lines
    if n_read and not len(gdf) and counts["empty"]:
        raise GeodetError(f"{source}: the labels hold no geometry ({counts['empty']} null or empty): draw the objects' "
                          "boxes (polygons or points)")
    if not len(gdf):
        raise GeodetError(f"{source}: no usable label ({describe_counts(counts)})")
    return gdf, counts


def _class_indices(gdf, class_column, classes, unknown: str, source: str) -> tuple[list, np.ndarray]:
    """The class names and each label's index among them (-1: a class not in ``classes``, dropped)."""
    names = list(classes) if classes else class_names(gdf, class_column)
    if class_column:
        values = class_values(gdf[class_column])
    else:
        values = np.full(len(gdf), names[0], dtype=object)
    lookup = {n: i for i, n in enumerate(names)}
    for n in [n for n in lookup if integer_name(n) != n]:  # a model trained when an integer column's 1 read as 1.0
        lookup.setdefault(integer_name(n), lookup[n])
    unknown_values = sorted(set(values) - set(lookup))
    if unknown_values:
        if unknown == "keep":
            for v in unknown_values:
                lookup[v] = len(names)
                names.append(v)
        else:
            log.warning("%s: dropping labels of classes not in the model: %s", source, ", ".join(unknown_values[:10]))
    return names, np.array([lookup.get(v, -1) for v in values], np.int64)


DRAWN_TWICE = "%s: %d label(s) drawn twice (the same box and class) counted once"


def drawn_again(boxes: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """For each label (its box, rounded as its frame needs, and class index), whether an earlier
    one is the same: a label drawn twice counts once, in a scene's grid as on a map."""
    _, first = np.unique(np.column_stack([boxes, classes]), axis=0, return_index=True)
    again = np.ones(len(boxes), bool)
    again[first] = False
    return again


def labels_to_boxes(
    gdf,
    scene,
    class_column: str | None = "label",
    classes: Sequence[str] | None = None,
    unknown: str = "drop",
    point_box_m: float = 1.0,
    source: str = "labels",
    min_visible: float | None = None,
) -> LabelBoxes:
    """Reproject labels to the scene, repair them, and turn each into a pixel box.

    Polygons become their bounding boxes; points become squares of ``point_box_m``. Classes not in
    ``classes`` are dropped (``unknown='drop'``) or added (``'keep'``). A label drawn twice (the
    same box and class) counts once. With ``min_visible``, a box less than that share inside the
    scene is marked ``cut`` (training ignores its place, as at a chip's edge, rather than teach a
    sliver). Raises GeodetError when no label falls inside the scene.
    """
    import shapely

    if scene.crs is None:
        raise GeodetError(f"{scene.path}: the scene has no georeferencing (no CRS, or no geotransform), so labels "
                          "cannot be placed on it: assign them (gdal_edit.py -a_srs EPSG:xxxx -a_ullr ...)")
    if gdf.crs is not None and gdf.crs != scene.crs:
        gdf = gdf.to_crs(scene.crs)
    gdf, counts = usable_geometries(gdf, class_column, source)
    geoms = np.array(gdf.geometry.values, dtype=object)
    is_point = np.isin(shapely.get_type_id(geoms), [0, 4])  # Point, MultiPoint
    counts["points"] = int(is_point.sum())
    boxes = geoms_to_pixel_boxes(geoms, scene.transform)
    if is_point.any():  # a square of point_box_m on the ground, centred on the point
        mx, my = metres_per_pixel(scene)
        hx, hy = point_box_m / 2 / mx, point_box_m / 2 / my
        c = boxes[is_point]
        cx, cy = (c[:, 0] + c[:, 2]) / 2, (c[:, 1] + c[:, 3]) / 2
        boxes[is_point] = np.stack([cx - hx, cy - hy, cx + hx, cy + hy], 1)
    names, idx = _class_indices(gdf, class_column, classes, unknown, source)
    # Clip to the scene; count the ones entirely outside, then (inside) of an unknown class, then
    # without an area (a point-thin polygon), so each label left out is counted once.
    w, h = scene.width, scene.height
    inside = (boxes[:, 2] > 0) & (boxes[:, 0] < w) & (boxes[:, 3] > 0) & (boxes[:, 1] < h)
    counts["outside"] = int((~inside).sum())
    counts["unknown"] = int((inside & (idx < 0)).sum())
    clipped = boxes.copy()
    np.clip(clipped[:, 0::2], 0, w, out=clipped[:, 0::2])
    np.clip(clipped[:, 1::2], 0, h, out=clipped[:, 1::2])
    flat = ~((clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1]))
    counts["no_area"] = counts.get("no_area", 0) + int((inside & (idx >= 0) & flat).sum())
    keep = inside & (idx >= 0) & ~flat
    again = drawn_again(np.round(boxes, 3), idx)
    counts["duplicate"] = int((keep & again).sum())
    if counts["duplicate"]:
        log.warning(DRAWN_TWICE, source, counts["duplicate"])
    keep &= ~again
    if not inside.any():
        lb = gdf.total_bounds
        sb = scene.bounds()
        d = 6 if scene.crs.is_geographic else 2  # degrees: a scene of 400 px at 1e-6 deg/px is not a point
        raise GeodetError(
            f"{source}: no label falls inside scene {Path(scene.path).name}: labels extent "
            f"({lb[0]:.{d}f}, {lb[1]:.{d}f}, {lb[2]:.{d}f}, {lb[3]:.{d}f}) vs scene extent ({sb[0]:.{d}f}, "
            f"{sb[1]:.{d}f}, {sb[2]:.{d}f}, {sb[3]:.{d}f}) in {scene.crs.to_string()}: check that they cover the same area"
        )
    counts["used"] = int(keep.sum())
    cut = None
    if min_visible is not None:
        area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
        cut = area(clipped[keep]) < float(min_visible) * area(boxes[keep])
        counts["cut_by_scene_edge"] = int(cut.sum())
    if any(counts.get(k) for k in ("repaired", "empty", "outside", "unknown", "no_class", "lines", "no_area",
                                   "duplicate", "cut_by_scene_edge")):
        log.info("%s: %s", source, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return LabelBoxes(clipped[keep], idx[keep], names, counts, cut)


LEFT_OUT = {"empty": "null or empty", "no_class": "without a class", "lines": "lines (draw polygons or points)",
            "outside": "outside the scene", "unknown": "of classes not in the model",
            "no_area": "without an area in the scene's pixels", "outside_labelled_area": "outside the labelled area",
            "duplicate": "drawn twice"}


def describe_counts(counts: dict) -> str:
    """What became of a file's labels, in words: 'used 0; left out: 61 lines (draw polygons or points)'."""
    gone = [f"{counts[k]} {what}" for k, what in LEFT_OUT.items() if counts.get(k)]
    return f"used {counts.get('used', 0)}" + (f"; left out: {', '.join(gone)}" if gone else "")


def metres_per_pixel(scene) -> tuple[float, float]:
    """A pixel's sides on the ground in metres: from the CRS's unit when projected (feet too), from
    the latitude of the scene's centre when geographic; a scene without a CRS counts pixels."""
    t = scene.transform
    px, py = float(np.hypot(t.a, t.d)), float(np.hypot(t.b, t.e))
    unit = getattr(scene, "unit_m", None)
    if unit:
        return px * unit, py * unit
    if scene.crs is not None and scene.crs.is_geographic:
        lat = np.radians((scene.bounds()[1] + scene.bounds()[3]) / 2)
        return px * 111_320.0 * max(float(np.cos(lat)), 1e-6), py * 110_574.0
    return px, py


def clip_boxes(boxes: np.ndarray, window: tuple[float, float, float, float], min_visibility: float = 0.5):
    """Boxes clipped to ``window`` (x0, y0, x1, y1) in window coordinates, and the kept mask.

    A box is kept when at least ``min_visibility`` of its area lies inside the window.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    wx0, wy0, wx1, wy1 = window
    c = boxes.copy()
    np.clip(c[:, 0::2], wx0, wx1, out=c[:, 0::2])
    np.clip(c[:, 1::2], wy0, wy1, out=c[:, 1::2])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    vis = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])
    keep = (vis > 0) & (vis >= min_visibility * np.maximum(area, 1e-12) - 1e-9)
    return c[keep] - [wx0, wy0, wx0, wy0], keep


def load_scene_labels(scene, labels_path, class_column="label", classes=None, unknown="drop", point_box_m=1.0):
    gdf = read_labels(labels_path, class_column or None)
    return labels_to_boxes(gdf, scene, class_column or None, classes, unknown, point_box_m, source=str(labels_path))
