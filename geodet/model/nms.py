"""Class- and tile-aware NMS for all tiles of a batch at once.

Two ways to the same greedy NMS (boxes by descending score, each kept box removes the later
boxes of its tile and class whose IoU with it exceeds the threshold):

- ``per_image``: torchvision's ``batched_nms`` tile by tile, the reference. On the CPU it is the
  decoder's only path, so CPU results never change.
- ``pairs``: one pass over the whole batch in tensors. The pairs of boxes that can exceed the
  threshold are found on a grid (no n^2 matrix), their IoU is computed with the formula of
  torchvision's CPU kernel, and the greedy result is reached by the fixed-point iteration of
  Cluster-NMS (Zheng et al., 2020): keep a box when no kept box before it suppresses it, repeated
  until nothing changes. The fixed point is unique, so it is exactly the greedy result; a few
  iterations reach it. No per-tile loop and no host sync per tile, which is what the GPU needs:
  torchvision's CUDA NMS walks its boxes serially in one thread block and syncs once per call.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import boxes as box_ops

NMS_METHODS = ("per_image", "pairs")
# pairs are generated for at most this many candidate boxes at once (memory: about 18 queries
# and their matches per box)
PAIR_CHUNK = 1 << 16
CHECK_EVERY = 4  # fixed-point iterations between convergence checks (each check is a host sync)
_MARGIN = 1e-3  # relative slack on the geometric bounds, far above float32 rounding
_MIN_CELL = 0.05  # px; a larger cell only adds candidates, never loses one


def tile_order(scores: Tensor, tiles: Tensor) -> Tensor:
    """Indices ordering boxes by tile, then by descending score, ties by position (the order of
    torchvision's stable sort within each tile's candidates)."""
    by_score = torch.sort(scores, descending=True, stable=True).indices
    return by_score[torch.sort(tiles[by_score], stable=True).indices]


def nms_tiles(boxes: Tensor, scores: Tensor, labels: Tensor, tiles: Tensor, n_tiles: int, iou: float, cap: int,
              method: str) -> Tensor:
    """Indices of the boxes kept (into the flat inputs), tile after tile, each tile's in
    descending score order, at most ``cap`` per tile. ``tiles`` (sorted ascending, as the
    decoder's candidates come) says which tile each box belongs to."""
    if method not in NMS_METHODS:
        raise ValueError(f"unknown NMS method {method!r}: {NMS_METHODS}")
    if len(scores) == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    if method == "per_image":
        return per_image_nms(boxes, scores, labels, tiles, n_tiles, iou, cap)
    order = tile_order(scores, tiles)
    keep = pair_nms_sorted(boxes[order], labels[order], tiles[order], iou)
    t = tiles[order]
    # the first ``cap`` kept boxes of each tile
    counts = torch.zeros(n_tiles + 1, dtype=torch.long, device=t.device)
    counts[1:] = torch.bincount(t, weights=keep.double(), minlength=n_tiles).long().cumsum(0)  # no sync
    rank = torch.cumsum(keep.long(), 0) - counts[t]  # 1-based rank among a tile's kept boxes
    return order[keep & (rank <= cap)]


def per_image_nms(boxes, scores, labels, tiles, n_tiles: int, iou: float, cap: int) -> Tensor:
    """torchvision's ``batched_nms`` on each tile's boxes, its first ``cap`` kept."""
    counts = torch.bincount(tiles, minlength=n_tiles).tolist()
    out, start = [], 0
    for n in counts:
        if n:
            sl = slice(start, start + n)
            out.append(box_ops.batched_nms(boxes[sl], scores[sl], labels[sl], iou)[:cap] + start)
        start += n
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=boxes.device)


def _above(iou: float) -> float:
    """The smallest float32 above ``iou``: ``x > iou`` (float32 ``x``, double ``iou``, as the
    CPU kernel compares) is ``x >= _above(iou)`` in float32."""
    t = np.float32(iou)
    if float(t) <= iou:
        t = np.nextafter(t, np.float32(np.inf))
    return float(t)


