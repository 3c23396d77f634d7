"""Writers for scene detections: GeoJSON (RFC 7946), GeoPackage, FlatGeobuf, Shapefile, CSV.

Every writer writes to a temporary file in the target folder and renames it into place, so an
interrupted run never leaves a half-written output and never touches a previous one.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np

from ..errors import GeodetError
# where outputs go and how they land: modules of their own, whose names are geodet.io.writers' too
from .atomic import (FULL_BYTES, LEFTOVER_AGE_S, WRITTEN, atomic_path, interrupts_held,  # noqa: F401
                     missing_folders, remove_partial, sweep_leftovers)
from .outputs import (FORMATS, check_not_an_input, check_output_folder, check_output_path,  # noqa: F401
                      report_path, same_file_key, say_shared_style, stem_files)

log = logging.getLogger(__name__)

SINGLE_CRS = ("fgb", "shp", "parquet")  # formats that hold one CRS per file: EPSG:4326 for scenes in several
SCORE_DECIMALS = 4  # scores are float32 sigmoids: 4 decimals say all a user can act on
GPKG_VERSION = "1.2"  # 1.4 warns in GDAL 3.6 / QGIS 3.22 (Debian 12, Ubuntu 22.04); 1.2 has all we use
DRIVERS = {"geojson": "GeoJSON", "gpkg": "GPKG", "fgb": "FlatGeobuf", "shp": "ESRI Shapefile"}
NEEDS_CRS = {"geojson", "gpkg", "fgb", "shp", "parquet"}


def output_format(path: str | Path, fmt: str | None = None) -> str:
    """The format of an output: ``fmt`` when given (it must agree with a known extension of
    ``path``), else the extension's."""
    suffix = Path(path).suffix.lower()
    if fmt:
        fmt = fmt.lower()
        if fmt not in set(FORMATS.values()):
            raise GeodetError(f"unknown output format '{fmt}': use one of geojson, gpkg, fgb, shp, csv, parquet")
        if suffix in FORMATS and FORMATS[suffix] != fmt:
            raise GeodetError(f"--format {fmt} but the file name {Path(path).name} says {FORMATS[suffix]}: name the "
                              f"file after its format (e.g. {Path(path).with_suffix('.' + fmt).name}) or drop --format")
        return fmt
    if suffix not in FORMATS:
        raise GeodetError(
            f"cannot tell the output format from '{Path(path).name}': use a .geojson, .gpkg, .fgb, .shp, .csv or .parquet "
            "name, or pass --format"
        )
    return FORMATS[suffix]


def boxes_to_polygons(boxes: np.ndarray, transform):
    """Pixel-edge boxes [N, 4] to polygons in the CRS of ``transform`` (exact affine of the corners)."""
    import shapely

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = boxes.T
    cols = np.stack([x0, x1, x1, x0, x0], axis=1)
    rows = np.stack([y0, y0, y1, y1, y0], axis=1)
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    xs = a * cols + b * rows + c
    ys = d * cols + e * rows + f
    coords = np.stack([xs, ys], axis=2)
    return shapely.polygons(coords)


def check_reaches_wgs84(crs, xy, fmt: str, what: str) -> None:
    """GeoJSON is written in WGS 84 (RFC 7946), as is a one-CRS file of scenes in several CRSs:
    ``crs`` (of ``what``, a scene) must have a way there at ``xy``; a local or engineering CRS has
    none, refused in one line (a ProjError ended the job once every tile had run)."""
    from pyproj import CRS, Transformer

    try:
        name = CRS.from_user_input(crs).name
    except Exception:
        name = str(crs)
    try:
        x, y = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(*xy, errcheck=True)
        ok = bool(np.isfinite([x, y]).all())
    except Exception:  # pyproj's CRSError, ProjError: no transformation
        ok = False
    if not ok:
        why = ("GeoJSON (RFC 7946) is written in WGS 84" if fmt == "geojson" else
               f"a .{fmt} of scenes in several CRSs is written in WGS 84")
        raise GeodetError(f"{what}: its CRS ({name}) has no transformation to WGS 84 (a local or engineering CRS?) "
                          f"and {why}: write .gpkg (each CRS in a layer of its own) or .csv")


