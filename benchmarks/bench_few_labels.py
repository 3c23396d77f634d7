"""Few labels: what each part of the trainer buys, over seeds, at a fixed budget per run, on cases
that are not degenerate.

Scenarios (``--scenario``, repeatable):
- ``inscene:NAME:PART``: the crowns centred in one part of ``NAME`` (a scene of ``--data``) are
  the labels and the part is the labelled area; train, detect over the whole scene, score the
  rest (detections and labels centred outside the part). PART is ``left``, ``right``, ``top`` or
  ``bottom`` (a third of the scene each: four different labelled areas of one scene) or ``ell``
  (an L-shaped polygon, a sixth-wide strip down the left side and a sixth-high strip along the
  bottom: about 31% of the scene, not a rectangle, so chips cross its inner corner).
- ``cross:SRC>DST``: train on every crown of SRC, score the whole of DST (another scene).
- ``synthetic:SEED``: synthetic vehicles (0.3 m, cars and trucks): the 512^2 top-left corner of a
  1024^2 scene of seed SEED is labelled (about 100 vehicles); scored with classes on an unseen
  scene of seed SEED + 1.

Rows (``--rows``, comma-separated; each row is features joined by ``+``):
- ``budget``: the time (or step) budget as the schedule, the labelled scene taught as labelled
  everywhere (no labelled area): what the trainer did before the labelled area existed;
- ``area``: + ``--labelled-area`` (chips inside it, anchors outside ignored);
- ``ctx``: chips reach past the area into real pixels (``train.chip_context``);
- ``gb``: the validation strip given back to training at 70% of the run (``train.val_give_back``);
- ``scale``, ``paste``, ``photo``, ``aug``: scale jitter 0.25, copy-paste 0.5, photometric 1.0, all three;
- ``self``: self-training (in-scene: the rest of the scene; cross: DST given as ``--unlabelled``);
- ``giou``: the GIoU box loss; ``atss``: ATSS anchor assignment;
- ``tta``: also score the model with test-time augmentation (flips and quarter turns, fused);
- ``adabn``: also score it with batch-norm statistics re-estimated on the scored scene (cross);
  these two train nothing of their own: the summary shows them as rows "ROW (tta at detection)";
- ``preset``: the preset exactly as shipped (its own defaults for all of the above).

Budget: ``--minutes M`` (a time limit: the trainer's own clock, as a user runs it; run on an idle
machine) or ``--steps N`` (a step cap: results independent of what else the machine runs, for
screening). Every run appends one JSON line to ``--results`` (reruns skip what is there): the
scores of ``model.pt`` (class-agnostic AP50, AP, P/R at best F1 with IoU 0.4; with classes for
synthetic), steps, minutes used, the CPU share it got, threads and the CPU's ISA.
``--summary`` prints mean [min-max] per scenario and row.

    python benchmarks/bench_few_labels.py --scenario inscene:yell_541000:left --rows area,area+ctx --seeds 0,1,2 --steps 800
    python benchmarks/bench_few_labels.py --summary
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

import os

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GEODET_TREES", ROOT.parent / "shared" / "data" / "trees"))
RESULTS = ROOT / "docs" / "few_labels" / "results_s10.jsonl"
FEATURES = {"budget", "area", "ctx", "gb", "scale", "paste", "photo", "aug", "self", "giou", "atss", "tta", "adabn",
            "preset", "nogb", "noctx", "noarea"}


def part_polygon(bounds, part: str):
    """The labelled part of a scene's map bounds: a third (left, right, top, bottom) or an L."""
    from shapely.geometry import Polygon, box

    x0, y0, x1, y1 = bounds.left, bounds.bottom, bounds.right, bounds.top
    w, h = x1 - x0, y1 - y0
    if part == "left":
        return box(x0, y0, x0 + w / 3, y1)
    if part == "right":
        return box(x1 - w / 3, y0, x1, y1)
    if part == "top":
        return box(x0, y1 - h / 3, x1, y1)
    if part == "bottom":
        return box(x0, y0, x1, y0 + h / 3)
    if part == "ell":
        return Polygon([(x0, y1), (x0 + w / 6, y1), (x0 + w / 6, y0 + h / 6), (x1, y0 + h / 6), (x1, y0), (x0, y0)])
    raise SystemExit(f"unknown part {part}: left, right, top, bottom or ell")


