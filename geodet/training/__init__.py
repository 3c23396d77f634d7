"""Training on GeoTIFFs with vector labels: chip sampling, the training loop, validation."""

from .trainer import Interrupted, Trainer, train

__all__ = ["Interrupted", "Trainer", "train"]
