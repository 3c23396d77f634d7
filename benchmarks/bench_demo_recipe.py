"""The demo's recipe under other settings: train the CPU preset on the demo's training scene for the
demo's time budget, with config overrides, then detect over its unseen test scene and evaluate.
Same scenes, seed and budget as ``geodet demo`` (which this mirrors); one line of JSON per run.

    python benchmarks/bench_demo_recipe.py NAME [--set train.lr=0.001 ...] [--minutes 4] [--seed 0]
        [--size 1024] [--steps N] [--out docs/demo/recipe.jsonl]

``--set section.key=value`` takes a JSON value (``train.lr=0.001``, ``model.group_norm=true``).
``--box-loss giou`` swaps the regression loss (torchvision's ``l1``, ``smooth_l1``, ``giou``, ...);
``--decay-share F`` the share of the run that the LR decays over. ``--steps`` trains a fixed
number of steps instead of a time budget. ``--val-size N`` validates on a separate N x N scene. Run it on an idle machine: the budget is wall time.
"""

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

from geodet.config import SceneLabels, load_config
from geodet.evaluation import evaluate
from geodet.model import load_model
from geodet.pipeline.scenes import detect_scene
from geodet.synthetic import make_scene
from geodet.training.trainer import Trainer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("--set", action="append", default=[], help="section.key=JSON value")
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--box-loss")
    ap.add_argument("--decay-share", type=float)
    ap.add_argument("--val-size", type=int, default=None,
                    help="validate on a separate synthetic scene of this side (seed 1000000 + seed) and train on the "
                         "whole training scene, instead of holding out its right 20%%")
    ap.add_argument("--workdir", default="/tmp/geodet-bench/demo-recipe")
    ap.add_argument("--out", default=None, help="append the JSON line to this file")
    a = ap.parse_args()
    if a.decay_share is not None:
        import geodet.training.schedule as schedule

        schedule.DECAY_SHARE = a.decay_share
    if a.box_loss:
        import geodet.training.trainer as trainer

        build = trainer.build_model

        def build_with_loss(*args, **kwargs):
            m = build(*args, **kwargs)
            m.net.head.regression_head._loss_type = a.box_loss
            return m

        trainer.build_model = build_with_loss
    wd = Path(a.workdir)
    data = wd / f"data_seed{a.seed}_{a.size}"
    data.mkdir(parents=True, exist_ok=True)
    # the demo's scenes: seeds 2s+1 (train) and 2s+2 (test)
    tr = make_scene(data / "train.tif", data / "train.gpkg", size=a.size, seed=a.seed * 2 + 1)
    te = make_scene(data / "test.tif", data / "test.gpkg", size=a.size, seed=a.seed * 2 + 2)
    cfg = load_config("cpu")
    for s in a.set:
        key, value = s.split("=", 1)
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, json.loads(value))
    cfg.train.scenes = [SceneLabels(str(tr.image), str(tr.labels))]
    if a.val_size:
        va = make_scene(data / f"val{a.val_size}.tif", data / f"val{a.val_size}.gpkg", size=a.val_size,
                        seed=1_000_000 + a.seed)
        cfg.train.val_scenes = [SceneLabels(str(va.image), str(va.labels))]
    cfg.train.seed = a.seed
    cfg.train.epochs = 1000
    if a.steps:
        cfg.train.max_steps, cfg.train.time_limit_min = a.steps, None
    else:
        cfg.train.time_limit_min = a.minutes
    out = wd / "runs" / a.name
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    path = Trainer(cfg, out, progress=False, overwrite=True).run()
    t_train = time.perf_counter() - t0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    model = load_model(path)
    frame = detect_scene(te.image, model, progress=False)
    m = evaluate(frame, te.labels, scene=te.image)
    agnostic = evaluate(frame, te.labels, scene=te.image, class_column="")
    backend = frame.attrs["report"].get("backend") or {}
    res = {"name": a.name, "set": a.set, "val_size": a.val_size, "box_loss": a.box_loss, "decay_share": a.decay_share, "seed": a.seed,
           "lr": cfg.train.lr, "steps": max(int(r["step"]) for r in rows if r["loss"]), "train_s": round(t_train, 1),
           "model_step": model.card.trained_steps, "AP50": round(m["AP50"], 3), "AP": round(m["AP"], 3),
           "precision": round(m["precision"], 2), "recall": round(m["recall"], 2),
           "AP50_per_class": {k: round(v["AP50"], 3) for k, v in m["per_class"].items()},
           "AP50_class_agnostic": round(agnostic["AP50"], 3), "detections": len(frame), "vehicles": te.n_objects,
           "detect": f"{backend.get('backend')} {backend.get('precision')}",
           "val_AP50": [(int(r["step"]), float(r["val_AP50"])) for r in rows if r["val_AP50"]]}
    print(json.dumps(res))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
