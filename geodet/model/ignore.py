"""What the loss may not teach: anchors over pixels nobody labelled.

A chip carries a boolean mask of its never-labelled pixels (outside the labelled area, the visible
part of a box cut away by the visibility rule, a teacher's doubtful boxes). A background anchor
(matched -1) becomes "ignore" (-2, as between the IoU thresholds) when an object hidden in the
unlabelled pixels could have made it more than background: an object inside the unlabelled
region overlaps the anchor by at most the anchor's unlabelled area, so its IoU with the anchor is
at most ``unlabelled area / anchor area``; where that bound reaches the background threshold
(``bg_iou``), the label is unknown and the anchor is ignored. Below it the anchor would be
background whatever lies there, exactly as in a labelled region. Testing only the anchor's centre
left anchors that straddle the region's edge (and overlap an unlabelled object) as background.
"""

from __future__ import annotations

import torch
from torch import Tensor


def unlabelled_share(anchors: Tensor, unlabelled: Tensor) -> Tensor:
    """Per anchor [N, 4] (pixel edges, the mask's grid), the share of its area on unlabelled pixels
    (``unlabelled`` [H, W], True there), from the mask's integral image. Outside the mask (padding)
    counts as labelled: nothing lies there."""
    h, w = unlabelled.shape[-2:]
    m = unlabelled.to(device=anchors.device, dtype=torch.float64)
    integral = torch.zeros((h + 1, w + 1), dtype=torch.float64, device=anchors.device)
    integral[1:, 1:] = m.cumsum(0).cumsum(1)
    x0 = anchors[:, 0].round().clamp(0, w).long()
    x1 = anchors[:, 2].round().clamp(0, w).long()
    y0 = anchors[:, 1].round().clamp(0, h).long()
    y1 = anchors[:, 3].round().clamp(0, h).long()
    count = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = ((anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])).double().clamp(min=1e-9)
    return (count / area).to(anchors.dtype)


def ignore_unlabelled(matched: Tensor, anchors: Tensor, unlabelled: Tensor, bg_iou: float) -> Tensor:
    """``matched`` with the background anchors (-1) that an unlabelled object could make more than
    background turned to ignore (-2); foreground matches stay."""
    hit = unlabelled_share(anchors, unlabelled) >= bg_iou
    return torch.where(hit & (matched == -1), torch.full_like(matched, -2), matched)


def resize_mask(mask: Tensor, height: int, width: int) -> Tensor:
    """A chip's unlabelled mask brought to the image's size after a resize (nearest neighbour), so
    it stays on the pixels it marks when a transform rescales the image and its boxes."""
    if tuple(mask.shape[-2:]) == (height, width):
        return mask
    m = torch.nn.functional.interpolate(mask[None, None].float(), size=(height, width), mode="nearest")
    return m[0, 0] > 0.5
