"""Self-supervised pretraining of the detector's own backbone and FPN on the user's unlabelled
imagery (``geodet pretrain``), written as a model file that ``geodet train --init`` starts from.

The method is dense VICReg (variance-invariance-covariance, arXiv 2105.04906, and its local
variant VICRegL, arXiv 2210.01571) with the loss from the ``lightly`` library: two views of one
chip, each a random crop rescaled to the tile (scale), flipped and turned (the dihedral group:
an aerial view has no "up") and recoloured (per-band gain, brightness and contrast, and hue and
saturation for 3-band images), so any band count and 16-bit scenes work. Each FPN level,
sampled at the same ground points in both views (the geometry between them is known), must
agree point by point, while the variance and covariance terms keep the features from
collapsing. Every FPN level gets this term, so every level's output conv learns, and the points
of all pairs of a batch make the variance and covariance terms' batch (hundreds of vectors, where
a global term on a batch of 4 pooled chips says little). A dense objective suits a detector of
small objects: what it learns is where things are, not one label per image.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import GeodetError, brief
from . import augment as aug

log = logging.getLogger(__name__)
POINTS = 64  # ground points sampled per chip pair for the dense loss
MIN_SCALE = 0.6  # a view covers at least this share of the chip's side
CONTEXT = 1.25  # a chip pair is cut from a window this much larger than a view


def require_lightly():
    try:
        from lightly.loss import VICRegLoss
    except ImportError:
        raise GeodetError("geodet pretrain needs the lightly library (its VICReg loss): pip install 'lightly==1.6.0'") from None
    return VICRegLoss


def dihedral_points(x: np.ndarray, y: np.ndarray, size: int, flip: bool, k: int):
    """Where the points (x, y) of a ``size`` square image go under ``geometric``'s transform: a
    horizontal flip, then ``k`` quarter turns counter-clockwise ((x, y) -> (y, size - x))."""
    if flip:
        x = size - x
    for _ in range(k):
        x, y = y, size - x
    return x, y


def _dihedral_image(img: np.ndarray, flip: bool, k: int) -> np.ndarray:
    if flip:
        img = img[:, :, ::-1]
    return np.rot90(img, k, axes=(1, 2)) if k else img


class ViewPairs(torch.utils.data.Dataset):
    """Pairs of views of random chips of ``scenes`` and, per pair, ``POINTS`` ground points as
    normalised coordinates in each view (for ``grid_sample``). Item ``i`` of epoch ``e`` comes
    from an RNG seeded by (seed, e, i)."""

    def __init__(self, scenes, size: int, length: int, seed: int, max_nodata: float = 0.5):
        for sc in scenes:
            sc.stats
        self.scenes, self.size, self.length, self.seed, self.max_nodata = scenes, int(size), length, seed, max_nodata
        self.window = int(round(size * CONTEXT))
        w = np.array([sc.width * sc.height for sc in scenes], float)
        self.p = w / w.sum()
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def _read(self, rng):
        from ..pipeline.grid import Tile

        W = self.window
        for _ in range(10):
            sc = self.scenes[int(rng.choice(len(self.scenes), p=self.p))]
            x = int(rng.integers(0, max(1, sc.width - W + 1)))
            y = int(rng.integers(0, max(1, sc.height - W + 1)))
            x1, y1 = min(x + W, sc.width), min(y + W, sc.height)
            img, frac = sc.read_tile(Tile(-1, 0, 0, x, y, W, W, (x, y, x1, y1), (x, y, x1, y1)))
            frac *= (x1 - x) * (y1 - y) / float(W * W)
            if frac >= 1 - self.max_nodata:
                break
        return img

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        base = self._read(rng)
        W, T = self.window, self.size
        crops = []
        for _ in range(2):
            side = int(round(W * rng.uniform(MIN_SCALE, 1.0)))
            crops.append((int(rng.integers(0, W - side + 1)), int(rng.integers(0, W - side + 1)), side))
        # ground points inside both crops (window pixels)
        ax, ay, a_s = crops[0]
        bx, by, b_s = crops[1]
        m = max(a_s, b_s) / T  # a view pixel in window pixels: keep the points off the views' edges
        lo_x, hi_x = max(ax, bx) + m, min(ax + a_s, bx + b_s) - m
        lo_y, hi_y = max(ay, by) + m, min(ay + a_s, by + b_s) - m
        px = rng.uniform(lo_x, hi_x, POINTS)
        py = rng.uniform(lo_y, hi_y, POINTS)
        views, grids = [], []
        for cx, cy, side in crops:
            img = base[:, cy : cy + side, cx : cx + side]
            img, _, _ = aug.rescale(img, np.zeros((0, 4)), T)
            flip, k = bool(rng.random() < 0.5), int(rng.integers(4))
            img = _dihedral_image(img, flip, k)
            img = aug.radiometric(np.ascontiguousarray(img), rng)
            img = aug.photometric(img, rng, 1.5)
            u = (px - cx) / side * T
            v = (py - cy) / side * T
            u, v = dihedral_points(u, v, T, flip, k)
            views.append(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)))
            grids.append(torch.from_numpy(np.stack([2 * u / T - 1, 2 * v / T - 1], 1).astype(np.float32)))
        return views[0], views[1], grids[0], grids[1]


class Projector(torch.nn.Module):
    """VICReg's expander: features to a wider embedding where the variance and covariance terms act."""

    def __init__(self, d_in: int, d_out: int = 256):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d_in, d_out), torch.nn.BatchNorm1d(d_out), torch.nn.ReLU(),
                                       torch.nn.Linear(d_out, d_out))

    def forward(self, x):
        return self.net(x)


