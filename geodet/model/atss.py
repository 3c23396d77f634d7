"""ATSS anchor assignment (Zhang et al. 2020, "Bridging the Gap Between Anchor-based and
Anchor-free Detection via Adaptive Training Sample Selection", arXiv 1912.02424).

Instead of fixed IoU thresholds (0.5 / 0.4), each object picks its candidates: on every pyramid
level the ``k`` anchors whose centres lie closest to its centre; its IoU threshold is the mean plus
the standard deviation of the candidates' IoUs. A candidate is positive when its IoU reaches that
threshold and its centre lies inside the object; an anchor claimed by several objects goes to the
one it overlaps most. Small objects, whose best anchors overlap them less, still get positives,
and large ones do not take every anchor around them. An object no candidate's centre falls in
(smaller or thinner than the stride) keeps its best candidate. Everything else is background (ATSS
has no band of ignored anchors); unlabelled pixels are ignored afterwards, at ``IGNORE_IOU``: ATSS
makes positives of candidates with IoUs well under the fixed matcher's 0.4.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_IOU = 0.2  # an anchor this much on unlabelled pixels could be an ATSS positive there: ignored
TOPK_PER_LOCATION = 9  # the paper's k, for one anchor per location; k grows with the anchors per location


def level_sizes(layout) -> list[int]:
    """The number of anchors of each pyramid level, from ``GridAnchorGenerator.layout``."""
    return [gh * gw * base.shape[0] for _offset, gh, gw, _sh, _sw, base in layout]


def atss_match(boxes: Tensor, anchors: Tensor, sizes: list[int], anchors_per_location: int,
               topk: int = TOPK_PER_LOCATION) -> Tensor:
    """Per anchor the index of its object, or -1 (background). ``sizes``: anchors per level, in
    the order of ``anchors``."""
    n_gt = boxes.shape[0]
    boxes, anchors = boxes.float(), anchors.float()
    matched = torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
    if n_gt == 0:
        return matched
    ac = (anchors[:, :2] + anchors[:, 2:]) / 2
    cand = _candidates(boxes, ac, sizes, topk * max(1, anchors_per_location))  # [G, K]
    iou = _pair_iou(boxes, anchors, cand)  # [G, K]
    thr = iou.mean(1, keepdim=True) + (iou.std(1, keepdim=True) if iou.shape[1] > 1 else 0.0)
    inside = ((ac[cand] > boxes[:, None, :2]) & (ac[cand] < boxes[:, None, 2:])).all(-1)
    positive = (iou >= thr) & inside & (iou > 0)
    # an object too small or thin for any candidate's centre to fall inside it still gets its best
    # candidate (as the IoU matcher's low-quality match does): never taught wholly as background
    none = ~positive.any(1)
    if none.any():
        best = iou.argmax(1)
        positive[none, best[none]] = iou[none, best[none]] > 0
    # each anchor to the object it overlaps most among those that chose it
    best = torch.full((anchors.shape[0],), -1.0, device=anchors.device, dtype=iou.dtype)
    g = torch.arange(n_gt, device=boxes.device)[:, None].expand_as(cand)
    sel_a, sel_g, sel_iou = cand[positive], g[positive], iou[positive]
    best = best.scatter_reduce(0, sel_a, sel_iou, "amax")
    win = sel_iou == best[sel_a]
    matched[sel_a[win]] = sel_g[win]
    return matched


def _candidates(boxes: Tensor, centres: Tensor, sizes: list[int], k: int, chunk: int = 256) -> Tensor:
    """Per object, the ``k`` anchors of each level whose centres lie nearest its centre (objects in
    chunks, so a dense tile never holds the whole objects x anchors distance matrix)."""
    gc = (boxes[:, :2] + boxes[:, 2:]) / 2
    rows = []
    for g0 in range(0, len(gc), chunk):
        cands, start = [], 0
        for n in sizes:
            d = torch.cdist(gc[g0 : g0 + chunk], centres[start : start + n])
            cands.append(d.topk(min(k, n), dim=1, largest=False).indices + start)
            start += n
        rows.append(torch.cat(cands, dim=1))
    return torch.cat(rows)


def _pair_iou(boxes: Tensor, anchors: Tensor, cand: Tensor) -> Tensor:
    """IoU of each object with its candidates only (dense tiles: never the full matrix)."""
    a = anchors[cand]  # [G, K, 4]
    b = boxes[:, None, :]
    wh = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a + area_b - inter)
