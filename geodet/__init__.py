"""geodet: find dense small objects in whole-scene GeoTIFFs.

The public names below load on first use, so ``import geodet`` (and every ``geodet --help``)
costs milliseconds and changes nothing in the process; torch loads when a model is first needed.
"""

from importlib import import_module

from .errors import GeodetError
from .memory import tune_memory

__version__ = "0.1.0"

# public name -> module that defines it (modules are named apart from the functions, e.g.
# ``geodet.evaluation`` holds ``evaluate`` and ``geodet.training`` holds ``train``, so importing a
# submodule never shadows a function)
_API = {
    "load_config": "config",
    "Scene": "io.scene",
    "TileGrid": "pipeline.grid",
    "ModelCard": "model.card",
    "build_model": "model.network",
    "load_model": "model.file",
    "save_model": "model.file",
    "fit_anchors": "model.anchors",
    "detect_scene": "pipeline.scenes",
    "detect_scenes": "pipeline.scenes",
    "detect_to_file": "pipeline.job",
    "write_detections": "io.writers",
    "train": "training.trainer",
    "evaluate": "evaluation",
}

__all__ = ["GeodetError", "__version__", "tune_memory", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'geodet' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
