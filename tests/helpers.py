"""Test helpers: ID-coded scenes and a perfect per-tile detector."""

from __future__ import annotations

import numpy as np
import torch


def packed_boxes(width, height, min_size, max_size, seed=0, gap_choices=(0, 0, 1, 2)):
    """Dense, non-overlapping integer boxes (many touching) filling a width x height scene."""
    rng = np.random.default_rng(seed)
    occ = np.zeros((height, width), bool)
    boxes = []
    y = 0
    while y < height:
        row_h = int(rng.integers(min_size, max_size + 1))
        x = int(rng.integers(0, 3))
        while x < width:
            w = int(rng.integers(min_size, max_size + 1))
            h = int(rng.integers(min_size, row_h + 1))
            dy = int(rng.integers(0, row_h - h + 1))
            x1, y1 = min(x + w, width), min(y + dy + h, height)
            if x1 - x >= 2 and y1 - (y + dy) >= 2 and not occ[y + dy : y1, x:x1].any():
                occ[y + dy : y1, x:x1] = True
                boxes.append((x, y + dy, x1, y1))
            x = x1 + int(rng.choice(gap_choices))
        y += row_h + int(rng.choice(gap_choices))
    return np.array(boxes, dtype=np.int64)


def encode_ids(boxes, x0, y0, w, h, ids_of=None):
    """RGB uint8 block [3, h, w] where object i (1-based, or ``ids_of[i]``) has colour i."""
    ids = np.zeros((h, w), np.int64)
    numbers = range(1, len(boxes) + 1) if ids_of is None else ids_of
    for i, (a, b, c, d) in zip(numbers, boxes):
        xa, xb = max(a, x0), min(c, x0 + w)
        ya, yb = max(b, y0), min(d, y0 + h)
        if xa < xb and ya < yb:
            ids[ya - y0 : yb - y0, xa - x0 : xb - x0] = i
    return np.stack([(ids >> 16) & 255, (ids >> 8) & 255, ids & 255]).astype(np.uint8)


def write_id_scene(path, boxes, width, height, crs="EPSG:32633", transform=None, block=512):
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    transform = transform or from_origin(500000, 4600000, 0.5, 0.5)
    prof = dict(driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs=crs, transform=transform,
                tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    boxes = np.asarray(boxes)
    with rasterio.open(path, "w", **prof) as dst:
        for by in range(0, height, block):
            for bx in range(0, width, block):
                w, h = min(block, width - bx), min(block, height - by)
                sel = np.flatnonzero((boxes[:, 2] > bx) & (boxes[:, 0] < bx + w) & (boxes[:, 3] > by) & (boxes[:, 1] < by + h))
                dst.write(encode_ids(boxes[sel], bx, by, w, h, ids_of=sel + 1), window=Window(bx, by, w, h))
    return path


class PerfectDetector:
    """For each object visible in a tile: the box of its visible pixels, cut at the tile edge."""

    def __call__(self, batch):
        out = []
        arr = torch.round(batch * 255).to(torch.int64).cpu().numpy()
        for img in arr:
            ids = (img[0] << 16) | (img[1] << 8) | img[2]
            ys, xs = np.nonzero(ids)
            vals = ids[ys, xs]
            if len(vals) == 0:
                out.append({"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)})
                continue
            uniq, inv = np.unique(vals, return_inverse=True)
            n = len(uniq)
            x0 = np.full(n, 1 << 30); y0 = np.full(n, 1 << 30); x1 = np.full(n, -1); y1 = np.full(n, -1)
            np.minimum.at(x0, inv, xs); np.minimum.at(y0, inv, ys)
            np.maximum.at(x1, inv, xs + 1); np.maximum.at(y1, inv, ys + 1)
            boxes = np.stack([x0, y0, x1, y1], 1).astype(np.float32)
            out.append({"boxes": torch.from_numpy(boxes), "scores": torch.ones(n), "labels": torch.zeros(n, dtype=torch.int64)})
        return out


def match_counts(pred, truth, iou=0.9):
    """(duplicates, misses): greedy one-to-one matching of predicted to true boxes at ``iou``."""
    from torchvision.ops import box_iou

    if len(pred) == 0:
        return 0, len(truth)
    m = box_iou(torch.tensor(np.asarray(pred, np.float64)), torch.tensor(np.asarray(truth, np.float64))).numpy()
    matched_truth = set()
    dup = 0
    for i in np.argsort(-m.max(axis=1)):
        cands = [j for j in np.flatnonzero(m[i] >= iou) if j not in matched_truth]
        if cands:
            matched_truth.add(max(cands, key=lambda j: m[i, j]))
        else:
            dup += 1
    return dup, len(truth) - len(matched_truth)
