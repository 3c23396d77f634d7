"""``geodet demo``: the whole job on synthetic scenes, offline, in a few minutes on a CPU."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .config import SceneLabels, load_config

log = logging.getLogger(__name__)


def _steps_made(metrics_csv) -> int:
    import csv

    with open(metrics_csv, newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["loss"]]
    return max(steps, default=0)


MIN_SIZE = 64  # px: room for a score of vehicles in each scene (a 16 px scene often has none)
MARK = ".geodet-demo"  # in a folder the demo writes: its files there are the demo's to replace
SCENES = ("data/train.tif", "data/train.gpkg", "data/test.tif", "data/test.gpkg")  # made by make_scene
WRITES = (*SCENES, "run", "detections.geojson", "detections.gpkg", "quicklook.png", "metrics.json")


def _is_demo_folder(out: Path) -> bool:
    if (out / MARK).is_file():
        return True
    try:  # a demo's before the mark: its metrics say so
        import json

        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        return isinstance(metrics, dict) and {"train_steps", "detection_backend"} <= set(metrics)
    except (OSError, ValueError):
        return False


def _check_demo_folder(out: Path, minutes: float, size: int) -> None:
    """Refuse, before any work, a budget or scene size that cannot make a demo, and a folder holding
    files of the demo's names (scenes, a training run, outputs) that no demo wrote: the demo replaces
    them."""
    from .errors import GeodetError

    if not minutes > 0:
        raise GeodetError(f"--time-limit must be a positive number of minutes, got {minutes:g}")
    if int(size) < MIN_SIZE:
        raise GeodetError(f"--size {size} is too small for the demo's scenes: give at least {MIN_SIZE} px (1024 by default)")
    if _is_demo_folder(out):
        return
    theirs = [name for name in WRITES if (out / name).exists() and not (name == "run" and (out / name).is_dir()
                                                                         and not any((out / name).iterdir()))]
    if theirs:
        listed = ", ".join(theirs[:4]) + (", ..." if len(theirs) > 4 else "")
        raise GeodetError(f"{out} holds {listed}, which no geodet demo wrote, and the demo replaces them: give another "
                          "--out (a new folder, or demo_out)")


def run_demo(out_dir="demo_out", minutes: float = 4.0, size: int = 1024, seed: int = 0, progress: bool = True,
             max_steps: int | None = None) -> dict:
    """Make train/test scenes, train the CPU preset for ``minutes``, detect, evaluate, write files."""
    from .pipeline.scenes import detect_scene
    from .evaluation import evaluate
    from .io.writers import check_output_path, missing_folders, remove_partial, write_detections, write_json
    from .model import load_model
    from .io.quicklook import quicklook
    from .synthetic import make_scene
    from .training.trainer import Trainer

    out = Path(out_dir)
    check_output_path(out / "metrics.json")
    _check_demo_folder(out, minutes, size)
    made = missing_folders(out / "data")  # removed again, with the scenes, if no model comes of the run
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = out / "data"
    data.mkdir(exist_ok=True)
    scenes = [out / n for n in (*SCENES, MARK) if not (out / n).exists()]  # made by this run (an earlier demo's stay)
    try:
        (out / MARK).write_text("geodet demo: the files of its names here are the demo's to replace\n", encoding="utf-8")
        log.info("making synthetic scenes (%d px, 0.3 m, vehicles) in %s", size, data)
        train_s = make_scene(data / "train.tif", data / "train.gpkg", size=size, seed=seed * 2 + 1)
        test_s = make_scene(data / "test.tif", data / "test.gpkg", size=size, seed=seed * 2 + 2)
        cfg = load_config("cpu")
        cfg.train.scenes = [SceneLabels(str(train_s.image), str(train_s.labels))]
        cfg.train.time_limit_min = minutes
        cfg.train.max_steps = max_steps
        cfg.train.seed = seed
        log.info("training the CPU preset for up to %.1f min on %d vehicles", minutes, train_s.n_objects)
        trainer = Trainer(cfg, out / "run", progress=progress, overwrite=True)  # the demo's own run folder
        model_path = trainer.run()
    except BaseException:  # a refused budget, an interrupt: the demo's scenes go with it (exit 2 writes nothing)
        run_left = (out / "run").is_dir() and any((out / "run").iterdir())  # stopped training keeps its checkpoint
        remove_partial([p for p in scenes if not (run_left and p == out / MARK)], made)  # the mark then stays with it
        raise
    share = trainer.cpu_share  # the trainer warns when other work took the CPU
    model = load_model(model_path)
    steps = _steps_made(out / "run" / "metrics.csv")
    log.info("detecting over the test scene")
    frame = detect_scene(test_s.image, model, progress=progress)
    write_detections(frame, out / "detections.geojson", style_min_score=model.card.operating_point)
    write_detections(frame, out / "detections.gpkg", style_min_score=model.card.operating_point)
    metrics = evaluate(frame, test_s.labels, scene=test_s.image)
    quicklook(test_s.image, frame, out / "quicklook.png", classes=model.card.classes, min_score=model.card.operating_point)
    metrics.pop("pr_curve", None)
    metrics["train_steps"] = steps
    metrics["model_from_step"] = model.card.trained_steps
    metrics["train_cpu_share"] = None if share is None else round(share, 2)
    backend = frame.attrs["report"].get("backend") or {}
    metrics["detection_backend"] = backend
    metrics["detect_seconds"] = frame.attrs["report"]["seconds"]["total"]
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(metrics, out / "metrics.json")
    print(f"geodet demo: trained {steps} steps in {minutes:g} min (model from step {model.card.trained_steps})")
    print(
        f"geodet demo: {len(frame)} detections of {test_s.n_objects} vehicles; AP50 {metrics['AP50']:.3f}, "
        f"AP {metrics['AP']:.3f}, precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f}\n"
        f"  detection:  {backend.get('backend')} {backend.get('precision')} ({backend.get('reason')}), "
        f"{metrics['detect_seconds']:.1f} s\n"
        f"  detections: {out / 'detections.geojson'} (EPSG:4326), {out / 'detections.gpkg'} ({test_s.crs})\n"
        f"  quicklook:  {out / 'quicklook.png'}\n  metrics:    {out / 'metrics.json'}\n"
        f"  model:      {model_path}\n  took {metrics['seconds']:.0f} s"
    )
    return metrics
