"""Training on GeoTIFFs with vector labels: chip sampling, augmentation, validation, checkpoints.

Validation holds out an area (the right-hand ``val_fraction`` strip of each scene, or separate
validation scenes) and runs the real whole-scene pipeline on it each epoch, so overlapping chips
never leak into validation. The model with the best validation AP50 is kept as ``model.pt``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .config import Config, config_from_dict
from .errors import GeodetError
from .labels import LabelBoxes, class_names, clip_boxes, labels_to_boxes, read_labels
from .model import GeodetModel, build_model, save_model
from .progress import progress_bar
from .scene import Scene, scene_from_config
from .tiling import Tile, overlap_pixels

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "geodet-checkpoint"


@dataclass
class TrainScene:
    scene: Scene
    labels: LabelBoxes
    area: tuple[int, int, int, int]  # x0, y0, x1, y1 of the part used for training
    labels_path: str


class Interrupted(Exception):
    pass


def _chip_tile(x: int, y: int, size: int, area) -> Tile:
    x1, y1 = min(x + size, area[2]), min(y + size, area[3])
    return Tile(-1, 0, 0, x, y, size, size, (x, y, x1, y1), (x, y, x1, y1))


class ChipSampler(torch.utils.data.Dataset):
    """Chip ``i`` of epoch ``e`` is drawn from an RNG seeded by (seed, rank, e, i): the same chips
    whatever the number of workers. Most chips are centred near a label box; a share are random."""

    def __init__(self, scenes: list[TrainScene], tile_size: int, cfg, length: int, seed: int, rank: int = 0):
        self.scenes = scenes
        self.size = tile_size
        self.cfg = cfg
        self.length = length
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        w = np.array([max(len(s.labels), 1) for s in scenes], float)
        self.scene_p = w / w.sum()

    def __len__(self) -> int:
        return self.length

    def _sample(self, rng):
        k = int(rng.choice(len(self.scenes), p=self.scene_p))
        ts = self.scenes[k]
        ax0, ay0, ax1, ay1 = ts.area
        size = self.size
        boxes = ts.labels.boxes
        in_area = np.flatnonzero((boxes[:, 0] >= ax0) & (boxes[:, 2] <= ax1) & (boxes[:, 1] >= ay0) & (boxes[:, 3] <= ay1))
        if len(in_area) and rng.random() >= self.cfg.negative_fraction:
            b = boxes[in_area[rng.integers(len(in_area))]]
            cx = (b[0] + b[2]) / 2 + rng.uniform(-size / 3, size / 3)
            cy = (b[1] + b[3]) / 2 + rng.uniform(-size / 3, size / 3)
            x, y = int(cx - size / 2), int(cy - size / 2)
        else:
            x = int(rng.integers(ax0, max(ax0 + 1, ax1 - size + 1)))
            y = int(rng.integers(ay0, max(ay0 + 1, ay1 - size + 1)))
        x = int(np.clip(x, ax0, max(ax0, ax1 - size)))
        y = int(np.clip(y, ay0, max(ay0, ay1 - size)))
        return ts, _chip_tile(x, y, size, ts.area)

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.rank, self.epoch, i])
        for _ in range(10):
            ts, tile = self._sample(rng)
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


DECAY_SHARE = 0.3  # the LR holds at its peak, then follows a cosine to 0 over the run's last 30%


def _lr_lambda(warmup: int, total: int, time_fraction=None):
    """Linear warm-up, a hold at the peak, then a cosine decay over the last ``DECAY_SHARE`` of the
    run. With a time limit the run's progress is the larger of the step and the time fraction, so
    the decay completes within the budget. Short budgets need the peak LR for most of the run."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        t = (step - warmup) / max(1, total - warmup)
        if time_fraction is not None:
            t = max(t, time_fraction())
        d = (min(1.0, t) - (1 - DECAY_SHARE)) / DECAY_SHARE
        return 1.0 if d <= 0 else 0.5 * (1 + math.cos(math.pi * d))

    return f


