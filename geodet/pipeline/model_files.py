"""Model files as detection loads them: a geodet ``.pt`` or ``.onnx``, a training run's folder, a
Hugging Face folder or ``hf://`` id (imported and cached)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import GeodetError

log = logging.getLogger(__name__)


def load_detector_file(path):
    """A model file: a geodet ``.pt`` (torch) or a geodet ``.onnx`` (ONNX Runtime). A pretrained
    backbone (``geodet pretrain``) is refused: its head has never seen a label."""
    from ..model import load_model

    if str(path).lower().endswith(".onnx"):
        from ..model.onnx import load_onnx

        return load_onnx(path)
    folder = Path(str(path))
    model = None
    if folder.is_dir() and (folder / "model.pt").is_file() and not (folder / "config.json").is_file():
        try:  # a training run's folder (a Hugging Face folder has its config.json)
            model = load_model(folder / "model.pt")
            log.info("%s is a training run's folder: using its model.pt", path)
            path = folder / "model.pt"
        except GeodetError as exc:
            if "format tag" not in str(exc):  # a geodet file, damaged or of another version: say so
                raise
    if model is None and (str(path).startswith("hf://") or folder.is_dir()):
        return imported_model(str(path))
    model = model or load_model(path)
    refuse_backbone(model, str(path))
    return model


def refuse_backbone(model, name: str = "the model") -> None:
    """A ``geodet pretrain`` backbone is no detector (its head never learned objects): refused
    wherever detection is given one, a file or a model loaded in Python."""
    extra = getattr(getattr(model, "card", None), "extra", None) or {}
    if extra.get("pretrain_only"):
        raise GeodetError(f"{name} is a pretrained backbone (geodet pretrain), not a detector: train it on labels "
                          f"first (geodet train --init {name if name != 'the model' else 'BACKBONE.pt'} ...)")


def imported_model(source: str):
    """A torchvision RetinaNet (Hugging Face folder or hf:// id) imported with its config's
    settings, cached as a geodet model file (keyed by the source's weights) for later runs."""
    import hashlib

    from ..model import save_model
    from ..model.imports import import_retinanet
    from .choice import cache_dir

    model = import_retinanet(source)
    card = {k: v for k, v in model.card.to_dict().items() if k != "created"}
    digest = hashlib.sha256(json.dumps(card, sort_keys=True, default=str).encode())
    for name, tensor in model.net.state_dict().items():  # the weights themselves, not the path
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    key = digest.hexdigest()[:16]
    path = cache_dir() / "imported" / f"{key}.pt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, path)
    from ..model import load_model

    return load_model(path)