def split_scene(scene_path: Path, labels_path: Path, part: str, work: Path):
    """Labels centred in the part, the part as a polygon file, and the labels of the rest."""
    import geopandas as gpd
    import rasterio
    import shapely

    work.mkdir(parents=True, exist_ok=True)
    with rasterio.open(scene_path) as src:
        b, crs = src.bounds, src.crs
    poly = part_polygon(b, part)
    paths = {k: work / f"{scene_path.stem}_{part}_{k}.gpkg" for k in ("train", "aoi", "test")}
    if all(p.exists() for p in paths.values()):  # made once (parallel runs share them)
        return paths, poly
    g = gpd.read_file(labels_path)
    c = g.geometry.bounds
    inside = shapely.contains_xy(poly, ((c.minx + c.maxx) / 2).to_numpy(), ((c.miny + c.maxy) / 2).to_numpy())
    g[inside].to_file(paths["train"])
    g[~inside].to_file(paths["test"])
    gpd.GeoDataFrame(geometry=[poly], crs=crs).to_file(paths["aoi"])
    return paths, poly


def corner(scene_path: Path, labels_path: Path, side_px: int, work: Path):
    """Labels centred in the top-left ``side_px`` square of the scene, and that square."""
    import geopandas as gpd
    import rasterio
    from shapely.geometry import box

    with rasterio.open(scene_path) as src:
        t, crs = src.transform, src.crs
    x0, y1 = t * (0, 0)
    x1, y0 = t * (side_px, side_px)
    paths = {"train": work / "corner_labels.gpkg", "aoi": work / "corner.gpkg"}
    g = gpd.read_file(labels_path)
    c = g.geometry.bounds
    inside = ((c.minx + c.maxx) / 2 < x1) & ((c.miny + c.maxy) / 2 > y0)
    if all(p.exists() for p in paths.values()):  # made once (parallel runs share them)
        return paths, int(inside.sum())
    g[inside].to_file(paths["train"])
    gpd.GeoDataFrame(geometry=[box(x0, y0, x1, y1)], crs=crs).to_file(paths["aoi"])
    return paths, int(inside.sum())


def score(model, scene: Path, labels: Path, classes: bool, outside=None, tta: bool = False) -> dict:
    """AP50, AP and precision/recall at IoU 0.4 (best F1) of ``model`` over ``scene``; with
    ``outside`` (a map polygon), only detections centred outside it count (labels are pre-filtered)."""
    import shapely

    from geodet.evaluation import evaluate
    from geodet.pipeline.scenes import detect_scene

    detector = model
    if tta:
        from geodet.model.tta import TtaModel

        detector = TtaModel(model)
    frame = detect_scene(scene, detector, progress=False)
    if outside is not None and len(frame):
        b = frame.geometry.bounds
        keep = ~shapely.contains_xy(outside, ((b.minx + b.maxx) / 2).to_numpy(), ((b.miny + b.maxy) / 2).to_numpy())
        frame = frame[keep]
    col = "label" if classes else ""
    m50 = evaluate(frame, labels, scene=scene, iou=0.5, class_column=col)
    m40 = evaluate(frame, labels, scene=scene, iou=0.4, class_column=col)
    return {"AP50": round(m50["AP50"], 4), "AP": round(m50["AP"], 4), "P@0.4": round(m40["precision"], 4),
            "R@0.4": round(m40["recall"], 4), "detections": int(len(frame)), "labels": int(m50["n_labels"])}


def features(row: str) -> set:
    f = set(row.split("+"))
    unknown = f - FEATURES
    if unknown:
        raise SystemExit(f"unknown row feature(s) {sorted(unknown)}: choose from {sorted(FEATURES)}")
    return f


def configure(cfg, f: set, kind: str) -> None:
    """The row's features on the config (``preset`` leaves the preset's own defaults)."""
    tc = cfg.train
    if "preset" in f:
        return
    tc.chip_context = "ctx" in f
    tc.val_give_back = 0.7 if "gb" in f else None
    aug = "aug" in f
    tc.scale_jitter = 0.25 if aug or "scale" in f else 0.0
    tc.copy_paste = 0.5 if aug or "paste" in f else 0.0
    tc.photometric = 1.0 if aug or "photo" in f else 0.0
    cfg.model.box_loss = "giou" if "giou" in f else "l1"
    cfg.model.matcher = "atss" if "atss" in f else "iou"


