"""What a training run writes: ``last.pt`` (the checkpoint ``--resume`` reads), ``metrics.csv`` (a
row per step, validation, self-training round and the reason the run stopped) and ``model.pt``
with its card (validation metrics, operating point, the bf16 check)."""

from __future__ import annotations

import csv
import logging
import ntpath
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import GeodetError, brief
from ..model import save_model

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "geodet-checkpoint"
METRICS_HEADER = ["step", "epoch", "loss", "classification", "bbox_regression", "lr", "val_AP", "val_AP50", "seconds",
                  "note"]
CARD_METRICS = ("AP", "AP50", "AP75", "precision", "recall", "f1")
KEPT_KEYS = CARD_METRICS + ("score_threshold", "tta_score_threshold", "step", "note")  # what a checkpoint keeps of a validation


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for every thread meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def save_checkpoint(out: Path, r, cfg, kept: dict | None = None, thresholds=None) -> None:
    """``out/last.pt``: the model, optimiser and scheduler state and the step (and, once the
    validation strips were given back, the validation before: ``kept``; self-training's rounds and
    thresholds), written atomically."""
    state = {
        "format": CHECKPOINT_FORMAT, "version": 1, "step": r.step, "epoch": r.epoch, "best_ap50": r.best,
        "card": r.model.card.to_dict(), "config": asdict(cfg),
        "model": r.model.net.state_dict(), "optimizer": r.opt.state_dict(), "scheduler": r.sched.state_dict(),
        "given_back": bool(r.given_back), "kept_metrics": kept or {}, "rounds_done": int(r.rounds_done),
        "thresholds": None if thresholds is None else thresholds.to_dict(), "val_areas": r.val_areas,
    }
    fd, tmp = tempfile.mkstemp(prefix=".last.", suffix=".pt", dir=out)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # as any file the user makes (mkstemp's is theirs alone): a shared run folder resumes
        torch.save(state, tmp)
        os.replace(tmp, out / "last.pt")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(out: Path) -> dict:
    """The state in ``out/last.pt`` (read without running code); a one-line error otherwise."""
    path = out / "last.pt"
    if not path.is_file():
        raise GeodetError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file; nothing in it runs
        raise GeodetError(f"{path}: checkpoint cannot be read ({brief(exc, 120)})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise GeodetError(f"{path}: not a geodet training checkpoint")
    return state


RUN_FILES = ("model.pt", "last.pt", "metrics.csv")  # what a run writes in its folder


ASIDE = ".replaced.geodet-"  # the hidden folder an --overwrite run keeps the run it replaces in


def check_run_folder(out: str | Path, resume: bool, overwrite: bool) -> list[Path]:
    """The run files already in ``out`` that this run will replace (``overwrite``); a one-line
    error where ``out`` holds a run and neither ``resume`` nor ``overwrite`` says what to do with it.
    A run an ``--overwrite`` that was killed set aside is put back first (or, beside a model of
    the killed run's own, said)."""
    out = Path(out)
    if resume and overwrite:
        raise GeodetError(f"--resume continues the run in {out} and --overwrite replaces it: give one of them")
    for stale in sorted(out.glob(ASIDE + "*")) if out.is_dir() else []:
        if (out / "model.pt").exists():
            log.warning("%s holds a run an earlier --overwrite set aside and never finished replacing: delete it, or "
                        "move its files back by hand", stale)
        else:  # killed before its model: the run it was to replace is the folder's run
            put_back(stale, out, newer=False)
    found = [out / n for n in RUN_FILES if (out / n).exists()]
    if found and not resume and not overwrite:
        go_on = "continue it with --resume, " if (out / "last.pt").exists() else ""
        raise GeodetError(f"{out} holds a run ({', '.join(p.name for p in found)}): {go_on}replace it with --overwrite, "
                          "or train into a new folder")
    return found if overwrite else []


def set_aside(paths: list[Path], out: Path) -> Path | None:
    """``--overwrite``: move the old run's files (``check_run_folder``'s list) into a hidden folder
    of ``out``, where they stay until this run has its model (``put_back`` otherwise). All or
    nothing: a file that cannot be moved (open in another program) leaves them all in place."""
    import tempfile

    if not paths:
        return None
    aside = Path(tempfile.mkdtemp(prefix=ASIDE, dir=out))
    moved = []
    try:
        for path in paths:
            os.replace(path, aside / path.name)
            moved.append(path)
    except OSError as exc:
        for done in moved:
            os.replace(aside / done.name, done)
        aside.rmdir()
        raise GeodetError(f"--overwrite: {path} cannot be moved aside ({exc.strerror}): close the program that holds "
                          "it, or train into a new folder") from None
    log.info("--overwrite: the run in %s (%s) is replaced once this one has its model", out,
             ", ".join(p.name for p in paths))
    return aside


def put_back(aside: Path | None, out: Path, done: bool = False, newer: bool = True) -> list[str]:
    """The old run's files set aside go back (a run that failed, or stopped before its model,
    leaves the run it was to replace as it was); when this run is ``done``, they are removed.
    With ``newer`` False they replace what is there. Returns the names put back."""
    import shutil

    back = []
    if aside is None or not aside.is_dir():
        return back
    for f in sorted(aside.iterdir()) if not done else []:
        if not newer or not (out / f.name).exists():
            os.replace(f, out / f.name)
            back.append(f.name)
    shutil.rmtree(aside, ignore_errors=True)
    if back:
        log.warning("--overwrite: the run this one was to replace is kept in %s as it was (%s)", out, ", ".join(back))
    return back


def undo_run(out: Path, before: set, made: list, aside: Path | None, stopped: bool) -> bool:
    """A new run (not resumed) that failed leaves no file of its own unless it has a model
    (``before``: the names that were not its own; ``made``: the folders it made); one ``stopped``
    (a signal) keeps its ``last.pt`` for --resume, unless it was replacing a run: then, without a
    model of its own, it goes and the run it replaced is put back. Returns whether it was."""
    from ..io.writers import remove_partial

    if (not stopped or aside is not None) and not (out / "model.pt").exists():
        remove_partial([out / n for n in ("metrics.csv", "last.pt") if n not in before], made if aside is None else [])
    return bool(put_back(aside, out))


def resumed_best(state: dict, val_areas) -> float:
    """The best validation AP50 a resumed run goes on from: forgotten (said) where the validation
    areas moved since (labels changed: the strip that holds them may be another), as it was
    measured on other pixels."""
    before = state.get("val_areas")
    if before is not None and val_areas is not None and [list(a) for a in before] != [list(a) for a in val_areas]:
        log.warning("--resume: the validation area moved (%s, was %s): the best validation AP50 so far is forgotten",
                    val_areas, before)
        return -1.0
    return float(state["best_ap50"])


def check_resumed_cap(out: Path, step: int, total: int | None) -> None:
    """A resumed run at ``step`` must have steps left under the step cap ``total``."""
    if total is not None and step >= total:
        raise GeodetError(f"--resume: the run in {out} is at step {step}, and this command's cap ends it at step "
                          f"{total} (--max-steps, or --epochs x steps per epoch): give a larger cap")


def check_same_data(state: dict, train_scenes, out: Path, classes=None) -> None:
    """``--resume`` trains on the checkpoint's (``state``) scenes and labels: other files are refused (a new
    run starts from the model with --init); changed labels in the same files are said. Other class
    names (``classes``, the labels' now) are refused even where their number is the same: the
    head's outputs would silently change meaning (a class renamed or recased sorts elsewhere)."""
    from ..io.labels import integer_name  # (a run of an older geodet read an integer class 1 as '1.0')

    was = [str(c) for c in (state["card"].get("classes") or [])]
    if classes is not None and was and [integer_name(c) for c in was] != [integer_name(str(c)) for c in classes]:
        raise GeodetError(f"--resume: {out / 'last.pt'} was trained on the classes {was}, these labels name "
                          f"{[str(c) for c in classes]}: resume with the run's class names, or start a new run from "
                          f"its model (--init {out / 'model.pt'} -o NEW_FOLDER)")
    def key(e):  # by name; ntpath splits a checkpoint's Windows paths too
        return ntpath.basename(str(e.get("scene"))), ntpath.basename(str(e.get("labels")))

    def files(entries):  # in any order
        return sorted(map(key, entries))

    before = list(state["card"].get("trained_on") or [])
    now = [{"scene": ts.scene.path, "labels": ts.labels_path, "labels_used": len(ts.labels)}
           for ts in train_scenes]
    if before and files(before) != files(now):
        def said(pairs):
            return ", ".join(f"{s} ({lab})" for s, lab in pairs)

        raise GeodetError(f"--resume: {out / 'last.pt'} was trained on {said(files(before))}, this run names "
                          f"{said(files(now))}: resume with the run's scenes and labels, or start a new run from "
                          f"its model (--init {out / 'model.pt'} -o NEW_FOLDER)")
    used = {key(b): b.get("labels_used") for b in before}
    for n in now:
        was = used.get(key(n))
        if was is not None and int(was) != n["labels_used"]:
            log.warning("--resume: %s now has %d usable labels (%d when the run began); training goes on with "
                        "the new ones", ntpath.basename(str(n["labels"])), n["labels_used"], int(was))


RESUMED = ("tiling.tile_size", "tiling.overlap", "tiling.overlap_m", "scene.bands", "scene.gsd_m", "scene.percentiles",
           "train.class_column",  # another column would give the head's classes to other objects
           # the optimiser's state holds its kind, learning rate and decay, and which weights it moves
           "train.optimizer", "train.lr", "train.weight_decay", "train.freeze_backbone_stages")


def resume_settings(cfg, state: dict, out: Path) -> None:
    """``--resume`` continues the run as it was: its tiling, scene and network settings (from
    ``last.pt``) replace a config file's or a default (said); a command-line value that differs is
    refused. The budget (epochs, steps, minutes) is this command's."""
    old = state.get("config") or {}
    # (the classes come from the labels; model.pretrained chose the first weights, and which batch norms are frozen)
    keys = list(RESUMED) + [f"model.{k}" for k in (old.get("model") or {}) if k != "classes"]
    kept, refused = [], []
    for key in keys:
        section, name = key.split(".", 1)
        if name not in (old.get(section) or {}):
            continue
        before, now = old[section][name], getattr(getattr(cfg, section), name)
        same = (list(before) == list(now)) if isinstance(before, (list, tuple)) and isinstance(now, (list, tuple)) \
            else before == now
        if same:
            continue
        if key in cfg.from_arguments:
            refused.append(f"{key} {before} (this command: {now})")
        else:
            setattr(getattr(cfg, section), name, list(before) if isinstance(before, (list, tuple)) else before)
            kept.append(f"{key} {before}")
    if refused:
        raise GeodetError(f"--resume: the run in {out} was trained with {', '.join(refused)}: leave those flags out "
                          "(the run keeps its settings), or start a new run")
    if kept:
        log.info("--resume: the run's own settings kept: %s", ", ".join(kept))


class MetricsLog:
    """``metrics.csv``, appended row by row by the main rank (other ranks write nothing)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def start(self, resume: bool, step: int = 0) -> None:
        """A new file with its header, unless a resumed run continues one: then without the rows
        past ``step``, the checkpoint's (a run killed after it logged steps it never saved runs
        them again: they are not in the file twice)."""
        if not self.enabled:
            return
        if not resume or not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(METRICS_HEADER)
            return
        try:
            with open(self.path, newline="") as f:
                rows = list(csv.reader(f))
        except (OSError, UnicodeDecodeError):
            return
        if not rows or "step" not in rows[0]:
            return
        at = rows[0].index("step")  # the file's own header (an older run's may differ)

        def past(row):
            try:
                return int(row[at]) > step
            except (IndexError, ValueError):
                return False

        if any(past(row) for row in rows[1:]):
            from ..io.writers import atomic_path

            with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([rows[0], *[row for row in rows[1:] if not past(row)]])

    def row(self, **values) -> None:
        if self.enabled:
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerow([values.get(k, "") for k in METRICS_HEADER])

    def step(self, r, losses: dict, seconds: float) -> None:
        self.row(step=r.step, epoch=r.epoch, **{k: f"{losses[k]:.5f}" for k in ("loss", "classification", "bbox_regression")},
                 lr=f"{r.sched.get_last_lr()[0]:.3g}", seconds=f"{seconds:.1f}")

    def note(self, r, seconds: float, note: str, **values) -> None:
        self.row(step=r.step, epoch=r.epoch, seconds=f"{seconds:.1f}", note=note, **values)


def save_kept_model(r, metrics: dict, path: Path, val_sets, batch_size: int) -> None:
    """``model.pt`` from the run's model, its card holding ``metrics`` (the validation that chose
    it), its operating point and, on CPUs with native bf16, how bf16 detection agrees with fp32."""
    card = r.model.card
    card.metrics = {k: metrics[k] for k in CARD_METRICS if k in metrics}
    # a strip cut from a training scene keeps that scene's full area (also once given back); a --val-scene has none
    scenes = [ntpath.basename(str(ts.scene.path)) for ts, _ in val_sets if getattr(ts, "full_area", None) is None]
    kind = "held-out area" if len(scenes) < len(val_sets) else f"validation scene(s): {', '.join(scenes)}"
    card.metrics.update({"step": r.step, "epoch": r.epoch, "validation": kind if metrics else "none"})
    if metrics.get("note"):  # validated earlier than this step (the strip was given back to training since)
        card.metrics.update(validated_at_step=int(metrics["step"]), validation_note=metrics["note"])
    card.operating_point = metrics.get("score_threshold") if metrics else None
    card.extra.pop("tta_operating_point", None)  # measured for this model, or not at all
    if metrics.get("tta_score_threshold") is not None:
        card.extra["tta_operating_point"] = float(metrics["tta_score_threshold"])
    card.trained_steps = r.step
    store_bf16_check(r, val_sets, batch_size)
    save_model(r.model, path)


def store_bf16_check(r, val_sets, batch_size: int) -> None:
    """On a CPU with native bf16, store in the card how bf16 detection agrees with fp32 on
    validation tiles, so detection can use bf16 without checking again."""
    from ..pipeline.backends import bf16_agreement, cpu_features, sample_tiles
    from ..pipeline.settings import resolve_detect_settings

    if r.device.type != "cpu" or not val_sets or not cpu_features()["bf16"]:
        return
    card = r.model.card
    s = resolve_detect_settings(card, device="cpu", batch_size=batch_size)
    tiles = []
    for ts, area in val_sets:
        tiles.extend(sample_tiles(ts.scene.area(*area), s, card, 8))
    if tiles:
        card.extra.setdefault("checks", {})["bf16"] = bf16_agreement(r.model, tiles[:16], s)
