"""The Ray engine, measured: overhead against one process, simulated scaling, and a large scene.

    python benchmarks/bench_ray.py overhead [--model MODEL.pt] [--rounds 3]
    python benchmarks/bench_ray.py scaling [--sleep 0.5] [--workers 1,2,4,8]
    python benchmarks/bench_ray.py large [--side 20000]

- overhead: the same scenes and model, in-process ``detect_scene`` writing each scene's GeoParquet
  against ``detect_ray`` with one actor holding every core (Ray already started, as on a cluster;
  its start-up is timed apart), interleaved rounds, medians. Whole-job ratio = in-process
  seconds / Ray seconds; steady ratio = Ray's block rate once the actor is up (after its first
  block) / the in-process rate over the same blocks.
- scaling: a local Ray instance with 16 logical CPUs and a detector that sleeps a fixed time per
  batch (standing in for a GPU), so scheduling, reading, writing parts and reducing are what is
  measured: blocks per hour at 1, 2, 4, 8 actors and efficiency T1 / (N x TN), for the whole
  job and for the steady part (once every actor has delivered a block: on a cluster the actors
  start in parallel on their own machines; here their start-up shares 2 cores).
- large: one scene of SIDE^2 px (a VRT repeating a 2048^2 synthetic COG, no disk) through the
  block path with the ``cpu`` preset's tiling and a cheap detector (brightest-blob boxes), the
  actors' peak RSS against a scene a quarter the side, and the result against in-process
  ``detect_scene`` on the same scene (the oracle: identical rows).
Results go to stdout as JSON lines and, with --out, to a file.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class SleepyDetector:
    """No boxes; sleeps ``seconds`` per batch, as a GPU's model call would take."""

    backend = None

    def __init__(self, seconds):
        self.seconds = seconds

    def __call__(self, batch):
        time.sleep(self.seconds)
        z = torch.zeros((0, 4))
        return [{"boxes": z, "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)} for _ in batch]


class BlobDetector:
    """A cheap deterministic detector: a box around each tile's brightest 16 x 16 cell, if it is
    bright; enough output to stitch, little CPU."""

    def __call__(self, batch):
        out = []
        for img in batch:
            g = img.float().mean(0)
            h, w = g.shape[0] // 16 * 16, g.shape[1] // 16 * 16
            cells = g[:h, :w].reshape(h // 16, 16, w // 16, 16).mean((1, 3))
            k = min(8, cells.numel())
            vals, idx = cells.flatten().topk(k)
            keep = vals > 0.3
            r, c = (idx // cells.shape[1])[keep].float() * 16, (idx % cells.shape[1])[keep].float() * 16
            boxes = torch.stack([c, r, c + 16, r + 16], 1) if keep.any() else torch.zeros((0, 4))
            out.append({"boxes": boxes, "scores": vals[keep].clamp(0, 1), "labels": torch.zeros(len(boxes), dtype=torch.int64)})
        return out


def ray_init(ray, **kw):
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR", runtime_env={"env_vars": env}, **kw)


def overhead(args):
    import ray

    from geodet.io.writers import write_detections
    from geodet.model import load_model
    from geodet.pipeline.scenes import detect_scene
    from geodet.pipeline.ray_engine import detect_ray
    from geodet.synthetic import make_scene

    wd = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    scenes = [str(make_scene(wd / f"s{i}.tif", wd / f"s{i}.gpkg", size=args.size, seed=20 + i).image) for i in range(args.scenes)]
    if args.model:
        model = load_model(args.model)
    else:
        from gpu_check import preset_model

        model = preset_model("cpu", ["car", "truck"])
    kw = dict(backend="torch", precision="fp32", num_workers=0)
    t0 = time.perf_counter()
    ray_init(ray, num_cpus=os.cpu_count())
    startup = time.perf_counter() - t0
    runs = {"in_process": [], "ray_1_actor": []}
    counts, steady, first = {}, [], []
    try:
        for r in range(args.rounds):
            t0 = time.perf_counter()
            n = 0
            for i, scene in enumerate(scenes):  # the same product as the Ray path: a GeoParquet file per scene
                frame = detect_scene(scene, model, progress=False, **kw)
                write_detections(frame, wd / f"inproc{r}_{i}.parquet")
                n += len(frame)
            runs["in_process"].append(time.perf_counter() - t0)
            counts["in_process"] = n
            t0 = time.perf_counter()
            s = detect_ray(scenes, args.model or model, wd / f"ray{r}", workers=1, cpus_per_worker=os.cpu_count(),
                           block_tiles=args.block_tiles, progress=False, **kw)
            runs["ray_1_actor"].append(time.perf_counter() - t0)
            counts["ray_1_actor"] = sum(x["detections"] for x in s["scenes"])
            blocks = s["blocks_run"]
            # blocks per hour once the actor is up, against the one-process rate over the same blocks
            steady.append(s["steady_blocks_per_hour"] / (blocks / runs["in_process"][-1] * 3600))
            first.append(s["first_block_s"])
            print(json.dumps({"round": r, "in_process_s": round(runs["in_process"][-1], 2),
                              "ray_s": round(runs["ray_1_actor"][-1], 2), "first_block_s": first[-1],
                              "steady_ratio": round(steady[-1], 3)}), file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"bench": "overhead", "scenes": len(scenes), "scene_px": args.size, "block_tiles": args.block_tiles,
            "blocks": blocks, "model": args.model or "cpu preset, random weights",
            "seconds": {k: [round(x, 2) for x in v] for k, v in runs.items()},
            "median_s": {k: round(v, 2) for k, v in med.items()},
            "throughput_ratio": round(med["in_process"] / med["ray_1_actor"], 3),
            "first_block_s": first, "steady_ratio": [round(x, 3) for x in steady],
            "steady_ratio_median": round(statistics.median(steady), 3),
            "detections": counts, "ray_startup_s": round(startup, 2)}


def scaling(args):
    import ray

    from geodet.pipeline.ray_engine import detect_ray
    from geodet.synthetic import make_scene

    wd = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    base = make_scene(wd / "s.tif", wd / "s.gpkg", size=args.size, seed=5).image
    scenes = []
    for i in range(args.scenes):  # distinct paths, one file's bytes
        p = wd / f"scene{i:03d}.tif"
        os.link(base, p)
        scenes.append(str(p))
    ray_init(ray, num_cpus=16)
    rows = []
    try:
        det = SleepyDetector(args.sleep)
        for n in [int(x) for x in args.workers.split(",")]:
            t0 = time.perf_counter()
            s = detect_ray(scenes, det, wd / f"w{n}", workers=n, cpus_per_worker=1, block_tiles=args.block_tiles,
                           tile_size=128, overlap=16, batch_size=args.block_tiles ** 2, num_workers=0, progress=False)
            dt = time.perf_counter() - t0
            assert not s["failed_scenes"], s["failed_scenes"]
            rows.append({"workers": n, "seconds": round(dt, 2), "blocks": s["blocks_run"],
                         "blocks_per_hour": round(s["blocks_run"] / dt * 3600), "first_block_s": s.get("first_block_s"),
                         "steady_blocks_per_hour": s.get("steady_blocks_per_hour"),
                         "median_block_s": s.get("median_block_s")})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    t1, s1 = rows[0]["seconds"], rows[0]["steady_blocks_per_hour"]
    for r in rows:
        r["efficiency"] = round(t1 / (r["workers"] * r["seconds"]), 3)  # whole job, start-up included
        if s1 and r["steady_blocks_per_hour"]:  # once every actor is up
            r["steady_efficiency"] = round(r["steady_blocks_per_hour"] / (r["workers"] * s1), 3)
    return {"bench": "scaling", "sleep_per_batch_s": args.sleep, "scenes": len(scenes), "scene_px": args.size,
            "block_tiles": args.block_tiles, "rows": rows}


def large(args):
    import ray

    from geodet.pipeline.scenes import detect_scene
    from geodet.pipeline.ray_engine import detect_ray
    from geodet.synthetic import make_scene
    from gpu_check import mosaic_vrt

    wd = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    make_scene(wd / "base.tif", wd / "base.gpkg", size=2048, seed=9)
    n = -(-args.side // 2048)
    small_n = max(1, n // 4)
    big = mosaic_vrt(wd / "base.tif", wd / "big.vrt", n)
    small = mosaic_vrt(wd / "base.tif", wd / "small.vrt", small_n)
    kw = dict(tile_size=256, overlap=32, batch_size=16, num_workers=0, score_threshold=0.3)
    ray_init(ray, num_cpus=os.cpu_count())
    out = {"bench": "large", "side_px": 2048 * n, "small_side_px": 2048 * small_n}
    try:
        det = BlobDetector()
        for name, scene in (("small", small), ("big", big)):
            t0 = time.perf_counter()
            s = detect_ray([str(scene)], det, wd / f"ray_{name}", workers=os.cpu_count(), block_tiles=args.block_tiles,
                           progress=False, **kw)
            out[name] = {"seconds": round(time.perf_counter() - t0, 1), "blocks": s["blocks_run"],
                         "worker_peak_rss_mb": s["worker_peak_rss_mb"],
                         "detections": s["scenes"][0]["detections"] if s["scenes"] else None}
            print(json.dumps({name: out[name]}), file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    out["rss_ratio_big_over_small"] = round(out["big"]["worker_peak_rss_mb"] / out["small"]["worker_peak_rss_mb"], 3)
    if not args.no_oracle:
        import geopandas as gpd

        t0 = time.perf_counter()
        ref = detect_scene(str(big), BlobDetector(), progress=False, **kw)
        got = gpd.read_parquet(wd / "ray_big" / "scene=big" / "detections.parquet")
        cols = ["px_x0", "px_y0", "px_x1", "px_y1", "tile_row", "tile_col"]
        a = got.sort_values(cols)[cols].to_numpy()
        b = ref.sort_values(cols)[cols].to_numpy()
        out["oracle"] = {"in_process_seconds": round(time.perf_counter() - t0, 1), "rows": len(ref),
                         "identical": bool(a.shape == b.shape and np.array_equal(a, b))}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["overhead", "scaling", "large"])
    ap.add_argument("--model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scenes", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--block-tiles", type=int, default=None)
    ap.add_argument("--sleep", type=float, default=0.5)
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--side", type=int, default=20000)
    ap.add_argument("--no-oracle", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    defaults = {"overhead": (4, 1024, 4), "scaling": (24, 512, 2), "large": (None, None, 8)}[args.what]
    args.scenes = args.scenes or defaults[0]
    args.size = args.size or defaults[1]
    args.block_tiles = args.block_tiles or defaults[2]
    res = {"overhead": overhead, "scaling": scaling, "large": large}[args.what](args)
    res["cpu_count"] = os.cpu_count()
    text = json.dumps(res)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
