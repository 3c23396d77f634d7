"""Adapting a trained model to another scene without labels: batch-norm statistics re-estimated on
the target scene's tiles (AdaBN, Li et al. 2016, arXiv 1603.04779).

A network trained from scratch normalises each layer with the mean and variance of its training
scene's activations. Another scene (another site, season, sensor or sun angle) shifts them, and
every layer after the first sees inputs off the scale it learnt. Re-estimating the statistics on
the target's own tiles (no labels, no gradient, a few seconds) puts them back on it; the weights
stay as trained.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch

from ..errors import GeodetError

log = logging.getLogger(__name__)


def _sample_tiles(paths, card, n: int, seed: int) -> list[torch.Tensor]:
    """Up to ``n`` random tiles (the model's tile size, mostly valid pixels) spread over ``paths``."""
    from ..io.scene import Scene
    from ..training.sampler import chip_tile

    rng = np.random.default_rng(seed)
    size = int(card.tile_size)
    out = []
    scenes = [Scene(p, bands=card.bands, gsd_m=card.gsd_m, percentiles=card.percentiles) for p in paths]
    try:
        for i in range(n * 3):
            sc = scenes[i % len(scenes)]
            x = int(rng.integers(0, max(1, sc.width - size + 1)))
            y = int(rng.integers(0, max(1, sc.height - size + 1)))
            img, frac = sc.read_tile(chip_tile(x, y, size, (0, 0, sc.width, sc.height)))
            if frac >= 0.5:
                out.append(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)))
            if len(out) >= n:
                break
    finally:
        for sc in scenes:
            sc.close()
    return out


@torch.no_grad()
def adapt_batch_norm(model, scenes, tiles: int = 64, batch_size: int = 4, seed: int = 0):
    """A copy of ``model`` whose BatchNorm statistics are those of ``scenes``' tiles (the caller's
    model is not changed). Models without BatchNorm layers (frozen or group norm) are refused."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise GeodetError("this model has no trainable batch-norm layers (frozen or group norm): there are no "
                          "statistics to adapt")
    images = _sample_tiles([str(p) for p in scenes], model.card, tiles, seed)
    if not images:
        raise GeodetError("no tile of the target scenes holds enough valid pixels to adapt to")
    adapted = copy.deepcopy(model).eval()
    adapted.source = None  # other weights than the file's: never the original's cached ONNX or int8 models
    for m in adapted.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative mean over every batch
            m.train()
    net = adapted.net
    for i in range(0, len(images), batch_size):
        x = net.transform(images[i : i + batch_size])[0].tensors
        net.backbone(x)
    adapted.eval()
    adapted.card.extra["adapted_to"] = {"scenes": [str(p) for p in scenes], "tiles": len(images), "method": "AdaBN"}
    log.info("batch-norm statistics of %d layer(s) re-estimated on %d tile(s) of %s", len(bns), len(images),
             ", ".join(str(p) for p in scenes))
    return adapted
