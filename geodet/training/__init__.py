"""Training on GeoTIFFs with vector labels: what is trained on (``inputs``), the start model
(``start``), chips (``sampler``, ``augment``, ``area``), the loop and its clock (``loop``,
``schedule``), what a run writes (``records``), validation, self-training, pretraining and which
tiles to label next. ``Trainer`` and ``train`` live in ``trainer``; they load on first use, so
importing a part of this package never imports the whole trainer."""

from importlib import import_module

__all__ = ["Interrupted", "Trainer", "train"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module(".trainer", __name__), name)
    raise AttributeError(f"module 'geodet.training' has no attribute {name!r}")
