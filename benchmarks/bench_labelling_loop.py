"""The labelling loop with a simulated annotator: which cells to label next, measured as a user
would label them.

A scene is cut into cells. The part no strategy may pick is the test (``trees``: the right third
of the scene; ``synthetic``: a whole unseen scene of the next seed). A seed's start is a block of
cells in the pool, labelled (the annotator labels every object centred in a cell and adds the
cell to the labelled area) and trained on from scratch; then, per round, a strategy picks
``--per-round`` cells, the annotator labels them, and training continues from the last model
(``train.init``) for ``--steps`` steps on every label so far. After each round the model is
scored on the test part. Strategies:

- ``random``: cells drawn at random from the pool;
- ``detections``: the cells with the most detections at or above the operating point;
- ``spread``: no model: each pick the pool cell farthest from every labelled one (diversity only);
- geodet's: ``uncertainty`` (summed doubt around the operating point, spread on the map),
  ``per-object`` (that doubt per object the cell is expected to hold), ``coreset`` (k-center in
  the model's feature space) and ``hybrid`` (k-center weighted by per-object doubt).

Every round of every run is one JSON line in ``--results``: cells and objects labelled, AP50, AP.
``--summary`` prints the curves (mean [min-max] over seeds per round) and, per strategy, the
objects it needed to reach the AP50 random cells reach at the end of the loop.

    python benchmarks/bench_labelling_loop.py --scene synthetic:11 --strategies random,uncertainty --seeds 0,1,2
    python benchmarks/bench_labelling_loop.py --summary
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "trees"
RESULTS = ROOT / "docs" / "labelling_loop" / "results.jsonl"
BASELINES = ("random", "detections", "spread")


class Task:
    """One scene's loop: the image, every true label, the cell grid, the pool and the test."""

    def __init__(self, spec: str, work: Path):
        import geopandas as gpd
        import rasterio

        from geodet.config import load_config

        kind, _, name = spec.partition(":")
        self.spec, self.work = spec, work
        work.mkdir(parents=True, exist_ok=True)
        if kind == "trees":
            self.image, self.labels = DATA / f"{name}.tif", DATA / f"{name}.gpkg"
            self.preset, self.cell = "trees", 208
            with rasterio.open(self.image) as src:
                w, self.tr, self.crs, self.size = src.width, src.transform, src.crs, (src.width, src.height)
            self.test_x = w * 2 / 3  # pixels: the right third is the test
            self.test_image, self.test_labels = self.image, work / "test.gpkg"
        elif kind == "synthetic":
            from geodet.synthetic import make_scene

            s = int(name)
            tr = make_scene(work / "train.tif", work / "train.gpkg", size=1024, seed=s)
            te = make_scene(work / "test.tif", work / "test.gpkg", size=1024, seed=s + 1)
            self.image, self.labels, self.preset, self.cell = tr.image, tr.labels, "cpu", 128
            with rasterio.open(self.image) as src:
                self.tr, self.crs, self.size = src.transform, src.crs, (src.width, src.height)
            self.test_x = None
            self.test_image, self.test_labels = te.image, te.labels
        else:
            raise SystemExit(f"unknown scene {spec}: trees:NAME or synthetic:SEED")
        self.cfg = load_config(self.preset)
        g = gpd.read_file(self.labels)
        inv = ~self.tr
        c = g.geometry.bounds
        self.cx, self.cy = inv * (((c.minx + c.maxx) / 2).to_numpy(), ((c.miny + c.maxy) / 2).to_numpy())
        self.gdf = g
        self.cols, self.rows = -(-self.size[0] // self.cell), -(-self.size[1] // self.cell)
        col_x0 = np.arange(self.cols) * self.cell
        pool_cols = col_x0 + self.cell <= (self.test_x if self.test_x is not None else self.size[0])
        self.pool = np.array([pool_cols[i % self.cols] for i in range(self.rows * self.cols)])
        if self.test_x is not None:
            g[self.cx >= self.test_x].to_file(self.test_labels)

    def cell_of_labels(self) -> np.ndarray:
        return (np.floor(self.cy / self.cell) * self.cols + np.floor(self.cx / self.cell)).astype(int)

    def write_round(self, cells: list[int], folder: Path) -> tuple[Path, Path, int]:
        """The annotator: every object centred in ``cells`` labelled, the cells as the labelled area."""
        import geopandas as gpd
        from shapely.geometry import box

        folder.mkdir(parents=True, exist_ok=True)
        mine = np.isin(self.cell_of_labels(), cells)
        labels, area = folder / "labels.gpkg", folder / "area.gpkg"
        self.gdf[mine].to_file(labels)
        polys = []
        for i in cells:
            r, c = divmod(i, self.cols)
            x0, y0 = self.tr * (c * self.cell, r * self.cell)
            x1, y1 = self.tr * (min((c + 1) * self.cell, self.size[0]), min((r + 1) * self.cell, self.size[1]))
            polys.append(box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
        gpd.GeoDataFrame(geometry=polys, crs=self.crs).to_file(area)
        return labels, area, int(mine.sum())

    def start_cells(self, seed: int, n: int) -> list[int]:
        """A block of about ``n`` pool cells at a seed-chosen place (a user's first labelled patch)."""
        rng = np.random.default_rng([seed, 5])
        side = int(np.ceil(np.sqrt(n)))
        pool_cols = int(self.pool.reshape(self.rows, self.cols)[0].sum())
        r0 = int(rng.integers(0, max(1, self.rows - side + 1)))
        c0 = int(rng.integers(0, max(1, pool_cols - side + 1)))
        block = [(r0 + i) * self.cols + c0 + j for i in range(side) for j in range(side)]
        return [b for b in block if b < self.rows * self.cols and self.pool[b]][:n]


def train_round(task: Task, labels: Path, area: Path, init: Path | None, steps: int, seed: int, out: Path) -> Path:
    import copy

    from geodet.config import SceneLabels
    from geodet.training.trainer import Trainer

    cfg = copy.deepcopy(task.cfg)
    cfg.train.scenes = [SceneLabels(str(task.image), str(labels), str(area))]
    cfg.train.max_steps, cfg.train.seed = steps, seed
    cfg.train.init = str(init) if init else None
    if out.exists():
        shutil.rmtree(out)
    return Trainer(cfg, out, progress=False, overwrite=True).run()


def choose(task: Task, strategy: str, model, labelled: list[int], n: int, seed: int, rnd: int) -> list[int]:
    from geodet.training.suggest import rank_scene, scene_cells
    from geodet.pipeline.settings import resolve_detect_settings

    rng = np.random.default_rng([seed, 11, rnd])
    free = task.pool.copy()
    free[labelled] = False
    if strategy == "random":
        return [int(i) for i in rng.choice(np.flatnonzero(free), n, replace=False)]
    if strategy == "spread":
        r, c = np.divmod(np.arange(len(free)), task.cols)
        taken = list(labelled)
        out = []
        for _ in range(n):
            tr, tc = np.divmod(np.array(taken), task.cols)
            d = np.min((r[:, None] - tr) ** 2 + (c[:, None] - tc) ** 2, axis=1).astype(float)
            d[~free] = -1
            i = int(np.argmax(d + rng.uniform(0, 1e-3, len(d))))
            out.append(i)
            taken.append(i)
            free[i] = False
        return out
    op = model.card.operating_point
    s = resolve_detect_settings(model.card)
    cells = scene_cells(model, task.image, s, task.cell, op, None, False, strategy in ("coreset", "hybrid"), {})
    cells.labelled = np.zeros(len(free), bool)
    cells.labelled[labelled] = True
    cells.allowed = free & cells.allowed
    if strategy == "detections":
        conf = cells.stats["confident"].reshape(-1).astype(float)
        return [int(i) for i in np.argsort(-np.where(cells.allowed, conf + rng.uniform(0, 1e-3, len(conf)), -1))[:n]]
    return [int(i) for i in rank_scene(cells, n, strategy)]


def run_loop(task: Task, strategy: str, seed: int, args, results: Path, done: dict) -> None:
    from geodet.model import load_model
    from bench_few_labels import score

    base = task.work / f"s{seed}"
    labelled = task.start_cells(seed, args.start)
    start = base / "round0"
    model_path = start / "run" / "model.pt"
    if not model_path.exists():  # round 0 is shared by every strategy of this seed
        labels, area, _ = task.write_round(labelled, start)
        train_round(task, labels, area, None, args.steps0, seed, start / "run")
    for rnd in range(args.rounds + 1):
        key = (task.spec, strategy, seed, rnd)
        folder = base / strategy / f"round{rnd}" if rnd else start
        if rnd and key in done and (folder / "run" / "model.pt").exists():  # measured before: its picks
            labelled, model_path = done[key]["picked"], folder / "run" / "model.pt"
        elif rnd:
            prev = load_model(model_path)
            if prev.card.operating_point is None:  # the validation strip held no label: the last one's
                prev.card.operating_point = 0.3
            picked = choose(task, strategy, prev, labelled, args.per_round, seed, rnd)
            labelled = labelled + picked
            labels, area, _ = task.write_round(labelled, folder)
            model_path = folder / "run" / "model.pt"
            train_round(task, labels, area, prev_path, args.steps, seed, folder / "run")
        prev_path = model_path
        if key in done:
            continue
        n_obj = int(np.isin(task.cell_of_labels(), labelled).sum())
        model = load_model(model_path)
        outside = None
        if task.test_x is not None:
            from shapely.geometry import box

            x_cut = (task.tr * (task.test_x, 0))[0]
            b = task.gdf.total_bounds
            outside = box(b[0] - 1e6, b[1] - 1e6, x_cut, b[3] + 1e6)
        sc = score(model, task.test_image, task.test_labels, task.preset == "cpu", outside)
        rec = {"scene": task.spec, "strategy": strategy, "seed": seed, "round": rnd, "cells": len(labelled),
               "objects": n_obj, "steps0": args.steps0, "steps": args.steps, "per_round": args.per_round,
               "operating_point": model.card.operating_point, **sc, "picked": labelled}
        with open(results, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps({k: v for k, v in rec.items() if k != "picked"}), flush=True)


def load(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def objects_to_reach(rs: list[dict], target: float) -> float | None:
    """The labelled objects at which a curve first reaches ``target`` AP50 (linear between rounds)."""
    rs = sorted(rs, key=lambda r: r["round"])
    for a, b in zip(rs, rs[1:]):
        if a["AP50"] >= target:
            return float(a["objects"])
        if b["AP50"] >= target:
            t = (target - a["AP50"]) / max(b["AP50"] - a["AP50"], 1e-9)
            return a["objects"] + t * (b["objects"] - a["objects"])
    return float(rs[0]["objects"]) if rs and rs[0]["AP50"] >= target else None


def summary(records: list[dict]) -> str:
    lines = []
    for scene in sorted({r["scene"] for r in records}):
        rs = [r for r in records if r["scene"] == scene]
        rounds = sorted({r["round"] for r in rs})
        lines += [f"\n**{scene}** (AP50, mean [min-max] over seeds; objects labelled in brackets)\n",
                  "| strategy | " + " | ".join(f"round {k}" for k in rounds) + " | objects to reach random's final AP50 |",
                  "|---|" + "---|" * (len(rounds) + 1)]
        final_random = {r["seed"]: r["AP50"] for r in rs if r["strategy"] == "random" and r["round"] == rounds[-1]}
        for strategy in sorted({r["strategy"] for r in rs}, key=lambda s: (s not in BASELINES, s)):
            cells = []
            for k in rounds:
                v = [r for r in rs if r["strategy"] == strategy and r["round"] == k]
                if not v:
                    cells.append("")
                    continue
                ap = [x["AP50"] for x in v]
                cells.append(f"{np.mean(ap):.3f} [{min(ap):.3f}-{max(ap):.3f}] ({np.mean([x['objects'] for x in v]):.0f})")
            need = []
            for seed, target in final_random.items():
                curve = [r for r in rs if r["strategy"] == strategy and r["seed"] == seed]
                need.append(objects_to_reach(curve, target) if curve else None)
            reach = ", ".join("not reached" if n is None else f"{n:.0f}" for n in need)
            lines.append(f"| {strategy} | " + " | ".join(cells) + f" | {reach} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scene", action="append", default=[], help="trees:NAME or synthetic:SEED")
    ap.add_argument("--strategies", default="random,detections,spread,uncertainty,per-object,coreset,hybrid")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--start", type=int, default=4, help="cells labelled at the start")
    ap.add_argument("--per-round", type=int, default=4, help="cells a strategy picks per round")
    ap.add_argument("--steps0", type=int, default=400, help="training steps of the first model")
    ap.add_argument("--steps", type=int, default=200, help="training steps per round (from the last model)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default="/tmp/geodet-bench/labelling_loop")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--summary", action="store_true")
    args = ap.parse_args()
    results = Path(args.results)
    if args.summary:
        print(summary(load(results)))
        return
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    results.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["scene"], r["strategy"], r["seed"], r["round"]): r for r in load(results)}
    for spec in args.scene:
        task = Task(spec, Path(args.workdir) / spec.replace(":", "_"))
        for seed in (int(s) for s in args.seeds.split(",")):
            for strategy in args.strategies.split(","):
                t0 = time.perf_counter()
                run_loop(task, strategy, seed, args, results, done)
                logging.getLogger("bench").warning("%s %s seed %d: %.1f min", spec, strategy, seed,
                                                   (time.perf_counter() - t0) / 60)


if __name__ == "__main__":
    main()