def _check_groups_reach_wgs84(groups, fmt: str) -> None:
    """``check_reaches_wgs84`` for each CRS group of frames, at its first detections' centre, where
    they are written in WGS 84: GeoJSON, and a one-CRS format of several CRSs."""
    if not (fmt == "geojson" or fmt in SINGLE_CRS and len(groups) > 1):
        return
    for crs, members in groups:
        b = [m.total_bounds for m in members if len(m)]
        if crs is not None and b:
            scenes = sorted({str(v) for m in members if "scene" in m.columns for v in m["scene"]})
            check_reaches_wgs84(crs, ((b[0][0] + b[0][2]) / 2, (b[0][1] + b[0][3]) / 2), fmt,
                                ", ".join(scenes)[:200] or "the detections")


def crs_text(crs) -> str | None:
    """A CRS as text that names it exactly: its authority code where one matches it exactly (rasterio's
    ``to_string`` takes a 70 % match, naming a custom Lambert ESRI:54094), else its WKT."""
    if crs is None:
        return None
    from pyproj import CRS

    return CRS.from_user_input(crs).to_string()


def crs_groups(frames) -> list:
    """Frames grouped by CRS, in first-seen order: ``[(crs, [frames])]``."""
    groups = []
    for f in frames:
        for crs, members in groups:
            if crs == f.crs:
                members.append(f)
                break
        else:
            groups.append((f.crs, [f]))
    return groups


def distinct_crss(crss: list) -> list:
    distinct = []
    for c in crss:
        if c is not None and all(c != d for d in distinct):
            distinct.append(c)
    return distinct


def combine_frames(frames):
    """One frame of several scenes' detections: in their CRS when they share one, else in EPSG:4326
    (with a ``crs`` column naming each row's scene CRS) rather than in one scene's projection; rows
    of a scene without a CRS (CSV output) have no geometry there, their pixel boxes in ``px_*``."""
    import geopandas as gpd
    import pandas as pd

    groups = crs_groups(frames)
    if len(groups) <= 1:
        out = pd.concat(frames, ignore_index=True)
        return out.set_crs(frames[0].crs, allow_override=True) if frames[0].crs is not None else out
    parts = []
    for crs, members in groups:
        g = pd.concat(members, ignore_index=True)
        g.insert(1, "crs", crs.to_string() if crs is not None else None)
        if crs is None:  # pixel boxes have no place on the Earth: these rows keep them in px_x0..px_y1 only
            g = g.set_geometry(gpd.GeoSeries([None] * len(g), index=g.index, crs="EPSG:4326"))
        parts.append(to_wgs84(g))
    return pd.concat(parts, ignore_index=True)


def to_wgs84(frame):
    """``frame`` in EPSG:4326, a box that crosses the antimeridian split there into a MultiPolygon
    (as RFC 7946 asks), not a polygon 360 degrees wide the other way round the Earth."""
    import shapely
    from shapely import affinity

    out = frame.to_crs("EPSG:4326")
    geoms = np.array(out.geometry.values, dtype=object)
    b = shapely.bounds(geoms)
    cross = np.flatnonzero(np.nan_to_num(b[:, 2] - b[:, 0]) > 180)
    if not len(cross):
        return out

    def east_of_zero(xy):  # longitudes -180..0 as 180..360: the box is whole again
        return np.c_[np.where(xy[:, 0] < 0, xy[:, 0] + 360, xy[:, 0]), xy[:, 1]]

    for i in cross:
        whole = shapely.transform(geoms[i], east_of_zero)
        west = shapely.clip_by_rect(whole, -180, -90, 180, 90)
        east = affinity.translate(shapely.clip_by_rect(whole, 180, -90, 540, 90), xoff=-360)
        parts = [p for g in (west, east) for p in shapely.get_parts(g) if p.geom_type == "Polygon" and not p.is_empty]
        geoms[i] = shapely.MultiPolygon(parts) if len(parts) > 1 else parts[0] if parts else geoms[i]
    return out.set_geometry(list(geoms), crs="EPSG:4326")


