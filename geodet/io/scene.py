"""Opening a raster scene: band choice, dtype scaling, nodata masks and resampling on read.

Only windows are ever read. Per-band scaling statistics for non-uint8 data come from one
decimated read (GDAL uses overviews when the file has them), never from a full read.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import GeodetError, ReadError, read_error
from .gdal import GDAL_CACHE_MB, HTTP_RETRY, READ_ERRORS, gdal_env, gdal_message  # noqa: F401 (geodet's readers import them here)
from .raster import (check_upsample, grid_crs, metres_per_unit, open_raster, overlap_pixels,  # noqa: F401
                     pixel_size_m)

log = logging.getLogger(__name__)

STATS_MAX_SIDE = 1024  # decimated read for percentile statistics


class Scene:
    """A raster opened for windowed reads of selected bands, scaled to float32 in 0..1.

    ``width``, ``height`` and ``transform`` describe the pixel grid that tiles live in: the file's
    own, or the resampled one when ``gsd_m`` differs from the file's resolution.
    """

    partly_unreadable: str | None = None  # GDAL's message where the statistics' read met damage
    defer_partial_warning = False  # the caller says the damage once its work has gone through

    def __init__(
        self,
        path: str | Path,
        bands: Sequence[int] | None = None,
        gsd_m: float | None = None,
        percentiles: Sequence[float] | None = None,
        stats: dict | None = None,
    ):
        """``bands``: 1-based band numbers (None: all); ``percentiles``: the scaling limits for
        non-uint8 data (None: the default of ``geodet.config``)."""
        self.path = str(path)
        self._handle = None
        self._pid = None
        self._origin = (0, 0)  # a view of an area (see ``area``) reads from here
        self._owns_handle = True
        src = open_raster(self.path)
        try:
            self.file_count = src.count
            self.file_width, self.file_height = src.width, src.height
            self.file_transform = src.transform
            self.crs = grid_crs(src)  # None without a geotransform too: pixel boxes are no map coordinates then
            self.dtype = np.dtype(src.dtypes[0])
            self.nodata = src.nodata
            self.unit_m = metres_per_unit(self.crs)  # metres per CRS unit (None: not projected)
            self.native_gsd = pixel_size_m(src.transform) * (self.unit_m or 1.0)
            # a pixel's sides in metres (not square in some products: resampled per axis)
            self.native_size_xy = (self.native_gsd, math.hypot(src.transform.b, src.transform.e) * (self.unit_m or 1.0))
            self.has_georef = self.crs is not None
            flags = src.mask_flag_enums
        finally:
            src.close()
        if self.dtype.kind == "c":
            raise GeodetError(f"{self.path}: complex pixels ({self.dtype}, e.g. a SAR SLC): geodet reads real values; make an "
                              "amplitude image first (e.g. gdal_translate with the 'mod' VRT pixel function, or gdal_calc.py)")
        if bands is None or len(bands) == 0:
            bands = list(range(1, self.file_count + 1))
        self.bands = [int(b) for b in bands]
        bad = [b for b in self.bands if not 1 <= b <= self.file_count]
        if bad:
            raise GeodetError(
                f"{self.path}: band {bad[0]} requested but the scene has {self.file_count} band(s): pass --bands "
                f"with numbers from 1 to {self.file_count}"
            )
        from rasterio.enums import MaskFlags

        self.all_valid = all(f == [MaskFlags.all_valid] for f in flags) and self.nodata is None
        self.is_float = self.dtype.kind == "f"
        self.gsd_m = gsd_m
        self.resampled = False
        self.width, self.height, self.transform = self.file_width, self.file_height, self.file_transform
        if gsd_m is not None:
            self._resample_to(gsd_m)
        # the grid a resampled scene is read in (an area view keeps its scene's, and offsets into it)
        self._grid_geometry = (self.transform, self.width, self.height)
        if percentiles is None:
            from ..config import SceneConfig

            percentiles = SceneConfig().percentiles
        self.percentiles = tuple(float(p) for p in percentiles)
        self._stats = None
        if self.dtype == np.uint8:
            self._stats = {"lo": [0.0] * len(self.bands), "hi": [255.0] * len(self.bands)}
        elif stats is not None:
            self._stats = {"lo": list(stats["lo"]), "hi": list(stats["hi"])}

    def _resample_to(self, gsd_m: float) -> None:
        """The grid tiles live in at ``gsd_m`` metres per pixel, per axis (the file's, when it is
        already at that resolution)."""
        if gsd_m <= 0:
            raise GeodetError(f"gsd_m must be positive, got {gsd_m}")
        if not self.has_georef:
            raise GeodetError(
                f"{self.path}: the scene has no georeferencing (no CRS or geotransform), so it cannot be resampled "
                f"to {gsd_m} m: georeference it (gdal_translate -a_srs ... -a_ullr ..., or QGIS's Georeferencer), "
                "or unset the GSD (--gsd / scene.gsd_m) to run at its own resolution")
        if self.crs is None or not self.crs.is_projected:
            raise GeodetError(
                f"{self.path}: resampling to {gsd_m} m needs a projected CRS; "
                "reproject the scene (e.g. gdalwarp -t_srs EPSG:326xx) or unset gsd_m"
            )
        fx, fy = (gsd_m / size for size in self.native_size_xy)
        check_upsample(self.path, min(self.native_size_xy), gsd_m, 1 / min(fx, fy))
        if abs(fx - 1.0) > 1e-6 or abs(fy - 1.0) > 1e-6:
            from rasterio.transform import Affine

            self.resampled = True
            self.width = max(1, int(round(self.file_width / fx)))
            self.height = max(1, int(round(self.file_height / fy)))
            # Scale so that the resampled grid covers exactly the file's extent.
            self.transform = self.file_transform * Affine.scale(self.file_width / self.width,
                                                                self.file_height / self.height)

    @property
    def stats(self) -> dict:
        """Per-band scaling limits ``{"lo", "hi"}``: 0 and 255 for uint8; otherwise the scene's
        percentiles from one decimated read, computed on first use (a view of an area shares its
        scene's, so both scale identically)."""
        if self._stats is None:
            self._stats = self._percentile_stats()
        return self._stats

    # -- handles ---------------------------------------------------------------------------
    @property
    def handle(self):
        """The open dataset of this process (reopened after fork or unpickling)."""
        if self._handle is None or self._pid != os.getpid() or self._handle.closed:
            # a view whose scene was closed, or that crossed into another process, opens its own
            self._owns_handle = True
            src = open_raster(self.path)
            if self.resampled:
                from rasterio.enums import Resampling
                from rasterio.vrt import WarpedVRT

                transform, width, height = getattr(self, "_grid_geometry", (self.transform, self.width, self.height))
                src = WarpedVRT(src, crs=self.crs, transform=transform, width=width, height=height,
                                resampling=Resampling.bilinear)
            self._handle, self._pid = src, os.getpid()
        return self._handle

    def close(self) -> None:
        if self._owns_handle and self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None

    def area(self, x0: int, y0: int, x1: int, y1: int) -> "Scene":
        """A view of the pixel area ``[x0, x1) x [y0, y1)`` of this scene's grid: its own width,
        height and transform, the same file handle and scaling statistics (so an area is scaled
        exactly as the whole scene). Its tiles are read from the area; closing it closes nothing."""
        from rasterio.windows import Window
        from rasterio.windows import transform as window_transform

        x0, y0, x1, y1 = (int(v) for v in (x0, y0, x1, y1))
        if not (0 <= x0 < x1 <= self.width and 0 <= y0 < y1 <= self.height):
            raise GeodetError(f"{self.path}: area {(x0, y0, x1, y1)} is not inside the {self.width} x {self.height} px grid")
        self.handle  # opened here first, so the view shares this handle
        self.stats  # and the statistics, from the whole scene
        view = copy.copy(self)
        view._handle, view._pid = self._handle, self._pid  # (copying drops the handle, as pickling does)
        view._owns_handle = False
        ox, oy = self._origin
        view._origin = (ox + x0, oy + y0)
        view.width, view.height = x1 - x0, y1 - y0
        view.transform = window_transform(Window(x0, y0, x1 - x0, y1 - y0), self.transform)
        return view

    def __enter__(self) -> "Scene":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_pid"] = None
        return state

    # -- reading ---------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return len(self.bands)

    @property
    def pixel_gsd(self) -> float:
        """The grid's ground resolution: metres per pixel in a projected CRS (whatever its unit),
        else the CRS's units (degrees) or pixels."""
        return pixel_size_m(self.transform) * (getattr(self, "unit_m", None) or 1.0)

    def overlap_px(self, overlap_m: float, tile_size: int | None = None) -> int:
        """An overlap in metres as pixels of this grid (a projected CRS is needed to know them); with
        ``tile_size``, one that is not smaller than the tile is refused naming --overlap-m."""
        if getattr(self, "unit_m", None) is None:
            raise GeodetError(f"{self.path}: an overlap in metres needs a projected CRS (the scene's is "
                              f"{self.crs.to_string() if self.crs else 'none'}): give it in pixels (--overlap)")
        px = overlap_pixels(overlap_m, self.pixel_gsd)
        if tile_size is not None and px >= tile_size:
            raise GeodetError(f"an overlap of {overlap_m:g} m is {px} px at {Path(self.path).name}'s "
                              f"{self.pixel_gsd:.3g} m per pixel, not smaller than the tile size ({tile_size} px): "
                              "lower --overlap-m (tiling.overlap_m) or raise --tile-size")
        return px

    def _percentile_stats(self) -> dict:
        scale = max(self.width, self.height) / STATS_MAX_SIDE
        out_w = max(1, int(self.width / max(scale, 1)))
        out_h = max(1, int(self.height / max(scale, 1)))
        try:
            data, valid = self._decimated(None, out_h, out_w)
        except READ_ERRORS() as exc:
            data, valid = self._decimated_readable(out_h, out_w, exc)
        if self.is_float:
            valid &= np.all(np.isfinite(data), axis=0)
        lo, hi = [], []
        p0, p1 = self.percentiles
        for band in data:
            vals = band[valid].astype(np.float64)
            if vals.size == 0:
                lo.append(0.0)
                hi.append(1.0)
                continue
            a, b = np.percentile(vals, [p0, p1])
            if not b > a:
                b = a + 1.0
            lo.append(float(a))
            hi.append(float(b))
        log.debug("%s: band scaling limits lo=%s hi=%s", self.path, lo, hi)
        return {"lo": lo, "hi": hi}

    def _decimated(self, window, out_h: int, out_w: int):
        from rasterio.enums import Resampling

        src = self.handle
        with gdal_env():
            data = src.read(self.bands, window=window, out_shape=(self.count, out_h, out_w), resampling=Resampling.nearest)
            valid = np.ones((out_h, out_w), bool)
            if not self.all_valid:
                valid &= src.dataset_mask(window=window, out_shape=(out_h, out_w), resampling=Resampling.nearest) > 0
        return data, valid

    def _decimated_readable(self, out_h: int, out_w: int, first_exc: Exception, parts: int = 8):
        """The decimated read of a damaged scene, piece by piece: unreadable pieces count as
        nodata (the tiles that cross them fail, or are skipped, when they are read)."""
        from rasterio.windows import Window

        self.partly_unreadable = gdal_message(first_exc)
        # said now, or, where the caller defers it (detect_scene), only once the scene has run:
        # when a tile's read fails as well, its error alone is the one line that matters
        (log.debug if self.defer_partial_warning else log.warning)("%s", self.damage_note())
        data = np.zeros((self.count, out_h, out_w), self.dtype)
        valid = np.zeros((out_h, out_w), bool)
        ys = np.linspace(0, out_h, parts + 1).round().astype(int)
        xs = np.linspace(0, out_w, parts + 1).round().astype(int)
        fy, fx = self.height / out_h, self.width / out_w
        ox, oy = self._origin
        read_any = False
        for i in range(parts):
            for j in range(parts):
                h, w = ys[i + 1] - ys[i], xs[j + 1] - xs[j]
                if h <= 0 or w <= 0:
                    continue
                win = Window(ox + xs[j] * fx, oy + ys[i] * fy, w * fx, h * fy)
                try:
                    d, v = self._decimated(win, h, w)
                except READ_ERRORS():
                    continue
                data[:, ys[i]:ys[i + 1], xs[j]:xs[j + 1]] = d
                valid[ys[i]:ys[i + 1], xs[j]:xs[j + 1]] = v
                read_any = True
        if not read_any:
            raise self.read_error(Window(ox, oy, self.width, self.height), first_exc)
        return data, valid

    def read_raw(self, window, out: np.ndarray | None = None) -> np.ndarray:
        """The selected bands of ``window`` in the file's dtype (in the resampled grid if any),
        read into ``out`` (``[C, h, w]`` of the file's dtype, a view will do) when given.

        Loops that stream a scene run inside ``gdal_env()`` (detection, chips and training do),
        which caps GDAL's block cache; entering it per read would cost ~2 ms a tile."""
        return self.handle.read(self.bands, window=window, out=out)

    def read_mask(self, window) -> np.ndarray:
        """GDAL's dataset mask of ``window`` (uint8, 255 valid, 0 nodata or masked)."""
        h, w = int(window.height), int(window.width)
        if self.all_valid:
            return np.full((h, w), 255, np.uint8)
        return self.handle.dataset_mask(window=window)

    def read_valid(self, window) -> np.ndarray:
        """Boolean mask of valid pixels (not nodata, not masked; finiteness is ``valid_pixels``)."""
        return self.read_mask(window) > 0

    def overview(self, max_side: int, bands: Sequence[int] | None = None, resampling: str = "average"):
        """A decimated read of the whole grid, at most ``max_side`` px on its long side: ``(data
        [C, h, w] in the file's dtype, valid [h, w] bool, scale)``, where ``scale`` is grid pixels
        per overview pixel. GDAL uses the file's overviews when it has them."""
        from rasterio.enums import Resampling

        bands = list(bands) if bands else self.bands
        scale = max(1.0, max(self.width, self.height) / max_side)
        oh, ow = max(1, int(self.height / scale)), max(1, int(self.width / scale))
        with gdal_env():
            data = self.handle.read(bands, out_shape=(len(bands), oh, ow), resampling=Resampling[resampling])
            valid = np.ones((oh, ow), bool) if self.all_valid else self.handle.dataset_mask(out_shape=(oh, ow)) > 0
        if self.is_float:
            valid &= np.all(np.isfinite(data), axis=0)
        return data, valid, scale

    def damage_note(self) -> str:
        """What to say of a scene whose statistics' read met damage (``partly_unreadable``)."""
        return (f"{self.path}: part of the scene cannot be read ({self.partly_unreadable}); scaling "
                "statistics came from the readable parts")

    def holds_data(self, max_side: int = 512, exact: bool = False) -> bool:
        """Whether any pixel holds data, from a decimated read of the mask (``overview``, nearest
        pixels); at once where GDAL says every pixel is valid. A decimated read can miss a valid
        area narrower than its step: ``exact`` confirms an empty answer at full resolution, strip
        by strip (the whole file read once, at most)."""
        from rasterio.windows import Window

        if self.all_valid and not self.is_float:
            return True
        if self.overview(max_side, resampling="nearest")[1].any():
            return True
        if not exact:
            return False
        rows = max(1, (1 << 22) // max(1, self.file_width))  # strips of about 4 Mpx
        with gdal_env():
            for r in range(0, self.file_height, rows):
                w = Window(0, r, self.file_width, min(rows, self.file_height - r))
                valid = self.handle.dataset_mask(window=w) > 0
                if self.is_float and valid.any():
                    valid &= np.all(np.isfinite(self.handle.read(self.bands, window=w)), axis=0)
                if valid.any():
                    return True
        return False

    def valid_pixels(self, data: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``mask`` (the dataset mask) and, for float data, finite in every band."""
        return mask & np.all(np.isfinite(data), axis=0) if self.is_float else mask

    def scale(self, data: np.ndarray, valid: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Scale to float32 0..1 (uint8 / 255; others by the percentile limits); pixels outside
        ``valid`` (from ``valid_pixels``, so NaNs included; None: all valid) become 0. Written into
        ``out`` (float32, the shape of ``data``) when given."""
        if out is None:
            out = np.empty(data.shape, np.float32)
        if self.dtype == np.uint8:
            np.multiply(data, np.float32(1 / 255), out=out)
        else:
            out[...] = data
            lo = np.asarray(self.stats["lo"], np.float32)[:, None, None]
            hi = np.asarray(self.stats["hi"], np.float32)[:, None, None]
            out -= lo
            out /= hi - lo
            np.clip(out, 0.0, 1.0, out=out)
        if valid is not None and not valid.all():
            out[:, ~valid] = 0.0
        return out

    skip_hint = True  # read errors suggest --on-read-error skip (detection has it; training and tiling do not)

    def read_error(self, window, exc: Exception, skip_hint: bool | None = None) -> ReadError:
        """A ``ReadError`` naming this file, ``window`` (in the grid's pixels) and GDAL's message
        (``skip_hint``: whether to suggest ``--on-read-error skip``; default ``self.skip_hint``)."""
        from rasterio.windows import bounds as window_bounds

        try:
            b = window_bounds(window, self.transform) if self.has_georef else None
        except Exception:
            b = None
        w = (window.col_off, window.row_off, window.width, window.height)
        return read_error(self.path, w, b, gdal_message(exc), self.skip_hint if skip_hint is None else skip_hint)

    def read_tile(self, tile, out: np.ndarray | None = None, raw: bool = False) -> tuple[np.ndarray, float]:
        """A tile as float32 ``[C, tile, tile]`` (padded with 0 past the scene) and its valid
        fraction; read into ``out`` (float32 ``[C, tile, tile]``) when given. A window that GDAL
        cannot read raises ``ReadError`` (file, window, map bounds, GDAL's message).

        ``raw`` (uint8 scenes): the tile unscaled, uint8, invalid pixels 0, for scaling elsewhere
        (a GPU), read straight into ``out`` (uint8 ``[C, tile, tile]``) when given;
        ``x * np.float32(1 / 255)`` then gives this method's float32 tile exactly.

        Pixels are read into ``out`` or a buffer this thread reuses, never into a new array: a
        tile-sized allocation is a fresh mapping whose pages fault in on every read, a third of a
        uint8 tile's read time."""
        if raw and self.dtype != np.uint8:
            raise GeodetError(f"{self.path}: raw tiles are read from uint8 scenes only, not {self.dtype}")
        window = tile.window()
        if self._origin != (0, 0):
            from rasterio.windows import Window

            window = Window(window.col_off + self._origin[0], window.row_off + self._origin[1], window.width, window.height)
        h, w = int(window.height), int(window.width)
        padded = (h, w) != (tile.height, tile.width)
        kind = np.uint8 if raw else np.float32
        if out is None:
            out = np.zeros((self.count, tile.height, tile.width), kind)
        elif out.dtype != kind or out.shape != (self.count, tile.height, tile.width):
            raise ValueError(f"read_tile needs a {np.dtype(kind)} buffer of {(self.count, tile.height, tile.width)}, "
                             f"not {out.dtype} {out.shape}")  # GDAL would convert into it silently
        elif padded:
            out[:, h:, :] = 0
            out[:, :h, w:] = 0
        into = out[:, :h, :w] if raw else _scratch((self.count, h, w), self.dtype)
        try:
            data = self.read_raw(window, out=into)
            mask = self.read_valid(window) if not self.all_valid else None
        except READ_ERRORS() as exc:
            raise self.read_error(window, exc) from None
        if mask is None and not self.is_float:  # every pixel valid
            if not raw:
                self.scale(data, None, out=out[:, :h, :w])
            return out, 1.0
        valid = self.valid_pixels(data, np.ones((h, w), bool) if mask is None else mask)
        frac = float(valid.mean()) if valid.size else 0.0
        if raw:
            if not valid.all():
                data[:, ~valid] = 0
        else:
            self.scale(data, valid, out=out[:, :h, :w])
        return out, frac

    def valid_at(self, tile, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Whether the pixels under the tile-pixel points (``xs``, ``ys``) hold data: not nodata,
        not masked, finite, inside the scene. Reads the tile's mask (and, for float data, its
        pixels) again: call it only for tiles with something to check."""
        xs, ys = np.floor(np.asarray(xs)).astype(np.int64), np.floor(np.asarray(ys)).astype(np.int64)
        vx0, vy0, vx1, vy1 = tile.valid
        w, h = vx1 - vx0, vy1 - vy0
        ok = (xs >= 0) & (ys >= 0) & (xs < w) & (ys < h)
        if self.all_valid and not self.is_float or not ok.any():
            return ok
        window = tile.window()
        if self._origin != (0, 0):
            from rasterio.windows import Window

            window = Window(window.col_off + self._origin[0], window.row_off + self._origin[1], window.width, window.height)
        try:
            valid = self.read_valid(window)
            if self.is_float:
                valid = self.valid_pixels(self.read_raw(window), valid)
        except READ_ERRORS() as exc:
            raise self.read_error(window, exc) from None
        out = np.zeros(len(xs), bool)
        out[ok] = valid[ys[ok], xs[ok]]
        return out

    def bounds(self) -> tuple[float, float, float, float]:
        from rasterio.transform import array_bounds

        west, south, east, north = array_bounds(self.height, self.width, self.transform)
        return (west, south, east, north)

    def describe(self) -> str:
        crs = self.crs.to_string() if self.crs else "no CRS"
        extra = f", resampled to {self.gsd_m} m: {self.width} x {self.height}" if self.resampled else ""
        return (
            f"{self.path}: {self.file_width} x {self.file_height} px, {self.file_count} band(s) {self.dtype}, "
            f"{crs}, {self.native_gsd:.4g} units/px{extra}"
        )


_SCRATCH = threading.local()


def _scratch(shape: tuple, dtype) -> np.ndarray:
    """A reusable array of ``shape`` and ``dtype`` for this thread's reads (its contents are
    overwritten by the next read in the thread): one buffer per dtype, grown as needed."""
    dtype = np.dtype(dtype)
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    n = int(np.prod(shape))
    buf = bufs.get(dtype)
    if buf is None or buf.size < n:
        buf = bufs[dtype] = np.empty(n, dtype)
    return buf[:n].reshape(shape)


def scene_from_config(path: str | Path, scene_cfg, stats: dict | None = None) -> Scene:
    return Scene(path, bands=scene_cfg.bands, gsd_m=scene_cfg.gsd_m, percentiles=scene_cfg.percentiles, stats=stats)
