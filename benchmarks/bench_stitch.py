"""Stitch time for N detections (default 1,000,000) on a dense synthetic grid of tiles.

    python benchmarks/bench_stitch.py [--n 1000000]

Boxes of 6-20 px are spread uniformly; each tile reports what lies (cut) inside it, as a real
detector would, so seams carry fragments. Prints the median of 3 runs.
"""

import argparse
import statistics
import time

import numpy as np

from geodet.pipeline.stitch import Stitcher
from geodet.pipeline.grid import TileGrid


def tile_results(grid, boxes):
    order = np.argsort(boxes[:, 0])
    xs = boxes[order, 0]
    for t in grid:
        x0, y0, x1, y1 = t.bounds
        lo, hi = np.searchsorted(xs, x0 - 20), np.searchsorted(xs, x1)
        b = boxes[order[lo:hi]]
        b = b[(b[:, 2] > x0) & (b[:, 0] < x1) & (b[:, 3] > y0) & (b[:, 1] < y1)]
        c = np.clip(b, [x0, y0, x0, y0], [x1, y1, x1, y1]) - [x0, y0, x0, y0]
        yield t, c, np.full(len(c), 0.9, np.float32), np.zeros(len(c), np.int64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    side = int(np.sqrt(args.n) * 25)  # ~25x25 px per object: dense
    xy = rng.uniform(0, side - 20, (args.n, 2))
    wh = rng.uniform(6, 20, (args.n, 2))
    boxes = np.hstack([xy, xy + wh])
    grid = TileGrid(side, side, 512, 64)
    feeds = list(tile_results(grid, boxes))  # pre-cut so only the stitcher is timed
    n_in = sum(len(f[1]) for f in feeds)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        st = Stitcher(grid)
        for f in feeds:
            st.add(*f)
        out = st.finish()
        times.append(time.perf_counter() - t0)
    print(f"scene {side}^2 px, {len(grid)} tiles, {args.n} objects, {n_in} tile detections -> {len(out)} stitched")
    print(f"stitch time median of 3: {statistics.median(times):.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
