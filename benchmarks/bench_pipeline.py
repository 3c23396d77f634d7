"""Pipeline overhead: end-to-end detect_scene on a 4096^2 synthetic scene against the bare model
forward over the same tiles, pre-read into memory, at the same batch size, in the same process.

    python benchmarks/bench_pipeline.py --model MODEL.pt [--size 4096] [--batch-size 4]
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from geodet.pipeline.scenes import detect_scene
from geodet.model import load_model
from geodet.io.scene import Scene
from geodet.synthetic import make_scene
from geodet.pipeline.grid import TileGrid


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/geodet-bench")
    args = ap.parse_args()
    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    p = wd / f"vehicles_{args.size}.tif"
    if not p.exists():
        make_scene(p, wd / f"vehicles_{args.size}.gpkg", size=args.size, seed=7)
    model = load_model(args.model).eval()
    card = model.card
    sc = Scene(p, bands=card.bands)
    grid = TileGrid(sc.width, sc.height, card.tile_size, card.overlap)
    tiles = torch.stack([torch.from_numpy(sc.read_tile(t)[0]) for t in grid])  # bare model: pre-read

    def bare():
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(tiles), args.batch_size):
                model(tiles[i : i + args.batch_size])
        return time.perf_counter() - t0

    def pipeline():
        t0 = time.perf_counter()
        frame = detect_scene(p, model, batch_size=args.batch_size, progress=False)
        return time.perf_counter() - t0, frame

    # The first model calls in a process are several seconds slower (oneDNN primitives, first-touch
    # memory), so warm up, then alternate the two and keep medians.
    with torch.inference_mode():
        for i in range(0, min(len(tiles), 8 * args.batch_size), args.batch_size):
            model(tiles[i : i + args.batch_size])
    t_bare, t_pipe, frame = [], [], None
    for _ in range(args.reps):
        t_bare.append(bare())
        dt, frame = pipeline()
        t_pipe.append(dt)
    tb, tp = statistics.median(t_bare), statistics.median(t_pipe)
    n = len(grid)
    print(f"{args.size}^2 scene, {n} tiles of {card.tile_size} px, batch {args.batch_size}, {len(frame)} detections, "
          f"{frame.attrs['report']['num_workers']} reader workers")
    print("runs (bare, pipeline) s: " + ", ".join(f"({b:.1f}, {q:.1f})" for b, q in zip(t_bare, t_pipe)))
    print(f"pipeline {n / tp:.2f} tiles/s (median of {args.reps}: {tp:.1f} s; last run's stages "
          f"{frame.attrs['report']['seconds']}) vs bare model {n / tb:.2f} tiles/s ({tb:.1f} s): ratio {tb / tp:.3f}")


if __name__ == "__main__":
    main()
