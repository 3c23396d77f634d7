"""RetinaNet for dense small objects, assembled from torchvision parts.

The model runs tiles at their native size (no hidden resize), on configurable pyramid levels
(P2-P6 for small objects, P3-P7 as in the paper) with anchors sized for the objects, and keeps
up to ``detections_per_tile`` boxes per tile.
"""

from __future__ import annotations

import copy
import datetime
import logging
import math
import os
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetClassificationHead, RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import sigmoid_focal_loss
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock
from torchvision.ops.misc import Conv2dNormActivation, FrozenBatchNorm2d

from ..config import ModelConfig, SceneConfig, TilingConfig
from ..errors import GeodetError, brief
from .card import ModelCard
from .decode import Decoder, decode_levels
from .atss import IGNORE_IOU as ATSS_IGNORE_IOU
from .atss import atss_match, level_sizes
from .ignore import ignore_unlabelled, resize_mask
from .matching import anchor_generator, match_anchors, match_anchors_on_grid

log = logging.getLogger(__name__)

BACKBONES = {
    "resnet18": (resnet.resnet18, resnet.ResNet18_Weights),
    "resnet34": (resnet.resnet34, resnet.ResNet34_Weights),
    "resnet50": (resnet.resnet50, resnet.ResNet50_Weights),
    "resnet101": (resnet.resnet101, resnet.ResNet101_Weights),
}
BOX_LOSSES = ("l1", "smooth_l1", "giou", "diou", "ciou")  # torchvision's regression head computes each
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


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


def resize_limits(min_size: int) -> tuple[int, int]:
    """torchvision's resize of a ``stock`` tile: its short side to ``min_size``, its long side at
    most the larger of 1333 and that."""
    return min_size, max(1333, min_size)


def resize_factor(min_size: int, side: int) -> float:
    """How much a square tile of ``side`` px is scaled by the resize of ``resize_limits``."""
    low, high = resize_limits(min_size)
    return min(low / side, high / side)


class ResizingTransform(GeneralizedRCNNTransform):
    """torchvision's resizing transform (the ``stock`` preset), which also brings a chip's
    unlabelled mask to the resized image, as it does the boxes."""

    def resize(self, image, target=None):
        image, target = super().resize(image, target)
        if target is not None and target.get("unlabelled") is not None:
            target["unlabelled"] = resize_mask(target["unlabelled"], int(image.shape[-2]), int(image.shape[-1]))
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


