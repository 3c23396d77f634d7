"""Detection files as geodet writes them (any vector format, GeoParquet, CSV with its .prj), read
back for evaluation: pixel columns, one scene of several, rows without a geometry, point labels."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..errors import GeodetError, brief

log = logging.getLogger(__name__)


def pixel_columns(df) -> list[str] | None:
    """The pixel-box columns of a detection table: ``px_x0..px_y1``, or the ``x0..y1`` that
    geodet wrote before 0.2."""
    for cols in (["px_x0", "px_y0", "px_x1", "px_y1"], ["x0", "y0", "x1", "y1"]):
        if set(cols) <= set(df.columns):
            return cols
    return None


def read_detections(path):
    """Any detection file geodet writes (vector formats, or CSV with a wkt column)."""
    import geopandas as gpd
    import pandas as pd
    import shapely

    if "|layername=" in str(path):  # one layer of a file, as QGIS names it
        from .labels import read_labels

        return read_labels(path, allow_empty=True, what="detections")
    p = Path(path)
    if not p.exists():
        raise GeodetError(f"detections not found: {path}")
    if p.suffix.lower() == ".csv":
        try:
            df = pd.read_csv(p)
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            raise GeodetError(f"{path}: not a CSV file pandas can read: {brief(exc, 120)}") from None
        if "wkt" in df.columns:
            geom = shapely.from_wkt(df["wkt"].where(df["wkt"].notna(), None), on_invalid="ignore")
            if "crs" in df.columns and df["crs"].notna().any():  # several CRSs: one per row, as geodet writes them
                parts = [gpd.GeoDataFrame(df[sel].drop(columns=["wkt", "crs"]), geometry=geom[sel.to_numpy()], crs=crs)
                         for crs, sel in ((c, df["crs"] == c) for c in df["crs"].dropna().unique())]
                first = parts[0].crs
                return pd.concat([f.to_crs(first) for f in parts], ignore_index=True).set_crs(first, allow_override=True)
            prj = p.with_suffix(".prj")  # the CRS, as geodet (and GDAL's CSV driver) write it beside the file
            crs = None
            if prj.exists():
                from pyproj import CRS
                from pyproj.exceptions import CRSError

                try:
                    crs = CRS.from_user_input(prj.read_text(encoding="utf-8", errors="replace"))
                except CRSError:
                    raise GeodetError(f"{prj}: not a CRS that PROJ can read; fix or remove it") from None
            return gpd.GeoDataFrame(df.drop(columns="wkt"), geometry=geom, crs=crs)
        cols = pixel_columns(df)
        if cols:
            geom = shapely.box(*(df[c] for c in cols))
            frame = gpd.GeoDataFrame(df, geometry=geom, crs=None)
            # pixel boxes alone: scored only in a scene's grid; a .prj beside says the scene had a place
            frame.attrs.update(pixel_boxes=True, prj=p.with_suffix(".prj").exists())
            return frame
        raise GeodetError(f"{path}: a CSV of detections needs a wkt column or px_x0, px_y0, px_x1, px_y1 pixel boxes")
    from .labels import read_geoparquet, read_labels

    if p.suffix.lower() == ".parquet":
        return read_geoparquet(p)
    if p.suffix.lower() == ".gpkg":
        import pyogrio

        try:
            layers = [name for name, geom in pyogrio.list_layers(p) if geom]  # not layer_styles
            fields = {name: set(pyogrio.read_info(p, layer=name)["fields"]) for name in layers}
        except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, ValueError, OSError) as exc:
            raise GeodetError(f"{path}: not a GeoPackage that OGR can read: {brief(exc, 120)}") from None
        if len(layers) > 1 and not all("score" in f for f in fields.values()):  # not geodet's layers by CRS
            shown = ", ".join(layers[:8]) + (", ..." if len(layers) > 8 else "")
            raise GeodetError(f"{path} holds {len(layers)} layers ({shown}): name the one with the detections as "
                              f"'{path}|layername={layers[0]}'")
        if len(layers) > 1:  # one layer per CRS (scenes in several UTM zones), as geodet writes them
            parts = [gpd.read_file(p, layer=name, engine="pyogrio") for name in layers]
            parts = [f for f in parts if len(f)] or parts[:1]
            crs = parts[0].crs
            return pd.concat([f.to_crs(crs) if f.crs != crs else f for f in parts], ignore_index=True).set_crs(
                crs, allow_override=True)
        if len(layers) == 1:
            return read_labels(p, allow_empty=True, layer=layers[0], what="detections")
    return read_labels(p, allow_empty=True, what="detections")


def only_scene(det, scene):
    """The detections of ``scene`` from a file of several scenes (its ``scene`` column, which names
    a scene by its file name, or by the end of its path where two scenes share a file name): the
    name that matches the most of ``scene``'s path, refused where that is several scenes."""
    from pathlib import PurePath

    if "scene" not in det.columns or scene is None or len(det) == 0:
        return det
    names = det["scene"].fillna("").astype(str)
    want = str(scene)

    def local(p: str) -> bool:
        return bool(p) and "://" not in p and not p.startswith("/vsi")

    def norm(p: str) -> str:  # ./a/s.tif is a/s.tif; an address is as written
        return os.path.normpath(p) if local(p) else p

    tails = [PurePath(norm(want)).parts] + ([PurePath(os.path.abspath(want)).parts] if local(want) else [])

    def matched(name: str) -> float:  # how many of ``want``'s last path components ``name`` ends with
        if name == want or norm(name) == norm(want):
            return float("inf")
        parts = PurePath(norm(name)).parts if name else ()
        best = 0
        for tail in tails:
            n = 0
            while n < min(len(parts), len(tail)) and parts[-1 - n] == tail[-1 - n]:
                n += 1
            best = max(best, n)
        return best

    score = {n: matched(n) for n in names.unique()}
    best = max(score.values())
    if not best:
        listed = ", ".join(sorted(set(names))[:5])
        raise GeodetError(f"none of the detections come from {PurePath(want).name} (scenes in the file: {listed}): "
                          "pass the --scene the detections were made on")
    chosen = [n for n, v in score.items() if v == best]
    if len(chosen) > 1:
        raise GeodetError(f"the detections come from {len(chosen)} scenes named {PurePath(want).name} "
                          f"({', '.join(sorted(chosen)[:4])}): pass --scene as the path that names one of them")
    return det[(names == chosen[0]).to_numpy()]


