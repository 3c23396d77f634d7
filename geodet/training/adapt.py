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


def _sample_tiles(paths, card, n: int, seed: int, settings) -> tuple[list[torch.Tensor], list[str]]:
    """Up to ``n`` random tiles (the model's tile size, mostly valid pixels) spread over ``paths``,
    opened as detection opens them (``settings``: bands, resolution, scaling; the same checks),
    and the paths they came from. A scene that cannot be opened, and a tile GDAL cannot read,
    is passed over with a warning (the detection job reports them)."""
    from ..errors import ReadError
    from ..io.scene import gdal_env
    from ..pipeline.reader import open_scene
    from ..training.sampler import chip_tile

    rng = np.random.default_rng(seed)
    size = int(settings.tile_size)
    out = []
    scenes, errors = [], []
    for p in paths:
        try:
            scenes.append(open_scene(p, settings, card, warn=False))
        except GeodetError as e:
            errors.append((p, e))
    if not scenes:  # the error says it, once
        raise errors[-1][1] if errors else GeodetError("no scene to adapt to")
    for p, e in errors:  # the others are adapted to
        log.warning("not adapting to %s: %s", p, e)
    used = set()
    try:
        with gdal_env():
            for i in range(n * 3):
                sc = scenes[i % len(scenes)]
                x = int(rng.integers(0, max(1, sc.width - size + 1)))
                y = int(rng.integers(0, max(1, sc.height - size + 1)))
                try:
                    # the valid fraction counts the part of the tile inside the scene (a small scene whole)
                    img, frac = sc.read_tile(chip_tile(x, y, size, (0, 0, sc.width, sc.height)))
                except ReadError as e:
                    log.warning("not adapting to an unreadable tile: %s", e)
                    continue
                if frac >= 0.5:
                    out.append(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)))
                    used.add(i % len(scenes))
                if len(out) >= n:
                    break
    finally:
        for sc in scenes:
            sc.close()
    return out, [scenes[k].path for k in sorted(used)]


@torch.no_grad()
def adapt_batch_norm(model, scenes, tiles: int = 64, batch_size: int = 4, seed: int = 0, settings=None):
    """A copy of ``model`` whose BatchNorm statistics are those of ``scenes``' tiles (the caller's
    model is not changed), read as detection with ``settings`` (``DetectSettings``; default: the
    model card's) will read them. Models without BatchNorm layers (frozen or group norm) are
    refused."""
    from ..model.network import GeodetModel
    from ..pipeline.scenes import scene_paths

    if not isinstance(model, GeodetModel):  # an ONNX model, a path: their statistics are not torch's to change
        raise GeodetError(f"adapt_batch_norm adapts a geodet torch model (geodet.load_model('model.pt')), not "
                          f"{type(model).__name__}")
    scenes = scene_paths(scenes)  # one scene's path alone is one scene, not its characters
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise GeodetError("this model has no trainable batch-norm layers (frozen or group norm): there are no "
                          "statistics to adapt: detect without --adapt")
    if settings is None:
        from ..pipeline.settings import resolve_detect_settings

        settings = resolve_detect_settings(model.card)
    images, used = _sample_tiles([str(p) for p in scenes], model.card, tiles, seed, settings)
    if not images:
        raise GeodetError("no tile of the target scenes holds enough valid pixels to adapt to (mostly nodata?): "
                          "detect without --adapt")
    source = getattr(model, "source", None) or {}
    adapted = copy.deepcopy(model).eval()
    adapted.source = None  # other weights than the file's: never the original's cached ONNX or int8 models
    layers = [m for m in adapted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative mean over every batch
        m.train()
    net = adapted.net
    device = next(adapted.parameters()).device
    for i in range(0, len(images), batch_size):
        x = net.transform([t.to(device) for t in images[i : i + batch_size]])[0].tensors
        net.backbone(x)
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum  # as trained, for whoever fine-tunes the copy
    adapted.eval()
    adapted.card.extra["adapted_to"] = {"scenes": used, "tiles": len(images), "method": "AdaBN",
                                      "model": {"path": source.get("path"), "sha256": source.get("sha256")}}
    log.info("batch-norm statistics of %d layer(s) re-estimated on %d tile(s) of %s", len(bns), len(images),
             ", ".join(used))
    return adapted