def _normalisation(scenes: list[TrainScene]) -> dict:
    """Per-band mean and std of the scaled training pixels (from decimated reads)."""
    sums, sq, n = 0, 0, 0
    for ts in scenes:
        sc = ts.scene
        data, valid, _ = sc.overview(512)
        x = sc.scale(data, valid)[:, valid].astype(np.float64)
        sums = sums + x.sum(1)
        sq = sq + (x**2).sum(1)
        n += x.shape[1]
    if n == 0:
        raise GeodetError("training scenes hold no valid pixels")
    mean = sums / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 1e-6))
    return {"mean": mean.tolist(), "std": np.maximum(std, 0.02).tolist()}


def _write_area(scene: Scene, area, path: Path, rows_per_block: int = 512) -> None:
    """The held-out area as its own tiled GeoTIFF (original dtype, exact georeferencing), copied
    in strips of ``rows_per_block`` rows so memory stays flat however large the area is."""
    import rasterio
    from rasterio.windows import Window
    from rasterio.windows import transform as window_transform

    x0, y0, x1, y1 = area
    win = Window(x0, y0, x1 - x0, y1 - y0)
    prof = dict(driver="GTiff", width=x1 - x0, height=y1 - y0, count=scene.count, dtype=scene.dtype.name,
                crs=scene.crs, transform=window_transform(win, scene.transform), nodata=scene.nodata,
                tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **prof) as dst:
        for r in range(y0, y1, rows_per_block):
            h = min(rows_per_block, y1 - r)
            src_win, dst_win = Window(x0, r, x1 - x0, h), Window(0, r - y0, x1 - x0, h)
            dst.write(scene.read_raw(src_win), window=dst_win)
            if not scene.all_valid:
                dst.write_mask(scene.read_mask(src_win), window=dst_win)