def _open_scenes(scenes, cfg) -> list:
    from ..io.scene import scene_from_config

    if not scenes:
        raise GeodetError("no scenes to pretrain on: name one or more GeoTIFFs")
    opened = [scene_from_config(p, cfg.scene) for p in scenes]
    for sc in opened:
        sc.skip_hint = False
        if sc.count != opened[0].count:
            raise GeodetError(f"{sc.path}: {sc.count} band(s) where {opened[0].path} has {opened[0].count}: pretrain "
                              "on scenes of one sensor (or pick the same bands with --bands)")
    return opened


class DenseVICReg(torch.nn.Module):
    """The pretraining objective on a batch of view pairs: on every FPN level, the features at the
    same ground points of the two views go through that level's expander and VICReg's loss, so
    every level's output conv learns; the points of all pairs together (``POINTS`` x batch) make
    the batch the variance and covariance terms need."""

    def __init__(self, backbone, transform, levels: int, channels: int, loss_fn):
        super().__init__()
        self.backbone, self.loss_fn = backbone, loss_fn
        self.expanders = torch.nn.ModuleList(Projector(channels) for _ in range(levels))
        self.register_buffer("mean", torch.as_tensor(transform.image_mean, dtype=torch.float32)[:, None, None])
        self.register_buffer("std", torch.as_tensor(transform.image_std, dtype=torch.float32)[:, None, None])

    def forward(self, a, b, ga, gb, autocast) -> torch.Tensor:
        n = a.shape[0]
        with torch.autocast(a.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            feats = list(self.backbone((torch.cat([a, b]) - self.mean) / self.std).values())
        grid = torch.cat([ga, gb])[:, :, None, :]  # [2B, P, 1, 2]
        loss = 0.0
        for level, expander in zip(feats, self.expanders):
            pts = torch.nn.functional.grid_sample(level.float(), grid, align_corners=False)[..., 0]  # [2B, C, P]
            pts = pts.permute(0, 2, 1).reshape(2, n * pts.shape[2], -1)
            za, zb = expander(torch.cat([pts[0], pts[1]])).chunk(2)
            loss = loss + self.loss_fn(za, zb)
        return loss / len(self.expanders)


def _pretrain_loop(objective, data, opt, sched, budget, state, params, tc, device, autocast, bar) -> tuple[int, list]:
    """Steps until the budget is spent; returns (steps, losses)."""
    from ..io.scene import gdal_env

    losses, step = [], 0
    with gdal_env():
        while True:
            data.epoch += 1
            for a, b, ga, gb in torch.utils.data.DataLoader(data, batch_size=tc.batch_size, shuffle=False):
                loss = objective(*(t.to(device) for t in (a, b, ga, gb)), autocast)
                if not torch.isfinite(loss):
                    raise GeodetError(f"pretraining diverged at step {step} (learning rate {tc.lr:g}): lower it (--lr, or "
                                      "train.lr in a config)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                opt.step()
                step += 1
                budget.note_step(step)
                budget.check_warmup(step, tc.warmup_steps)
                state["progress"] = budget.progress(step)
                sched.step()
                losses.append(loss.item())
                bar.n = min(bar.total, round(budget.clock(step))) if budget.seconds else step
                bar.set_postfix(step=step, loss=f"{losses[-1]:.3f}")
                bar.refresh()
                if budget.stop_reason(step):
                    return step, losses


def _check_replaces_no_detector(out: Path, scenes) -> None:
    """Refuse, before any work, a backbone written over one of the run's scenes, a training run's
    model.pt, or a trained detector (a backbone file of an earlier pretrain is replaced)."""
    from ..io.outputs import check_not_an_input
    from ..model.card import ModelCard
    from ..model.file import read_model_file

    check_not_an_input(out, [(s, "a scene of this run") for s in scenes if isinstance(s, (str, os.PathLike))])
    if out.name == "model.pt" and any((out.parent / n).exists() for n in ("last.pt", "metrics.csv")):
        raise GeodetError(f"{out} is the model of the training run in {out.parent}: a backbone written there would "
                          f"replace it; give another name, e.g. {out.parent.parent / 'backbone.pt'}")
    if out.is_file():
        try:
            card = ModelCard.from_dict(read_model_file(out)["card"], source=str(out))
        except GeodetError as exc:  # a checkpoint, a damaged or newer model, anything else: not ours to replace
            raise GeodetError(f"{out} exists and is not a backbone of an earlier geodet pretrain ({brief(exc, 100)}); "
                              "pretrain replaces only those: give another name, e.g. backbone.pt") from None
        if not is_pretrain_only(card):
            raise GeodetError(f"{out} is a trained detector: a backbone written there would replace it; give another "
                              "name, e.g. backbone.pt")


def pretrain(scenes, out, cfg, minutes: float | None, progress: bool = True, max_steps: int | None = None) -> Path:
    """Pretrain ``cfg``'s backbone and FPN on ``scenes`` (paths) for ``minutes`` (and at most
    ``max_steps``); writes a model file (``out``) whose card says it is a pretrained backbone, for
    ``geodet train --init``."""
    from ..config import check_run_values
    from ..io.writers import check_output_path
    from ..model import build_model
    from ..pipeline.detect import resolve_device
    from ..progress import progress_bar
    from .inputs import normalisation
    from .loop import CpuShare, training_precision
    from .schedule import Budget, lr_factor, make_optimizer

    VICRegLoss = require_lightly()
    check_run_values(cfg)
    out = check_output_path(out, suffixes=(".pt",), example="backbone.pt")
    _check_replaces_no_detector(out, scenes)
    if minutes is not None and minutes <= 0:
        raise GeodetError("--time-limit must be a positive number of minutes")
    if max_steps is not None and max_steps <= 0:
        raise GeodetError("--max-steps must be a positive number of steps")
    if minutes is None and max_steps is None:
        raise GeodetError("pretraining needs --time-limit or --max-steps")
    tc = cfg.train
    torch.manual_seed(tc.seed)
    opened = _open_scenes(scenes, cfg)
    device = resolve_device(tc.device)
    tile = int(cfg.tiling.tile_size)
    size = min(tile, 256)  # views: the model's scale, smaller chips (more of them per second)
    model = build_model(cfg.model, bands=opened[0].bands, normalisation=normalisation(opened), tile_size=tile,
                        overlap=cfg.tiling.overlap, gsd_m=cfg.scene.gsd_m, percentiles=cfg.scene.percentiles)
    if cfg.model.pretrained != "none":
        log.info("pretraining from %s weights", cfg.model.pretrained)
    backbone = model.net.backbone.train()
    levels = cfg.model.levels[1] - cfg.model.levels[0] + 1
    objective = DenseVICReg(backbone, model.net.transform, levels, cfg.model.channels, VICRegLoss()).to(device)
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = make_optimizer(params, tc)
    budget = Budget(max_steps, None if minutes is None else minutes * 60)
    state = {"progress": 0.0}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, tc.warmup_steps, state["progress"]))
    data = ViewPairs(opened, size, 64 * tc.batch_size, tc.seed)
    usage = CpuShare()
    timed = budget.seconds is not None
    bar = progress_bar(total=round(budget.seconds) if timed else max_steps, unit="s" if timed else "step",
                       enabled=progress, desc=f"pretrain ({minutes:g} min)" if timed else "pretrain")
    try:
        step, losses = _pretrain_loop(objective, data, opt, sched, budget, state, params, tc, device,
                                      training_precision(tc.precision, device), bar)
    finally:
        bar.close()
    _write_backbone(model, backbone, out, scenes, step, losses, budget, size, usage.share())
    return out


