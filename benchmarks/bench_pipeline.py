"""Pipeline overhead: end-to-end detect_scene on a 4096^2 synthetic scene against the bare model
forward over the same tiles, pre-read into memory, at the same batch size, in the same process.

    python benchmarks/bench_pipeline.py --model MODEL.pt [--size 4096] [--batch-size 4]
"""

import argparse
import time
from pathlib import Path

import torch

from geodet.detect import detect_scene
from geodet.model import load_model
from geodet.scene import Scene
from geodet.synthetic import make_scene
from geodet.tiling import TileGrid


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workdir", default="/tmp/geodet-bench")
    args = ap.parse_args()
    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    p = wd / f"vehicles_{args.size}.tif"
    if not p.exists():
        make_scene(p, wd / f"vehicles_{args.size}.gpkg", size=args.size, seed=7)
    model = load_model(args.model)
    card = model.card
    t0 = time.perf_counter()
    frame = detect_scene(p, model, batch_size=args.batch_size, progress=False)
    t_pipe = time.perf_counter() - t0
    rep = frame.attrs["report"]
    # bare model: the same tiles, read beforehand, same batches
    sc = Scene(p, bands=card["bands"])
    grid = TileGrid(sc.width, sc.height, card["tile_size"], rep["overlap"])
    tiles = torch.stack([torch.from_numpy(sc.read_tile(t)[0]) for t in grid])
    model.eval()
    t1 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(tiles), args.batch_size):
            model(tiles[i : i + args.batch_size])
    t_bare = time.perf_counter() - t1
    n = len(grid)
    print(f"{args.size}^2 scene, {n} tiles of {card['tile_size']} px, batch {args.batch_size}, {len(frame)} detections")
    print(f"pipeline {n / t_pipe:.2f} tiles/s ({t_pipe:.1f} s; stages {rep['seconds']}) vs bare model "
          f"{n / t_bare:.2f} tiles/s ({t_bare:.1f} s): ratio {t_bare / t_pipe:.3f}")


if __name__ == "__main__":
    main()