class DenseRetinaNet(RetinaNet):
    """RetinaNet whose training-time matching visits only nearby anchors (see
    ``match_anchors_on_grid``), or is chunked when the anchor layout is unknown."""

    def compute_loss(self, targets, head_outputs, anchors):
        # the focal and box losses always in float32, also when the network ran under autocast
        head_outputs = {k: v.float() for k, v in head_outputs.items()}
        with torch.autocast(anchors[0].device.type, enabled=False):
            return self._compute_loss(targets, head_outputs, anchors)

    def _compute_loss(self, targets, head_outputs, anchors):
        matched_idxs = []
        layout = getattr(self.anchor_generator, "layout", None)
        n_grid = sum(gh * gw * base.shape[0] for _, gh, gw, _, _, base in layout) if layout else -1
        hi, lo = self.proposal_matcher.high_threshold, self.proposal_matcher.low_threshold
        for anchors_per_image, targets_per_image in zip(anchors, targets):
            if targets_per_image["boxes"].numel() == 0:
                matched = torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64, device=anchors_per_image.device)
            elif getattr(self, "matcher", "iou") == "atss" and n_grid == anchors_per_image.shape[0]:
                matched = atss_match(targets_per_image["boxes"], anchors_per_image, level_sizes(layout),
                                     layout[0][5].shape[0])
            elif n_grid == anchors_per_image.shape[0]:
                matched = match_anchors_on_grid(targets_per_image["boxes"], anchors_per_image, layout, hi, lo)
            else:
                matched = match_anchors(targets_per_image["boxes"], anchors_per_image, hi, lo)
            if targets_per_image.get("unlabelled") is not None:
                at = ATSS_IGNORE_IOU if getattr(self, "matcher", "iou") == "atss" else lo
                matched = ignore_unlabelled(matched, anchors_per_image, targets_per_image["unlabelled"], at)
            matched_idxs.append(matched)
        return self.head.compute_loss(targets, head_outputs, anchors, matched_idxs)

    def postprocess_detections(self, head_outputs, anchors, image_shapes):
        return decode_levels(self.box_coder, head_outputs, anchors, image_shapes, self.score_thresh, self.nms_thresh,
                             self.detections_per_img, self.topk_candidates)

    def core(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The network core on a normalised, padded batch: ``(cls_logits [B, N, K],
        bbox_regression [B, N, 4])`` over every anchor of every level. This is what ONNX exports."""
        head_outputs = self.head(list(self.backbone(x).values()))
        return head_outputs["cls_logits"], head_outputs["bbox_regression"]

    @property
    def decoder(self) -> "Decoder":
        if getattr(self, "_decoder", None) is None:
            self._decoder = Decoder(self.anchor_generator, self.box_coder, self.levels)
        return self._decoder

    def detect(self, images: list[Tensor], score_thresh: float, nms_thresh: float, detections_per_img: int,
               topk_candidates: int | None = None, autocast_dtype: torch.dtype | None = None,
               timings: dict | None = None) -> list[dict[str, Tensor]]:
        """Eval-mode forward with the thresholds of this call (the model's attributes untouched).
        ``autocast_dtype`` runs the core (only) under autocast; decoding is always float32.
        ``timings`` accumulates seconds of ``core`` and ``decode``."""
        import time

        t0 = time.perf_counter()
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, _ = self.transform(images)
        x = image_list.tensors
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            cls_logits, bbox_regression = self.core(x)
        t1 = time.perf_counter()
        dets = self.decoder(cls_logits.float(), bbox_regression.float(), tuple(x.shape[-2:]), image_list.image_sizes,
                            score_thresh, nms_thresh, detections_per_img, topk_candidates or self.topk_candidates)
        dets = self.transform.postprocess(dets, image_list.image_sizes, original_sizes)
        if timings is not None:
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            timings["core"] = timings.get("core", 0.0) + t1 - t0
            timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - t1
        return dets


def _check_model_config(cfg: ModelConfig) -> None:
    if not isinstance(cfg, ModelConfig):
        hint = " (pass its .model section)" if hasattr(cfg, "model") else ""
        raise GeodetError(f"build_model takes the model section of a config (cfg.model){hint}, got {type(cfg).__name__}")
    if len(set(cfg.classes)) != len(cfg.classes):
        raise GeodetError(f"model.classes names a class twice: {list(cfg.classes)}")
    if not 0 <= cfg.score_threshold <= 1 or not 0 < cfg.nms_iou <= 1:
        raise GeodetError("model.score_threshold must be in [0, 1] and model.nms_iou in (0, 1]")
    if cfg.backbone not in BACKBONES:
        raise GeodetError(f"model.backbone '{cfg.backbone}' is not supported: use one of {', '.join(BACKBONES)}")
    if len(cfg.levels) != 2 or not 2 <= cfg.levels[0] <= 5 or cfg.levels[1] < cfg.levels[0] or cfg.levels[1] > 8:
        raise GeodetError(f"model.levels must be [min, max] with 2 <= min <= 5 and min <= max <= 8, got {cfg.levels}")
    if cfg.pretrained not in ("none", "imagenet", "imported") and not Path(cfg.pretrained).suffix in (".pth", ".pt"):
        raise GeodetError(f"model.pretrained must be none, imagenet, imported or the path of a torchvision ImageNet "
                          f"weights file (.pth), got '{cfg.pretrained}'")
    if not 0 <= cfg.trainable_layers <= 5:
        raise GeodetError(f"model.trainable_layers must be 0..5, got {cfg.trainable_layers}")
    if cfg.channels < 8 or not 1 <= cfg.head_depth <= 8:
        raise GeodetError("model.channels must be >= 8 and model.head_depth 1..8")
    if not cfg.classes:
        raise GeodetError("model.classes is empty: name at least one class")
    if cfg.matcher not in ("iou", "atss"):
        raise GeodetError(f"model.matcher must be iou or atss, got '{cfg.matcher}'")
    if cfg.box_loss not in BOX_LOSSES:
        raise GeodetError(f"model.box_loss must be one of {', '.join(BOX_LOSSES)}, got '{cfg.box_loss}'")


def _check_build_args(bands, tile_size, overlap, gsd_m, percentiles, norm) -> None:
    """``build_model``'s scene settings, refused in one line where no model can have them."""
    if any(int(b) < 1 for b in bands):
        raise GeodetError(f"bands are numbered from 1, got {bands}")
    if tile_size < 1 or not 0 <= overlap < tile_size:
        raise GeodetError(f"tile_size must be positive and overlap from 0 to less than it, got {tile_size} and {overlap}")
    if gsd_m is not None and not gsd_m > 0:
        raise GeodetError(f"gsd_m must be a positive number of metres per pixel, got {gsd_m}")
    if percentiles is not None and (len(percentiles) != 2 or not 0 <= percentiles[0] < percentiles[1] <= 100):
        raise GeodetError(f"percentiles must be two numbers 0 <= low < high <= 100, got {list(percentiles)}")
    if not isinstance(norm, dict) or not {"mean", "std"} <= set(norm):
        raise GeodetError("normalisation must be a dict with 'mean' and 'std', one value per band")
    if len(norm["mean"]) != len(bands) or len(norm["std"]) != len(bands):
        raise GeodetError(f"normalisation has {len(norm['mean'])} band(s) but the model has {len(bands)}")
    if not all(float(x) > 0 for x in norm["std"]):
        raise GeodetError(f"normalisation's std must be positive for every band, got {list(norm['std'])}")


def imagenet_url(backbone: str) -> str:
    """The address of torchvision's ImageNet weights for ``backbone`` (its file name carries the
    first hex digits of the file's SHA-256)."""
    _, weights_enum = BACKBONES[backbone]
    return weights_enum.IMAGENET1K_V1.url


def imagenet_file(backbone: str) -> Path:
    """torchvision's ImageNet weights for ``backbone`` in torch's hub cache (``$TORCH_HOME/hub/
    checkpoints``, where torchvision itself keeps them), downloaded there on first use and
    checked against the SHA-256 prefix in the file name. Offline, a GeodetError says where to put
    the file."""
    url = imagenet_url(backbone)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if cached.is_file():
        return cached
    import re

    m = re.search(r"-([0-9a-f]{8,})\.pth?$", cached.name)
    cached.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading ImageNet weights for %s from %s", backbone, url)
    try:
        torch.hub.download_url_to_file(url, str(cached), hash_prefix=m.group(1) if m else None, progress=False)
    except Exception as exc:  # offline (URLError, timeouts), refused, or a damaged download (hash)
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise GeodetError(
            f"model.pretrained imagenet: cannot download the {backbone} weights ({reason}): on a machine with internet "
            f"fetch {url} and put it at {cached} (or set model.pretrained to the file's path), or train from scratch "
            "with model.pretrained: none") from None
    return cached


def _subnet(channels: int, depth: int, norm_layer) -> nn.Sequential:
    layers = nn.Sequential(*[Conv2dNormActivation(channels, channels, norm_layer=norm_layer) for _ in range(depth)])
    for layer in layers.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, std=0.01)
            if layer.bias is not None:
                nn.init.constant_(layer.bias, 0)
    return layers


def _local_weights(path: str, backbone: str) -> dict:
    """A torchvision ImageNet weights file downloaded elsewhere: loaded without running code, and
    checked against the SHA-256 prefix in its name where torchvision's naming has one
    (``resnet50-0676ba61.pth``)."""
    import hashlib
    import re

    p = Path(path).expanduser()
    if not p.is_file():
        raise GeodetError(f"model.pretrained: weights file not found: {path}")
    m = re.search(r"-([0-9a-f]{8,})\.pth?$", p.name)
    if m:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if not digest.startswith(m.group(1)):
            raise GeodetError(f"model.pretrained: {p.name} is damaged or not the file its name says (SHA-256 starts "
                              f"{digest[:8]}, the name says {m.group(1)}): download it again")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise GeodetError(f"model.pretrained: {p.name} is not a weights file a safe load accepts ({brief(exc, 120)})") from None
    if not isinstance(sd, dict) or "conv1.weight" not in sd:
        raise GeodetError(f"model.pretrained: {p.name} is not a torchvision ResNet state_dict (no conv1.weight): give "
                          f"the {backbone} ImageNet weights file")
    return sd


def build_backbone(cfg: ModelConfig, in_channels: int, load_pretrained: bool = True) -> BackboneWithFPN:
    fn, _ = BACKBONES[cfg.backbone]
    pretrained = cfg.pretrained != "none"
    if pretrained and cfg.pretrained != "imported" and in_channels != 3 and load_pretrained:
        raise GeodetError(
            f"model.pretrained {cfg.pretrained}: ImageNet weights were learnt on 3-band RGB photographs and this model "
            f"has {in_channels} band(s): train from scratch (model.pretrained: none), pick 3 RGB bands with --bands, "
            "or pretrain on your own imagery")
    # Frozen BN only makes sense with pretrained statistics; from scratch BN must learn.
    norm = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    body = fn(weights=None, norm_layer=norm)
    if pretrained and cfg.pretrained != "imported" and load_pretrained:
        path = imagenet_file(cfg.backbone) if cfg.pretrained == "imagenet" else cfg.pretrained
        sd = _local_weights(path, cfg.backbone)
        try:
            body.load_state_dict({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, strict=True)
        except RuntimeError as exc:
            raise GeodetError(f"model.pretrained: the weights do not fit {cfg.backbone} ({brief(exc, 120)})") from None
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
    a float batch ``[B, C, H, W]`` gives ``[{"boxes", "scores", "labels"}]`` in tile pixels, with
    the card's thresholds; ``model.predict(batch, score_threshold=...)`` takes them per call.
    In train mode, ``model(batch, targets)`` gives ``{"classification", "bbox_regression"}``.
    """

    def __init__(self, net: DenseRetinaNet, card: ModelCard):
        super().__init__()
        self.net = net
        self.card = card
        self.source: dict | None = None  # {"path", "sha256"} when loaded from a file

    @property
    def classes(self) -> list[str]:
        return list(self.card.classes)

    def forward(self, images: Tensor | list[Tensor], targets: list[dict] | None = None):
        imgs = list(images)
        if self.training:
            if targets is None:
                raise GeodetError("training the model needs targets")
            return self.net(imgs, targets)
        return self.predict(imgs)

    def predict(self, images: Tensor | list[Tensor], score_threshold: float | None = None, nms_iou: float | None = None,
                detections_per_tile: int | None = None, autocast_dtype: torch.dtype | None = None,
                timings: dict | None = None) -> list[dict[str, Tensor]]:
        """Detections for a batch with these thresholds (None: the card's); changes nothing on
        the model. Call it in eval mode and under ``torch.inference_mode()`` for speed.
        ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the network core under autocast; boxes
        are always decoded in float32. ``timings`` accumulates seconds of ``core`` and ``decode``."""
        m = self.card.model
        return self.net.detect(
            list(images),
            float(m.score_threshold if score_threshold is None else score_threshold),
            float(m.nms_iou if nms_iou is None else nms_iou),
            int(m.detections_per_tile if detections_per_tile is None else detections_per_tile),
            autocast_dtype=autocast_dtype, timings=timings,
        )


def default_normalisation(cfg: ModelConfig, n_bands: int) -> dict:
    if cfg.pretrained != "none":
        mean = (IMAGENET_MEAN + [float(np.mean(IMAGENET_MEAN))] * n_bands)[:n_bands]
        std = (IMAGENET_STD + [float(np.mean(IMAGENET_STD))] * n_bands)[:n_bands]
        if n_bands < 3:
            mean, std = [float(np.mean(IMAGENET_MEAN))] * n_bands, [float(np.mean(IMAGENET_STD))] * n_bands
        return {"mean": mean, "std": std}
    return {"mean": [0.5] * n_bands, "std": [0.25] * n_bands}


def build_model(
    cfg: ModelConfig,
    bands: Sequence[int] | None = None,
    normalisation: dict | None = None,
    tile_size: int | None = None,
    overlap: int | None = None,
    gsd_m: float | None = None,
    percentiles: Sequence[float] | None = None,
    load_pretrained: bool = True,
) -> GeodetModel:
    """A RetinaNet for ``len(bands)`` input bands, configured by ``cfg``, with its card. Settings
    left as None take the defaults of ``geodet.config``.

    ``load_pretrained=False`` builds the pretrained architecture (frozen BN) without fetching
    weights, for loading a model file."""
    _check_model_config(cfg)
    bands = list(bands) if bands else list(SceneConfig().bands)
    tile_size = int(tile_size if tile_size is not None else TilingConfig().tile_size)
    if overlap is None:  # the default's, or an eighth of a tile too small for it (as geodet tile does)
        overlap = TilingConfig().overlap if 4 * TilingConfig().overlap <= tile_size else tile_size // 8
    overlap = int(overlap)
    n_bands = len(bands)
    norm = normalisation or default_normalisation(cfg, n_bands)
    _check_build_args(bands, tile_size, overlap, gsd_m, percentiles, norm)
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
    head.regression_head._loss_type = cfg.box_loss
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
    net.levels = tuple(cfg.levels)
    net.matcher = cfg.matcher
    if cfg.resize_min_size:
        # torchvision's stock transform (resizes tiles); only for comparisons with stock settings
        net.transform = ResizingTransform(*resize_limits(cfg.resize_min_size), norm["mean"], norm["std"])
    else:
        net.transform = NativeSizeTransform(tile_size, tile_size, norm["mean"], norm["std"])
    card = ModelCard(
        classes=list(cfg.classes),
        bands=[int(b) for b in bands],
        mean=[float(v) for v in norm["mean"]],
        std=[float(v) for v in norm["std"]],
        model=copy.deepcopy(cfg),
        tile_size=tile_size,
        overlap=overlap,
        percentiles=[float(p) for p in (percentiles if percentiles is not None else SceneConfig().percentiles)],
        gsd_m=None if gsd_m is None else float(gsd_m),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        extra={"gsd_unit": "m"},  # metres in any CRS (older cards held the training scene CRS's unit)
    )
    return GeodetModel(net, card)