def pair_iou(b: Tensor, area: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """IoU of boxes ``i`` and ``j`` as torchvision's CPU NMS kernel computes it, in float32,
    operation for operation (so the same comparisons come out the same)."""
    bi, bj = b[i], b[j]
    w = (torch.minimum(bi[:, 2], bj[:, 2]) - torch.maximum(bi[:, 0], bj[:, 0])).clamp_(min=0)
    h = (torch.minimum(bi[:, 3], bj[:, 3]) - torch.maximum(bi[:, 1], bj[:, 1])).clamp_(min=0)
    inter = w * h
    return inter / (area[i] + area[j] - inter)


def suppression_pairs(b: Tensor, labels: Tensor, tiles: Tensor, iou: float) -> tuple[Tensor, Tensor]:
    """Every pair (i, j), i < j, of boxes of one tile and class whose IoU exceeds ``iou``, for
    boxes already in NMS order. Found on grids, never by comparing all pairs.

    Why nothing is missed: IoU > t needs, on each axis, an overlap of at least t times the longer
    side, so the sides differ by less than a factor 1/t and the centres by at most (1 - t) times
    the longer side. Boxes are put in size classes a factor R = (1 + margin) / t wide (longest
    side), so partners are in the same or the next class; each class has a grid whose cell is
    (1 - t) times the longest side in it and the class below, with a margin, so partners' centres
    lie in neighbouring cells."""
    dev = b.device
    n = len(b)
    if n < 2 or iou >= 1.0:
        return (torch.zeros(0, dtype=torch.long, device=dev),) * 2
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    side = torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]).double()
    ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])  # boxes without area have IoU 0 with all
    r = max((1.0 + _MARGIN) / iou, 1.1)  # wider classes only add candidates; this bounds their number
    level = torch.floor(torch.log(side.clamp(min=1e-30)) / math.log(r)).long()
    big = torch.iinfo(torch.long).max
    stats = torch.stack([torch.where(ok, level, big).min(), torch.where(ok, level, -big).max(), labels.max(),
                         tiles.max()])
    lo, hi, top_label, top_tile = stats.tolist()  # one host sync for the sizes below
    if lo > hi:  # no box with an area
        return (torch.zeros(0, dtype=torch.long, device=dev),) * 2
    level = torch.where(ok, level - lo, torch.zeros_like(level))
    n_levels = hi - lo + 2
    smax = torch.zeros(n_levels, dtype=torch.float64, device=dev).scatter_reduce(0, level, side * ok, "amax")
    smax = torch.cummax(smax, 0).values  # longest side in a class or any below it
    cell = (smax * ((1.0 - iou) * (1.0 + _MARGIN))).clamp(min=_MIN_CELL)
    cx, cy = (b[:, 0] + b[:, 2]).double() / 2, (b[:, 1] + b[:, 3]).double() / 2
    group = tiles * (top_label + 1) + labels
    if (top_tile + 1) * (top_label + 1) >= (1 << 21) // n_levels:  # keys hold 21 bits of (tile, class, size class)
        group = torch.unique(group, return_inverse=True)[1]
    group = group * n_levels  # + a size class: a box's (tile, class, size class)

    def key(gl: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return ((gl << 21) + (y + 1)) << 21 | (x + 1)

    own = key(group + level, torch.floor(cx / cell[level]).long(), torch.floor(cy / cell[level]).long())
    own = torch.where(ok, own, torch.full_like(own, -1))
    sorted_keys, by_key = torch.sort(own)
    pi, pj = [], []
    with_area = ok.nonzero()[:, 0]
    for start in range(0, len(with_area), PAIR_CHUNK):
        sl = with_area[start : start + PAIR_CHUNK]
        # 18 queries per box, built at once: size class and the next (axis 0), cell rows and
        # columns around its own (axes 1, 2)
        lv = level[sl] + torch.arange(2, device=dev)[:, None]  # [2, n]
        gx, gy = torch.floor(cx[sl] / cell[lv]).long(), torch.floor(cy[sl] / cell[lv]).long()
        d = torch.arange(-1, 2, device=dev)
        q = key((group[sl] + lv)[:, None, None, :], gx[:, None, None, :] + d[None, None, :, None],
                gy[:, None, None, :] + d[None, :, None, None]).reshape(-1)
        src = sl.expand(18, -1).reshape(-1)
        first = torch.searchsorted(sorted_keys, q, side="left")
        count = torch.searchsorted(sorted_keys, q, side="right") - first
        total = int(count.sum())
        if total == 0:
            continue
        a = torch.repeat_interleave(src, count, output_size=total)
        offs = torch.arange(total, device=dev) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count,
                                                                         output_size=total)
        c = by_key[torch.repeat_interleave(first, count, output_size=total) + offs]
        i, j = torch.minimum(a, c), torch.maximum(a, c)
        # a pair in one size class is found from both sides: keep it once
        once = (i != j) & ((level[a] != level[c]) | (a < c))
        i, j = i[once], j[once]
        hit = pair_iou(b, area, i, j) >= _above(iou)
        pi.append(i[hit])
        pj.append(j[hit])
    if not pi:
        return (torch.zeros(0, dtype=torch.long, device=dev),) * 2
    return torch.cat(pi), torch.cat(pj)


def pair_nms_sorted(b: Tensor, labels: Tensor, tiles: Tensor, iou: float) -> Tensor:
    """Greedy NMS (a mask of the boxes kept) for boxes in NMS order (``tile_order``), by the
    Cluster-NMS fixed point over the suppressing pairs."""
    n = len(b)
    i, j = suppression_pairs(b, labels, tiles, iou)
    keep = torch.ones(n, dtype=torch.bool, device=b.device)
    if len(i) == 0:
        return keep
    while True:
        for _ in range(CHECK_EVERY):
            before = keep
            hits = torch.zeros(n, dtype=torch.int32, device=b.device).index_add_(0, j, keep[i].int())
            keep = hits == 0
        if torch.equal(keep, before):  # one step changed nothing: the (unique) fixed point
            return keep
