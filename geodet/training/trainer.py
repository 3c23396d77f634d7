"""The training loop on GeoTIFFs with vector labels: setup, optimiser and schedule, the step loop,
the metrics log, checkpoints and resume.

With a time limit the clock is the schedule: the learning rate's warm-up, hold and decay span the
minutes given (``schedule.Budget``), epochs and steps cap the run only when set, and training stops
early enough for the final validation to end within the limit. ``metrics.csv`` says why it stopped.

Validation holds out an area (a strip of ``val_fraction`` of each scene's labelled area, cut across
its longer side, or separate validation scenes) and runs the real whole-scene pipeline on it, so
overlapping chips never leak into validation; it runs as often as keeps it near a tenth of the
time. ``model.pt`` is the model at the end of the schedule (``train.keep: last``) or the one with
the best validation AP50 (``best``); its card records its validation metrics and operating point
(best-F1 score).

A labelled area (``SceneLabels.labelled_area``) says where the labels are complete: chips are drawn
inside it and the loss ignores anchors outside it, so unlabelled objects are never taught as
background.
"""

from __future__ import annotations

import copy
import csv
import logging
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import ModelConfig, Config, config_from_dict
from ..errors import GeodetError
from ..io.labels import class_names, labels_to_boxes, read_labels
from ..io.scene import READ_ERRORS, gdal_env, scene_from_config
from ..model import GeodetModel, ModelCard, build_model, save_model
from ..pipeline.grid import overlap_pixels
from ..progress import progress_bar
from .area import centres_inside, read_labelled_area, validation_split, within
from .sampler import ChipDataset, TrainScene, collate_chips
from .schedule import DECAY_SHARE, DEFAULT_EPOCHS, Budget, lr_factor, make_optimizer
from .validation import validate

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "geodet-checkpoint"
NORM_SAMPLE_SIDE = 512  # long side of the decimated read that normalisation statistics come from
METRICS_HEADER = ["step", "epoch", "loss", "classification", "bbox_regression", "lr", "val_AP", "val_AP50", "seconds",
                  "note"]
LOW_CPU_SHARE = 0.6  # below this share of its threads' CPU time, training was starved by other work


class Interrupted(Exception):
    pass


class CpuShare:
    """The share of wall time x torch threads that this process spent on the CPU since creation:
    near 1 when training had its cores, far lower when other programs took them."""

    def __init__(self):
        import resource

        self._t = time.perf_counter()
        r = resource.getrusage(resource.RUSAGE_SELF)
        self._cpu = r.ru_utime + r.ru_stime

    def share(self) -> float | None:
        import resource

        wall = time.perf_counter() - self._t
        r = resource.getrusage(resource.RUSAGE_SELF)
        threads = max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
        return None if wall <= 0 else (r.ru_utime + r.ru_stime - self._cpu) / (wall * threads)


def normalisation(scenes) -> dict:
    """Per-band mean and std of the scaled pixels of ``scenes`` (``Scene`` objects; from decimated
    reads)."""
    sums, sq, n = 0, 0, 0
    for sc in scenes:
        try:
            data, valid, _ = sc.overview(NORM_SAMPLE_SIDE)
        except READ_ERRORS() as exc:
            from rasterio.windows import Window

            raise sc.read_error(Window(0, 0, sc.width, sc.height), exc) from None
        x = sc.scale(data, valid)[:, valid].astype(np.float64)
        sums = sums + x.sum(1)
        sq = sq + (x**2).sum(1)
        n += x.shape[1]
    if n == 0:
        raise GeodetError("training scenes hold no valid pixels")
    mean = sums / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 1e-6))
    return {"mean": mean.tolist(), "std": np.maximum(std, 0.02).tolist()}


@dataclass
class Run:
    """What one training run works with, made by ``Trainer.setup``."""

    model: GeodetModel
    train_model: torch.nn.Module  # the model, or its DDP wrapper
    params: list
    opt: torch.optim.Optimizer
    sched: Optional[torch.optim.lr_scheduler.LambdaLR]
    scaler: torch.amp.GradScaler
    device: torch.device
    total: Optional[int]  # the step cap; None when only the clock ends the run
    step: int = 0
    epoch: int = 0
    best: float = -1.0
    autocast_dtype: Optional[torch.dtype] = None  # the network's forward under autocast of this type
    budget: Optional[Budget] = None
    progress: float = 0.0  # share of the run done (0..1), the LR schedule's clock
    teacher: Optional[object] = None  # self-training's EMA teacher (selftrain.EmaTeacher)
    rounds_done: int = 0
    last_ap50: float = 0.0  # the latest validation's
    data: Optional[object] = None  # the chip dataset (a self-training round gives it the teacher's boxes)


STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


def freeze_stages(model: GeodetModel, n: int | None) -> None:
    """Freeze the backbone body's first ``n`` stages (stem, layer1, ...) and train the rest of
    the body; None leaves the model as built."""
    if n is None:
        return
    if not 0 <= int(n) <= len(STAGES):
        raise GeodetError(f"train.freeze_backbone_stages must be 0..{len(STAGES)}, got {n}")
    frozen = tuple(p for stage in STAGES[: int(n)] for p in stage)
    for name, p in model.net.backbone.body.named_parameters():
        p.requires_grad_(not name.startswith(frozen))


def training_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast type for training: fp16 on CUDA, bf16 on CPUs with native bf16, else none."""
    from ..pipeline.backends import cpu_features

    precision = (precision or "auto").lower()
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise GeodetError(f"train.precision must be auto, fp32, bf16 or fp16, got '{precision}'")
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16":
        raise GeodetError("train.precision fp16 is for CUDA; on a CPU use bf16 (CPUs with native bf16) or fp32")
    native = cpu_features()["bf16"]
    if precision == "bf16" and not native:
        raise GeodetError("train.precision bf16: this CPU has no native bf16 (AVX512_BF16 or AMX) and geodet does not "
                          "emulate it: use fp32 or auto")
    return torch.bfloat16 if native else None


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
        self.cpu_share: Optional[float] = None  # set at the end of a run

    # -- data ---------------------------------------------------------------------------
    def _open(self, pairs, classes):
        opened = []
        for pair in pairs:
            if not pair.scene or not pair.labels:
                raise GeodetError("each training entry needs both 'scene' and 'labels'")
            sc = scene_from_config(pair.scene, self.cfg.scene)
            sc.skip_hint = False
            if not sc.has_georef:
                raise GeodetError(f"{pair.scene}: the scene has no georeferencing (no CRS or geotransform), so vector "
                                  "labels cannot be placed on it: georeference it (e.g. gdal_translate -a_srs and "
                                  "-a_ullr, or QGIS's Georeferencer)")
            gdf = read_labels(pair.labels, self.cfg.train.class_column or None)
            opened.append((sc, gdf, pair))
        if classes is None:
            names = set()
            for _, gdf, _ in opened:
                names |= set(class_names(gdf, self.cfg.train.class_column or None))
            classes = sorted(names)
        out = []
        for sc, gdf, pair in opened:
            lp = pair.labels
            lb = labels_to_boxes(gdf, sc, self.cfg.train.class_column or None, classes, self.cfg.train.unknown_classes,
                                 self.cfg.train.point_box_m, source=str(lp))
            if len(lb) == 0:
                raise GeodetError(f"{lp}: no usable labels inside {sc.path} (counts: {lb.counts})")
            classes = lb.classes
            area = (0, 0, sc.width, sc.height)
            labelled = None
            if getattr(pair, "labelled_area", None):
                labelled = read_labelled_area(pair.labelled_area, sc)
                inside = centres_inside(labelled, lb.boxes)
                lb.counts["outside_labelled_area"] = int((~inside).sum())
                if not inside.any():
                    raise GeodetError(f"{pair.labelled_area}: no label of {lp} lies inside the labelled area: give the "
                                      "polygons of the part of the scene you labelled")
                if lb.counts["outside_labelled_area"]:
                    log.warning("%s: %d of %d labels lie outside the labelled area %s: they still count as objects "
                                "where a chip reaches them, but chips are drawn inside the area", lp,
                                lb.counts["outside_labelled_area"], len(lb), pair.labelled_area)
                x0, y0, x1, y1 = labelled.bounds
                area = (max(0, int(np.floor(x0))), max(0, int(np.floor(y0))), min(sc.width, int(np.ceil(x1))),
                        min(sc.height, int(np.ceil(y1))))
            out.append(TrainScene(sc, lb, area, str(lp), labelled))
        return out, classes

    def _apply_init(self) -> None:
        """With ``train.init``: the start model's card sets the architecture and, unless the
        config set them, the tile size, overlap, GSD, bands and percentiles."""
        from ..model.file import read_model_file

        cfg = self.cfg
        payload = read_model_file(cfg.train.init)
        card = ModelCard.from_dict(payload["card"], source=f"{cfg.train.init} card")
        if "scene.bands" in cfg.explicit and len(cfg.scene.bands) != len(card.bands):
            raise GeodetError(f"--init {cfg.train.init} was trained on {len(card.bands)} band(s) ({card.bands}) but this "
                              f"run reads {len(cfg.scene.bands)} ({cfg.scene.bands}): use the same number of bands, or "
                              "train from scratch")
        self.init_payload, self.init_card = payload, card
        classes = cfg.model.classes if "model.classes" in cfg.explicit else None
        col = card.extra.get("class_column")
        if col is not None and "train.class_column" not in cfg.explicit:
            cfg.train.class_column = col  # the start model's classes came from this column: so do these
        cfg.model = copy.deepcopy(card.model)
        # the classes come from the labels (or the config), as in any training run
        cfg.model.classes = classes if classes is not None else ModelConfig().classes
        for key, value in (("tiling.tile_size", card.tile_size), ("tiling.overlap", card.overlap),
                           ("scene.gsd_m", card.gsd_m), ("scene.bands", list(card.bands)),
                           ("scene.percentiles", list(card.percentiles))):
            if key not in cfg.explicit and value is not None:
                section, name = key.split(".")
                setattr(getattr(cfg, section), name, value)
        log.info("starting from %s (%s, %d classes, %d px tiles%s)", cfg.train.init, card.model.backbone,
                 len(card.classes), card.tile_size, f" at {card.gsd_m:g} m" if card.gsd_m else "")

    def prepare(self):
        cfg = self.cfg
        if cfg.train.init and getattr(self, "init_card", None) is None:
            self._apply_init()
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
                parts = validation_split(ts.area, cfg.train.val_fraction)
                if parts is None:
                    continue
                ts.area, val_area = parts
                b = ts.labels.boxes
                if not (within(b, ts.area) & centres_inside(ts.labelled, b)).any():
                    raise GeodetError(f"{ts.labels_path}: every label lies in the validation strip {val_area} of "
                                      f"{ts.scene.path}: label more of the scene, or set train.val_fraction: 0")
                self.val_sets.append((ts, val_area))
        self.keep = cfg.train.keep
        n_val = sum(int((within(v.labels.boxes, a) & centres_inside(v.labelled, v.labels.boxes)).sum())
                    for v, a in self.val_sets)
        if self.val_sets and n_val == 0:
            log.warning("the validation area holds no labels, so validation cannot tell models apart: model.pt will be "
                        "the last model. If you labelled only part of the scene, pass --labelled-area (the validation "
                        "strip is then cut from it), or give --val-scene")
            self.keep = "last"
        self.classes = classes
        t = cfg.tiling
        gsd = self.train_scenes[0].scene.pixel_gsd
        self.overlap = overlap_pixels(t.overlap_m, gsd) if t.overlap_m is not None else t.overlap
        n_labels = sum(len(s.labels) for s in self.train_scenes)
        col = cfg.train.class_column
        where = f"from the labels' '{col}' column" if col else "one class: no class column (train.class_column '')"
        log.info("training on %d scene(s), %d labels; classes %s (%s)", len(self.train_scenes), n_labels, classes, where)
        self._prepare_self_training()

    def _open_unlabelled(self, path: str):
        """An unlabelled scene read as the labelled ones are: same bands, resampled to their GSD."""
        from ..io.scene import Scene

        cfg, ref = self.cfg, self.train_scenes[0].scene
        sc = scene_from_config(path, cfg.scene)
        sc.skip_hint = False
        if sc.count != ref.count:
            raise GeodetError(f"--unlabelled {path}: {sc.count} band(s) where the labelled scenes have {ref.count}: "
                              "give scenes of the same sensor, or pick the same bands with --bands")
        if cfg.scene.gsd_m is None and abs(sc.pixel_gsd / ref.pixel_gsd - 1) > 0.05:
            if not (sc.has_georef and sc.crs.is_projected and ref.crs is not None and ref.crs.is_projected):
                raise GeodetError(f"--unlabelled {path}: {sc.pixel_gsd:.3g} units/px where the labelled scenes have "
                                  f"{ref.pixel_gsd:.3g}, and it cannot be resampled (no projected CRS): give scenes "
                                  "at the same ground resolution")
            log.info("%s: resampled from %.3g m to the labelled scenes' %.3g m", path, sc.pixel_gsd, ref.pixel_gsd)
            sc = Scene(path, bands=cfg.scene.bands, gsd_m=ref.pixel_gsd, percentiles=cfg.scene.percentiles)
            sc.skip_hint = False
        return sc

    def _prepare_self_training(self) -> None:
        from .selftrain import unlabelled_areas

        tc = self.cfg.train
        self.pseudo_areas = []
        if not (tc.self_training or tc.unlabelled):
            return
        if self.world > 1:
            raise GeodetError("self-training runs in one process: train without --engine ray (or without "
                              "--unlabelled / train.self_training)")
        if not 0 <= tc.burn_in < 1 or tc.pseudo_rounds < 1 or not 0 < tc.pseudo_share < 1 or not 0 < tc.ema_decay < 1:
            raise GeodetError("self-training needs 0 <= train.burn_in < 1, train.pseudo_rounds >= 1, 0 < "
                              "train.pseudo_share < 1 and 0 < train.ema_decay < 1")
        if not self.val_sets:
            raise GeodetError("self-training chooses the teacher's thresholds on validation: keep a validation strip "
                              "(train.val_fraction > 0) or give --val-scene")
        scenes = [self._open_unlabelled(p) for p in tc.unlabelled]
        self.pseudo_areas = unlabelled_areas(self.train_scenes, self.val_sets, scenes)
        if not self.pseudo_areas:
            log.warning("self-training: nothing is unlabelled (no --unlabelled scene, and the labelled area covers "
                        "the scenes): training on the labels alone")
        else:
            px = sum((a[1][2] - a[1][0]) * (a[1][3] - a[1][1]) for a in self.pseudo_areas)
            log.info("self-training on %d unlabelled area(s), %.2g Mpx: burn-in on the labels for %d%% of the run, then "
                     "%d pseudo-label round(s)", len(self.pseudo_areas), px / 1e6, round(100 * tc.burn_in),
                     tc.pseudo_rounds)

    # -- checkpoints ---------------------------------------------------------------------
    def _save_checkpoint(self, r: Run) -> None:
        state = {
            "format": CHECKPOINT_FORMAT, "version": 1, "step": r.step, "epoch": r.epoch, "best_ap50": r.best,
            "card": r.model.card.to_dict(), "config": asdict(self.cfg),
            "model": r.model.net.state_dict(), "optimizer": r.opt.state_dict(), "scheduler": r.sched.state_dict(),
        }
        fd, tmp = tempfile.mkstemp(prefix=".last.", suffix=".pt", dir=self.out)
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.out / "last.pt")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _load_checkpoint(self) -> dict:
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

    # -- setup ---------------------------------------------------------------------------
    def _device(self) -> torch.device:
        from ..pipeline.detect import resolve_device

        device = resolve_device(self.cfg.train.device)
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(device)
        return device

    def _build(self, state: dict | None) -> GeodetModel:
        cfg = self.cfg
        cfg.model.classes = list(self.classes)
        init = getattr(self, "init_card", None)
        if state is not None:
            old = ModelCard.from_dict(state["card"], source=str(self.out / "last.pt"))
            norm = {"mean": old.mean, "std": old.std}
        elif init is not None:
            norm = {"mean": init.mean, "std": init.std}
        else:
            norm = normalisation([ts.scene for ts in self.train_scenes]) if cfg.model.pretrained == "none" else None
        sc0 = self.train_scenes[0].scene
        model = build_model(cfg.model, bands=sc0.bands, normalisation=norm, tile_size=cfg.tiling.tile_size,
                            overlap=self.overlap, gsd_m=cfg.scene.gsd_m, percentiles=cfg.scene.percentiles,
                            load_pretrained=state is None)
        card = model.card
        card.trained_on = [{"scene": ts.scene.path, "labels": ts.labels_path, "labels_used": len(ts.labels),
                            "counts": ts.labels.counts} for ts in self.train_scenes]
        native = float(sc0.pixel_gsd) if sc0.crs is not None and sc0.crs.is_projected else None
        card.gsd_m = cfg.scene.gsd_m if cfg.scene.gsd_m else native
        card.extra["class_column"] = cfg.train.class_column  # --init from this model reads its classes the same way
        if init is not None and state is None:
            self._load_init(model, init)
        freeze_stages(model, cfg.train.freeze_backbone_stages)
        return model

    def _load_init(self, model: GeodetModel, init: ModelCard) -> None:
        """The start model's weights; with other classes, all but the last classification conv
        (which keeps its prior-probability initialisation)."""
        sd = self.init_payload["state_dict"]
        same = list(init.classes) == list(model.card.classes)
        if not same:
            sd = {k: v for k, v in sd.items() if not k.startswith("head.classification_head.cls_logits.")}
            log.info("classes %s differ from the start model's %s: the last classification conv starts afresh",
                     model.card.classes, init.classes)
        try:
            missing, unexpected = model.net.load_state_dict(sd, strict=False)
        except RuntimeError as exc:
            raise GeodetError(f"{self.cfg.train.init}: its weights do not fit this configuration "
                              f"({str(exc).splitlines()[0][:160]})") from None
        expected_missing = set() if same else {"head.classification_head.cls_logits.weight",
                                                "head.classification_head.cls_logits.bias"}
        if set(missing) - expected_missing or unexpected:
            raise GeodetError(f"{self.cfg.train.init}: its weights do not fit this configuration (missing "
                              f"{sorted(set(missing) - expected_missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        model.card.extra["fine_tuned_from"] = {"path": str(self.cfg.train.init), "classes": list(init.classes)}

    def setup(self) -> Run:
        """Data, device (and the process group when distributed), model, optimiser, schedule;
        the state of ``last.pt`` when resuming. The run folder is made only after every input
        has been read and checked."""
        tc = self.cfg.train
        torch.manual_seed(tc.seed + self.rank)
        total = self._step_cap()
        if tc.keep not in ("best", "last"):
            raise GeodetError(f"train.keep must be best or last, got '{tc.keep}'")
        seconds = None if tc.time_limit_min is None else float(tc.time_limit_min) * 60
        if seconds is not None and seconds <= 0:
            raise GeodetError(f"--time-limit must be a positive number of minutes, got {tc.time_limit_min:g}")
        self.prepare()
        device = self._device()
        state = self._load_checkpoint() if self.resume else None
        model = self._build(state).to(device)
        self.out.mkdir(parents=True, exist_ok=True)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, tc)
        train_model = model
        if self.world > 1:
            train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        r = Run(model, train_model, params, opt, None, torch.amp.GradScaler("cuda", enabled=device.type == "cuda"),
                device, total, autocast_dtype=training_precision(tc.precision, device))
        warmup = min(tc.warmup_steps, total // 4) if total is not None else tc.warmup_steps
        self.warmup = warmup
        # the schedule reads the run's progress, which the budget sets before each scheduler step
        r.sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warmup, r.progress))
        if state is not None:
            model.net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            r.sched.load_state_dict(state["scheduler"])
            r.step, r.epoch, r.best = int(state["step"]), int(state["epoch"]), float(state["best_ap50"])
            log.info("resuming at step %d (epoch %d)", r.step, r.epoch)
        # a resumed run gets a fresh time budget; a step cap counts from the first step
        r.budget = Budget(total, seconds, start_step=r.step)
        if self.pseudo_areas:
            from .selftrain import EmaTeacher

            r.teacher = EmaTeacher(model, tc.ema_decay)
        return r

    def _step_cap(self) -> Optional[int]:
        """The steps the run may take: max_steps, else epochs x steps_per_epoch when epochs is set;
        none with a time limit (the clock ends the run); else the default number of epochs."""
        tc = self.cfg.train
        if tc.max_steps is not None:
            total = tc.max_steps
        elif tc.epochs is not None:
            total = tc.epochs * tc.steps_per_epoch
        elif tc.time_limit_min is not None:
            return None
        else:
            total = DEFAULT_EPOCHS * tc.steps_per_epoch
        if total <= 0:
            raise GeodetError("nothing to train: epochs, steps_per_epoch and max_steps must be positive")
        return total

    def _loader(self, r: Run):
        tc = self.cfg.train
        steps_per_epoch = tc.steps_per_epoch if r.total is None else min(tc.steps_per_epoch, r.total)
        data = ChipDataset(self.train_scenes, self.cfg.tiling.tile_size, tc, steps_per_epoch * tc.batch_size, tc.seed, self.rank)
        kw = dict(batch_size=tc.batch_size, shuffle=False, collate_fn=collate_chips, num_workers=tc.num_workers,
                  pin_memory=r.device.type == "cuda")
        if tc.num_workers > 0:
            from ..pipeline.reader import worker_init

            kw.update(worker_init_fn=worker_init, persistent_workers=False)
        return data, kw

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

    STOPS = (None, "step cap", "time limit")

    def _clock(self, r: Run) -> Optional[str]:
        """Update the run's progress and say whether the budget is spent. Rank 0's clock rules
        every rank (one small broadcast per step), so all ranks follow one schedule and stop at
        the same step."""
        b = r.budget
        b.note_step(r.step)
        if self.world == 1:  # (several ranks would have to agree to stop: they share rank 0's clock instead)
            b.check_warmup(r.step, self.warmup)
        values = [b.progress(r.step), float(self.STOPS.index(b.stop_reason(r.step)))]
        if self.world > 1:
            import torch.distributed as dist

            t = torch.tensor(values, dtype=torch.float64, device=r.device)
            dist.broadcast(t, 0)
            values = t.tolist()
        r.progress = values[0]
        return self.STOPS[int(values[1])]

    def step(self, r: Run, images, targets) -> dict:
        """One optimiser step; returns the losses as floats (and the budget's stop reason under
        ``"stop"``, None to go on)."""
        images = images.to(r.device, non_blocking=True)
        targets = [{k: v.to(r.device) for k, v in t.items()} for t in targets]
        with torch.autocast(r.device.type, dtype=r.autocast_dtype or torch.float32, enabled=r.autocast_dtype is not None):
            losses = r.train_model(images, targets)
            loss = losses["classification"] + losses["bbox_regression"]
        if not torch.isfinite(loss):
            raise GeodetError(f"training diverged at step {r.step} (loss {loss.item()}): lower train.lr")
        r.opt.zero_grad(set_to_none=True)
        r.scaler.scale(loss).backward()
        r.scaler.unscale_(r.opt)
        torch.nn.utils.clip_grad_norm_(r.params, self.cfg.train.grad_clip)
        r.scaler.step(r.opt)
        r.scaler.update()
        if r.teacher is not None:
            r.teacher.update(r.model)
        r.step += 1
        stop = self._clock(r)
        r.sched.step()
        return {"loss": loss.item(), "classification": losses["classification"].item(),
                "bbox_regression": losses["bbox_regression"].item(), "stop": stop}

    def _log(self, row: list) -> None:
        if self.main:
            with open(self.out / "metrics.csv", "a", newline="") as f:
                csv.writer(f).writerow(row)

    def run(self) -> Path:
        """Train; returns the path of ``model.pt``. A failure before the first model is saved (a
        bad input or setting found late, a damaged chip) leaves nothing behind: the files and
        folders this run made are removed. An interrupted run keeps ``last.pt`` for --resume."""
        from ..io.writers import missing_folders, remove_partial

        made = missing_folders(self.out)
        try:
            return self._run()
        except Exception as exc:
            if not isinstance(exc, Interrupted) and self.main and not self.resume and not (self.out / "model.pt").exists():
                remove_partial([self.out / "metrics.csv", self.out / "last.pt"], made)
            raise

    def _run(self) -> Path:
        r = self.setup()
        tc = self.cfg.train
        if self.main and (not self.resume or not (self.out / "metrics.csv").exists()):
            with open(self.out / "metrics.csv", "w", newline="") as f:
                csv.writer(f).writerow(METRICS_HEADER)
        data, loader_kw = self._loader(r)
        r.data = data
        usage = CpuShare()
        old_handlers = self._handle_signals()
        timed = r.budget.seconds is not None
        bar = progress_bar(total=round(r.budget.seconds) if timed else r.total, initial=0 if timed else r.step,
                           unit="s" if timed else "step", enabled=self.progress and self.main,
                           desc=f"train ({tc.time_limit_min:g} min)" if timed else "train")
        self._describe_run(r)
        r.model.train()
        stopped = None
        try:
            with gdal_env():  # GDAL's block cache capped while chips stream in
                while stopped is None:
                    data.epoch = r.epoch
                    for images, targets in torch.utils.data.DataLoader(data, **loader_kw):
                        losses = self.step(r, images, targets)
                        if timed:
                            bar.n = min(bar.total, round(r.budget.elapsed()))
                            bar.refresh()
                        else:
                            bar.update(1)
                        bar.set_postfix(step=r.step, loss=f"{losses['loss']:.3f}")
                        self._log([r.step, r.epoch, *(f"{losses[k]:.5f}" for k in ("loss", "classification", "bbox_regression")),
                                   f"{r.sched.get_last_lr()[0]:.3g}", "", "", f"{r.budget.elapsed():.1f}", ""])
                        stopped = self._stop or losses["stop"]
                        if stopped:
                            break
                    r.epoch += 1
                    if stopped in self.STOPS:
                        self._end_of_epoch(r, final=stopped is not None)
                    elif self.main:
                        self._save_checkpoint(r)
        finally:
            bar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
        if stopped not in self.STOPS:
            raise Interrupted(f"stopped by {stopped} at step {r.step}; {self.out / 'last.pt'} is saved: rerun with --resume")
        self._finish(r, stopped, usage.share())
        return self.out / "model.pt"

    def _describe_run(self, r: Run) -> None:
        tc = self.cfg.train
        if r.budget.seconds is not None:
            cap = f", capped at {r.total} steps" if r.total is not None else ""
            log.info("training for %g min%s: the learning-rate schedule spans the budget (warm-up %d steps, hold, "
                     "cosine decay over the last %d%%)", tc.time_limit_min, cap, self.warmup, round(100 * DECAY_SHARE))
        else:
            log.info("training for %d steps (no time limit)", r.total)

    def _finish(self, r: Run, stopped: str, share: Optional[float]) -> None:
        """Say why training stopped, in the log and in ``metrics.csv``, and warn when other work
        took the CPU."""
        b = r.budget
        minutes = b.elapsed() / 60
        if stopped == "time limit":
            why = f"time limit: {minutes:.1f} of {self.cfg.train.time_limit_min:g} min used"
        else:
            why = f"step cap: {r.step} steps in {minutes:.1f} min"
        self.cpu_share = share
        self._log([r.step, r.epoch, "", "", "", "", "", "", f"{b.elapsed():.1f}", f"stopped: {why}"])
        if self.main:
            log.info("training stopped at step %d (%s); validation AP50 %.3f (best seen %.3f); model.pt is the %s "
                     "model", r.step, why, r.last_ap50, max(r.best, 0.0),
                     "last" if self.keep == "last" else "best")
        if self.main and share is not None and share < LOW_CPU_SHARE and b.elapsed() > 30:
            log.warning("training got %.0f%% of the CPU time its %d thread(s) could use (other programs were busy on "
                        "these cores), so it made fewer steps than the budget buys on an idle machine: rerun on an "
                        "idle machine or with a larger --time-limit", 100 * share, torch.get_num_threads())

    def _end_of_epoch(self, r: Run, final: bool) -> None:
        """Validate when due (always at the end), log, keep the best model (its card holds the
        metrics and the operating point), and save ``last.pt``."""
        if not self.main:
            return
        if not r.budget.due_validation(final):
            self._save_checkpoint(r)
            self._pseudo_round(r)
            return
        t0 = time.perf_counter()
        m = validate(r.model, self.val_sets, self.classes, self.overlap, r.device, self.cfg.detect.batch_size,
                     self.cfg.train.min_visibility)
        r.model.train()
        ap50 = m.get("AP50") if m else None
        score = ap50 if ap50 is not None else 0.0
        r.last_ap50 = score
        if self.keep == "last" or not m or score > r.best or not (self.out / "model.pt").exists():
            r.best = max(r.best, score)
            card = r.model.card
            card.metrics = {k: m[k] for k in ("AP", "AP50", "AP75", "precision", "recall", "f1") if k in m}
            card.metrics.update({"step": r.step, "epoch": r.epoch, "validation": "held-out area" if m else "none"})
            card.operating_point = m.get("score_threshold") if m else None
            card.trained_steps = r.step
            self._store_bf16_check(r)
            save_model(r.model, self.out / "model.pt")
            log.info("step %d: val AP50 %.3f (saved model.pt)", r.step, score)
        else:
            log.info("step %d: val AP50 %.3f (best %.3f)", r.step, score, r.best)
        self._save_checkpoint(r)
        r.budget.note_validation(time.perf_counter() - t0)
        self._log([r.step, r.epoch, "", "", "", "", f"{m.get('AP') or 0:.4f}" if m else "", f"{ap50 or 0:.4f}" if m else "",
                   f"{r.budget.elapsed():.1f}", f"validation ({time.perf_counter() - t0:.1f} s)"])
        if not final:
            self._pseudo_round(r)

    def _pseudo_round(self, r: Run) -> None:
        """Self-training: when the run's progress reaches the next round, the teacher labels the
        unlabelled areas again and the chips draw from its boxes from then on."""
        from .selftrain import pseudo_scenes, thresholds_from_validation

        tc = self.cfg.train
        if r.teacher is None or r.rounds_done >= tc.pseudo_rounds:
            return
        due = tc.burn_in + r.rounds_done * (1 - tc.burn_in) / tc.pseudo_rounds
        if r.progress < due:
            return
        t0 = time.perf_counter()
        if r.rounds_done == 0:
            r.teacher.reset(r.model)
        teacher = r.teacher.model
        op = r.model.card.operating_point if r.model.card.operating_point is not None else 0.5
        thr = thresholds_from_validation(teacher, self.val_sets, self.classes, self.overlap, r.device,
                                         self.cfg.detect.batch_size, tc.min_visibility, op)
        rng = np.random.default_rng([tc.seed, 99, r.rounds_done])
        scenes, n_sure, n_doubt = pseudo_scenes(teacher, self.pseudo_areas, thr, self.classes, self.overlap,
                                                self.cfg.tiling.tile_size, r.device, self.cfg.detect.batch_size, rng)
        r.data.set_scenes(self.train_scenes + [s for s in scenes if len(s.labels)], tc.pseudo_share)
        r.rounds_done += 1
        r.model.train()
        note = (f"pseudo-labels round {r.rounds_done}: {n_sure} boxes, {n_doubt} uncertain ignored; thresholds "
                f"(small/large, split at {thr.split:.0f} px) {thr.describe(self.classes)} ({time.perf_counter() - t0:.1f} s)")
        log.info(note)
        self._log([r.step, r.epoch, "", "", "", "", "", "", f"{r.budget.elapsed():.1f}", note])

    def _store_bf16_check(self, r: Run) -> None:
        """On a CPU with native bf16, store in the card how bf16 detection agrees with fp32 on
        validation tiles, so detection can use bf16 without checking again."""
        from ..pipeline.backends import bf16_agreement, cpu_features, sample_tiles
        from ..pipeline.settings import resolve_detect_settings

        if r.device.type != "cpu" or not self.val_sets or not cpu_features()["bf16"]:
            return
        card = r.model.card
        s = resolve_detect_settings(card, device="cpu", batch_size=self.cfg.detect.batch_size)
        tiles = []
        for ts, area in self.val_sets:
            tiles.extend(sample_tiles(ts.scene.area(*area), s, card, 8))
        if tiles:
            card.extra.setdefault("checks", {})["bf16"] = bf16_agreement(r.model, tiles[:16], s)


def train(config: Config | dict | str | Path, out_dir: str | Path = "runs/geodet", resume: bool = False, progress: bool = True) -> Path:
    """Train a model from a config (object, dict or YAML path); returns the path of ``model.pt``."""
    from ..config import load_config

    if isinstance(config, (str, Path)):
        config = load_config(config)
    elif isinstance(config, dict):
        config = config_from_dict(config)
    return Trainer(config, out_dir, resume=resume, progress=progress).run()
