"""The model file: ``{format, version, card, state_dict}``, loaded with
``torch.load(weights_only=True)`` so a file from a stranger cannot run code."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..errors import GeodetError, brief
from .card import ModelCard
from .network import GeodetModel, build_model

MODEL_FORMAT = "geodet-model"
MODEL_VERSION = 1


def weights_sha256(state_dict: dict) -> str:
    """The SHA-256 of a state dict's names, dtypes, shapes and bytes, in its order: a model file
    carries it, so weights damaged on disk or in a copy are refused, not run (torch.load does not
    check its archive's checksums)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in state_dict.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def card_sha256(card: dict) -> str:
    """The SHA-256 of a model card as a file holds it (its JSON with sorted keys): a card damaged on
    disk (a GSD, a class name, a threshold) would change every detection without a word."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(card, sort_keys=True, default=str).encode()).hexdigest()


def save_model(model: GeodetModel, path: str | Path) -> Path:
    """Write the model file atomically: ``{format, version, card, state_dict, weights_sha256,
    card_sha256}``."""
    path = Path(path)
    if not (hasattr(model, "net") and hasattr(model, "card")):
        raise GeodetError(f"save_model takes a geodet model (geodet.build_model or load_model), got "
                          f"{type(model).__name__}")
    if path.is_dir():
        raise GeodetError(f"{path} is a folder: give the model file's name, e.g. {path / 'model.pt'}")
    state = {k: v.detach().cpu() for k, v in model.net.state_dict().items()}
    payload = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "card": model.card.to_dict(),
        "state_dict": state,
        "weights_sha256": weights_sha256(state),
    }
    payload["card_sha256"] = card_sha256(payload["card"])
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch says a failed write as a RuntimeError of its own
        raise GeodetError(f"cannot write {path}: {brief(exc)}: choose another place (or free some space)") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def is_pickle_refusal(exc: BaseException) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused a file for the Python objects it holds
    (not for damage): its words across torch 2.1 to 2.14."""
    text = str(exc)
    return any(k in text for k in ("Unsupported global", "Unsupported class", "unsupported GLOBAL",
                                   "Unsupported operand", "is blocked"))


def read_model_file(path: str | Path) -> dict:
    """The checked payload of a model file; nothing in it is executed."""
    p = Path(path)
    if p.is_dir():
        raise GeodetError(f"{path} is a folder without a model.pt: give the model file (the model.pt that geodet train "
                          "wrote, or a .pt of geodet import)")
    if not p.is_file():
        raise GeodetError(f"model file not found: {path}")
    with open(p, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; a legacy torch file starts with a pickle protocol byte
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise GeodetError(f"{path}: not a model file (not a PyTorch file at all): give the model.pt that geodet train "
                          "wrote, or import other checkpoints first")
    try:
        with warnings.catch_warnings():  # torch's note on an old pickle protocol: the error below says what matters
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files; none of them run code
        reason = brief(exc)
        todo = "copy it again (it looks damaged or incomplete)"
        if is_pickle_refusal(exc):
            reason = "it holds Python objects that a safe load refuses"
            todo = "give a model.pt that geodet train wrote, or import other checkpoints first (geodet import)"
        raise GeodetError(f"{path}: not a readable geodet model file ({reason}): {todo}") from None
    if isinstance(payload, dict) and payload.get("format") == "geodet-checkpoint":  # a run's last.pt
        raise GeodetError(f"{path} is a training checkpoint (what train --resume reads), not a model: give the run's "
                          "model.pt, or its folder")
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise GeodetError(f"{path}: not a geodet model file (no '{MODEL_FORMAT}' format tag): a torchvision RetinaNet's "
                          f"weights become one with geodet import {p.name} -o MODEL.pt")
    if payload.get("version") != MODEL_VERSION:
        raise GeodetError(
            f"{path}: model file version {payload.get('version')!r} is not supported by this geodet "
            f"(it reads version {MODEL_VERSION}): upgrade geodet or re-export the model"
        )
    if not isinstance(payload.get("card"), dict) or not isinstance(payload.get("state_dict"), dict):
        raise GeodetError(f"{path}: model file is missing its card or weights")
    digest = payload.get("weights_sha256")  # files written before the digest have none: read as they are
    if digest is not None and (not all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values())
                               or weights_sha256(payload["state_dict"]) != digest):
        raise GeodetError(f"{path}: the model's weights are damaged or were changed outside geodet (they no longer "
                          "match the digest written with them): copy the file again, or use the run's model.pt")
    digest = payload.get("card_sha256")  # (files written before it have none)
    if digest is not None and card_sha256(payload["card"]) != digest:
        raise GeodetError(f"{path}: the model's card (its settings: bands, resolution, classes, thresholds) is damaged "
                          "or was changed outside geodet: copy the file again, or use the run's model.pt")
    return payload


def model_from_payload(payload: dict, source: str = "model") -> GeodetModel:
    card = ModelCard.from_dict(payload["card"], source=f"{source} card")
    model = build_model(card.model, bands=card.bands, tile_size=card.tile_size, overlap=card.overlap,
                        normalisation={"mean": card.mean, "std": card.std}, load_pretrained=False)
    try:
        model.net.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise GeodetError(f"{source}: weights do not fit the architecture in the card ({str(exc).splitlines()[0]})") from None
    model.card = card
    return model.eval()


def load_model(path: str | Path) -> GeodetModel:
    """Load a model file with ``torch.load(weights_only=True)`` (or a training run's folder: its
    ``model.pt``); ``model.card`` describes it and ``model.source`` names the file and its SHA-256."""
    from ..hashing import file_sha256

    if isinstance(path, GeodetModel):
        raise GeodetError("load_model was given a model that is already loaded: use it as it is")
    if not isinstance(path, (str, os.PathLike)):
        raise GeodetError(f"load_model takes a model file's path (str or pathlib.Path), not {type(path).__name__}")
    if Path(path).is_dir() and (Path(path) / "model.pt").is_file():  # a training run's folder, as -m takes it
        path = Path(path) / "model.pt"
    model = model_from_payload(read_model_file(path), source=str(path))
    model.source = {"path": str(path), "sha256": file_sha256(path)}
    return model
