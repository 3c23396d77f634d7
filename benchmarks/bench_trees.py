"""Real tree crowns: train from scratch on yell_541000 for at most N minutes with geodet's
trees preset, then with stock torchvision settings (geodet/configs/stock.yaml over the trees preset:
P3-P7, 32-512 px anchors, 256-channel heads, 800 px resize), the same budget each. Reports
whole-scene AP50, and precision/recall at IoU 0.4, on osbs_029 and soap_061 (class-agnostic).

    python benchmarks/bench_trees.py [--minutes 15] [--data ../shared/data/trees]
"""

import argparse
import json
import time
from pathlib import Path

import yaml

from geodet.config import SceneLabels, apply_overrides, config_dir, load_config
from geodet.pipeline.scenes import detect_scene
from geodet.evaluation import evaluate
from geodet.model import load_model
from geodet.training.trainer import Trainer


def run(name, cfg, data, minutes, out):
    cfg.train.scenes = [SceneLabels(str(data / "yell_541000.tif"), str(data / "yell_541000.gpkg"))]
    cfg.train.time_limit_min = minutes
    cfg.train.epochs = 10_000
    t0 = time.perf_counter()
    path = Trainer(cfg, out / name, progress=False, overwrite=True).run()
    minutes_used = (time.perf_counter() - t0) / 60
    model = load_model(path)
    rows = []
    for scene in ("osbs_029", "soap_061"):
        f = detect_scene(data / f"{scene}.tif", model, progress=False)
        m50 = evaluate(f, data / f"{scene}.gpkg", scene=data / f"{scene}.tif", iou=0.5, class_column="")
        m40 = evaluate(f, data / f"{scene}.gpkg", scene=data / f"{scene}.tif", iou=0.4, class_column="")
        rows.append({"settings": name, "scene": scene, "AP50": round(m50["AP50"], 3),
                     "precision@0.4": round(m40["precision"], 3), "recall@0.4": round(m40["recall"], 3),
                     "f1@0.4": round(m40["f1"], 3), "train_min": round(minutes_used, 1),
                     "steps": model.card.trained_steps, "labels": m50["n_labels"]})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "trees"))
    ap.add_argument("--workdir", default="/tmp/geodet-bench/trees")
    ap.add_argument("--only", choices=["geodet", "stock"])
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.only in (None, "geodet"):
        rows += run("geodet trees preset", load_config("trees"), data, args.minutes, out)
    if args.only in (None, "stock"):
        stock = load_config("trees")
        over = yaml.safe_load((config_dir() / "stock.yaml").read_text())["model"]
        apply_overrides(stock, {f"model.{k}": v for k, v in over.items()})
        rows += run("stock torchvision settings", stock, data, args.minutes, out)
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
