"""Writers for scene detections: GeoJSON (RFC 7946), GeoPackage, FlatGeobuf, Shapefile, CSV.

Every writer writes to a temporary file in the target folder and renames it into place, so an
interrupted run never leaves a half-written output and never touches a previous one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import GeodetError

FORMATS = {
    ".geojson": "geojson", ".json": "geojson", ".gpkg": "gpkg", ".fgb": "fgb", ".shp": "shp", ".csv": "csv",
}
DRIVERS = {"geojson": "GeoJSON", "gpkg": "GPKG", "fgb": "FlatGeobuf", "shp": "ESRI Shapefile"}
NEEDS_CRS = {"geojson", "gpkg", "fgb", "shp"}


def output_format(path: str | Path, fmt: str | None = None) -> str:
    if fmt:
        fmt = fmt.lower()
        if fmt not in set(FORMATS.values()):
            raise GeodetError(f"unknown output format '{fmt}': use one of geojson, gpkg, fgb, shp, csv")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise GeodetError(
            f"cannot tell the output format from '{Path(path).name}': use a .geojson, .gpkg, .fgb, .shp or .csv "
            "name, or pass --format"
        )
    return FORMATS[suffix]


def check_output_path(path: str | Path) -> Path:
    """Fail before any work starts if the output cannot be written there."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise GeodetError(f"output folder does not exist: {parent} (create it first)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GeodetError(f"output folder is not writable: {parent}")
    if p.is_dir():
        raise GeodetError(f"output path is a folder: {p}; give a file name such as {p / 'detections.gpkg'}")
    return p


def file_sha256(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


class atomic_path:
    """``with atomic_path(out) as tmp:`` write to ``tmp``; it replaces ``out`` only on success."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmpdir = None

    def __enter__(self) -> Path:
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f".{self.path.stem}.", dir=self.path.parent or "."))
        return self.tmpdir / self.path.name

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                produced = sorted(self.tmpdir.iterdir())
                for f in produced:  # a shapefile is several files with one stem
                    os.replace(f, self.path.parent / f.name)
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        return False


def write_detections(gdf, path: str | Path, fmt: str | None = None, csv_geometry: str = "wkt") -> Path:
    """Write detections; the format comes from ``fmt`` or the file's extension."""
    import pyogrio
    from shapely.geometry.polygon import orient

    path = Path(path)
    fmt = output_format(path, fmt)
    if fmt in NEEDS_CRS and gdf.crs is None:
        raise GeodetError(
            f"the scene has no CRS, so {fmt} output cannot be georeferenced: write CSV (-o out.csv) for pixel "
            "boxes, or assign the scene a CRS (gdal_edit.py -a_srs EPSG:xxxx)"
        )
    with atomic_path(path) as tmp:
        if fmt == "csv":
            df = gdf.drop(columns="geometry").copy()
            if csv_geometry == "wkt":
                df["wkt"] = gdf.geometry.to_wkt()
            df.to_csv(tmp, index=False)
        else:
            out = gdf
            layer_opts = None
            if fmt == "geojson":
                out = gdf.to_crs("EPSG:4326")
                out = out.set_geometry([orient(g, sign=1.0) for g in out.geometry], crs="EPSG:4326")
                layer_opts = {"RFC7946": "YES", "WRITE_BBOX": "NO"}
            pyogrio.write_dataframe(
                out, tmp, driver=DRIVERS[fmt], layer_options=layer_opts, geometry_type="Polygon",
                **({"layer": path.stem} if fmt == "gpkg" else {}),
            )
    return path


def write_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    return path


def report_path(output: str | Path) -> Path:
    """``out.gpkg`` -> ``out.gpkg.report.json``: named after the whole output name, so outputs that
    differ only in format never share a report."""
    p = Path(output)
    return p.with_name(p.name + ".report.json")
