"""Augmentations for training chips (float32 ``[C, H, W]`` in 0..1, boxes ``[N, 4]`` in chip pixels,
and an optional boolean ``[H, W]`` mask of never-labelled pixels that follows the geometry).

- ``geometric``: flips and 90-degree rotations (the dihedral group: aerial views have no "up").
- ``radiometric``: mild brightness and contrast.
- ``photometric``: hue and saturation jitter (3-band images) and a gain per band (any band count).
- ``rescale``: a chip read at another size resampled to the model's tile (scale jitter).
- ``InstanceBank``: copy-paste of labelled objects onto other labelled places of a chip.
"""

from __future__ import annotations

import numpy as np
import torch


def geometric(img: np.ndarray, boxes: np.ndarray, rng, mask: np.ndarray | None = None):
    """Random flips and 90-degree rotations; boxes and ``mask`` follow the pixels."""
    _, h, w = img.shape
    b = boxes.copy()
    if rng.random() < 0.5:  # horizontal flip
        img = img[:, :, ::-1]
        mask = None if mask is None else mask[:, ::-1]
        b[:, [0, 2]] = w - b[:, [2, 0]]
    if rng.random() < 0.5:  # vertical flip
        img = img[:, ::-1, :]
        mask = None if mask is None else mask[::-1, :]
        b[:, [1, 3]] = h - b[:, [3, 1]]
    k = int(rng.integers(4))
    for _ in range(k):  # rotate 90 degrees counter-clockwise: (x, y) -> (y, W - x)
        img = np.rot90(img, 1, axes=(1, 2))
        mask = None if mask is None else np.rot90(mask, 1)
        h, w = w, h
        b = np.stack([b[:, 1], h - b[:, 2], b[:, 3], h - b[:, 0]], axis=1) if len(b) else b
    return img, b, mask


def radiometric(img: np.ndarray, rng) -> np.ndarray:
    """Mild contrast and brightness jitter, clipped to 0..1."""
    contrast = rng.uniform(0.85, 1.15)
    bright = rng.uniform(-0.08, 0.08)
    return np.clip((img - 0.5) * contrast + 0.5 + bright, 0, 1).astype(np.float32)


def photometric(img: np.ndarray, rng, strength: float) -> np.ndarray:
    """Hue (+/- 0.03 x strength of the colour circle) and saturation (x 1 +/- 0.3 x strength) on
    3-band images, through torchvision; then a gain of 1 +/- 0.1 x strength per band, any band
    count. Pixels at 0 (nodata, padding) stay 0."""
    if strength <= 0:
        return img
    x = torch.from_numpy(np.ascontiguousarray(img))
    if x.shape[0] == 3:
        from torchvision.transforms.v2 import functional as TF

        x = TF.adjust_saturation(x, float(rng.uniform(1 - 0.3 * strength, 1 + 0.3 * strength)))
        x = TF.adjust_hue(x, float(rng.uniform(-0.03 * strength, 0.03 * strength)))
    gain = rng.uniform(1 - 0.1 * strength, 1 + 0.1 * strength, size=(x.shape[0], 1, 1)).astype(np.float32)
    return np.clip(x.numpy() * gain, 0, 1).astype(np.float32)


def rescale(img: np.ndarray, boxes: np.ndarray, size: int, mask: np.ndarray | None = None):
    """A square chip resampled to ``size`` px (bilinear, antialiased when shrinking); boxes scale
    with it and ``mask`` is resampled by nearest neighbour."""
    s = img.shape[-1]
    if s == size:
        return img, boxes, mask
    f = size / s
    x = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(img))[None], size=(size, size),
                                        mode="bilinear", align_corners=False, antialias=f < 1)[0]
    if mask is not None:
        m = torch.from_numpy(np.ascontiguousarray(mask))[None, None].float()
        mask = torch.nn.functional.interpolate(m, size=(size, size), mode="nearest")[0, 0].numpy() > 0.5
    return x.clamp(0, 1).numpy(), boxes * f, mask


class InstanceBank:
    """Labelled objects cut out once (a box and a margin of ``margin`` px), pasted onto chips at
    random places that are labelled, inside the image's valid pixels and clear of every box (the
    chip's labels and earlier pastes), with a feathered margin so no hard seam marks them."""

    def __init__(self, crops: list[np.ndarray], labels: list[int], margin: int):
        self.crops, self.labels, self.margin = crops, labels, int(margin)

    def __len__(self) -> int:
        return len(self.crops)

    @staticmethod
    def _alpha(h: int, w: int, margin: int) -> np.ndarray:
        """1 over the object's box, falling linearly to 0 across the margin."""
        if margin <= 0:
            return np.ones((h, w), np.float32)
        ys = np.minimum(np.arange(h), np.arange(h)[::-1]).astype(np.float32)
        xs = np.minimum(np.arange(w), np.arange(w)[::-1]).astype(np.float32)
        a = np.minimum.outer(ys, xs)
        return np.clip((a + 1) / (margin + 1), 0, 1)

    def paste(self, img: np.ndarray, boxes: np.ndarray, labels: np.ndarray, occupied: np.ndarray, rng,
              count: int, unlabelled: np.ndarray | None = None, valid: np.ndarray | None = None):
        """Paste up to ``count`` random objects into ``img`` (in place); returns the boxes and
        labels with the pasted ones appended. ``occupied``: every box of the chip's pixels (also
        those too clipped to be targets), which no paste may touch."""
        _, H, W = img.shape
        taken = [np.asarray(occupied, np.float64).reshape(-1, 4)]
        new_b, new_l = [], []
        m = self.margin
        for _ in range(count):
            j = int(rng.integers(len(self.crops)))
            crop = self.crops[j]
            if rng.random() < 0.5:
                crop = crop[:, :, ::-1]
            if rng.random() < 0.5:
                crop = crop[:, ::-1, :]
            if rng.random() < 0.5:
                crop = np.swapaxes(crop, 1, 2)
            _, h, w = crop.shape
            if h > H or w > W:
                continue
            for _ in range(10):
                x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
                box = np.array([x + m, y + m, x + w - m, y + h - m], np.float64)
                all_taken = np.concatenate(taken)
                if len(all_taken):
                    # clear of every box, margin included
                    ix = np.minimum(all_taken[:, 2], x + w) - np.maximum(all_taken[:, 0], x)
                    iy = np.minimum(all_taken[:, 3], y + h) - np.maximum(all_taken[:, 1], y)
                    if ((ix > 0) & (iy > 0)).any():
                        continue
                if unlabelled is not None and unlabelled[y : y + h, x : x + w].any():
                    continue
                if valid is not None and not valid[y : y + h, x : x + w].all():
                    continue
                a = self._alpha(h, w, m)
                region = img[:, y : y + h, x : x + w]
                region[...] = a * crop + (1 - a) * region
                taken.append(box[None])
                new_b.append(box)
                new_l.append(self.labels[j])
                break
        if not new_b:
            return boxes, labels
        return (np.concatenate([boxes.reshape(-1, 4), np.array(new_b)]),
                np.concatenate([labels, np.array(new_l, dtype=labels.dtype)]))
