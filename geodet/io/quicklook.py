"""A downsampled picture of a scene with detections drawn, coloured by class."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

MAX_SIDE = 1600


def quicklook(scene_path, detections, out_png, classes=None, max_side: int = MAX_SIDE, bands=None,
              min_score: float | None = None) -> Path:
    """Write a PNG of the scene (at most ``max_side`` px) with the boxes scoring ``min_score`` or
    more (None: every box given; callers pass the model's operating point). The threshold and the
    number of boxes drawn are written on the picture and logged."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from .writers import atomic_path
    from .labels import geoms_to_pixel_boxes
    from .scene import Scene

    sc = Scene(scene_path, bands=bands or None)
    show = sc.bands[:3] if sc.count >= 3 else sc.bands[:1]
    raw, _, scale = sc.overview(max_side, bands=show)
    oh, ow = raw.shape[1:]
    idx = [sc.bands.index(b) for b in show]
    lo = np.asarray(sc.stats["lo"])[idx][:, None, None]
    hi = np.asarray(sc.stats["hi"])[idx][:, None, None]
    img = np.clip((raw.astype(np.float32) - lo) / (hi - lo), 0, 1).transpose(1, 2, 0)
    if img.shape[2] == 1:
        img = img[:, :, 0]
    fig = Figure(figsize=(ow / 100, oh / 100), dpi=100)
    ax = fig.subplots()
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
    names = list(classes) if classes else sorted(set(detections["label"].astype(str)))
    cmap = matplotlib.colormaps["tab10"]
    if "score" in detections.columns and min_score is not None:
        detections = detections[detections["score"] >= min_score]
    if len(detections):
        det = detections
        if det.crs is not None and sc.crs is not None and det.crs != sc.crs:
            det = det.to_crs(sc.crs)
        boxes = geoms_to_pixel_boxes(det.geometry.values, sc.transform) / scale
        labels = det["label"].astype(str).to_numpy()
        for b, lab in zip(boxes, labels):
            k = names.index(lab) if lab in names else 0
            ax.add_patch(Rectangle((b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1], fill=False,
                                   edgecolor=cmap(k % 10), linewidth=0.8))
        for k, n in enumerate(names):
            ax.plot([], [], color=cmap(k % 10), label=n)
        ax.legend(loc="upper right", fontsize=8)
    what = f"{len(detections)} boxes" + (f" with score >= {min_score:.3g}" if min_score is not None else "")
    ax.text(4, 4, what, color="white", fontsize=8, va="top", ha="left",
            bbox={"facecolor": "black", "alpha": 0.6, "pad": 2, "edgecolor": "none"})
    ax.set_axis_off()
    fig.subplots_adjust(0, 0, 1, 1)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    logging.getLogger(__name__).info("quicklook %s: %s drawn", out_png, what)  # once it is there
    sc.close()
    return Path(out_png)
