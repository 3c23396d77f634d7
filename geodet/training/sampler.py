"""Training chips: where they are (``ChipWindows``, pure geometry like ``TileGrid``), and what
they hold (``ChipDataset``, which reads them, clips the labels and augments)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..io.labels import LabelBoxes, clip_boxes
from ..io.scene import Scene
from ..pipeline.grid import Tile


@dataclass
class TrainScene:
    scene: Scene
    labels: LabelBoxes
    area: tuple[int, int, int, int]  # x0, y0, x1, y1 of the part used for training
    labels_path: str


def chip_tile(x: int, y: int, size: int, area) -> Tile:
    """A ``size`` square chip at (x, y), its valid part clipped to ``area``."""
    x1, y1 = min(x + size, area[2]), min(y + size, area[3])
    return Tile(-1, 0, 0, x, y, size, size, (x, y, x1, y1), (x, y, x1, y1))


class ChipWindows:
    """Chip windows over training areas: most centred near a label box (jittered by a third of
    a chip), a ``negative_fraction`` anywhere in the area. No I/O."""

    def __init__(self, areas: list[tuple], boxes: list[np.ndarray], size: int, negative_fraction: float):
        self.areas, self.size, self.negative_fraction = areas, int(size), float(negative_fraction)
        self.inside = []
        for (ax0, ay0, ax1, ay1), b in zip(areas, boxes):
            keep = (b[:, 0] >= ax0) & (b[:, 2] <= ax1) & (b[:, 1] >= ay0) & (b[:, 3] <= ay1)
            self.inside.append(b[keep])
        w = np.array([max(len(b), 1) for b in boxes], float)
        self.scene_p = w / w.sum()

    def draw(self, rng) -> tuple[int, Tile]:
        """(scene index, chip) drawn with ``rng``; the chip lies inside the area where it fits."""
        k = int(rng.choice(len(self.areas), p=self.scene_p))
        ax0, ay0, ax1, ay1 = self.areas[k]
        size, boxes = self.size, self.inside[k]
        if len(boxes) and rng.random() >= self.negative_fraction:
            b = boxes[rng.integers(len(boxes))]
            cx = (b[0] + b[2]) / 2 + rng.uniform(-size / 3, size / 3)
            cy = (b[1] + b[3]) / 2 + rng.uniform(-size / 3, size / 3)
            x, y = int(cx - size / 2), int(cy - size / 2)
        else:
            x = int(rng.integers(ax0, max(ax0 + 1, ax1 - size + 1)))
            y = int(rng.integers(ay0, max(ay0 + 1, ay1 - size + 1)))
        x = int(np.clip(x, ax0, max(ax0, ax1 - size)))
        y = int(np.clip(y, ay0, max(ay0, ay1 - size)))
        return k, chip_tile(x, y, size, self.areas[k])


class ChipDataset(torch.utils.data.Dataset):
    """Chip ``i`` of epoch ``e`` is drawn from an RNG seeded by (seed, rank, e, i): the same chips
    whatever the number of workers. A chip with too much nodata is redrawn (up to 10 times)."""

    def __init__(self, scenes: list[TrainScene], tile_size: int, cfg, length: int, seed: int, rank: int = 0):
        for ts in scenes:
            ts.scene.stats  # computed once here, not in every worker
        self.scenes = scenes
        self.windows = ChipWindows([s.area for s in scenes], [s.labels.boxes for s in scenes], tile_size,
                                   cfg.negative_fraction)
        self.size, self.cfg, self.length, self.seed, self.rank = tile_size, cfg, length, seed, rank
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.rank, self.epoch, i])
        for _ in range(10):
            k, tile = self.windows.draw(rng)
            ts = self.scenes[k]
            img, frac = ts.scene.read_tile(tile)
            # valid fraction over the whole chip (padding counts as nodata)
            vx0, vy0, vx1, vy1 = tile.valid
            frac *= (vx1 - vx0) * (vy1 - vy0) / float(self.size * self.size)
            if frac >= 1.0 - self.cfg.max_nodata_fraction:
                break
        boxes, keep = clip_boxes(ts.labels.boxes, tile.valid, self.cfg.min_visibility)
        labels = ts.labels.labels[keep]
        if self.cfg.augment:
            img, boxes = augment(img, boxes, rng)
        return torch.from_numpy(np.ascontiguousarray(img)), torch.from_numpy(boxes).float(), torch.from_numpy(labels)


def augment(img: np.ndarray, boxes: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """Flips, 90-degree rotations and mild brightness/contrast jitter; boxes follow the pixels."""
    _, h, w = img.shape
    b = boxes.copy()
    if rng.random() < 0.5:  # horizontal flip
        img = img[:, :, ::-1]
        b[:, [0, 2]] = w - b[:, [2, 0]]
    if rng.random() < 0.5:  # vertical flip
        img = img[:, ::-1, :]
        b[:, [1, 3]] = h - b[:, [3, 1]]
    k = int(rng.integers(4))
    for _ in range(k):  # rotate 90 degrees counter-clockwise: (x, y) -> (y, W - x)
        img = np.rot90(img, 1, axes=(1, 2))
        h, w = w, h
        b = np.stack([b[:, 1], h - b[:, 2], b[:, 3], h - b[:, 0]], axis=1) if len(b) else b
    contrast = rng.uniform(0.85, 1.15)
    bright = rng.uniform(-0.08, 0.08)
    img = np.clip((img - 0.5) * contrast + 0.5 + bright, 0, 1).astype(np.float32)
    return img, b


def collate_chips(batch):
    images = torch.stack([b[0] for b in batch])
    targets = [{"boxes": b[1].reshape(-1, 4), "labels": b[2].long()} for b in batch]
    return images, targets
