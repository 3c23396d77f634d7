"""Training chips: where they are (``ChipWindows``, pure geometry like ``TileGrid``), and what
they hold (``ChipDataset``, which reads them, clips the labels, marks the pixels nobody labelled
and augments)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..io.labels import LabelBoxes, clip_boxes
from ..io.scene import Scene
from ..pipeline.grid import Tile
from . import augment as aug
from .area import centres_inside, random_point, unlabelled_mask, within

log = logging.getLogger(__name__)
BANK_MAX = 512  # labelled objects kept for copy-paste
PASTE_MAX = 8  # objects pasted into one chip at most


@dataclass
class TrainScene:
    scene: Scene
    labels: LabelBoxes
    area: tuple[int, int, int, int]  # x0, y0, x1, y1 of the part used for training (chips stay inside)
    labels_path: str
    # where the labels are complete, in the scene's pixels (a shapely geometry); None: everywhere
    labelled: Optional[Any] = None
    kind: str = "labels"  # "labels" (the user's) or "pseudo" (a teacher's, see selftrain.py)
    full_area: Optional[tuple] = None  # the area before a validation strip was cut from it
    held_out: Optional[tuple] = None  # a validation strip (x0, y0, x1, y1): its labels never train

    def teach(self):
        """Where this scene's chips may teach (labels and background): the labelled area inside
        ``area``, without the held-out strip; None when that is the whole scene."""
        from shapely.geometry import box

        whole = (0, 0, self.scene.width, self.scene.height)
        if self.labelled is None and tuple(self.area) == whole and self.held_out is None:
            return None
        geom = box(*self.area) if self.labelled is None else self.labelled.intersection(box(*self.area))
        if self.held_out is not None:
            geom = geom.difference(box(*self.held_out))
        import shapely

        shapely.prepare(geom)
        return geom

    def training_boxes(self) -> np.ndarray:
        """Which labels a chip may hold: all but those centred in the held-out strip, and those
        mostly outside the scene (their place is ignored, as a box a chip's edge cuts)."""
        b = self.labels.boxes
        ok = np.ones(len(b), bool) if self.labels.cut is None else ~self.labels.cut
        if self.held_out is None:
            return ok
        return ok & ~within_centres(b, self.held_out)


def within_centres(boxes: np.ndarray, rect) -> np.ndarray:
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    return (cx >= rect[0]) & (cx < rect[2]) & (cy >= rect[1]) & (cy < rect[3])


def chip_tile(x: int, y: int, size: int, area) -> Tile:
    """A ``size`` square chip at (x, y), its valid part clipped to ``area``."""
    x1, y1 = min(x + size, area[2]), min(y + size, area[3])
    return Tile(-1, 0, 0, x, y, size, size, (x, y, x1, y1), (x, y, x1, y1))


class ChipWindows:
    """Chip windows over training areas: most centred near a label box (jittered by a third of
    a chip), a ``negative_fraction`` centred anywhere in the labelled part of the area. No I/O.

    A chip stays inside its area's rectangle, or, with ``bounds`` (per area: the scene's
    rectangle), inside the scene: it then reaches past the area into real pixels, which the
    caller marks as unlabelled."""

    def __init__(self, areas: list[tuple], boxes: list[np.ndarray], size: int, negative_fraction: float,
                 labelled: list | None = None, pseudo: list | None = None, pseudo_share: float = 0.0,
                 bounds: list | None = None):
        """``pseudo``: which areas hold a teacher's boxes; they get ``pseudo_share`` of the chips
        (when there are any), the user's areas the rest, each group by its box count."""
        self.areas, self.size, self.negative_fraction = areas, int(size), float(negative_fraction)
        self.labelled = labelled or [None] * len(areas)
        self.bounds = bounds or list(areas)
        self.inside = []
        for rect, b, geom in zip(areas, boxes, self.labelled):
            self.inside.append(b[within(b, rect) & centres_inside(geom, b)])
        w = np.array([max(len(b), 1) for b in self.inside], float)
        pseudo = np.zeros(len(areas), bool) if pseudo is None else np.asarray(pseudo, bool)
        share = float(pseudo_share) if pseudo.any() and (~pseudo).any() else float(pseudo.all())
        self.scene_p = np.where(pseudo, share * w / max(w[pseudo].sum(), 1e-9),
                                (1 - share) * w / max(w[~pseudo].sum(), 1e-9))
        self.scene_p /= self.scene_p.sum()

    def draw(self, rng, size: int | None = None) -> tuple[int, Tile]:
        """(scene index, chip of ``size`` px, default the chip size) drawn with ``rng``; the chip
        lies inside the area where it fits."""
        k = int(rng.choice(len(self.areas), p=self.scene_p))
        ax0, ay0, ax1, ay1 = self.areas[k]
        size, boxes = int(size or self.size), self.inside[k]
        if len(boxes) and rng.random() >= self.negative_fraction:
            b = boxes[rng.integers(len(boxes))]
            cx = (b[0] + b[2]) / 2 + rng.uniform(-size / 3, size / 3)
            cy = (b[1] + b[3]) / 2 + rng.uniform(-size / 3, size / 3)
        elif self.labelled[k] is None:
            cx = rng.integers(ax0, max(ax0 + 1, ax1 - size + 1)) + size / 2
            cy = rng.integers(ay0, max(ay0 + 1, ay1 - size + 1)) + size / 2
        else:
            cx, cy = random_point(self.labelled[k], self.areas[k], rng)
        bx0, by0, bx1, by1 = self.bounds[k]
        x, y = int(cx - size / 2), int(cy - size / 2)
        x = int(np.clip(x, bx0, max(bx0, bx1 - size)))
        y = int(np.clip(y, by0, max(by0, by1 - size)))
        return k, chip_tile(x, y, size, self.bounds[k])


def instance_bank(scenes: list[TrainScene], seed: int, margin: int = 3) -> aug.InstanceBank:
    """Up to ``BANK_MAX`` labelled objects (inside the training areas and labelled parts), cut out
    of their scenes once with ``margin`` px around each."""
    rng = np.random.default_rng([seed, 7])
    cands = []
    for k, ts in enumerate(scenes):
        b = ts.labels.boxes
        ok = within(b + [-margin, -margin, margin, margin], ts.area) & centres_inside(ts.labelled, b)
        cands += [(k, i) for i in np.flatnonzero(ok)]
    if len(cands) > BANK_MAX:
        cands = [cands[i] for i in sorted(rng.choice(len(cands), BANK_MAX, replace=False))]
    crops, labels = [], []
    for k, i in cands:
        ts = scenes[k]
        x0, y0, x1, y1 = ts.labels.boxes[i]
        x0, y0 = int(np.floor(x0)) - margin, int(np.floor(y0)) - margin
        x1, y1 = int(np.ceil(x1)) + margin, int(np.ceil(y1)) + margin
        tile = Tile(-1, 0, 0, x0, y0, x1 - x0, y1 - y0, (x0, y0, x1, y1), (x0, y0, x1, y1))
        img, frac = ts.scene.read_tile(tile)
        if frac < 1.0:
            continue
        crops.append(img)
        labels.append(int(ts.labels.labels[i]))
    return aug.InstanceBank(crops, labels, margin)


class ChipDataset(torch.utils.data.Dataset):
    """Chip ``i`` of epoch ``e`` is drawn from an RNG seeded by (seed, rank, e, i): the same chips
    whatever the number of workers. A chip with too much nodata is redrawn (up to 10 times).

    Each item is ``(image [C, S, S], boxes [N, 4], labels [N], unlabelled)``, ``unlabelled`` a
    boolean ``[S, S]`` tensor of the pixels outside the labelled area, or None when the chip lies
    wholly inside it."""

    def __init__(self, scenes: list[TrainScene], tile_size: int, cfg, length: int, seed: int, rank: int = 0):
        self.size, self.cfg, self.length, self.seed, self.rank = tile_size, cfg, length, seed, rank
        self.set_scenes(scenes)
        self.epoch = 0
        self.bank = instance_bank(scenes, seed) if cfg.augment and cfg.copy_paste > 0 else None
        if self.bank is not None and len(self.bank) == 0:
            log.warning("copy-paste: no labelled object lies wholly inside the training area; pasting is off")
            self.bank = None

    def set_scenes(self, scenes: list[TrainScene], pseudo_share: float = 0.0) -> None:
        """Draw chips from ``scenes`` from now on (a self-training round adds the teacher's)."""
        for ts in scenes:
            ts.scene.stats  # computed once here, not in every worker
        self.scenes, self.pseudo_share = scenes, pseudo_share
        self.teach = [s.teach() for s in scenes]
        self.boxes_ok = [s.training_boxes() for s in scenes]
        context = getattr(self.cfg, "chip_context", False)
        bounds = [(0, 0, s.scene.width, s.scene.height) for s in scenes] if context else None
        self.windows = ChipWindows([s.area for s in scenes], [s.labels.boxes[ok] for s, ok in zip(scenes, self.boxes_ok)],
                                   self.size, self.cfg.negative_fraction, self.teach,
                                   [s.kind == "pseudo" for s in scenes], pseudo_share, bounds)

    def __len__(self) -> int:
        return self.length

    def _read_size(self, rng) -> int:
        j = self.cfg.scale_jitter if self.cfg.augment else 0.0
        if j <= 0:
            return self.size
        # a chip of S px resampled to the tile: objects appear at size / S of their size
        s = float(np.exp(rng.uniform(np.log(1 - min(j, 0.9)), np.log(1 + j))))
        return max(8, int(round(self.size / s)))

    def _labels_and_mask(self, k: int, tile: Tile, read: int):
        """The chip's labels (in chip pixels) and its unlabelled mask: pixels outside where the
        scene may teach, and the visible part of every box the visibility rule cut away (an
        object is there; it is neither a label nor background)."""
        ts = self.scenes[k]
        src_boxes, src_labels = ts.labels.boxes[self.boxes_ok[k]], ts.labels.labels[self.boxes_ok[k]]
        boxes, keep = clip_boxes(src_boxes, tile.valid, self.cfg.min_visibility)
        seen, seen_keep = clip_boxes(src_boxes, tile.valid, 1e-9)
        held, _ = clip_boxes(ts.labels.boxes[~self.boxes_ok[k]], tile.valid, 1e-9)  # held-out objects reaching in
        cut = np.concatenate([seen[~keep[seen_keep]], held]) + [tile.valid[0] - tile.col_off,
                                                              tile.valid[1] - tile.row_off] * 2
        unlabelled = unlabelled_mask(self.teach[k], tile.col_off, tile.row_off, read, read)
        if len(cut):
            unlabelled = np.zeros((read, read), bool) if unlabelled is None else unlabelled
            for x0, y0, x1, y1 in cut:
                unlabelled[int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))] = True
        return boxes + [tile.valid[0] - tile.col_off, tile.valid[1] - tile.row_off] * 2, src_labels[keep], unlabelled

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.rank, self.epoch, i])
        read = self._read_size(rng)
        for _ in range(10):
            k, tile = self.windows.draw(rng, read)
            ts = self.scenes[k]
            img, frac = ts.scene.read_tile(tile)
            # valid fraction over the whole chip (padding counts as nodata)
            vx0, vy0, vx1, vy1 = tile.valid
            frac *= (vx1 - vx0) * (vy1 - vy0) / float(read * read)
            if frac >= 1.0 - self.cfg.max_nodata_fraction:
                break
        boxes, labels, unlabelled = self._labels_and_mask(k, tile, read)
        if self.cfg.augment:
            img, boxes, unlabelled = aug.rescale(img, boxes, self.size, unlabelled)
            if self.bank is not None and rng.random() < self.cfg.copy_paste:
                f = self.size / read
                occupied, _ = clip_boxes(ts.labels.boxes[self.boxes_ok[k]], tile.valid, 1e-9)
                img = np.ascontiguousarray(img)
                boxes, labels = self.bank.paste(img, boxes, labels, occupied * f, rng, int(rng.integers(1, PASTE_MAX + 1)),
                                                unlabelled, img.any(axis=0))
            img, boxes, unlabelled = aug.geometric(img, boxes, rng, unlabelled)
            img = aug.radiometric(img, rng)
            img = aug.photometric(img, rng, self.cfg.photometric)
        mask = None if unlabelled is None or not unlabelled.any() else torch.from_numpy(np.ascontiguousarray(unlabelled))
        return (torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)), torch.from_numpy(boxes).float(),
                torch.from_numpy(labels), mask)


def augment(img: np.ndarray, boxes: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """Flips, 90-degree rotations and mild brightness/contrast jitter; boxes follow the pixels."""
    img, boxes, _ = aug.geometric(img, boxes, rng)
    return aug.radiometric(img, rng), boxes


def collate_chips(batch):
    images = torch.stack([b[0] for b in batch])
    targets = []
    for b in batch:
        t = {"boxes": b[1].reshape(-1, 4), "labels": b[2].long()}
        if len(b) > 3 and b[3] is not None:
            t["unlabelled"] = b[3]
        targets.append(t)
    return images, targets
