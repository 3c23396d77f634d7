"""Importing torchvision RetinaNets (DeepForest's releases included) as geodet models.

A source is a Hugging Face model folder or repository as DeepForest publishes them
(``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``; torchvision ``RetinaNet``
keys, possibly under a ``model.`` prefix), or a plain torchvision RetinaNet ``state_dict``
(``.pt``/``.pth`` loaded with ``weights_only=True``, or ``.safetensors``). Nothing is unpickled.

The card makes the model behave as at home, explicitly: torchvision resizes every image so its
short side is ``min_size`` (800), so a model run at home on ``tile_size`` px windows of ``gsd``
m imagery sees ``gsd * tile_size / min_size`` m pixels; in geodet that is the card's ground
resolution and tile size (``min_size`` px), and scenes are resampled on read. Without a GSD the
card has none and scenes run at their native resolution. ImageNet mean and std, the config's
classes and thresholds, and torchvision's postprocess (1000 candidates per level, 300
detections per image) come with it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from ..config import ModelConfig
from ..errors import GeodetError, brief
from .file import is_pickle_refusal

log = logging.getLogger(__name__)

# torchvision's _default_anchorgen(): per level x, int(x * 2**(1/3)), int(x * 2**(2/3))
TV_ANCHOR_BASES = [32, 64, 128, 256, 512]
TV_ANCHORS = [float(v) for x in TV_ANCHOR_BASES for v in (x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3)))]
SUPPORTED = "torchvision RetinaNet checkpoints with a ResNet-18/34/50/101 + FPN backbone (P3-P7, 9 anchors per place)"


def _refuse(source, why: str):
    raise GeodetError(f"{source}: {why}. geodet imports {SUPPORTED}; nothing else is loaded")


def read_state_dict(path: Path, source) -> dict:
    """Weights from a ``.safetensors`` file or a torch file loaded with ``weights_only=True``."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise GeodetError("reading .safetensors needs the safetensors package: pip install safetensors") from None
        try:
            return load_file(str(path))
        except Exception as exc:
            _refuse(source, f"not a readable safetensors file ({brief(exc, 120)})")
    with open(path, "rb") as f:
        head = f.read(64)
    if path.suffix.lower() == ".onnx" or (not head.startswith(b"PK") and b"onnx" in head.lower()):
        raise GeodetError(f"{source} is an ONNX model: geodet runs its own exports as they are (geodet detect -m "
                          f"{path.name}, for a file geodet export wrote) and imports torchvision RetinaNet weights "
                          "(.pt, .pth, .safetensors), not ONNX")
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # a torch file: a zip, or a legacy pickle
        _refuse(source, "not a PyTorch weights file (.pt, .pth) or a .safetensors file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        why = ("it holds Python objects (a pickle payload) that a safe load refuses" if is_pickle_refusal(exc)
               else f"not a readable torch file ({brief(exc, 120)})")
        _refuse(source, why)
    if isinstance(sd, dict) and sd.get("format") == "geodet-model":
        raise GeodetError(f"{source} is a geodet model already: detect with it as it is (-m), or train from it with "
                          "--init; import reads torchvision RetinaNet weights")
    if isinstance(sd, dict) and sd.get("format") == "geodet-checkpoint":
        raise GeodetError(f"{source} is a geodet training checkpoint: train --resume continues its run, and the run's "
                          "model.pt is its model (detect -m, train --init); import reads torchvision RetinaNet weights")
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        _refuse(source, "not a state_dict (a mapping of tensor names to tensors)")
    return sd


