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

# The API names are bound eagerly: lazily, importing the submodules geodet.train or
# geodet.evaluate would rebind ``geodet.train`` / ``geodet.evaluate`` to the modules.
from .anchors import fit_anchors  # noqa: E402
from .config import load_config  # noqa: E402
from .detect import detect_scene, detect_scenes  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .export import write_detections  # noqa: E402
from .model import build_model, load_model, save_model  # noqa: E402
from .scene import Scene  # noqa: E402
from .tiling import TileGrid  # noqa: E402
from .train import train  # noqa: E402

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