def with_geometry(det, source):
    """The detections that have a geometry; those without one (null or empty) are left out and
    counted in a warning (a box cannot be scored without its place)."""
    if not len(det):
        return det
    missing = (det.geometry.isna() | det.geometry.is_empty).to_numpy()
    if missing.any():
        name = source if isinstance(source, (str, Path)) else "detections"
        log.warning("%s: %d detection(s) without a geometry left out", name, int(missing.sum()))
        det = det[~missing]
    return det


def with_scores(det, source):
    """The detections with a score to rank them by: a score column that is not numbers is refused
    (naming a value), and rows without a score (NaN, empty) are left out and counted."""
    import pandas as pd

    if "score" not in det.columns or not len(det):
        return det
    raw = det["score"]
    num = pd.to_numeric(raw, errors="coerce")
    text = raw.astype(str).str.strip().str.lower()
    bad = num.isna() & raw.notna() & ~text.isin(["", "nan", "none", "null"])
    name = source if isinstance(source, (str, Path)) else "detections"
    if bad.any():
        raise GeodetError(f"{name}: the score column holds {str(raw[bad].iloc[0])!r}, not a number: give the "
                          "detections' scores as numbers from 0 to 1")
    values = num.to_numpy(np.float64, na_value=np.nan)
    missing = ~np.isfinite(values)
    if missing.any():
        log.warning("%s: %d detection(s) without a finite score left out (they cannot be ranked)", name,
                    int(missing.sum()))
    if missing.any() or raw.dtype != np.float64:
        det = det[~missing].copy()
        det["score"] = values[~missing]
    return det


def points_as_squares(gt, point_box_m: float = 1.0):
    """Point labels as squares of ``point_box_m`` on the ground (as training and ``--scene`` make
    them), in the labels' CRS; other geometries as they are."""
    import shapely

    geoms = np.array(gt.geometry.values, dtype=object)
    is_point = np.isin(shapely.get_type_id(geoms), [0, 4]) if len(geoms) else np.zeros(0, bool)
    if not is_point.any():
        return gt
    pts = gt.geometry[is_point]
    crs = gt.crs
    work = pts.to_crs(pts.estimate_utm_crs()) if crs is not None and crs.is_geographic else pts
    unit = 1.0
    if work.crs is not None and work.crs.axis_info:
        unit = work.crs.axis_info[0].unit_conversion_factor or 1.0  # metres per unit (US feet: 0.3048)
    h = point_box_m / 2 / unit
    c = shapely.centroid(np.array(work.values, dtype=object))
    x, y = shapely.get_x(c), shapely.get_y(c)
    squares = work.__class__(shapely.box(x - h, y - h, x + h, y + h), index=work.index, crs=work.crs)
    if squares.crs != crs:
        squares = squares.to_crs(crs)
    geoms[is_point] = np.array(squares.values, dtype=object)
    return gt.set_geometry(list(geoms), crs=crs)


def pixel_grid_scale(source, scene) -> tuple[float, float] | None:
    """For pixel boxes read from ``source`` (a CSV geodet wrote without geometry): the factors
    from the grid they were detected in to ``scene``'s own pixels, from the report beside the
    file (a model run at its own GSD resamples the scene); None where no report names the scene."""
    import json

    if not isinstance(source, (str, Path)) or "|" in str(source):
        return None
    try:
        report = json.loads(Path(f"{source}.report.json").read_text(encoding="utf-8"))
        scenes = [s for s in report.get("scenes") or [] if isinstance(s, dict)]
    except (OSError, ValueError, AttributeError):
        return None
    from .outputs import scene_key

    want = Path(str(scene))
    exact = [s for s in scenes if scene_key(str(s.get("scene"))) == scene_key(str(scene))]
    named = [s for s in scenes if Path(str(s.get("scene"))).name == want.name]
    found = exact or (named if len(named) == 1 else [])  # two scenes of one name elsewhere: neither is guessed
    if not found:
        return None
    s = found[0]
    if s.get("area_px"):
        raise GeodetError(f"{source}: the pixel boxes are relative to an area of {want.name}, not the whole "
                          "scene: write the detections with geometry (not --csv-geometry pixel) to evaluate")
    try:
        (fw, fh), (gw, gh) = s["scene_size_px"], s["grid_size_px"]
        return float(fw) / float(gw), float(fh) / float(gh)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