def strip_prefix(sd: dict) -> dict:
    """Drop a wrapper's prefix (``model.`` in DeepForest's Lightning checkpoints)."""
    for prefix in ("model.", "module.", "net."):
        if any(k.startswith(prefix + "backbone.") for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def backbone_of(sd: dict, source) -> str:
    if "head.classification_head.cls_logits.weight" not in sd or "head.regression_head.bbox_reg.weight" not in sd:
        _refuse(source, "no RetinaNet head (head.classification_head.cls_logits, head.regression_head.bbox_reg)")
    if "backbone.body.conv1.weight" not in sd or "backbone.fpn.extra_blocks.p6.weight" not in sd:
        _refuse(source, "the backbone is not a torchvision ResNet + FPN with P6/P7 (e.g. a DINOv3 or other backbone)")
    bottleneck = "backbone.body.layer1.0.conv3.weight" in sd
    n3 = len({k.split(".")[3] for k in sd if k.startswith("backbone.body.layer3.")})
    name = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101"}.get((bottleneck, n3))
    if name is None:
        _refuse(source, f"a ResNet with {n3} blocks in layer3 is not one of ResNet-18/34/50/101")
    return name


def resolve_source(source: str) -> tuple[dict, dict, str]:
    """(state_dict, config, description) of ``source``: a folder, a weights file, or a Hugging
    Face repository id (``hf://ORG/NAME`` or ``ORG/NAME``), fetched where the network allows and
    read from the local cache otherwise."""
    s = str(source)
    path = Path(s[5:] if s.startswith("hf://") and Path(s[5:]).exists() else s).expanduser()
    if s.startswith("hf://") or (not path.exists() and s.count("/") == 1 and not s.startswith((".", "/"))):
        path = _hf_folder(s[5:] if s.startswith("hf://") else s)
    if not path.exists():
        raise GeodetError(f"{source}: no such file or folder (a Hugging Face repository is given as hf://ORG/NAME)")
    config: dict = {}
    if path.is_dir():
        cfg_file = path / "config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text())
            except ValueError as exc:
                raise GeodetError(f"{cfg_file}: not valid JSON ({exc})") from None
        for name in ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth"):
            if (path / name).is_file():
                weights = path / name
                break
        else:
            raise GeodetError(f"{path}: no model.safetensors or pytorch_model.bin in the folder")
    else:
        weights = path
    return strip_prefix(read_state_dict(weights, source)), config, str(weights)


def _hf_folder(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise GeodetError("fetching Hugging Face models needs huggingface_hub: pip install huggingface_hub") from None
    patterns = ["config.json", "*.safetensors", "pytorch_model.bin"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass  # not in the cache yet: fetch it
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10))
    except Exception as exc:
        raise GeodetError(
            f"hf://{repo_id}: not in the Hugging Face cache and it could not be fetched ({type(exc).__name__}: "
            f"{brief(exc, 120)}): on a machine with internet run "
            f"'hf download {repo_id}' (huggingface_hub's command; or 'geodet import hf://{repo_id} -o model.pt') and "
            "copy the cache (HF_HOME) or the model file here"
        ) from None


def _setting(config: dict, key: str, source, kind, low=None, high=None, open_low=False, open_high=False):
    """``config[key]`` as ``kind`` within [low, high] (open ends as said), None when absent; a
    one-line error naming the key otherwise."""
    import math

    value = config.get(key)
    if value is None:
        return None
    want = f"{'an integer' if kind is int else 'a number'}" + (
        f" from {low} to {high}" if low is not None and high is not None else f" above {low}" if open_low else
        f" of at least {low}" if low is not None else "")
    try:
        if isinstance(value, bool) or (kind is int and float(value) != int(float(value))):
            raise ValueError
        v = kind(float(value)) if kind is int else float(value)
    except (TypeError, ValueError):
        raise GeodetError(f"{source}: config.json's {key} is {value!r}, not {want}: fix config.json, or give the "
                          "value as a flag of geodet import") from None
    bad = (not math.isfinite(v) or (low is not None and (v <= low if open_low else v < low))
           or (high is not None and (v >= high if open_high else v > high)))
    if bad:
        raise GeodetError(f"{source}: config.json's {key} is {value!r}, not {want}{' (excluded)' if open_high else ''}: "
                          "fix config.json, or give the value as a flag of geodet import")
    return v


def _label_dict(value, source) -> dict[int, str]:
    """DeepForest's ``label_dict`` ({name: index}; {index: name} read too) as {index: name}."""
    if not value:
        return {}
    fix = ("fix config.json: label_dict maps each class name to its index, e.g. {\"Tree\": 0, \"Bird\": 1}, or import it "
           "naming them (geodet import SOURCE --classes Tree,Bird -o MODEL.pt)")
    if not isinstance(value, dict):
        raise GeodetError(f"{source}: config.json's label_dict is a {type(value).__name__}, not a mapping: {fix}")

    def index(x):
        try:
            return int(x) if not isinstance(x, bool) and float(x) == int(float(x)) else None
        except (TypeError, ValueError):
            return None

    pairs = [(index(v), str(k)) for k, v in value.items()]
    if any(i is None for i, _ in pairs):
        pairs = [(index(k), str(v)) for k, v in value.items()]  # {index: name}
    if any(i is None or i < 0 for i, _ in pairs):
        raise GeodetError(f"{source}: config.json's label_dict {dict(value)} has a class without an index: {fix}")
    if len({i for i, _ in pairs}) != len(pairs):
        raise GeodetError(f"{source}: config.json's label_dict {dict(value)} gives two classes one index: {fix}")
    return dict(pairs)


def _class_names(config: dict, source, n_classes: int, classes) -> list[str]:
    """The imported head's class names: given, from config.json's label_dict, or numbered."""
    if classes is None:
        by_index = _label_dict(config.get("label_dict"), source)
        if by_index and sorted(by_index) != list(range(n_classes)):
            # names cut off or made up (class_0) would label every detection wrongly, silently
            raise GeodetError(f"{source}: config.json's label_dict {config['label_dict']} gives indices "
                              f"{sorted(by_index)} but the classification head has {n_classes} class(es), indices "
                              f"0 to {n_classes - 1}: fix config.json, or import it naming its {n_classes} class(es) "
                              "(geodet import SOURCE --classes A,B,... -o MODEL.pt)")
        if by_index:
            classes = [by_index[i] for i in range(n_classes)]
        else:
            classes = [f"class_{i}" for i in range(n_classes)] if n_classes > 1 else ["object"]
    classes = list(classes)
    cfg_n = _setting(config, "num_classes", source, int, 1)
    if cfg_n is not None and cfg_n != n_classes:
        _refuse(source, f"its config says {cfg_n} classes but the classification head has {n_classes}")
    if len(classes) != n_classes:
        raise GeodetError(f"{source}: the head has {n_classes} class(es) but {len(classes)} names were given "
                          f"({', '.join(classes)}): give {n_classes} with --classes")
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:  # two of the head's outputs under one name could not be told apart in the detections
        raise GeodetError(f"{source}: class name(s) {', '.join(twice)} given twice ({', '.join(classes)}): give each "
                          "of the head's classes its own name (--classes)")
    return classes


def import_retinanet(source, *, gsd_m: float | None = None, tile_size: int | None = None, min_size: int | None = None,
                     bands: Sequence[int] | None = None, classes: Sequence[str] | None = None,
                     score_threshold: float | None = None, nms_iou: float | None = None,
                     detections_per_tile: int | None = None, topk_candidates: int | None = None):
    """A ``GeodetModel`` (eval mode) holding a torchvision RetinaNet's weights, with a full card.

    ``gsd_m`` and ``tile_size`` describe how the model ran at home (``tile_size`` px windows of
    ``gsd_m`` m imagery, resized by torchvision to ``min_size``); settings left None come from the
    source's ``config.json`` (DeepForest's keys) and then torchvision's defaults."""
    from .network import IMAGENET_MEAN, IMAGENET_STD, build_model

    sd, config, where = resolve_source(source)
    backbone = backbone_of(sd, source)
    cls_w = sd["head.classification_head.cls_logits.weight"]
    n_anchors = sd["head.regression_head.bbox_reg.weight"].shape[0] // 4
    if n_anchors != 9 or cls_w.shape[0] % n_anchors:
        _refuse(source, f"{n_anchors} anchors per place (torchvision's RetinaNet has 9)")
    n_classes = cls_w.shape[0] // n_anchors
    channels = int(cls_w.shape[1])
    config = config if isinstance(config, dict) else {}
    classes = _class_names(config, source, n_classes, classes)
    min_size = int(min_size or _setting(config, "min_size", source, int, 1) or 800)
    home_tile = int(tile_size or _setting(config, "patch_size", source, int, 1) or min_size)
    if gsd_m is None:
        gsd_m = _setting(config, "gsd", source, float, 0, open_low=True)
    scale = min_size / home_tile  # torchvision's resize factor at home
    card_gsd = None if gsd_m is None else float(gsd_m) / scale
    card_tile = min_size if gsd_m is not None else home_tile
    share = _setting(config, "patch_overlap", source, float, 0, 1, open_high=True)
    overlap = int(round(card_tile * (share or 0.05)))
    if score_threshold is None:
        score_threshold = _setting(config, "score_thresh", source, float, 0, 1)
    if nms_iou is None:
        nms_iou = _setting(config, "nms_thresh", source, float, 0, 1)
    m = ModelConfig(
        classes=classes, backbone=backbone, pretrained="imported", trainable_layers=3, levels=[3, 7],
        anchor_sizes=[float(x) for x in TV_ANCHOR_BASES], scales_per_octave=3, anchor_size_list=list(TV_ANCHORS),
        aspect_ratios=[0.5, 1.0, 2.0], channels=channels, head_depth=_head_depth(sd), group_norm=False,
        score_threshold=float(score_threshold if score_threshold is not None else 0.05),
        nms_iou=float(nms_iou if nms_iou is not None else 0.5),
        topk_candidates=int(topk_candidates or 1000), detections_per_tile=int(detections_per_tile or 300),
    )
    n_bands = int(sd["backbone.body.conv1.weight"].shape[1])
    bands = list(bands) if bands else list(range(1, n_bands + 1))
    if len(bands) != n_bands:
        raise GeodetError(f"{source}: the network takes {n_bands} band(s) but --bands names {len(bands)}")
    mean = (IMAGENET_MEAN * 2)[:n_bands] if n_bands <= 3 else IMAGENET_MEAN + [sum(IMAGENET_MEAN) / 3] * (n_bands - 3)
    std = (IMAGENET_STD * 2)[:n_bands] if n_bands <= 3 else IMAGENET_STD + [sum(IMAGENET_STD) / 3] * (n_bands - 3)
    model = build_model(m, bands=bands, normalisation={"mean": mean, "std": std}, tile_size=card_tile, overlap=overlap,
                        gsd_m=card_gsd, load_pretrained=False)
    ours = model.net.state_dict()
    mapped = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        k2 = k.replace("backbone.fpn.extra_blocks.p6.", "backbone.fpn.extra_blocks.convs.0.").replace(
            "backbone.fpn.extra_blocks.p7.", "backbone.fpn.extra_blocks.convs.1.")
        mapped[k2] = v
    missing = sorted(set(ours) - set(mapped))
    unexpected = sorted(set(mapped) - set(ours))
    if missing or unexpected:
        _refuse(source, f"its weights do not fit ({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} "
                        f"unexpected, e.g. {unexpected[:2]})")
    bad = [k for k in ours if tuple(ours[k].shape) != tuple(mapped[k].shape)]
    if bad:
        _refuse(source, f"tensor shapes differ from a {backbone} RetinaNet (e.g. {bad[0]}: "
                        f"{tuple(mapped[bad[0]].shape)} vs {tuple(ours[bad[0]].shape)})")
    model.net.load_state_dict(mapped)
    model.card.trained_on = [{"imported_from": str(source), "weights": os.path.basename(where),
                              "home": {"tile_size": home_tile, "gsd_m": gsd_m, "min_size": min_size}}]
    model.card.extra["imported"] = {"source": str(source), "config": {k: config[k] for k in sorted(config)
                                                                      if isinstance(config[k], (str, int, float, bool))}}
    return model.eval()


def _head_depth(sd: dict) -> int:
    return len({k.split(".")[3] for k in sd if k.startswith("head.classification_head.conv.")})
