"""Few labels: what each part of the trainer buys, over seeds, at a fixed CPU budget per run.

Scenarios (``--scenario``, repeatable):
- ``inscene:NAME``: the crowns of the left third of ``NAME`` (a scene of ``--data``) are labelled;
  train on them, then detect over the whole scene and score the right two thirds (detections and
  labels centred there). The everyday "label a corner, find the rest" job.
- ``cross:NAME[+NAME...]``: train on every crown of ``yell_541000``; score the whole of each
  ``NAME`` (other sites).
- ``synthetic:SEED``: synthetic vehicles (0.3 m, cars and trucks): a 1024^2 training scene of
  seed SEED whose 512^2 top-left corner is labelled (about 100 vehicles), scored on an unseen
  1024^2 scene of seed SEED + 1 (with classes).

Rows (``--rows``): ``today`` (the trainer before this benchmark: 10 epochs x steps_per_epoch
whatever the budget, the whole scene taught, no augmentation beyond flips/rot90/brightness),
``budget`` (+ the time limit is the schedule), ``area`` (+ the labelled area), ``scale``,
``paste``, ``photo`` (+ one augmentation each: scale jitter 0.25, copy-paste 0.5, photometric
1.0), ``all`` (area and the three augmentations), ``preset`` (the preset as shipped), ``self``
(``all`` + self-training), ``pretrain`` (``all`` from a backbone pretrained for a third of the
minutes on the same scenes), ``both``. Every row gets the same minutes in all.

Every run appends one JSON line to ``--results`` (rerunning skips what is there) with the
scores of the model kept by validation (``best``) and of the last step (``last``), the steps,
the minutes used and the CPU share the run got. ``--table`` prints the mean, the spread (min to
max) and every run per scenario and row.

    python benchmarks/bench_few_labels.py --scenario inscene:yell_541000 --rows today,budget,area --seeds 0,1,2 \
        --minutes 15
    python benchmarks/bench_few_labels.py --table
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "trees"
RESULTS = ROOT / "docs" / "few_labels" / "results.jsonl"
AUGS = {"scale_jitter": 0.0, "copy_paste": 0.0, "photometric": 0.0}
ROWS = {
    "today": dict(epochs=10, area=False, **AUGS),
    "budget": dict(area=False, **AUGS),
    "area": dict(area=True, **AUGS),
    "scale": dict(area=True, **{**AUGS, "scale_jitter": 0.25}),
    "paste": dict(area=True, **{**AUGS, "copy_paste": 0.5}),
    "photo": dict(area=True, **{**AUGS, "photometric": 1.0}),
    "all": dict(area=True, scale_jitter=0.25, copy_paste=0.5, photometric=1.0),
    "preset": dict(area=True),
    # + self-training: on the rest of the labelled scene (in-scene) or on the target scenes (cross-site,
    # synthetic: the unseen scene, unlabelled)
    "self": dict(area=True, scale_jitter=0.25, copy_paste=0.5, photometric=1.0, self_training=True),
    # + self-supervised pretraining on the same scenes (labelled and target, unlabelled) for a third of
    # the budget, then training from it for the rest: the same minutes in all
    "pretrain": dict(area=True, scale_jitter=0.25, copy_paste=0.5, photometric=1.0, pretrain=1 / 3),
    "both": dict(area=True, scale_jitter=0.25, copy_paste=0.5, photometric=1.0, self_training=True, pretrain=1 / 3),
}


def left_third(scene_path: Path, labels_path: Path, work: Path):
    """Labels centred in the left third of the scene, that third as a polygon, and the labels of
    the other two thirds (the test)."""
    import geopandas as gpd
    import rasterio
    from shapely.geometry import box

    work.mkdir(parents=True, exist_ok=True)
    with rasterio.open(scene_path) as src:
        b, crs = src.bounds, src.crs
    x_cut = b.left + (b.right - b.left) / 3
    g = gpd.read_file(labels_path)
    cx = g.geometry.bounds[["minx", "maxx"]].mean(axis=1)
    paths = {k: work / f"{scene_path.stem}_{k}.gpkg" for k in ("train", "aoi", "test")}
    g[cx < x_cut].to_file(paths["train"])
    g[cx >= x_cut].to_file(paths["test"])
    gpd.GeoDataFrame(geometry=[box(b.left, b.bottom, x_cut, b.top)], crs=crs).to_file(paths["aoi"])
    return paths, x_cut


def corner(scene_path: Path, labels_path: Path, side_px: int, work: Path):
    """Labels centred in the top-left ``side_px`` square of the scene, and that square."""
    import geopandas as gpd
    import rasterio
    from shapely.geometry import box

    with rasterio.open(scene_path) as src:
        t, crs = src.transform, src.crs
    x0, y1 = t * (0, 0)
    x1, y0 = t * (side_px, side_px)
    g = gpd.read_file(labels_path)
    c = g.geometry.bounds
    inside = ((c.minx + c.maxx) / 2 < x1) & ((c.miny + c.maxy) / 2 > y0)
    paths = {"train": work / "corner_labels.gpkg", "aoi": work / "corner.gpkg"}
    g[inside].to_file(paths["train"])
    gpd.GeoDataFrame(geometry=[box(x0, y0, x1, y1)], crs=crs).to_file(paths["aoi"])
    return paths, int(inside.sum())


def score(model, scene: Path, labels: Path, classes: bool, x_min=None) -> dict:
    """AP50, AP and precision/recall at IoU 0.4 (best F1) of ``model`` over ``scene``; with
    ``x_min`` (map x), only detections centred east of it count (labels are pre-filtered)."""
    from geodet.evaluation import evaluate
    from geodet.pipeline.scenes import detect_scene

    frame = detect_scene(scene, model, progress=False)
    if x_min is not None:
        b = frame.geometry.bounds
        frame = frame[((b.minx + b.maxx) / 2 >= x_min).to_numpy()]
    col = "label" if classes else ""
    m50 = evaluate(frame, labels, scene=scene, iou=0.5, class_column=col)
    m40 = evaluate(frame, labels, scene=scene, iou=0.4, class_column=col)
    return {"AP50": round(m50["AP50"], 4), "AP": round(m50["AP"], 4), "P@0.4": round(m40["precision"], 4),
            "R@0.4": round(m40["recall"], 4), "detections": int(len(frame)), "labels": int(m50["n_labels"])}


def last_model(run: Path):
    """The model of the last step (``last.pt``), to compare with the one validation kept."""
    import torch

    from geodet.model.file import model_from_payload

    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    return model_from_payload({"card": state["card"], "state_dict": state["model"]}, source=str(run / "last.pt"))


def run_one(scenario: str, row: str, seed: int, minutes: float, work: Path, threads: int | None) -> dict:
    import torch

    from geodet.config import SceneLabels, load_config
    from geodet.model import load_model
    from geodet.training.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    kind, _, name = scenario.partition(":")
    spec = ROWS[row]
    tests = []  # (scene, labels, classes, x_min)
    if kind == "inscene":
        scene, labels = DATA / f"{name}.tif", DATA / f"{name}.gpkg"
        paths, x_cut = left_third(scene, labels, work / "data")
        cfg = load_config("trees")
        pair = SceneLabels(str(scene), str(paths["train"]), str(paths["aoi"]) if spec["area"] else None)
        tests.append((name, scene, paths["test"], False, x_cut))
    elif kind == "cross":
        cfg = load_config("trees")
        pair = SceneLabels(str(DATA / "yell_541000.tif"), str(DATA / "yell_541000.gpkg"))
        for test in name.split("+"):
            tests.append((test, DATA / f"{test}.tif", DATA / f"{test}.gpkg", False, None))
    elif kind == "synthetic":
        from geodet.synthetic import make_scene

        s = int(name)
        d = work / f"synthetic{s}"
        d.mkdir(parents=True, exist_ok=True)
        tr = make_scene(d / "train.tif", d / "train.gpkg", size=1024, seed=s)
        te = make_scene(d / "test.tif", d / "test.gpkg", size=1024, seed=s + 1)
        paths, n = corner(tr.image, tr.labels, 512, d)
        cfg = load_config("cpu")
        pair = SceneLabels(str(tr.image), str(paths["train"]), str(paths["aoi"]) if spec["area"] else None)
        tests.append((f"synthetic{s + 1}", te.image, te.labels, True, None))
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    cfg.train.scenes = [pair]
    if spec.get("self_training"):
        cfg.train.self_training = True
        if kind != "inscene":  # the scenes to detect, unlabelled, as a user would give them
            cfg.train.unlabelled = [str(t[1]) for t in tests]
    cfg.train.seed = seed
    cfg.train.keep = "best"  # model.pt is the best-validation model; last.pt gives the end of the schedule
    cfg.train.time_limit_min = minutes
    for key in ("epochs", "scale_jitter", "copy_paste", "photometric"):
        if key in spec:
            setattr(cfg.train, key, spec[key])
    out = work / "runs" / f"{scenario.replace(':', '_')}_{row}_s{seed}_{minutes:g}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    t0 = time.perf_counter()
    if spec.get("pretrain"):
        from geodet.training.pretrain import pretrain

        out.mkdir(parents=True, exist_ok=True)
        scenes = list(dict.fromkeys([pair.scene] + [str(t[1]) for t in tests]))
        cfg.train.init = str(pretrain(scenes, out / "pretrained.pt", cfg, minutes * spec["pretrain"], progress=False))
        cfg.train.time_limit_min = minutes - (time.perf_counter() - t0) / 60
    trainer = Trainer(cfg, out, progress=False)
    path = trainer.run()
    used = (time.perf_counter() - t0) / 60
    best = load_model(path)
    rec = {"scenario": scenario, "row": row, "seed": seed, "minutes": minutes, "used_min": round(used, 2),
           "steps": int(last_steps(out)), "best_step": best.card.trained_steps, "cpu_share": round(trainer.cpu_share or 0, 2),
           "threads": torch.get_num_threads(), "isa": isa(), "val_AP50": best.card.metrics.get("AP50"),
           "settings": {k: getattr(cfg.train, k) for k in ("epochs", "scale_jitter", "copy_paste", "photometric",
                                                           "self_training", "init")}
           | {"labelled_area": bool(pair.labelled_area), "unlabelled": list(cfg.train.unlabelled)}}
    last = last_model(out)
    for test, scene, labels, classes, x_min in tests:
        rec[f"best:{test}"] = score(best, scene, labels, classes, x_min)
        rec[f"last:{test}"] = score(last, scene, labels, classes, x_min)
    return rec


def last_steps(run: Path) -> int:
    import csv

    with open(run / "metrics.csv", newline="") as f:
        return max((int(r["step"]) for r in csv.DictReader(f) if r["loss"]), default=0)


def isa() -> str:
    from geodet.pipeline.backends import cpu_features

    f = cpu_features()
    return f"{f['isa']}{' bf16' if f['bf16'] else ''}{' vnni' if f['vnni'] else ''}"


def load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def grouped(records: list[dict]) -> dict:
    """The runs per (scenario, test scene, minutes, threads) and row, sorted by seed."""
    groups: dict = {}
    for r in records:
        for k in r:
            if k.startswith("best:"):
                groups.setdefault((r["scenario"], k[5:], r["minutes"], r.get("threads")), {}).setdefault(r["row"], []).append(r)
    return {key: {row: sorted(rows[row], key=lambda r: r["seed"]) for row in ROWS if row in rows}
            for key, rows in groups.items()}


def table(records: list[dict], metric: str = "AP50", which: str = "best") -> str:
    """Markdown: per scenario, test scene and row, the mean, min-max and every run of ``metric``."""
    lines = []
    for (scenario, test, minutes, _threads), rows in grouped(records).items():
        lines += [f"\n{scenario} -> {test}, {minutes:g} min, {which} model, {metric}\n",
                  f"| row | mean {metric} | min-max | runs (seed: value) | AP | steps | CPU share |",
                  "|---|---|---|---|---|---|---|"]
        for row, rs in rows.items():
            scores = [r[f"{which}:{test}"] for r in rs]
            vals = [v[metric] for v in scores]
            runs = ", ".join(f"{r['seed']}: {v[metric]:.3f}" for r, v in zip(rs, scores))
            steps = ", ".join(str(r["steps"]) for r in rs)
            share = ", ".join(f"{r['cpu_share']:.2f}" for r in rs)
            lines.append(f"| {row} | {np.mean(vals):.3f} | {min(vals):.3f}-{max(vals):.3f} | {runs} | "
                         f"{np.mean([v['AP'] for v in scores]):.3f} | {steps} | {share} |")
    return "\n".join(lines)


def summary(records: list[dict]) -> str:
    """Markdown, one table per scenario and test scene: per row, AP50 and AP of the kept model
    (``model.pt``: the best validation AP50) and of the last step, as mean [min-max] over seeds."""

    def cell(vals):
        return f"{np.mean(vals):.3f} [{min(vals):.3f}-{max(vals):.3f}]"

    lines = []
    for (scenario, test, minutes, threads), rows in grouped(records).items():
        lines += [f"\n**{scenario} -> {test}**, {minutes:g} min on {threads} thread(s)\n",
                  "| row | seeds | AP50, model.pt | AP50, last step | AP, last step | P / R @0.4, last | steps |",
                  "|---|---|---|---|---|---|---|"]
        for row, rs in rows.items():
            b = [r[f"best:{test}"] for r in rs]
            last = [r[f"last:{test}"] for r in rs]
            pr = f"{np.mean([x['P@0.4'] for x in last]):.2f} / {np.mean([x['R@0.4'] for x in last]):.2f}"
            lines.append(f"| {row} | {len(rs)} | {cell([x['AP50'] for x in b])} | {cell([x['AP50'] for x in last])} | "
                         f"{cell([x['AP'] for x in last])} | {pr} | {', '.join(str(r['steps']) for r in rs)} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", action="append", default=[])
    ap.add_argument("--rows", default="today,budget,area,all")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--workdir", default="/tmp/geodet-bench/few_labels")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--table", action="store_true", help="print the tables of --results and exit")
    ap.add_argument("--summary", action="store_true", help="print one summary table per scenario and exit")
    ap.add_argument("--metric", default="AP50")
    ap.add_argument("--which", default="best", choices=["best", "last"])
    args = ap.parse_args()
    results = Path(args.results)
    if args.summary:
        print(summary(load(results)))
        return
    if args.table:
        print(table(load(results), args.metric, args.which))
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    results.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["scenario"], r["row"], r["seed"], r["minutes"]) for r in load(results)}
    for scenario in args.scenario:
        for seed in (int(s) for s in args.seeds.split(",")):
            for row in args.rows.split(","):
                if (scenario, row, seed, args.minutes) in done:
                    continue
                rec = run_one(scenario, row, seed, args.minutes, Path(args.workdir), args.threads)
                with open(results, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