def scenario_setup(scenario: str, f: set, work: Path):
    """(config, SceneLabels, tests [(name, scene, labels, classes, outside polygon)], unlabelled)."""
    from geodet.config import SceneLabels, load_config

    kind, _, name = scenario.partition(":")
    tests, unlabelled = [], []
    use_area = ("area" in f or "preset" in f) and "noarea" not in f
    if kind == "inscene":
        scene_name, _, part = name.partition(":")
        scene, labels = DATA / f"{scene_name}.tif", DATA / f"{scene_name}.gpkg"
        paths, poly = split_scene(scene, labels, part or "left", work / "data")
        cfg = load_config("trees")
        pair = SceneLabels(str(scene), str(paths["train"]), str(paths["aoi"]) if use_area else None)
        tests.append((scene_name, scene, paths["test"], False, poly))
    elif kind == "cross":
        src, _, dst = name.partition(">")
        cfg = load_config("trees")
        pair = SceneLabels(str(DATA / f"{src}.tif"), str(DATA / f"{src}.gpkg"))
        tests.append((dst, DATA / f"{dst}.tif", DATA / f"{dst}.gpkg", False, None))
        unlabelled = [str(DATA / f"{dst}.tif")]
    elif kind == "synthetic":
        s = int(name)
        d = work / f"synthetic{s}"
        d.mkdir(parents=True, exist_ok=True)
        tr, te = synthetic_pair(d, s)
        paths, _n = corner(tr.image, tr.labels, 512, d)
        cfg = load_config("cpu")
        pair = SceneLabels(str(tr.image), str(paths["train"]), str(paths["aoi"]) if use_area else None)
        tests.append((f"synthetic{s + 1}", te.image, te.labels, True, None))
        unlabelled = [str(te.image)]
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    return cfg, pair, tests, unlabelled if kind != "inscene" else []


def synthetic_pair(d: Path, s: int):
    """The training and test scenes of seed ``s`` (made once; parallel runs share them)."""
    from types import SimpleNamespace

    from geodet.synthetic import make_scene

    out = []
    for name, seed in (("train", s), ("test", s + 1)):
        img, lab = d / f"{name}.tif", d / f"{name}.gpkg"
        if not (img.exists() and lab.exists()):
            make_scene(img, lab, size=1024, seed=seed)
        out.append(SimpleNamespace(image=img, labels=lab))
    return out


def run_one(scenario: str, row: str, seed: int, minutes: float | None, steps: int | None, work: Path,
            threads: int | None) -> dict:
    import torch

    from geodet.model import load_model
    from geodet.training.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    f = features(row)
    cfg, pair, tests, unlabelled = scenario_setup(scenario, f, work)
    configure(cfg, f, scenario.partition(":")[0])
    cfg.train.scenes = [pair]
    if "self" in f:
        cfg.train.self_training = True
        cfg.train.unlabelled = unlabelled
    cfg.train.seed = seed
    cfg.train.time_limit_min = minutes
    cfg.train.max_steps = steps
    budget = f"{minutes:g}min" if minutes else f"{steps}steps"
    out = work / "runs" / f"{scenario.replace(':', '_').replace('>', '-')}_{row}_s{seed}_{budget}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, out, progress=False, overwrite=True)
    path = trainer.run()
    used = (time.perf_counter() - t0) / 60
    model = load_model(path)
    rec = {"scenario": scenario, "row": row, "seed": seed, "minutes": minutes, "steps_cap": steps,
           "used_min": round(used, 2), "steps": int(last_steps(out)), "cpu_share": round(trainer.cpu_share or 0, 2),
           "threads": torch.get_num_threads(), "isa": isa(), "val_AP50": model.card.metrics.get("AP50"),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "operating_point": model.card.operating_point,
           "settings": {k: getattr(cfg.train, k) for k in ("scale_jitter", "copy_paste", "photometric", "self_training",
                                                           "chip_context", "val_give_back", "lr", "batch_size")}
           | {"labelled_area": bool(pair.labelled_area), "unlabelled": list(cfg.train.unlabelled),
              "box_loss": getattr(cfg.model, "box_loss", "l1"), "matcher": getattr(cfg.model, "matcher", "iou")}}
    for test, scene, labels, classes, outside in tests:
        rec[f"last:{test}"] = score(model, scene, labels, classes, outside)
        # detection-time variants scored on the same model (no training of their own)
        if "adabn" in f:
            from geodet.training.adapt import adapt_batch_norm

            rec[f"adabn:{test}"] = score(adapt_batch_norm(model, [scene]), scene, labels, classes, outside)
        if "tta" in f:
            rec[f"tta:{test}"] = score(model, scene, labels, classes, outside, tta=True)
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


