"""Test-time augmentation: the model runs on flipped and turned copies of each tile (aerial views
have no "up"), each view's boxes are mapped back, and the views' boxes of one object are fused.

Fusion (as weighted box fusion, Solovyev et al. 2021): the views' boxes are clustered around the
highest-scoring ones (class by class, IoU at least ``fuse_iou``); a cluster's box is the
score-weighted mean of its members and its score their summed score over the number of views,
so an object every view found keeps its score and a box one view alone saw drops to a fraction
of it. ``TtaModel`` behaves as a geodet model for the pipeline (``card``, ``predict``), so
``detect_scene`` runs it like any other.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou

# (horizontal flip, quarter turns counter-clockwise): the four views that need no square tile, and
# the four more of the dihedral group for square tiles
VIEWS_ANY = ((False, 0), (True, 0), (False, 2), (True, 2))
VIEWS_SQUARE = VIEWS_ANY + ((False, 1), (True, 1), (False, 3), (True, 3))


def view(batch: Tensor, flip: bool, k: int) -> Tensor:
    if flip:
        batch = batch.flip(-1)
    return torch.rot90(batch, k, dims=(-2, -1)) if k else batch


def unview_boxes(b: Tensor, flip: bool, k: int, h: int, w: int) -> Tensor:
    """Boxes found in ``view(batch, flip, k)`` of an ``h`` x ``w`` image, in the image's pixels."""
    b = b.clone()
    # undo the turns: a quarter turn counter-clockwise maps (x, y) of a (w, h) image to (y, w - x)
    # of the (h, w) view; its inverse maps (u, v) of the view to (w - v, u)
    hh, ww = (w, h) if k % 2 else (h, w)  # the view's height and width
    for _ in range(k % 4):
        # view (height hh, width ww) came from a (height ww, width hh) image by one turn
        x0, y0, x1, y1 = b.unbind(-1)
        b = torch.stack([hh - y1, x0, hh - y0, x1], -1)
        hh, ww = ww, hh
    if flip:
        x0, y0, x1, y1 = b.unbind(-1)
        b = torch.stack([w - x1, y0, w - x0, y1], -1)
    return b


def fuse(boxes: Tensor, scores: Tensor, labels: Tensor, n_views: int, fuse_iou: float, cap: int,
         views: Tensor | None = None) -> dict:
    """One box per object from the boxes of ``n_views`` views (see the module's note); ``views``
    (each box's view) lets a view vote once per object: its best box in a cluster counts, not a
    second box it kept beside it (possible where the model's NMS IoU is above ``fuse_iou``)."""
    if boxes.numel() == 0:
        return {"boxes": boxes, "scores": scores, "labels": labels}
    leaders = batched_nms(boxes, scores, labels, fuse_iou)
    iou = box_iou(boxes[leaders], boxes)
    iou[labels[leaders][:, None] != labels[None, :]] = 0
    best, owner = iou.max(0)
    member = best >= fuse_iou
    if views is not None:
        member &= _best_of_each_view(owner, scores, views, member, n_views)
    owner, w = owner[member], scores[member]
    n = len(leaders)
    fused = torch.zeros((n, 4), dtype=boxes.dtype, device=boxes.device).index_add_(0, owner, boxes[member] * w[:, None])
    total = torch.zeros(n, dtype=scores.dtype, device=scores.device).index_add_(0, owner, w)
    fused = fused / total.clamp(min=1e-12)[:, None]
    score = (total / n_views).clamp(max=1.0)
    order = score.argsort(descending=True)[:cap]
    return {"boxes": fused[order], "scores": score[order], "labels": labels[leaders][order]}


def _best_of_each_view(owner: Tensor, scores: Tensor, views: Tensor, member: Tensor, n_views: int) -> Tensor:
    """Of the members of each cluster, the highest-scoring one of each view (ties: the first)."""
    idx = member.nonzero().squeeze(1)
    keep = torch.zeros_like(member)
    if len(idx) == 0:
        return keep
    order = idx[scores[idx].argsort(descending=True, stable=True)]
    key = owner[order] * n_views + views[order]
    _, inverse = torch.unique(key, return_inverse=True)
    pos = torch.arange(len(order), device=order.device)
    first = torch.full((int(inverse.max()) + 1,), len(order), dtype=pos.dtype, device=pos.device)
    first = first.scatter_reduce(0, inverse, pos, reduce="amin")
    keep[order[first]] = True
    return keep


def tta_card(card):
    """The card as TTA sees it: the operating point measured with TTA at validation where the
    card has one (``train.tta_operating_point``), else the card's own."""
    import dataclasses

    op = (card.extra or {}).get("tta_operating_point")
    return dataclasses.replace(card, operating_point=float(op)) if op is not None else card


class TtaModel(nn.Module):
    """A geodet model run on ``views`` (default: all eight dihedral views on square tiles, four on
    others) with the views' boxes fused. The wrapped model is not changed."""

    def __init__(self, model, views=None, fuse_iou: float = 0.55):
        super().__init__()
        self.model = model
        self.card = tta_card(model.card)
        self.source = None  # not the file's network: it runs in torch, never as the file's cached ONNX models
        self.views, self.fuse_iou = views, fuse_iou

    @torch.inference_mode()
    def predict(self, images, score_threshold=None, nms_iou=None, detections_per_tile=None, autocast_dtype=None,
                timings=None) -> list[dict]:
        batch = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
        h, w = int(batch.shape[-2]), int(batch.shape[-1])
        views = self.views or (VIEWS_SQUARE if h == w else VIEWS_ANY)
        cap = detections_per_tile or self.card.model.detections_per_tile
        per_image = [[] for _ in range(batch.shape[0])]
        for flip, k in views:
            out = self.model.predict(view(batch, flip, k), score_threshold=score_threshold, nms_iou=nms_iou,
                                     detections_per_tile=cap, autocast_dtype=autocast_dtype, timings=timings)
            for i, d in enumerate(out):
                which = torch.full((len(d["scores"]),), len(per_image[i]), dtype=torch.int64, device=d["scores"].device)
                per_image[i].append((unview_boxes(d["boxes"], flip, k, h, w), d["scores"], d["labels"], which))
        return [fuse(*(torch.cat([v[j] for v in vs]) for j in range(3)), len(views), self.fuse_iou, cap,
                     views=torch.cat([v[3] for v in vs])) for vs in per_image]

    def forward(self, images):
        return self.predict(images)