class Trainer:
    def __init__(self, cfg: Config, out_dir: str | Path, resume: bool = False, progress: bool = True):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.resume = resume
        self.progress = progress
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.main = self.rank == 0
        self._stop = None
        self._val_dir = None  # temporary folder of the held-out areas' GeoTIFFs

    # -- data ---------------------------------------------------------------------------
    def _open(self, pairs, classes):
        opened = []
        for pair in pairs:
            if not pair.scene or not pair.labels:
                raise GeodetError("each training entry needs both 'scene' and 'labels'")
            sc = scene_from_config(pair.scene, self.cfg.scene)
            if sc.crs is None:
                raise GeodetError(f"{pair.scene}: the scene has no CRS, so vector labels cannot be placed on it")
            gdf = read_labels(pair.labels, self.cfg.train.class_column or None)
            opened.append((sc, gdf, pair.labels))
        if classes is None:
            names = set()
            for _, gdf, _ in opened:
                names |= set(class_names(gdf, self.cfg.train.class_column or None))
            classes = sorted(names)
        out = []
        for sc, gdf, lp in opened:
            lb = labels_to_boxes(gdf, sc, self.cfg.train.class_column or None, classes, self.cfg.train.unknown_classes,
                                 self.cfg.train.point_box_m, source=str(lp))
            if len(lb) == 0:
                raise GeodetError(f"{lp}: no usable labels inside {sc.path} (counts: {lb.counts})")
            classes = lb.classes
            out.append(TrainScene(sc, lb, (0, 0, sc.width, sc.height), str(lp)))
        return out, classes

    def prepare(self):
        cfg = self.cfg
        if not cfg.train.scenes:
            raise GeodetError("no training scenes: list train.scenes in the config or pass --scene and --labels")
        user_classes = cfg.model.classes if cfg.model.classes != ["object"] or not cfg.train.class_column else None
        self.train_scenes, classes = self._open(cfg.train.scenes, user_classes)
        self.val_sets = []  # (scene path or Scene, area, labels frame path)
        if cfg.train.val_scenes:
            vs, classes = self._open(cfg.train.val_scenes, classes)
            self.val_sets = [(v, v.area) for v in vs]
        elif cfg.train.val_fraction > 0:
            for ts in self.train_scenes:
                w = ts.scene.width
                split = int(round(w * (1 - cfg.train.val_fraction)))
                if split < 16 or w - split < 16:
                    continue
                ts.area = (0, 0, split, ts.scene.height)
                self.val_sets.append((ts, (split, 0, w, ts.scene.height)))
        self.classes = classes
        t = cfg.tiling
        gsd = self.train_scenes[0].scene.pixel_gsd
        self.overlap = overlap_pixels(t.overlap_m, gsd) if t.overlap_m is not None else t.overlap
        n_labels = sum(len(s.labels) for s in self.train_scenes)
        log.info("training on %d scene(s), %d labels, classes %s", len(self.train_scenes), n_labels, classes)

    # -- checkpoints ---------------------------------------------------------------------
    def _save_checkpoint(self, model, opt, sched, step, epoch, best):
        state = {
            "format": CHECKPOINT_FORMAT, "version": 1, "step": step, "epoch": epoch, "best_ap50": best,
            "card": model.card, "config": asdict(self.cfg),
            "model": model.net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        }
        path = self.out / "last.pt"
        fd, tmp = tempfile.mkstemp(prefix=".last.", suffix=".pt", dir=self.out)
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _load_checkpoint(self):
        path = self.out / "last.pt"
        if not path.is_file():
            raise GeodetError(f"--resume: no checkpoint at {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file; nothing in it runs
            raise GeodetError(f"{path}: checkpoint cannot be read ({str(exc).splitlines()[0][:120]})") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise GeodetError(f"{path}: not a geodet training checkpoint")
        return state

    # -- validation ----------------------------------------------------------------------
    def validate(self, model: GeodetModel, device) -> dict:
        from .detect import detect_scene
        from .evaluate import coco_metrics

        if not self.val_sets:
            return {}
        allb, alls, alll, gb, gl = [], [], [], [], []
        if self._val_dir is None:  # the held-out areas are copied once per run, not per epoch
            self._val_dir = tempfile.TemporaryDirectory(prefix="geodet-val-")
            for i, (ts, area) in enumerate(self.val_sets):
                _write_area(ts.scene, area, Path(self._val_dir.name) / f"val{i}.tif")
        for i, (ts, area) in enumerate(self.val_sets):
            path = Path(self._val_dir.name) / f"val{i}.tif"
            frame = detect_scene(
                path, model, tile_size=model.card["tile_size"], overlap=self.overlap, device=str(device),
                num_workers=0, progress=False, bands=list(range(1, ts.scene.count + 1)), gsd_m=None,
                batch_size=self.cfg.detect.batch_size,
            )
            off = np.array([area[0], area[1], area[0], area[1]], float)
            allb.append(frame[["x0", "y0", "x1", "y1"]].to_numpy(np.float64) + off)
            alls.append(frame["score"].to_numpy())
            alll.append(frame["label"].map({n: k for k, n in enumerate(self.classes)}).to_numpy(np.int64))
            boxes, keep = clip_boxes(ts.labels.boxes, area, self.cfg.train.min_visibility)
            # offset by scene index so boxes of different scenes never match each other
            shift = np.array([0, i * 1e7, 0, i * 1e7])
            gb.append(boxes + off + shift)
            gl.append(ts.labels.labels[keep])
            allb[-1] = allb[-1] + shift
        m = coco_metrics(np.concatenate(allb), np.concatenate(alls), np.concatenate(alll),
                         np.concatenate(gb), np.concatenate(gl), self.classes, iou=0.5)
        model.train()
        return m

    # -- the loop ------------------------------------------------------------------------
    def _handle_signals(self):
        def handler(signum, _frame):
            if self._stop is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self._stop = signal.Signals(signum).name
            log.warning("%s received: stopping after this step and saving last.pt", self._stop)

        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for s in old:
                signal.signal(s, handler)
        except ValueError:  # not the main thread
            old = {}
        return old

    def run(self) -> Path:
        from .detect import resolve_device

        cfg = self.cfg
        tc = cfg.train
        torch.manual_seed(tc.seed + self.rank)
        self.prepare()
        device = resolve_device(tc.device)
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(device)
        self.out.mkdir(parents=True, exist_ok=True)
        state = self._load_checkpoint() if self.resume else None
        cfg.model.classes = list(self.classes)
        if state is not None:
            card = state["card"]
            norm = card["normalisation"]
        else:
            norm = _normalisation(self.train_scenes) if cfg.model.pretrained == "none" else None
        model = build_model(
            cfg.model, bands=self.train_scenes[0].scene.bands, normalisation=norm, tile_size=cfg.tiling.tile_size,
            overlap=self.overlap, gsd_m=cfg.scene.gsd_m, percentiles=cfg.scene.percentiles,
            load_pretrained=state is None,
        )
        model.card["trained_on"] = [
            {"scene": ts.scene.path, "labels": ts.labels_path, "labels_used": len(ts.labels), "counts": ts.labels.counts}
            for ts in self.train_scenes
        ]
        sc0 = self.train_scenes[0].scene
        native = float(sc0.pixel_gsd) if sc0.crs is not None and sc0.crs.is_projected else None
        model.card["gsd_m"] = cfg.scene.gsd_m if cfg.scene.gsd_m else native
        model.card["band_stats"] = self.train_scenes[0].scene.stats if self.train_scenes[0].scene.dtype != np.uint8 else None
        model.to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        params = [p for p in model.parameters() if p.requires_grad]
        if tc.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
        elif tc.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=tc.lr, momentum=0.9, weight_decay=tc.weight_decay)
        else:
            raise GeodetError(f"train.optimizer must be adamw or sgd, got '{tc.optimizer}'")
        total = tc.max_steps if tc.max_steps is not None else tc.epochs * tc.steps_per_epoch
        if total <= 0:
            raise GeodetError("nothing to train: epochs, steps_per_epoch and max_steps must be positive")
        budget_s = tc.time_limit_min * 60 if tc.time_limit_min else None
        started = time.perf_counter()  # a resumed run gets a fresh budget, as its deadline does
        time_fraction = (lambda: (time.perf_counter() - started) / budget_s) if budget_s else None
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(tc.warmup_steps, total // 4), total, time_fraction))
        step, epoch, best = 0, 0, -1.0
        if state is not None:
            model.net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            step, epoch, best = int(state["step"]), int(state["epoch"]), float(state["best_ap50"])
            log.info("resuming at step %d (epoch %d)", step, epoch)
        train_model = model
        if self.world > 1:
            train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        steps_per_epoch = tc.steps_per_epoch if tc.max_steps is None else min(tc.steps_per_epoch, total)
        sampler = ChipSampler(self.train_scenes, cfg.tiling.tile_size, tc, steps_per_epoch * tc.batch_size, tc.seed, self.rank)
        loader_kw = dict(batch_size=tc.batch_size, shuffle=False, collate_fn=collate_chips, num_workers=tc.num_workers,
                         pin_memory=device.type == "cuda")
        if tc.num_workers > 0:
            from .tiling import worker_init

            loader_kw.update(worker_init_fn=worker_init, persistent_workers=False)
        metrics_path = self.out / "metrics.csv"
        if self.main and (state is None or not metrics_path.exists()):
            with open(metrics_path, "w", newline="") as f:
                csv.writer(f).writerow(["step", "epoch", "loss", "classification", "bbox_regression", "lr", "val_AP", "val_AP50", "seconds"])
        scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
        t_start = time.perf_counter()
        deadline = t_start + tc.time_limit_min * 60 if tc.time_limit_min else None
        old_handlers = self._handle_signals()
        timed = tc.time_limit_min is not None  # the clock, not the step count, may end the run
        bar = progress_bar(total=None if timed else total, initial=step, unit="step", enabled=self.progress and self.main,
                           desc=f"train (up to {tc.time_limit_min:g} min)" if timed else "train")
        model.train()
        stopped = None
        try:
            while step < total and stopped is None:
                sampler.epoch = epoch
                loader = torch.utils.data.DataLoader(sampler, **loader_kw)
                for images, targets in loader:
                    images = images.to(device, non_blocking=True)
                    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
                    with torch.autocast(device.type, enabled=device.type == "cuda"):
                        losses = train_model(images, targets)
                        loss = losses["classification"] + losses["bbox_regression"]
                    if not torch.isfinite(loss):
                        raise GeodetError(f"training diverged at step {step} (loss {loss.item()}): lower train.lr")
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                    scaler.step(opt)
                    scaler.update()
                    sched.step()
                    step += 1
                    n_img = len(targets)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}", tiles_s=f"{n_img * bar.format_dict.get('rate', 0) or 0:.1f}")
                    if self.main:
                        with open(metrics_path, "a", newline="") as f:
                            csv.writer(f).writerow([step, epoch, f"{loss.item():.5f}", f"{losses['classification'].item():.5f}",
                                                    f"{losses['bbox_regression'].item():.5f}", f"{sched.get_last_lr()[0]:.3g}",
                                                    "", "", f"{time.perf_counter() - t_start:.1f}"])
                    if self._stop:
                        stopped = self._stop
                        break
                    if deadline and time.perf_counter() > deadline:
                        stopped = "time limit"
                        break
                    if step >= total:
                        break
                epoch += 1
                if stopped in (None, "time limit"):
                    best = self._end_of_epoch(model, opt, sched, step, epoch, best, device, metrics_path, t_start)
                elif self.main:
                    self._save_checkpoint(model, opt, sched, step, epoch, best)
        finally:
            bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
            if self._val_dir is not None:
                self._val_dir.cleanup()
                self._val_dir = None
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
        if stopped not in (None, "time limit"):
            raise Interrupted(f"stopped by {stopped} at step {step}; {self.out / 'last.pt'} is saved: rerun with --resume")
        if stopped == "time limit":
            log.warning("time limit reached at step %d of %d", step, total)
        return self.out / "model.pt"

    def _end_of_epoch(self, model, opt, sched, step, epoch, best, device, metrics_path, t_start):
        if not self.main:
            return best
        model.eval()
        m = self.validate(model, device)
        model.train()
        ap50 = m.get("AP50") if m else None
        with open(metrics_path, "a", newline="") as f:
            csv.writer(f).writerow([step, epoch, "", "", "", "", f"{m.get('AP') or 0:.4f}" if m else "",
                                    f"{ap50 or 0:.4f}" if m else "", f"{time.perf_counter() - t_start:.1f}"])
        score = ap50 if ap50 is not None else 0.0
        if not m or score > best or not (self.out / "model.pt").exists():
            best = max(best, score)
            model.card["metrics"] = {k: m[k] for k in ("AP", "AP50", "AP75", "precision", "recall", "f1") if k in m}
            model.card["metrics"].update({"step": step, "epoch": epoch, "validation": "held-out area" if m else "none"})
            model.card["trained_steps"] = step
            save_model(model, self.out / "model.pt")
            log.info("epoch %d: val AP50 %.3f (saved model.pt)", epoch, score)
        else:
            log.info("epoch %d: val AP50 %.3f (best %.3f)", epoch, score, best)
        self._save_checkpoint(model, opt, sched, step, epoch, best)
        return best


def train(config: Config | dict | str | Path, out_dir: str | Path = "runs/geodet", resume: bool = False, progress: bool = True) -> Path:
    """Train a model from a config (object, dict or YAML path); returns the path of ``model.pt``."""
    from .config import load_config

    if isinstance(config, (str, Path)):
        config = load_config(config)
    elif isinstance(config, dict):
        config = config_from_dict(config)
    return Trainer(config, out_dir, resume=resume, progress=progress).run()
