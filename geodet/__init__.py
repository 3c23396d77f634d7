"""geodet: find dense small objects in whole-scene GeoTIFFs."""

from .errors import GeodetError

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
