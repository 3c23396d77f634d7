"""Anchors and matching: torchvision's AnchorGenerator that records its layout, and matching of
label boxes to anchors that visits only the anchors near each box (dense tiles train on P2)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import boxes as box_ops

from ..config import ModelConfig
from ..errors import GeodetError

MATCH_CHUNK_ELEMENTS = 4_000_000  # box-anchor IoU pairs held at once when matching


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
        # anchors in float32 whatever the feature maps' type: under bf16 autocast torchvision would
        # make them bf16, whose 8-bit mantissa rounds coordinates of 256-512 px to 2 px steps, so
        # training would encode its box targets against anchors other than those detection decodes with
        shapes = [fm.new_empty((1, 1, *fm.shape[-2:]), dtype=torch.float32) for fm in feature_maps]
        anchors = super().forward(image_list, shapes)
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
    if cfg.anchor_size_list:
        k = cfg.scales_per_octave
        if len(cfg.anchor_size_list) != n_levels * k:
            raise GeodetError(f"model.anchor_size_list has {len(cfg.anchor_size_list)} sizes but {n_levels} levels x "
                              f"{k} scales_per_octave make {n_levels * k}")
        sizes = tuple(tuple(float(v) for v in cfg.anchor_size_list[i * k : (i + 1) * k]) for i in range(n_levels))
    else:
        sizes = tuple(
            tuple(float(s) * 2 ** (i / cfg.scales_per_octave) for i in range(cfg.scales_per_octave)) for s in cfg.anchor_sizes
        )
    return GridAnchorGenerator(sizes, (tuple(float(a) for a in cfg.aspect_ratios),) * n_levels)