def _write_backbone(model, backbone, out, scenes, step, losses, budget, size, share) -> None:
    from ..model import save_model

    card = model.card
    card.extra["pretrained"] = {
        "method": "dense VICReg on every FPN level (point by point), lightly's loss",
        "scenes": [str(p) for p in scenes], "minutes": round(budget.elapsed() / 60, 2), "steps": step,
        # the mean of the first and of the last steps, apart (a tenth, 1 to 10 steps, of a short run each)
        "loss_first": round(float(np.mean(losses[:_ends(losses)])), 4) if losses else None,
        "loss_last": round(float(np.mean(losses[-_ends(losses):])), 4) if losses else None,
        "view_size": size, "cpu_share": None if share is None else round(share, 2),
    }
    card.extra["pretrain_only"] = True  # a backbone, not a detector: its head is untrained
    card.trained_on = [{"scene": str(p), "labels": None} for p in scenes]
    model.net.backbone = backbone.cpu()
    save_model(model.cpu(), out)
    log.info("pretrained %d steps in %.1f min: loss %.3f -> %.3f", step, budget.elapsed() / 60,
             card.extra["pretrained"]["loss_first"] or math.nan, card.extra["pretrained"]["loss_last"] or math.nan)


def is_pretrain_only(card) -> bool:
    return bool(card.extra.get("pretrain_only"))


def _ends(losses) -> int:
    """How many steps at each end of a run its first and last losses average: up to 10, never
    overlapping (a run of 6 steps: its first 3 and its last 3)."""
    return max(1, min(10, len(losses) // 2))
