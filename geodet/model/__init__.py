"""The detector: network parts (torchvision RetinaNet with small-object settings), anchor
matching, anchor fitting, the typed model card and the model file."""

from .card import ModelCard
from .file import MODEL_FORMAT, MODEL_VERSION, load_model, model_from_payload, read_model_file, save_model
from .matching import anchor_generator, match_anchors, match_anchors_on_grid
from .network import GeodetModel, build_model

__all__ = ["MODEL_FORMAT", "MODEL_VERSION", "GeodetModel", "ModelCard", "anchor_generator", "build_model", "load_model",
           "match_anchors", "match_anchors_on_grid", "model_from_payload", "read_model_file", "save_model"]