def write_detections(gdf, path: str | Path, fmt: str | None = None, csv_geometry: str = "wkt",
                     style_min_score: float | None = None, report=None) -> Path:
    """Write detections (a frame, or a list of per-scene frames); the format comes from ``fmt`` or
    the file's extension. What a GIS user opens:

    - GeoPackage 1.2 with the default style in its ``layer_styles`` table; other vector formats
      get the same style as a ``.qml`` sidecar (QGIS loads it with the layer); with
      ``style_min_score`` (the model's operating point) the style draws only detections scoring
      at least that;
    - CSV with ``.prj`` (the CRS) and ``.csvt`` (column types) sidecars, which GDAL's CSV driver
      reads, and full-precision WKT;
    - GeoParquet (``.parquet``, with ``geo`` metadata) for large results;
    - scores rounded to ``SCORE_DECIMALS``.

    Scenes in several CRSs (one rule for ``geodet detect`` and ``geodet merge``): GeoJSON is
    EPSG:4326 anyway; a GeoPackage gets one layer per CRS (``STEM_EPSG``), each in its own CRS; CSV
    gets each row's WKT in its scene's CRS and a ``crs`` column; FlatGeobuf, Shapefile and
    GeoParquet (one CRS per file) are written in EPSG:4326 with a ``crs`` column naming each
    row's scene CRS.

    ``report`` (a function returning a dict, called once the detections are written): the JSON
    report ``OUT.report.json``, renamed into place with the output, so neither lands without
    the other."""
    from .style import qml

    path = Path(path)
    fmt = output_format(path, fmt)
    frames = [_rounded(f) for f in _checked_frames(gdf, path, fmt, csv_geometry)]
    groups = crs_groups(frames)
    if fmt in NEEDS_CRS and any(c is None for c, _ in groups):
        raise GeodetError(
            f"the scene has no CRS, so {fmt} output cannot be georeferenced: write CSV (-o out.csv) for pixel "
            "boxes, or assign the scene a CRS (gdal_edit.py -a_srs EPSG:xxxx)"
        )
    _check_groups_reach_wgs84(groups, fmt)  # before anything is written (merge too)
    classes = sorted({str(v) for f in frames if "label" in f.columns for v in f["label"]})
    style = qml(classes, style_min_score)
    if fmt != "gpkg":
        say_shared_style(path, style)
    landing = atomic_path(path)
    # one CRS no more: no old .prj left to lie (unless it is a shapefile's, beside: that is not the CSV's)
    landing.stale = [path.with_suffix(".prj")] if fmt == "csv" and not stem_files(path, (".shp",)) else []
    with landing as tmp, warnings.catch_warnings():
        # GDAL's advice on a name that --format overrides (out.dat as gpkg) is not the user's business
        warnings.filterwarnings("ignore", message="The filename extension should be", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*non conformant file extension", category=RuntimeWarning)
        if fmt == "csv":
            _write_csv(groups, tmp, csv_geometry)
        elif fmt == "gpkg":
            _write_gpkg(groups, tmp, path.stem, classes, style_min_score)
        elif fmt == "parquet":
            _typed_text(combine_frames(frames)).to_parquet(tmp, index=False)
        else:
            _write_ogr(combine_frames(frames), tmp, fmt)
        if fmt != "gpkg":  # its style is in its layer_styles table
            tmp.with_suffix(".qml").write_text(style, encoding="utf-8")
        if report is not None:
            (tmp.parent / report_path(path).name).write_text(
                json.dumps(json_safe(report()), indent=2, default=str, allow_nan=False), encoding="utf-8")
    return path


def _checked_frames(gdf, path: Path, fmt: str, csv_geometry: str) -> list:
    """``write_detections``' frames as a list, and what it cannot write refused first."""
    import geopandas as gpd

    if csv_geometry not in ("wkt", "pixel"):
        raise GeodetError(f"csv_geometry must be wkt or pixel, got {csv_geometry!r}")
    given = list(gdf) if isinstance(gdf, (list, tuple)) else [gdf]
    if not given or not all(isinstance(f, gpd.GeoDataFrame) for f in given):
        raise GeodetError("write_detections takes detections as a GeoDataFrame (what detect_scene returns) or a "
                          "list of them")
    if fmt == "shp" and path.suffix.lower() != ".shp":
        raise GeodetError(f"{path.name}: a shapefile's name ends in .shp: name it {path.stem}.shp")
    return given


def _write_gpkg(groups, tmp: Path, stem: str, classes, style_min_score) -> None:
    """A layer per CRS (``STEM``, or ``STEM_EPSG`` for several), each styled in ``layer_styles``."""
    import pandas as pd
    import pyogrio

    from .style import add_gpkg_style

    used = set()
    for k, (crs, members) in enumerate(groups):
        g = pd.concat(members, ignore_index=True).set_crs(crs, allow_override=True)
        epsg = crs.to_epsg()
        layer = stem if len(groups) == 1 else f"{stem}_{epsg if epsg else k + 1}"
        if layer.lower() in used:  # two CRSs with one EPSG code (another datum, a custom UTM): a layer each
            layer = f"{layer}_{k + 1}"
        used.add(layer.lower())
        pyogrio.write_dataframe(g, tmp, driver=DRIVERS["gpkg"], layer=layer, geometry_type="Polygon",
                                append=k > 0, dataset_options={"VERSION": GPKG_VERSION} if k == 0 else None)
        add_gpkg_style(tmp, layer, classes, style_min_score)


def _write_ogr(out, tmp: Path, fmt: str) -> None:
    """GeoJSON (RFC 7946: WGS 84, counter-clockwise, 9 decimals), FlatGeobuf or a shapefile."""
    import pyogrio
    import shapely

    layer_opts = None
    if fmt == "geojson":
        out = to_wgs84(out)
        out = out.set_geometry(shapely.orient_polygons(out.geometry.values, exterior_cw=False), crs="EPSG:4326")
        # 9 decimals (0.1 mm) keep a 2 cm drone scene's boxes where they are; GDAL's default, 7, is 1 cm
        layer_opts = {"RFC7946": "YES", "WRITE_BBOX": "NO", "COORDINATE_PRECISION": "9"}
    if fmt == "shp":
        out = _shapefile_text(out)
    multi = bool((out.geom_type == "MultiPolygon").any())  # boxes split at the antimeridian
    target = tmp if fmt != "fgb" or tmp.suffix.lower() == ".fgb" else tmp.with_name(tmp.name + ".fgb")
    pyogrio.write_dataframe(out, target, driver=DRIVERS[fmt], layer_options=layer_opts,
                            geometry_type="MultiPolygon" if multi else "Polygon", promote_to_multi=multi)
    if target != tmp:  # GDAL makes a folder of a FlatGeobuf named otherwise
        target.rename(tmp)
    if fmt == "shp" and tmp.suffix != ".shp":  # GDAL names a shapefile's parts in lower case: A.SHP as given
        for part in tmp.parent.glob(f"{glob.escape(tmp.stem)}.*"):
            if part.suffix in (".shp", ".shx", ".dbf", ".prj", ".cpg"):
                part.rename(part.with_suffix(part.suffix.upper() if tmp.suffix.isupper() else part.suffix))
        if not tmp.exists():
            tmp.with_suffix(".shp").rename(tmp)


def _typed_text(frame):
    """Text columns typed as text when there are no rows (an empty object column is Arrow's ``null``
    type, which a dataset of files with detections cannot be combined with): the type pandas gives
    a column of text (pandas 3's ``str``, Arrow's string on pandas 2)."""
    if len(frame):
        return frame
    import pandas as pd

    text = pd.Series(["x"]).dtype
    if text == object:  # pandas 2
        import pyarrow as pa

        text = pd.ArrowDtype(pa.string())
    for c in ("scene", "label", "crs"):
        if c in frame.columns and frame[c].dtype == object:
            frame[c] = frame[c].astype(text)
    return frame


SHP_TEXT = 254  # bytes in a shapefile's text field


def _shapefile_text(frame):
    """A shapefile's text fields hold 254 bytes: a ``crs`` column's WKT (a CRS without an authority
    code) is written as its PROJ string, which fits; a class name that does not fit is refused."""
    from pyproj import CRS

    if "crs" in frame.columns:
        long = {v for v in frame["crs"].dropna().unique() if len(str(v).encode()) > SHP_TEXT}
        if long:
            with warnings.catch_warnings():  # pyproj's note that a PROJ string is not the whole WKT: said here
                warnings.simplefilter("ignore", UserWarning)
                short = {v: CRS.from_user_input(v).to_proj4() for v in long}
            frame = frame.assign(crs=frame["crs"].map(lambda v: short.get(v, v)))
    if "label" in frame.columns:
        check_shapefile_classes(frame["label"].dropna().unique())
    return frame


def check_shapefile_classes(classes) -> None:
    """Class names a shapefile's 254-byte text field holds whole (a cut one no longer meets its style)."""
    too_long = [v for v in classes if len(str(v).encode()) > SHP_TEXT]
    if too_long:
        raise GeodetError(f"the class name {str(too_long[0])[:40]}... is longer than a shapefile's text field "
                          f"({SHP_TEXT} bytes): write .gpkg, .fgb or .parquet")


def _rounded(frame):
    if "score" in frame.columns:
        frame = frame.copy()
        frame["score"] = frame["score"].astype("float64").round(SCORE_DECIMALS)
    return frame


# .csvt tokens that both GDAL's CSV driver and QGIS's Delimited Text reader accept (QGIS refuses the
# whole file for WKT, Integer64 or Integer(Boolean)); GDAL still finds the geometry in the wkt column
# by its name
CSVT = {"i": "Integer", "u": "Integer", "f": "Real", "b": "Integer"}


def _write_csv(groups, tmp: Path, csv_geometry: str) -> None:
    """CSV with full-precision WKT, a ``.csvt`` of column types and, with one CRS, a ``.prj``."""
    import pandas as pd

    parts = []
    for crs, members in groups:
        g = pd.concat(members, ignore_index=True)
        df = g.drop(columns="geometry").copy()
        if len(groups) > 1:
            df.insert(1, "crs", crs.to_string() if crs is not None else None)
        if csv_geometry == "wkt":
            df["wkt"] = g.geometry.to_wkt(rounding_precision=-1)
        parts.append(df)
    df = pd.concat(parts, ignore_index=True)
    df.to_csv(tmp, index=False)
    kinds = [CSVT.get(df[c].dtype.kind, "String") if c != "wkt" else "String" for c in df.columns]
    tmp.with_suffix(".csvt").write_text(",".join(f'"{k}"' for k in kinds) + "\n", encoding="ascii")
    crss = [c for c, _ in groups if c is not None]
    if len(groups) == 1 and crss:
        tmp.with_suffix(".prj").write_text(crss[0].to_wkt("WKT1_GDAL"), encoding="ascii")


def write_json(data: dict, path: str | Path) -> Path:
    """``data`` as JSON (RFC 8259: NaN and infinities, which JSON has no words for, as null)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(data), indent=2, default=str, allow_nan=False), encoding="utf-8")
    return path


def json_safe(v):
    """``v`` with every NaN or infinity (JSON has no words for them) as None, in dicts and lists."""
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