def budget_of(r: dict) -> str:
    return f"{r['minutes']:g} min" if r.get("minutes") else f"{r['steps_cap']} steps"


def summary(records: list[dict], metric_rows=("AP50", "AP")) -> str:
    """Markdown, one table per scenario, test scene and budget: per row, AP50 and AP of model.pt
    as mean [min-max] over seeds, P/R at IoU 0.4, the steps and every seed's AP50."""

    def cell(vals):
        return f"{np.mean(vals):.3f} [{min(vals):.3f}-{max(vals):.3f}]"

    groups: dict = {}
    for r in records:
        base = "+".join(x for x in r["row"].split("+") if x not in ("tta", "adabn"))
        for k in list(r):
            kind, _, test = k.partition(":")
            if kind not in ("last", "tta", "adabn") or not test:
                continue
            row = base if kind == "last" else f"{base} ({kind} at detection)"
            key = (r["scenario"], test, budget_of(r), r.get("threads"))
            groups.setdefault(key, {}).setdefault(row, []).append(dict(r, **{f"last:{test}": r[k]}))
    lines = []
    for (scenario, test, budget, threads), rows in groups.items():
        lines += [f"\n**{scenario} -> {test}**, {budget}, {threads} thread(s)\n",
                  "| row | seeds | AP50 | AP | P / R @0.4 | steps | AP50 per seed |", "|---|---|---|---|---|---|---|"]
        for row, rs in rows.items():
            rs = sorted(rs, key=lambda r: r["seed"])
            s = [r[f"last:{test}"] for r in rs]
            pr = f"{np.mean([x['P@0.4'] for x in s]):.2f} / {np.mean([x['R@0.4'] for x in s]):.2f}"
            per = ", ".join(f"{r['seed']}: {x['AP50']:.3f}" for r, x in zip(rs, s))
            lines.append(f"| {row} | {len(rs)} | {cell([x['AP50'] for x in s])} | {cell([x['AP'] for x in s])} | {pr} | "
                         f"{', '.join(str(r['steps']) for r in rs)} | {per} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", action="append", default=[])
    ap.add_argument("--rows", default="budget,area")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--minutes", type=float, default=None, help="a time limit per run (the trainer's clock)")
    ap.add_argument("--steps", type=int, default=None, help="a step cap per run (screening, load-independent)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--workdir", default="/tmp/geodet-bench/few_labels")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--summary", action="store_true", help="print one summary table per scenario and exit")
    ap.add_argument("--parallel", type=int, default=1, help="runs at once (processes; e.g. on one GPU)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds after which no new run starts")
    args = ap.parse_args()
    results = Path(args.results)
    if args.summary:
        print(summary(load(results)))
        return
    if (args.minutes is None) == (args.steps is None):
        raise SystemExit("give --minutes or --steps")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    results.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["scenario"], r["row"], r["seed"], r.get("minutes"), r.get("steps_cap")) for r in load(results)}
    # seeds outermost: a run cut short by --deadline leaves every row with its first seeds
    jobs = [(scenario, row, seed) for seed in (int(s) for s in args.seeds.split(",")) for scenario in args.scenario
            for row in args.rows.split(",") if (scenario, row, seed, args.minutes, args.steps) not in done]
    for scenario in args.scenario:  # shared inputs made once, before any parallel run
        scenario_setup(scenario, features(args.rows.split(",")[0]), Path(args.workdir))
    if args.parallel <= 1:
        for job in jobs:
            _record(results, run_one(*job, args.minutes, args.steps, Path(args.workdir), args.threads))
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # CUDA in the workers: no fork
    deadline = time.time() + args.deadline if args.deadline else None
    with ctx.Pool(args.parallel, maxtasksperchild=1) as pool:
        pending = [pool.apply_async(_job, (job, args.minutes, args.steps, args.workdir, args.threads, deadline))
                   for job in jobs]
        for p in pending:
            left = None if deadline is None else max(1.0, deadline + 600 - time.time())
            try:
                rec = p.get(timeout=left)
            except Exception as exc:  # one failed run does not stop the others
                print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
                continue
            if rec is not None:
                _record(results, rec)


def _job(job, minutes, steps, workdir, threads, deadline):
    if deadline is not None and time.time() > deadline:
        return None  # out of time: not started
    return run_one(*job, minutes, steps, Path(workdir), threads)


def _record(results: Path, rec: dict) -> None:
    with open(results, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
