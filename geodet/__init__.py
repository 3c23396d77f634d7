"""geodet: find dense small objects in whole-scene GeoTIFFs."""

from .errors import GeodetError
from .memory import tune_memory

__version__ = "0.1.0"

# The API names are bound eagerly: lazily, importing the submodules geodet.train or
# geodet.evaluate would rebind ``geodet.train`` / ``geodet.evaluate`` to the modules.
from .anchors import fit_anchors
from .config import load_config
from .detect import detect_scene, detect_scenes
from .evaluate import evaluate
from .export import write_detections
from .model import build_model, load_model, save_model
from .scene import Scene
from .tiling import TileGrid
from .train import train

__all__ = [
    "GeodetError",
    "__version__",
    "tune_memory",
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
