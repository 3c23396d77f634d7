"""The training run: ``Trainer`` reads what it trains on (``inputs``), builds the start model
(``start``), runs the loop on its clock (``loop``), validates (``validation``), runs self-training
rounds (``selftrain``) and writes the checkpoint, the metrics log and the model (``records``).

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

import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch

from ..config import Config, check_run_values
from ..errors import GeodetError
from ..io.scene import gdal_env
from ..progress import progress_bar
from . import inputs
from .loop import STOPS, CpuShare, Run, StopSignals, train_step, training_precision
from .records import (KEPT_KEYS, MetricsLog, check_resumed_cap, check_run_folder, check_same_data, load_checkpoint,
                      put_back, resume_settings, resumed_best, save_checkpoint, save_kept_model, set_aside, undo_run)
from .sampler import ChipDataset, collate_chips
from .schedule import DECAY_SHARE, Budget, lr_factor, make_optimizer, step_cap
from .start import apply_init, build_start_model, freeze_stages
from .validation import tta_operating_point, validate

log = logging.getLogger(__name__)
LOW_CPU_SHARE = 0.6  # below this share of its threads' CPU time, training was starved by other work

# names other modules and tests import from here
normalisation = inputs.normalisation
__all__ = ["CpuShare", "Interrupted", "Trainer", "freeze_stages", "normalisation", "train", "training_precision"]


class Interrupted(Exception):
    pass


class Trainer:
    def __init__(self, cfg: Config, out_dir: str | Path, resume: bool = False, progress: bool = True,
                 overwrite: bool = False):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.resume = resume
        self.overwrite = overwrite
        self.replaced: Optional[list] = None  # the old run's files --overwrite replaces (checked in run())
        self.before: set = set()  # run files in the folder before this run (a failure leaves them)
        self.progress = progress
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.main = self.rank == 0
        self.init = None  # (payload, card) of --init's model file
        self.metrics = MetricsLog(self.out / "metrics.csv", self.main)
        self.kept_metrics: dict = {}  # the validation before the strips were given back
        self.thresholds = None  # self-training's latest thresholds
        self.cpu_share: Optional[float] = None  # set at the end of a run

    # -- what is trained on ----------------------------------------------------------------
    def prepare(self):
        """Read and check every input: the start model's card (``--init``), the labelled scenes,
        the validation areas, the unlabelled scenes."""
        cfg = self.cfg
        check_run_values(cfg)  # before anything is read: values no run can start with
        if cfg.train.init and self.init is None:
            self.init = apply_init(cfg)
        if not cfg.train.scenes:
            raise GeodetError("no training scenes: list train.scenes in the config, or name them: geodet train "
                              "SCENE... --labels LABELS...")
        user_classes = cfg.model.classes if cfg.model.classes != ["object"] or not cfg.train.class_column else None
        self.train_scenes, classes = inputs.open_labelled(cfg.train.scenes, cfg, user_classes)
        self.val_sets = []  # [(TrainScene, area)]
        if cfg.train.val_scenes:
            vs, classes = inputs.open_labelled(cfg.train.val_scenes, cfg, classes, self.train_scenes[0].scene)
            self.val_sets = [(v, v.area) for v in vs]
            inputs.check_validation_scenes(vs, self.train_scenes)
        elif cfg.train.val_fraction > 0:
            self.val_sets = inputs.validation_strips(self.train_scenes, cfg.train.val_fraction)
        self.keep = cfg.train.keep
        if self.val_sets and not sum(inputs.labels_inside(v, a) for v, a in self.val_sets):
            hint = ("label objects inside the validation strip, or give --val-scene"
                    if any(getattr(v, "labelled", None) is not None for v, _ in self.val_sets) else
                    "if you labelled only part of the scene, pass --labelled-area (the validation strip is then cut "
                    "from it), or give --val-scene")
            log.warning("the validation area holds no labels, so validation cannot tell models apart: model.pt will be "
                        "the last model (%s)", hint)
            self.keep = "last"
        self.classes = classes
        t = cfg.tiling
        first = self.train_scenes[0].scene
        self.overlap = first.overlap_px(t.overlap_m, t.tile_size) if t.overlap_m is not None else t.overlap
        n_labels = sum(len(s.labels) for s in self.train_scenes)
        col = cfg.train.class_column
        where = f"from the labels' '{col}' column" if col else "one class: no class column (train.class_column '')"
        log.info("training on %d scene(s), %d labels; classes %s (%s)", len(self.train_scenes), n_labels, classes, where)
        self._prepare_self_training()

    def _prepare_self_training(self) -> None:
        from .selftrain import unlabelled_areas

        tc = self.cfg.train
        self.pseudo_areas = []
        if not (tc.self_training or tc.unlabelled):
            return
        inputs.check_self_training(tc, self.world, bool(self.val_sets))
        inputs.check_unlabelled(tc.unlabelled, self.train_scenes, self.val_sets)
        scenes = [inputs.open_unlabelled(p, self.cfg, self.train_scenes[0].scene) for p in tc.unlabelled]
        self.pseudo_areas = unlabelled_areas(self.train_scenes, self.val_sets, scenes)
        if not self.pseudo_areas:
            log.warning("self-training: nothing is unlabelled (no --unlabelled scene, and the labelled area covers "
                        "the scenes): training on the labels alone")
        else:
            px = sum((a.rect[2] - a.rect[0]) * (a.rect[3] - a.rect[1]) for a in self.pseudo_areas)
            log.info("self-training on %d unlabelled area(s), %.2g Mpx: burn-in on the labels for %d%% of the run, then "
                     "%d pseudo-label round(s)", len(self.pseudo_areas), px / 1e6, round(100 * tc.burn_in),
                     tc.pseudo_rounds)

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

    def setup(self) -> Run:
        """Data, device (and the process group when distributed), model, optimiser, schedule;
        the state of ``last.pt`` when resuming. The run folder is made only after every input
        has been read and checked."""
        tc = self.cfg.train
        torch.manual_seed(tc.seed + self.rank)
        total = step_cap(tc)
        if tc.val_give_back is not None and self.world > 1:
            raise GeodetError("train.val_give_back runs in one process: train without --engine ray or leave "
                              "val_give_back unset")
        seconds = None if tc.time_limit_min is None else float(tc.time_limit_min) * 60
        if seconds is not None and seconds <= 0:
            raise GeodetError(f"--time-limit must be a positive number of minutes, got {tc.time_limit_min:g}")
        replaced = []
        if self.main:  # before reading anything: the run must be able to write its folder, and not over a run
            from ..io.writers import check_output_folder

            check_output_folder(self.out)
            replaced = self.replaced if self.replaced is not None else check_run_folder(self.out, self.resume,
                                                                                       self.overwrite)
        state = load_checkpoint(self.out) if self.resume else None
        if state is not None:
            resume_settings(self.cfg, state, self.out)  # the run's tiling and network, before anything is read
        self.prepare()
        device = self._device()
        model = build_start_model(self.cfg, self.train_scenes, self.classes, self.overlap, state, self.init).to(device)
        self.out.mkdir(parents=True, exist_ok=True)
        # every input read and the start model built: the old run steps aside until this one has its model
        self.aside = set_aside(replaced, self.out)
        self.before -= {p.name for p in replaced}
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, tc)
        train_model = model
        if self.world > 1:
            train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        r = Run(model, train_model, params, opt, None, torch.amp.GradScaler("cuda", enabled=device.type == "cuda"),
                device, total, autocast_dtype=training_precision(tc.precision, device),
                val_areas=[[int(v) for v in a] for _, a in self.val_sets])
        warmup = min(tc.warmup_steps, total // 4) if total is not None else tc.warmup_steps
        self.warmup = warmup
        # the schedule reads the run's progress, which the budget sets before each scheduler step
        r.sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warmup, r.progress))
        if state is not None:
            check_same_data(state, self.train_scenes, self.out, model.card.classes)
            try:
                model.net.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
                r.sched.load_state_dict(state["scheduler"])
            except (RuntimeError, ValueError, KeyError):  # another network, classes or optimiser than the run's
                raise GeodetError(f"--resume: {self.out / 'last.pt'} holds another network or classes (its classes: "
                                  f"{list(state['card'].get('classes', []))}) than this config and these labels make "
                                  f"(classes {list(model.card.classes)}): resume with the run's own config and labels, "
                                  "or train into a new folder") from None
            r.step, r.epoch, r.best = int(state["step"]), int(state["epoch"]), resumed_best(state, r.val_areas)
            check_resumed_cap(self.out, r.step, total)
            if state.get("given_back"):  # the strips were training data by then: they stay so
                inputs.give_back(self.val_sets)
                r.given_back, self.kept_metrics = True, dict(state.get("kept_metrics") or {})
            r.rounds_done = int(state.get("rounds_done") or 0)
            if state.get("thresholds"):
                from .selftrain import Thresholds

                self.thresholds = Thresholds.from_dict(state["thresholds"])
            log.info("resuming at step %d (epoch %d)", r.step, r.epoch)
        # a resumed run gets a fresh time budget; a step cap counts from the first step
        r.budget = Budget(total, seconds, start_step=r.step)
        if tc.tta_operating_point and tc.val_give_back is None:
            r.budget.final_passes = 9.0  # the last validation runs again on 8 views
        if self.pseudo_areas:
            from .selftrain import EmaTeacher

            r.teacher = EmaTeacher(model, tc.ema_decay)
        return r

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

    # -- the run -------------------------------------------------------------------------
    def run(self) -> Path:
        """Train; returns ``model.pt``'s path. A failure before the first model (a bad input found
        late, a damaged chip) leaves nothing behind (``records.undo_run``); an interrupted run keeps
        ``last.pt`` for --resume, unless it was replacing a run (which is put back)."""
        from ..io.writers import missing_folders

        made = missing_folders(self.out)
        if self.main:  # a refusal here leaves the folder's run as it is
            self.replaced = check_run_folder(self.out, self.resume, self.overwrite)
        self.before, self.aside = {n for n in ("metrics.csv", "last.pt") if (self.out / n).exists()}, None
        try:
            path = self._run()
        except BaseException as exc:
            undone = self.main and not self.resume and undo_run(self.out, self.before, made, self.aside,
                                                                isinstance(exc, (Interrupted, KeyboardInterrupt)))
            if undone and isinstance(exc, Interrupted):
                raise Interrupted(f"stopped before its first model: the run in {self.out} is kept as it was") from None
            raise
        put_back(self.aside, self.out, done=True)  # this run has its model: the run it replaces goes
        return path

    def _run(self) -> Path:
        r = self.setup()
        tc = self.cfg.train
        self.metrics.start(self.resume, r.step)
        r.data, loader_kw = self._loader(r)
        usage = CpuShare()
        timed = r.budget.seconds is not None
        bar = progress_bar(total=round(r.budget.seconds) if timed else r.total, initial=0 if timed else r.step,
                           unit="s" if timed else "step", enabled=self.progress and self.main,
                           desc=f"train ({tc.time_limit_min:g} min)" if timed else "train")
        self._describe_run(r)
        r.model.train()
        stopped = None
        try:
            with gdal_env(), StopSignals() as signals:  # GDAL's block cache capped while chips stream in
                if r.teacher is not None and r.rounds_done:  # --resume: the chips of the rounds done, made again
                    self._pseudo_round(r, again=True)
                while stopped is None:
                    stopped = self._epoch(r, loader_kw, bar, signals)
        finally:
            bar.close()
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
        if stopped not in STOPS:
            if self.main:  # metrics.csv says why the run ended here, as it does at the end of a schedule
                self.metrics.note(r, r.budget.elapsed(), f"stopped: {stopped} at step {r.step} (last.pt saved: --resume)")
            raise Interrupted(f"stopped by {stopped} at step {r.step}; {self.out / 'last.pt'} is saved: rerun with --resume")
        self._finish(r, stopped, usage.share())
        return self.out / "model.pt"

    def _epoch(self, r: Run, loader_kw: dict, bar, signals: StopSignals) -> Optional[str]:
        """One epoch of steps, then validation or a checkpoint; returns why the run stops (None: go on)."""
        tc = self.cfg.train
        timed = r.budget.seconds is not None
        stopped = None
        r.data.epoch = r.epoch
        for images, targets in torch.utils.data.DataLoader(r.data, **loader_kw):
            losses = train_step(r, images, targets, tc.grad_clip, self.warmup, self.world)
            if timed:
                bar.n = min(bar.total, round(r.budget.clock(r.step)))
                bar.refresh()
            else:
                bar.update(1)
            bar.set_postfix(step=r.step, loss=f"{losses['loss']:.3f}")
            self.metrics.step(r, losses, r.budget.elapsed())
            stopped = signals.requested or losses["stop"]
            if stopped:
                break
        r.epoch += 1
        if stopped in STOPS:
            self._end_of_epoch(r, final=stopped is not None)
        elif self.main:
            save_checkpoint(self.out, r, self.cfg, self.kept_metrics, self.thresholds)
        return stopped

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
        self.metrics.note(r, b.elapsed(), f"stopped: {why}")
        if self.main and r.teacher is not None and r.rounds_done < self.cfg.train.pseudo_rounds:
            from .selftrain import too_few_rounds

            too_few_rounds(self, r)
        if self.main and not self.val_sets:
            log.info("training stopped at step %d (%s); no validation (%s and no --val-scene): model.pt is the last "
                     "model", r.step, why, "train.val_fraction 0" if not self.cfg.train.val_fraction else
                     "the labelled scenes are too small to hold out a strip of 16 px or more")
        elif self.main:
            log.info("training stopped at step %d (%s); validation AP50 %.3f (best seen %.3f); model.pt is the %s "
                     "model", r.step, why, r.last_ap50, max(r.best, 0.0),
                     "last" if self.keep == "last" else "best")
        if self.main and share is not None and share < LOW_CPU_SHARE and b.elapsed() > 30:
            log.warning("training got %.0f%% of the CPU time its %d thread(s) could use (other programs were busy on "
                        "these cores), so it made fewer steps than the budget buys on an idle machine: rerun on an "
                        "idle machine or with a larger --time-limit", 100 * share, torch.get_num_threads())

    # -- validation and self-training ----------------------------------------------------
    def _end_of_epoch(self, r: Run, final: bool) -> None:
        """Validate when due (always at the end), log, keep the best model (its card holds the
        metrics and the operating point), and save ``last.pt``. Once the validation strips are
        given back, nothing is validated again: the card keeps the last validation before."""
        if not self.main:
            return
        if self._give_back_due(r, final):
            self._give_back(r)
        if r.given_back:
            if final:
                save_kept_model(r, self.kept_metrics, self.out / "model.pt", self.val_sets, self.cfg.detect.batch_size)
                log.info("step %d: saved model.pt (validated at step %d, before the strip was given back)", r.step,
                         self.kept_metrics.get("step", 0))
            save_checkpoint(self.out, r, self.cfg, self.kept_metrics, self.thresholds)
            if not final:
                self._pseudo_round(r)
            return
        if not r.budget.due_validation(final):
            save_checkpoint(self.out, r, self.cfg, self.kept_metrics, self.thresholds)
            self._pseudo_round(r)
            return
        t0 = time.perf_counter()
        m = validate(r.model, self.val_sets, self.classes, self.overlap, r.device, self.cfg.detect.batch_size,
                     self.cfg.train.min_visibility)
        ap50 = m.get("AP50") if m else None
        score = ap50 if ap50 is not None else 0.0
        kept = self.keep == "last" or not m or score > r.best or not (self.out / "model.pt").exists()
        if final and m and kept:
            m["tta_score_threshold"] = self._tta_threshold(r)
        elif final and m and self.cfg.train.tta_operating_point:
            self._tta_for_kept_model(r)  # keep: best kept an earlier model.pt: TTA's operating point is its
        r.model.train()
        r.last_ap50 = score
        if kept:
            r.best = max(r.best, score)
            save_kept_model(r, m, self.out / "model.pt", self.val_sets, self.cfg.detect.batch_size)
            if m:
                log.info("step %d: val AP50 %.3f (saved model.pt)", r.step, score)
            else:
                log.info("step %d: saved model.pt (no validation)", r.step)
        else:
            log.info("step %d: val AP50 %.3f (best %.3f)", r.step, score, r.best)
        save_checkpoint(self.out, r, self.cfg, self.kept_metrics, self.thresholds)
        r.budget.note_validation(time.perf_counter() - t0)
        self.metrics.note(r, r.budget.elapsed(), f"validation ({time.perf_counter() - t0:.1f} s)",
                          val_AP=f"{m.get('AP') or 0:.4f}" if m else "", val_AP50=f"{ap50 or 0:.4f}" if m else "")
        if not final:
            self._pseudo_round(r)

    def _give_back_due(self, r: Run, final: bool) -> bool:
        at = self.cfg.train.val_give_back
        return (at is not None and not r.given_back and not final and r.progress >= at
                and any(ts.held_out is not None for ts, _ in self.val_sets))

    def _give_back(self, r: Run) -> None:
        """Validate one last time (the operating point, the card's metrics and self-training's
        thresholds come from it), then return the validation strips' labels to training."""
        t0 = time.perf_counter()
        m = validate(r.model, self.val_sets, self.classes, self.overlap, r.device, self.cfg.detect.batch_size,
                     self.cfg.train.min_visibility)
        r.model.train()
        r.last_ap50 = r.best = (m.get("AP50") or 0.0) if m else 0.0
        self.kept_metrics = {k: v for k, v in dict(m or {}, step=r.step).items() if k in KEPT_KEYS}
        self.kept_metrics["note"] = f"validated at step {r.step}, before the validation strip was given back to training"
        r.model.card.operating_point = m.get("score_threshold") if m else None
        if m:
            self.kept_metrics["tta_score_threshold"] = self._tta_threshold(r)
        if r.teacher is not None and self.thresholds is None:
            log.info("self-training's thresholds are measured now, on the student, before the strip is given back "
                     "(no round has run yet: train.val_give_back is earlier than train.burn_in)")
            self.thresholds = self._thresholds(r, r.model)
        n = inputs.give_back(self.val_sets)
        r.data.set_scenes(r.data.scenes, r.data.pseudo_share)
        r.given_back = True
        note = (f"validation (AP50 {r.last_ap50:.4f}), then the strip's {n} label(s) given back to training "
                f"({time.perf_counter() - t0:.1f} s)")
        log.info("step %d: %s", r.step, note)
        self.metrics.note(r, r.budget.elapsed(), note, val_AP=f"{m.get('AP') or 0:.4f}" if m else "",
                          val_AP50=f"{r.last_ap50:.4f}" if m else "")

    def _tta_threshold(self, r: Run) -> Optional[float]:
        """The operating point of test-time augmentation (``train.tta_operating_point``), on the
        validation strips: TTA's fused scores run lower than the plain model's."""
        if not self.cfg.train.tta_operating_point:
            return None
        op, m, seconds = tta_operating_point(r.model, self.val_sets, self.classes, self.overlap, r.device, self.cfg)
        log.info("step %d: operating point with test-time augmentation %s (AP50 %.3f; %.1f s)", r.step,
                 "none" if op is None else f"{op:.3f}", (m.get("AP50") or 0.0) if m else 0.0, seconds)
        return op

    def _tta_for_kept_model(self, r: Run) -> None:
        """TTA's operating point for the model.pt an earlier validation kept (``keep: best``),
        measured once, at the end, on that model, and written into its card."""
        from ..model import load_model
        from ..model.file import save_model

        path = self.out / "model.pt"
        if not path.exists() or not self.val_sets:
            return
        kept = load_model(path).to(r.device).eval()
        op, _, seconds = tta_operating_point(kept, self.val_sets, self.classes, self.overlap, r.device, self.cfg)
        kept.card.extra.pop("tta_operating_point", None)
        if op is not None:
            kept.card.extra["tta_operating_point"] = float(op)
        save_model(kept.cpu(), path)
        log.info("operating point with test-time augmentation of the kept model.pt (step %s): %s (%.1f s)",
                 kept.card.metrics.get("step", "?"), "none" if op is None else f"{op:.3f}", seconds)

    def _thresholds(self, r: Run, teacher):
        from .selftrain import thresholds_from_validation

        tc = self.cfg.train
        op = r.model.card.operating_point if r.model.card.operating_point is not None else 0.5
        return thresholds_from_validation(teacher, self.val_sets, self.classes, self.overlap, r.device,
                                          self.cfg.detect.batch_size, tc.min_visibility, op)

    def _pseudo_round(self, r: Run, again: bool = False) -> None:
        from .selftrain import pseudo_round

        pseudo_round(self, r, again)


def train(config: Config | dict | str | Path, out_dir: str | Path = "runs/geodet", resume: bool = False, progress: bool = True,
          overwrite: bool = False) -> Path:
    """Train a model from a config (object, dict or YAML path); returns the path of ``model.pt``.
    A folder that holds a run is continued (``resume``) or replaced (``overwrite``), never silently."""
    config = inputs.training_config(config, out_dir)
    return Trainer(config, out_dir, resume=resume, progress=progress, overwrite=overwrite).run()
