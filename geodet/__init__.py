"""geodet: find dense small objects in whole-scene GeoTIFFs."""

import os as _os

# GDAL's block cache defaults to 5% of RAM and fills as a scene streams through, so memory would
# grow with scene size; windows are read once, so a small cache loses nothing. Users may override.
_os.environ.setdefault("GDAL_CACHEMAX", "128")

from .errors import GeodetError  # noqa: E402


def _fix_malloc_threshold() -> None:
    """Keep tile-sized buffers on mmap so they go back to the OS when freed.

    glibc raises its mmap threshold after large frees, after which every per-tile temporary lands
    on a heap that never shrinks: peak memory then grows with the number of tiles (measured: 3.5 GB
    vs 0.8 GB for a 16000^2 scene). Fixing the threshold keeps memory flat in the scene size.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 1 MiB, fixed
        libc.mallopt(-1, 1 << 24)  # M_TRIM_THRESHOLD: return heap tops over 16 MiB
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return


_fix_malloc_threshold()

__version__ = "0.1.0"

__all__ = [
    "GeodetError",
    "__version__",
    "load_config",
    "Scene",
    "TileGrid",
    "build_model",
    "load_model",
    "save_model",
    "fit_anchors",
    "detect_scene",
    "detect_scenes",
    "write_detections",
    "train",
    "evaluate",
]


def __getattr__(name):  # lazy imports keep `geodet --help` fast
    import importlib

    where = {
        "load_config": "config", "Scene": "scene", "TileGrid": "tiling", "build_model": "model",
        "load_model": "model", "save_model": "model", "fit_anchors": "anchors", "detect_scene": "detect",
        "detect_scenes": "detect", "write_detections": "export", "train": "train", "evaluate": "evaluate",
    }
    if name in where:
        return getattr(importlib.import_module(f".{where[name]}", __name__), name)
    raise AttributeError(name)
