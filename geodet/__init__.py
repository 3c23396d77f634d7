"""geodet: find dense small objects in whole-scene GeoTIFFs."""

from .errors import GeodetError
from .memory import tune_memory

__version__ = "0.1.0"

# The API names are bound eagerly: lazily, importing the submodule geodet.evaluate would rebind
# ``geodet.evaluate`` to the module. (Training lives in ``geodet.training``, so ``geodet.train`` is
# only ever the function.)
from .model.anchors import fit_anchors
from .config import load_config
from .pipeline.detect import detect_scene, detect_scenes
from .pipeline.job import detect_to_file
from .evaluate import evaluate
from .io.writers import write_detections
from .model import ModelCard, build_model, load_model, save_model
from .io.scene import Scene
from .pipeline.grid import TileGrid
from .training.trainer import train

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
    "detect_to_file",
    "ModelCard",
    "write_detections",
    "train",
    "evaluate",
]
