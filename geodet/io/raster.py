"""Opening a raster: clear errors for what is not one or is damaged, and a pixel's size in metres."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import warnings
from pathlib import Path

from ..errors import REMOTE_PREFIXES, GeodetError, ReadError
from .gdal import gdal_env, gdal_message

log = logging.getLogger(__name__)


def open_raster(path: str | Path):
    """rasterio.open with a clear GeodetError for missing or unreadable files."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    p = Path(connection_file(path) or path)
    if not str(path).startswith(("/vsi", *REMOTE_PREFIXES)):
        if not p.exists():
            raise GeodetError(f"scene not found: {p}")
        if p.is_dir():
            raise GeodetError(f"scene is a folder, not a raster file: {path}")
    try:
        with warnings.catch_warnings(), gdal_env(), _gdal_warnings() as said:
            # a scene without georeferencing is handled (and explained) by the caller
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(path)
        damage = [m for m in said if any(k in m for k in DAMAGE_SIGNS)]
        if damage:  # GDAL opened what it could of a cut or corrupt header: its CRS or grid may be missing
            src.close()
            raise GeodetError(f"{path}: the file looks damaged (GDAL: {damage[0][:160]}): copy or download it again")
        for m in said:
            log.debug("GDAL on opening %s: %s", path, m)
        return src
    except rasterio.errors.RasterioIOError as exc:
        if str(path).startswith(REMOTE_PREFIXES):
            raise ReadError(f"{path}: cannot open the remote scene: the reads kept failing after retries; GDAL says: "
                            f"{gdal_message(exc)}. Check the address, the connection or the object store's "
                            "credentials", {"error": gdal_message(exc)}) from None
        hint = ""
        if p.suffix.lower() == ".json" and _looks_like_stac(p):
            hint = ": it is STAC JSON, so give it with --stac"
        raise GeodetError(
            f"{path}: not a raster that GDAL can read (expected a GeoTIFF or another georeferenced raster){hint}"
        ) from None


# GDAL drivers whose connection strings name a raster inside a container file: DRIVER:file:name
CONTAINER_DRIVERS = ("GPKG", "NETCDF", "HDF5", "HDF4", "HDF4_EOS", "NITF_IM", "GTIFF_DIR", "SENTINEL2", "ZARR")


def split_connection(path) -> tuple[str, str, str] | None:
    """``(driver, file, name)`` of a GDAL connection string naming a raster inside a container
    (``GPKG:/data/x.gpkg:table``, ``NETCDF:"x.nc":var``, ``GPKG:C:\\d\\x.gpkg:t``, as QGIS gives a
    GeoPackage raster layer's source); None for a plain path, also one whose name holds a colon
    (``T10:30.tif`` that exists) or a Windows drive."""
    import re

    text = str(path)
    m = re.match(r'^([A-Z][A-Z0-9_]+):("[^"]+"|(?:[A-Za-z]:[\\/])?[^:]*)(?::(.*))?$', text)
    if m is None or m.group(1) not in CONTAINER_DRIVERS or os.path.exists(text):
        return None
    return m.group(1), m.group(2).strip('"'), m.group(3) or ""


def connection_file(path) -> str | None:
    """The container file of a GDAL connection string (``split_connection``), or None."""
    parts = split_connection(path)
    return parts[1] if parts else None


def _looks_like_stac(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b'"stac_version"' in head or b'"assets"' in head


# libtiff on a file cut inside its header ("TIFFFetchNormalTag:IO error during reading of \"GeoKeyDirectory\""); its other
# warnings (an RGB file with a fourth band and no ExtraSamples) come from files that read well
DAMAGE_SIGNS = ("IO error",)


_SAID = threading.local()  # the GDAL warnings of an open in progress, per thread


class _Collect(logging.Filter):
    """On rasterio's GDAL logger, once: while a thread opens a scene (``_gdal_warnings``), GDAL's
    warnings in that thread are kept for it and not passed on; in other threads, as always."""

    def filter(self, record) -> bool:
        said = getattr(_SAID, "said", None)
        if said is None or record.levelno < logging.WARNING:
            return True
        said.append(record.getMessage())
        return False


_COLLECT = _Collect()


@contextlib.contextmanager
def _gdal_warnings():
    """GDAL's warnings (rasterio logs them) in this thread while the block runs, as a list of
    messages, not on the user's stderr: the caller decides what they mean."""
    logger = logging.getLogger("rasterio._env")
    if _COLLECT not in logger.filters:
        logger.addFilter(_COLLECT)
    outer = getattr(_SAID, "said", None)
    _SAID.said = said = []
    try:
        yield said
    finally:
        _SAID.said = outer


MAX_UPSAMPLE = 32  # a GSD finer than the scene's by more than this per side is refused as a mistake


def check_upsample(path, native_m: float, gsd_m: float, factor: float) -> None:
    """Refuse resampling ``factor`` times finer per side than MAX_UPSAMPLE: a GSD in the wrong unit, or
    a typo, makes a grid no machine holds. The error carries ``upsample`` (the reader names the
    model's card where the GSD came from it)."""
    if factor > MAX_UPSAMPLE:
        exc = GeodetError(
            f"{path}: resampling from {native_m:.3g} m to {gsd_m:.3g} m per pixel would make the scene {factor:.3g} "
            f"times larger per side (at most {MAX_UPSAMPLE} is taken as meant): check the GSD (metres per pixel; "
            "--gsd / scene.gsd_m)")
        exc.upsample = factor
        raise exc


def grid_crs(src):
    """The CRS of an opened raster's pixel grid: its CRS where a geotransform places the grid in it,
    else None (a CRS without a geotransform, which GDAL reads as the identity, places nothing:
    pixel coordinates are not map coordinates of that CRS)."""
    return src.crs if src.crs is not None and not src.transform.is_identity else None


def georeference_advice(src) -> str:
    """What to do about an opened raster without a CRS or grid: warp one georeferenced by ground
    control points only (GDAL reads them, geodet needs a grid), else assign one."""
    gcps, gcp_crs = src.gcps if hasattr(src, "gcps") else ([], None)
    if gcps:
        return (f"it is georeferenced by {len(gcps)} ground control points only: warp it to a grid first "
                f"(gdalwarp -t_srs {gcp_crs.to_string() if gcp_crs else 'EPSG:xxxx'} in.tif out.tif)")
    return "assign a CRS (gdal_edit.py -a_srs EPSG:xxxx) and, without a geotransform, corners (-a_ullr)"


def pixel_size_m(transform) -> float:
    """Ground resolution of a (possibly rotated) affine transform, in CRS units per pixel."""
    return float(math.hypot(transform.a, transform.d))


def metres_per_unit(crs) -> float | None:
    """Metres in one linear unit of a projected ``crs`` (1 for metres, 0.3048006 for US survey
    feet); None for a geographic CRS or none."""
    if crs is None or not crs.is_projected:
        return None
    try:
        return float(crs.linear_units_factor[1])
    except Exception:  # a projected CRS without a unit PROJ knows: take it as metres, as GDAL does
        return 1.0


def overlap_pixels(overlap_m: float, gsd_m: float) -> int:
    """An overlap given in metres, in pixels at ``gsd_m`` (rounded up)."""
    if overlap_m < 0:
        raise GeodetError(f"overlap must be zero or positive, got {overlap_m} m")
    if gsd_m <= 0:
        raise GeodetError(f"ground resolution must be positive, got {gsd_m} m")
    return int(math.ceil(overlap_m / gsd_m - 1e-9))
