"""RetinaNet for dense small objects, assembled from torchvision parts, and the model file.

The model runs tiles at their native size (no hidden resize), on configurable pyramid levels
(P2-P6 for small objects, P3-P7 as in the paper) with anchors sized for the objects, and keeps
up to ``detections_per_tile`` boxes per tile.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetClassificationHead, RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import boxes as box_ops
from torchvision.ops import sigmoid_focal_loss
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock
from torchvision.ops.misc import Conv2dNormActivation, FrozenBatchNorm2d

from .config import ModelConfig
from .errors import GeodetError

log = logging.getLogger(__name__)

MODEL_FORMAT = "geodet-model"
MODEL_VERSION = 1
BACKBONES = {
    "resnet18": (resnet.resnet18, resnet.ResNet18_Weights),
    "resnet34": (resnet.resnet34, resnet.ResNet34_Weights),
    "resnet50": (resnet.resnet50, resnet.ResNet50_Weights),
    "resnet101": (resnet.resnet101, resnet.ResNet101_Weights),
}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
MATCH_CHUNK_ELEMENTS = 4_000_000  # box-anchor IoU pairs held at once when matching


class ExtraLevels(ExtraFPNBlock):
    """Pyramid levels above P5, each a stride-2 3x3 conv of the one below (P6, P7 of the paper)."""

    def __init__(self, channels: int, n: int, first_level: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, 2, 1) for _ in range(n))
        self.first_level = first_level
        for conv in self.convs:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.constant_(conv.bias, 0)

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]):
        top = results[-1]
        for i, conv in enumerate(self.convs):
            top = conv(top if i == 0 else F.relu(top))
            results.append(top)
            names.append(f"p{self.first_level + i}")
        return results, names


class NativeSizeTransform(GeneralizedRCNNTransform):
    """Normalise and batch, but never resize: tiles run at their native resolution."""

    def resize(self, image, target=None):
        return image, target


class FocalClassificationHead(RetinaNetClassificationHead):
    """torchvision's classification subnet with configurable focal-loss alpha and gamma."""

    def __init__(self, *args, alpha: float = 0.25, gamma: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha, self.gamma = alpha, gamma

    def compute_loss(self, targets, head_outputs, matched_idxs):
        losses = []
        for tgt, logits, matched in zip(targets, head_outputs["cls_logits"], matched_idxs):
            foreground = matched >= 0
            num_foreground = int(foreground.sum())
            gt = torch.zeros_like(logits)
            gt[foreground, tgt["labels"][matched[foreground]]] = 1.0
            valid = matched != self.BETWEEN_THRESHOLDS
            loss = sigmoid_focal_loss(logits[valid], gt[valid], alpha=self.alpha, gamma=self.gamma, reduction="sum")
            losses.append(loss / max(1, num_foreground))
        return sum(losses) / len(targets)


def match_anchors(
    boxes: Tensor, anchors: Tensor, fg_iou: float, bg_iou: float, chunk_elements: int = MATCH_CHUNK_ELEMENTS
) -> Tensor:
    """torchvision's Matcher (with low-quality matches) without the full box x anchor IoU matrix.

    Returns per anchor the matched box index, -1 below ``bg_iou`` and -2 between the thresholds.
    Memory is ``chunk_elements`` IoUs instead of 35 bytes per box-anchor pair, so tiles with
    thousands of objects train on P2.
    """
    m = boxes.shape[0]
    chunk = max(1, chunk_elements // max(m, 1))
    best_val = torch.empty(anchors.shape[0], device=anchors.device)
    best_idx = torch.empty(anchors.shape[0], dtype=torch.int64, device=anchors.device)
    box_best = torch.zeros(m, device=anchors.device)
    for s in range(0, anchors.shape[0], chunk):
        iou = box_ops.box_iou(boxes, anchors[s : s + chunk])
        best_val[s : s + chunk], best_idx[s : s + chunk] = iou.max(dim=0)
        box_best = torch.maximum(box_best, iou.max(dim=1).values)
    matches = best_idx.clone()
    matches[best_val < bg_iou] = -1
    matches[(best_val >= bg_iou) & (best_val < fg_iou)] = -2
    # Low-quality matches: every anchor that is some box's best keeps its own best box.
    for s in range(0, anchors.shape[0], chunk):
        iou = box_ops.box_iou(boxes, anchors[s : s + chunk])
        hit = ((iou == box_best[:, None]) & (box_best[:, None] > 0)).any(dim=0)
        idx = torch.nonzero(hit).squeeze(1) + s
        matches[idx] = best_idx[idx]
    return matches


class GridAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator that also records the layout of the anchors it made
    (per level: offset in the flat list, grid size, stride, base anchors), so matching can
    visit only the anchors near each box (``match_anchors_on_grid``)."""

    def forward(self, image_list, feature_maps):
        anchors = super().forward(image_list, feature_maps)
        image_size = image_list.tensors.shape[-2:]
        layout, offset = [], 0
        for fm, base in zip(feature_maps, self.cell_anchors):
            gh, gw = int(fm.shape[-2]), int(fm.shape[-1])
            layout.append((offset, gh, gw, int(image_size[0] // gh), int(image_size[1] // gw), base))
            offset += gh * gw * base.shape[0]
        self.layout = layout
        return anchors


def _grid_candidates(boxes: Tensor, layout) -> tuple[Tensor, Tensor]:
    """(box index, anchor index) for every anchor that can overlap a box, from the anchor layout:
    per level, the grid positions whose anchors reach the box, times the anchors per position."""
    dev = boxes.device
    n = boxes.shape[0]
    x0, y0, x1, y1 = boxes.unbind(1)
    gs, idxs = [], []
    for offset, gh, gw, sh, sw, base in layout:
        n_base = base.shape[0]
        # anchor (iy, ix, a) is (ix * sw, iy * sh) + base[a]; it overlaps the box only if
        # ix * sw + base[a, 0] < x1 and ix * sw + base[a, 2] > x0 (and the same in y)
        # (the first integer above, and the last below, the bounds; rounding can only widen them)
        ix_lo = (torch.floor((x0 - base[:, 2].max()) / sw) + 1).long().clamp(0, gw - 1)
        ix_hi = (torch.ceil((x1 - base[:, 0].min()) / sw) - 1).long().clamp(0, gw - 1)
        iy_lo = (torch.floor((y0 - base[:, 3].max()) / sh) + 1).long().clamp(0, gh - 1)
        iy_hi = (torch.ceil((y1 - base[:, 1].min()) / sh) - 1).long().clamp(0, gh - 1)
        nx = (ix_hi - ix_lo + 1).clamp(min=0)
        ny = (iy_hi - iy_lo + 1).clamp(min=0)
        counts = nx * ny * n_base
        total = int(counts.sum())
        if total == 0:
            continue
        g = torch.repeat_interleave(torch.arange(n, device=dev), counts)
        k = torch.arange(total, device=dev) - (torch.cumsum(counts, 0) - counts)[g]
        a, pos = k % n_base, k // n_base
        ix = ix_lo[g] + pos % nx[g]
        iy = iy_lo[g] + pos // nx[g]
        gs.append(g)
        idxs.append(offset + (iy * gw + ix) * n_base + a)
    if not gs:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return empty, empty
    return torch.cat(gs), torch.cat(idxs)


def match_anchors_on_grid(boxes: Tensor, anchors: Tensor, layout, fg_iou: float, bg_iou: float) -> Tensor:
    """The same result as ``match_anchors`` (torchvision's Matcher with low-quality matches), but
    IoUs are computed only for box-anchor pairs that can overlap, found from the anchor grid:
    tens of pairs per box instead of every anchor of the tile (a P2 tile has tens of thousands)."""
    m, n = anchors.shape[0], boxes.shape[0]
    g, idx = _grid_candidates(boxes, layout)
    a, b = anchors[idx], boxes[g]
    # the arithmetic of torchvision's box_iou, pair by pair
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    wh = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    iou = inter / (area_b + area_a - inter)
    best_val = torch.zeros(m, dtype=iou.dtype, device=anchors.device).scatter_reduce(0, idx, iou, "amax")
    # the first box among equals, as max(dim=0) over the dense matrix gives
    is_best = iou == best_val[idx]
    best_idx = torch.full((m,), n, dtype=torch.int64, device=anchors.device)
    best_idx = best_idx.scatter_reduce(0, idx[is_best], g[is_best], "amin")
    best_idx[best_val == 0] = 0
    box_best = torch.zeros(n, dtype=iou.dtype, device=anchors.device).scatter_reduce(0, g, iou, "amax")
    matches = best_idx.clone()
    matches[best_val < bg_iou] = -1
    matches[(best_val >= bg_iou) & (best_val < fg_iou)] = -2
    # Low-quality matches: every anchor that is some box's best keeps its own best box.
    hit = (iou == box_best[g]) & (box_best[g] > 0)
    matches[idx[hit]] = best_idx[idx[hit]]
    return matches


class DenseRetinaNet(RetinaNet):
    """RetinaNet whose training-time matching visits only nearby anchors (see
    ``match_anchors_on_grid``), or is chunked when the anchor layout is unknown."""

    def compute_loss(self, targets, head_outputs, anchors):
        matched_idxs = []
        layout = getattr(self.anchor_generator, "layout", None)
        n_grid = sum(gh * gw * base.shape[0] for _, gh, gw, _, _, base in layout) if layout else -1
        hi, lo = self.proposal_matcher.high_threshold, self.proposal_matcher.low_threshold
        for anchors_per_image, targets_per_image in zip(anchors, targets):
            if targets_per_image["boxes"].numel() == 0:
                matched_idxs.append(torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64, device=anchors_per_image.device))
                continue
            if n_grid == anchors_per_image.shape[0]:
                matched_idxs.append(match_anchors_on_grid(targets_per_image["boxes"], anchors_per_image, layout, hi, lo))
            else:
                matched_idxs.append(match_anchors(targets_per_image["boxes"], anchors_per_image, hi, lo))
        return self.head.compute_loss(targets, head_outputs, anchors, matched_idxs)


def anchor_generator(cfg: ModelConfig) -> GridAnchorGenerator:
    lo, hi = cfg.levels
    n_levels = hi - lo + 1
    if len(cfg.anchor_sizes) != n_levels:
        raise GeodetError(
            f"model.anchor_sizes has {len(cfg.anchor_sizes)} size(s) but levels P{lo}-P{hi} make {n_levels}: "
            "give one base size per level"
        )
    if cfg.scales_per_octave < 1 or not cfg.aspect_ratios or min(cfg.aspect_ratios) <= 0:
        raise GeodetError("model.scales_per_octave must be >= 1 and model.aspect_ratios positive numbers")
    sizes = tuple(
        tuple(float(s) * 2 ** (i / cfg.scales_per_octave) for i in range(cfg.scales_per_octave)) for s in cfg.anchor_sizes
    )
    return GridAnchorGenerator(sizes, (tuple(float(a) for a in cfg.aspect_ratios),) * n_levels)


def _check_model_config(cfg: ModelConfig) -> None:
    if cfg.backbone not in BACKBONES:
        raise GeodetError(f"model.backbone '{cfg.backbone}' is not supported: use one of {', '.join(BACKBONES)}")
    if len(cfg.levels) != 2 or not 2 <= cfg.levels[0] <= 5 or cfg.levels[1] < cfg.levels[0] or cfg.levels[1] > 8:
        raise GeodetError(f"model.levels must be [min, max] with 2 <= min <= 5 and min <= max <= 8, got {cfg.levels}")
    if cfg.pretrained not in ("none", "imagenet"):
        raise GeodetError(f"model.pretrained must be 'none' or 'imagenet', got '{cfg.pretrained}'")
    if not 0 <= cfg.trainable_layers <= 5:
        raise GeodetError(f"model.trainable_layers must be 0..5, got {cfg.trainable_layers}")
    if cfg.channels < 8 or not 1 <= cfg.head_depth <= 8:
        raise GeodetError("model.channels must be >= 8 and model.head_depth 1..8")
    if not cfg.classes:
        raise GeodetError("model.classes is empty: name at least one class")


def _imagenet_weights(backbone: str):
    """The torchvision weights enum, only if its file is already in the torch hub cache."""
    _, weights_enum = BACKBONES[backbone]
    weights = weights_enum.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not cached.is_file():
        raise GeodetError(
            f"ImageNet weights for {backbone} are not in the torch cache ({cached}) and geodet does not download "
            f"at run time: fetch {weights.url} on a machine with internet into that folder, or set model.pretrained: none"
        )
    return weights


def _subnet(channels: int, depth: int, norm_layer) -> nn.Sequential:
    layers = nn.Sequential(*[Conv2dNormActivation(channels, channels, norm_layer=norm_layer) for _ in range(depth)])
    for layer in layers.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, std=0.01)
            if layer.bias is not None:
                nn.init.constant_(layer.bias, 0)
    return layers


def build_backbone(cfg: ModelConfig, in_channels: int, load_pretrained: bool = True) -> BackboneWithFPN:
    fn, _ = BACKBONES[cfg.backbone]
    pretrained = cfg.pretrained == "imagenet"
    weights = _imagenet_weights(cfg.backbone) if pretrained and load_pretrained else None
    # Frozen BN only makes sense with pretrained statistics; from scratch BN must learn.
    norm = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    body = fn(weights=weights, norm_layer=norm)
    if in_channels != 3:
        old = body.conv1
        new = nn.Conv2d(in_channels, old.out_channels, 7, 2, 3, bias=False)
        with torch.no_grad():
            if pretrained:
                mean_w = old.weight.mean(dim=1)
                for c in range(in_channels):
                    new.weight[:, c] = old.weight[:, c] if c < 3 and in_channels >= 3 else mean_w
        body.conv1 = new
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][: cfg.trainable_layers]
    if cfg.trainable_layers == 5:
        layers_to_train.append("bn1")
    if pretrained:
        for name, p in body.named_parameters():
            if not any(name.startswith(layer) for layer in layers_to_train):
                p.requires_grad_(False)
    lo, hi = cfg.levels
    returned = list(range(lo - 1, min(hi, 5)))
    return_layers = {f"layer{k}": str(i) for i, k in enumerate(returned)}
    stage2 = body.inplanes // 8
    in_list = [stage2 * 2 ** (k - 1) for k in returned]
    # Always pass our block: BackboneWithFPN would otherwise add a max-pool level.
    extra = ExtraLevels(cfg.channels, max(0, hi - 5), 6)
    fpn_norm = partial(nn.GroupNorm, math.gcd(32, cfg.channels)) if cfg.group_norm else None
    return BackboneWithFPN(body, return_layers, in_list, cfg.channels, extra_blocks=extra, norm_layer=fpn_norm)


class GeodetModel(nn.Module):
    """A RetinaNet plus its card. In eval mode, ``model(batch)`` follows the detector protocol:
    a float batch ``[B, C, H, W]`` gives ``[{"boxes", "scores", "labels"}]`` in tile pixels.
    In train mode, ``model(batch, targets)`` gives ``{"classification", "bbox_regression"}``.
    """

    def __init__(self, net: DenseRetinaNet, card: dict):
        super().__init__()
        self.net = net
        self.card = card

    @property
    def classes(self) -> list[str]:
        return list(self.card["classes"])

    def forward(self, images: Tensor | list[Tensor], targets: list[dict] | None = None):
        imgs = list(images)
        if self.training:
            if targets is None:
                raise GeodetError("training the model needs targets")
            return self.net(imgs, targets)
        return self.net(imgs)

    def set_thresholds(self, score_threshold: float | None = None, nms_iou: float | None = None) -> None:
        if score_threshold is not None:
            self.net.score_thresh = float(score_threshold)
        if nms_iou is not None:
            self.net.nms_thresh = float(nms_iou)


def default_normalisation(cfg: ModelConfig, n_bands: int) -> dict:
    if cfg.pretrained == "imagenet":
        mean = (IMAGENET_MEAN + [float(np.mean(IMAGENET_MEAN))] * n_bands)[:n_bands]
        std = (IMAGENET_STD + [float(np.mean(IMAGENET_STD))] * n_bands)[:n_bands]
        if n_bands < 3:
            mean, std = [float(np.mean(IMAGENET_MEAN))] * n_bands, [float(np.mean(IMAGENET_STD))] * n_bands
        return {"mean": mean, "std": std}
    return {"mean": [0.5] * n_bands, "std": [0.25] * n_bands}


def build_model(
    cfg: ModelConfig,
    bands: Sequence[int] = (1, 2, 3),
    normalisation: dict | None = None,
    tile_size: int = 512,
    overlap: int = 64,
    gsd_m: float | None = None,
    band_stats: dict | None = None,
    percentiles: Sequence[float] = (2.0, 98.0),
    load_pretrained: bool = True,
) -> GeodetModel:
    """A RetinaNet for ``len(bands)`` input bands, configured by ``cfg``, with its card.

    ``load_pretrained=False`` builds the pretrained architecture (frozen BN) without fetching
    weights, for loading a model file."""
    _check_model_config(cfg)
    n_bands = len(bands)
    norm = normalisation or default_normalisation(cfg, n_bands)
    if len(norm["mean"]) != n_bands or len(norm["std"]) != n_bands:
        raise GeodetError(f"normalisation has {len(norm['mean'])} band(s) but the model has {n_bands}")
    backbone = build_backbone(cfg, n_bands, load_pretrained)
    anchors = anchor_generator(cfg)
    n_anchors = anchors.num_anchors_per_location()[0]
    head_norm = partial(nn.GroupNorm, math.gcd(32, cfg.channels)) if cfg.group_norm else None
    head = RetinaNetHead(cfg.channels, n_anchors, len(cfg.classes), norm_layer=head_norm)
    head.classification_head = FocalClassificationHead(
        cfg.channels, n_anchors, len(cfg.classes), prior_probability=cfg.prior_probability,
        norm_layer=head_norm, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma,
    )
    head.classification_head.conv = _subnet(cfg.channels, cfg.head_depth, head_norm)
    head.regression_head.conv = _subnet(cfg.channels, cfg.head_depth, head_norm)
    net = DenseRetinaNet(
        backbone,
        num_classes=len(cfg.classes),
        anchor_generator=anchors,
        head=head,
        score_thresh=cfg.score_threshold,
        nms_thresh=cfg.nms_iou,
        detections_per_img=cfg.detections_per_tile,
        topk_candidates=cfg.topk_candidates,
        fg_iou_thresh=cfg.fg_iou,
        bg_iou_thresh=cfg.bg_iou,
    )
    if cfg.resize_min_size:
        # torchvision's stock transform (resizes tiles); only for comparisons with stock settings
        net.transform = GeneralizedRCNNTransform(cfg.resize_min_size, max(1333, cfg.resize_min_size), norm["mean"], norm["std"])
    else:
        net.transform = NativeSizeTransform(tile_size, tile_size, norm["mean"], norm["std"])
    card = {
        "classes": list(cfg.classes),
        "bands": [int(b) for b in bands],
        "normalisation": {"mean": [float(v) for v in norm["mean"]], "std": [float(v) for v in norm["std"]]},
        "band_stats": band_stats,
        "percentiles": [float(p) for p in percentiles],
        "gsd_m": None if gsd_m is None else float(gsd_m),
        "tile_size": int(tile_size),
        "overlap": int(overlap),
        "model": asdict(cfg),
        "trained_on": [],
        "metrics": {},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return GeodetModel(net, card)


# -- the model file ------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Card values as plain Python types, which ``weights_only`` loading accepts."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise GeodetError(f"model card holds a value of type {type(value).__name__}, which a model file cannot store")


def save_model(model: GeodetModel, path: str | Path) -> Path:
    """Write the model file atomically: ``{format, version, card, state_dict}``."""
    path = Path(path)
    payload = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "card": _plain(model.card),
        "state_dict": {k: v.detach().cpu() for k, v in model.net.state_dict().items()},
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_model_file(path: str | Path) -> dict:
    """The checked payload of a model file; nothing in it is executed."""
    p = Path(path)
    if not p.is_file():
        raise GeodetError(f"model file not found: {path}")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files; none of them run code
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "it holds Python objects that a safe load refuses"
        raise GeodetError(f"{path}: not a readable geodet model file ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise GeodetError(f"{path}: not a geodet model file (no '{MODEL_FORMAT}' format tag)")
    if payload.get("version") != MODEL_VERSION:
        raise GeodetError(
            f"{path}: model file version {payload.get('version')!r} is not supported by this geodet "
            f"(it reads version {MODEL_VERSION}): upgrade geodet or re-export the model"
        )
    if not isinstance(payload.get("card"), dict) or not isinstance(payload.get("state_dict"), dict):
        raise GeodetError(f"{path}: model file is missing its card or weights")
    return payload


def model_from_payload(payload: dict, source: str = "model") -> GeodetModel:
    from .config import config_from_dict

    card = payload["card"]
    try:
        cfg = config_from_dict({"model": card["model"]}, source=f"{source} card").model
        model = build_model(
            cfg,
            load_pretrained=False,
            bands=card["bands"], normalisation=card["normalisation"], tile_size=card["tile_size"],
            overlap=card["overlap"], gsd_m=card.get("gsd_m"), band_stats=card.get("band_stats"),
            percentiles=card.get("percentiles", (2.0, 98.0)),
        )
    except KeyError as exc:
        raise GeodetError(f"{source}: model card lacks {exc}") from None
    try:
        model.net.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise GeodetError(f"{source}: weights do not fit the architecture in the card ({str(exc).splitlines()[0]})") from None
    model.card = card
    return model.eval()


def load_model(path: str | Path) -> GeodetModel:
    """Load a model file with ``torch.load(weights_only=True)``; ``model.card`` describes it."""
    return model_from_payload(read_model_file(path), source=str(path))
