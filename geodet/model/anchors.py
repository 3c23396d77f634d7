"""Anchor coverage and fitting anchor sizes and aspect ratios to label box sizes.

Coverage is measured with the model's real anchors (torchvision's AnchorGenerator on a tile)
against label boxes of the given sizes placed at random sub-pixel positions: the share of boxes
whose best anchor reaches the matcher's foreground IoU.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import GeodetError
from ..model import anchor_generator

COVERAGE_TILE = 256


def _anchors(cfg: ModelConfig, tile: int) -> torch.Tensor:
    from torchvision.models.detection.image_list import ImageList

    gen = anchor_generator(cfg)
    lo, hi = cfg.levels
    feats = [torch.zeros(1, 1, max(1, tile // 2**lv), max(1, tile // 2**lv)) for lv in range(lo, hi + 1)]
    images = ImageList(torch.zeros(1, 3, tile, tile), [(tile, tile)])
    return gen(images, feats)[0]


def _sizes(box_sizes_px) -> np.ndarray:
    """Box sizes as an (N, 2) array of finite (width, height): (N, 4) boxes are not sizes."""
    try:
        sizes = np.asarray(box_sizes_px, np.float64)
    except (TypeError, ValueError):
        raise GeodetError("box sizes must be an (N, 2) array of (width, height) in pixels") from None
    if sizes.size == 0:
        return sizes.reshape(0, 2)
    if sizes.ndim != 2 or sizes.shape[1] != 2:
        raise GeodetError(f"box sizes must be an (N, 2) array of (width, height) in pixels, got shape {sizes.shape}"
                          + (" (boxes x0, y0, x1, y1? give their widths and heights)" if sizes.shape[-1] == 4 else ""))
    if not np.isfinite(sizes).all():
        raise GeodetError("box sizes must be finite numbers of pixels")
    return sizes


def anchor_coverage(box_sizes_px, cfg: ModelConfig, iou: float | None = None, n_max: int = 2000, seed: int = 0) -> float:
    """Share of boxes (``[N, 2]`` widths and heights in pixels) whose best anchor has IoU >= ``iou``
    (default: the config's foreground threshold)."""
    sizes = _sizes(box_sizes_px)
    if len(sizes) == 0:
        raise GeodetError("no label boxes to measure anchor coverage on")
    rng = np.random.default_rng(seed)
    if len(sizes) > n_max:
        sizes = sizes[rng.choice(len(sizes), n_max, replace=False)]
    thr = cfg.fg_iou if iou is None else iou
    big = float(sizes.max())
    tile = int(max(COVERAGE_TILE, 2 ** np.ceil(np.log2(big * 2 + 64))))
    stride_max = 2 ** cfg.levels[1]
    c = rng.uniform(tile / 2 - stride_max, tile / 2 + stride_max, size=(len(sizes), 2))
    boxes = torch.tensor(np.concatenate([c - sizes / 2, c + sizes / 2], 1), dtype=torch.float32)
    return float((_best_iou(boxes, cfg, tile) >= thr - 1e-6).float().mean())


def _best_iou(boxes: torch.Tensor, cfg: ModelConfig, tile: int) -> torch.Tensor:
    """Each box's best IoU with the anchors ``_anchors(cfg, tile)`` would make, without making
    them: an anchor of one shape is ``(ix * stride, iy * stride) + base``, and its overlap with a
    box shrinks as its centre moves away in x or in y, so the best of each shape is at one of the
    two grid positions nearest the box's centre in each axis. Exact, and as fast for a label as
    large as the scene (whose tile would hold millions of anchors) as for a small one."""
    gen = anchor_generator(cfg)
    lo, hi = cfg.levels
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    best = torch.zeros(len(boxes))
    for lv, base in zip(range(lo, hi + 1), gen.cell_anchors):
        n = max(1, tile // 2**lv)
        stride = tile // n
        base = base.to(torch.float32)
        bx, by = (base[:, 0] + base[:, 2]) / 2, (base[:, 1] + base[:, 3]) / 2  # [A]
        for dx in (0, 1):
            for dy in (0, 1):
                ix = (torch.floor((cx[:, None] - bx) / stride) + dx).clamp(0, n - 1)  # [N, A]
                iy = (torch.floor((cy[:, None] - by) / stride) + dy).clamp(0, n - 1)
                ax0, ax1 = ix * stride + base[:, 0], ix * stride + base[:, 2]
                ay0, ay1 = iy * stride + base[:, 1], iy * stride + base[:, 3]
                iw = (torch.minimum(ax1, boxes[:, 2:3]) - torch.maximum(ax0, boxes[:, 0:1])).clamp(min=0)
                ih = (torch.minimum(ay1, boxes[:, 3:4]) - torch.maximum(ay0, boxes[:, 1:2])).clamp(min=0)
                inter = iw * ih
                union = (ax1 - ax0) * (ay1 - ay0) + ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[:, None]
                best = torch.maximum(best, (inter / (union - inter)).max(dim=1).values)
    return best


@dataclass
class AnchorFit:
    anchor_sizes: list[float]
    aspect_ratios: list[float]
    coverage: float


def fit_anchors(box_sizes_px, levels, scales_per_octave: int = 1, base_cfg: ModelConfig | None = None,
                n_ratios: int = 3) -> AnchorFit:
    """Choose anchor sizes (one octave per level) and aspect ratios from label box sizes.

    Aspect ratios (height / width, torchvision's convention) come from quantiles of the boxes'
    ratios; the smallest anchor size is then searched on a log grid for the best coverage.
    ``box_sizes_px``: an (N, 2) array of (width, height); ``levels``: the first and last pyramid level.
    """
    sizes = _sizes(box_sizes_px)
    sizes = sizes[(sizes > 0).all(1)]
    if len(levels) != 2 or int(levels[0]) > int(levels[1]):
        raise GeodetError(f"levels must be the first and last pyramid level (e.g. [2, 5]), got {list(levels)}")
    if len(sizes) == 0:
        raise GeodetError("no label boxes with positive size to fit anchors to")
    cfg = copy.deepcopy(base_cfg or ModelConfig())
    cfg.anchor_size_list = None  # the fit is sizes per level (an explicit list would stand in for them)
    cfg.levels = list(levels)
    cfg.scales_per_octave = scales_per_octave
    n_levels = levels[1] - levels[0] + 1
    ratio = sizes[:, 1] / sizes[:, 0]
    if n_ratios == 1:
        ratio_sets = [[1.0]]
    else:
        q = np.quantile(np.log(ratio), np.linspace(0.1, 0.9, n_ratios))
        # two significant digits: a fence's 0.0033 stays a ratio (two decimals made it 0, refused)
        ratio_sets = [sorted({float(f"{np.exp(v):.2g}") for v in q}), [0.5, 1.0, 2.0]]
    scale = np.sqrt(sizes[:, 0] * sizes[:, 1])
    lo = max(2.0, float(np.quantile(scale, 0.02)) / 2)
    best = None
    sample = sizes[np.random.default_rng(0).choice(len(sizes), min(len(sizes), 400), replace=False)]
    for ratios in ratio_sets:
        cfg.aspect_ratios = ratios
        for base in np.exp(np.linspace(np.log(lo), np.log(lo * 4), 13)):
            cfg.anchor_sizes = [float(np.round(base * 2**i, 1)) for i in range(n_levels)]
            cov = anchor_coverage(sample, cfg, n_max=400)
            if best is None or cov > best.coverage + 1e-9:
                best = AnchorFit(list(cfg.anchor_sizes), list(ratios), cov)
    cfg.anchor_sizes, cfg.aspect_ratios = best.anchor_sizes, best.aspect_ratios
    best.coverage = anchor_coverage(sizes, cfg)
    return best


def size_summary(box_sizes_px) -> str:
    s = np.asarray(box_sizes_px, np.float64).reshape(-1, 2)
    q = [5, 25, 50, 75, 95]
    w, h = np.percentile(s[:, 0], q), np.percentile(s[:, 1], q)
    a = np.percentile(np.sqrt(s[:, 0] * s[:, 1]), q)
    head = "percentile " + " ".join(f"{p:>6d}" for p in q)
    return "\n".join([
        f"{len(s)} boxes", head,
        "width px   " + " ".join(f"{v:6.1f}" for v in w),
        "height px  " + " ".join(f"{v:6.1f}" for v in h),
        "sqrt(area) " + " ".join(f"{v:6.1f}" for v in a),
    ])
