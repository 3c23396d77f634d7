"""Stitching in blocks against one stitcher: how many detections each block keeps or decides
itself, how many reach the per-scene reduce, whether the result is the same rows, and the time.

    python benchmarks/bench_block_stitch.py [--side 4096] [--objects 15000] [--rounds 3]

Detections come from the tests' imperfect detector (``tests/helpers.noisy_tile_views``: each
object's part in the tile, jittered, sometimes missed or seen partly, plus false positives; two
classes; objects 4-30 px). For each tiling and block size: the share of the detections whose
objects the reduce decides, the share it reads (with the boxes it only looks at), identity with
one ``Stitcher``, and medians over rounds of the one-stitcher time, the blocks' time (all blocks,
one after another) and the reduce's.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import noisy_tile_views  # noqa: E402

from geodet.pipeline.grid import TileGrid  # noqa: E402
from geodet.pipeline.stitch import Stitcher, reduce_blocks, stitch_block  # noqa: E402


def run(side, tile, overlap, k, n_objects, rounds):
    grid = TileGrid(side, side, tile, overlap)
    views = noisy_tile_views(grid, 0, n_objects, 1.0, max_size=30)
    times = {"one_stitcher": [], "blocks": [], "reduce": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        st = Stitcher(grid, 0.5)
        for v in views:
            st.add(*v)
        ref = st.finish()
        t1 = time.perf_counter()
        blocks = []
        for r0 in range(0, grid.n_rows, k):
            for c0 in range(0, grid.n_cols, k):
                r1, c1 = min(r0 + k, grid.n_rows) - 1, min(c0 + k, grid.n_cols) - 1
                own = [v for v in views if r0 <= v[0].row <= r1 and c0 <= v[0].col <= c1]
                blocks.append(stitch_block(grid, (r0, r1), (c0, c1), own, 0.5))
        t2 = time.perf_counter()
        got = reduce_blocks(grid, blocks, 0.5)
        t3 = time.perf_counter()
        for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[key].append(dt)
    n_in = sum(b.n_in for b in blocks)
    decided = sum(int(b.deferred[8].sum()) for b in blocks)
    sent = sum(b.n_deferred for b in blocks)
    same = all(np.array_equal(getattr(ref, f), getattr(got, f))
               for f in ("boxes", "scores", "labels", "tile_row", "tile_col"))
    return {"side": side, "tile": tile, "overlap": overlap, "block_tiles": k, "blocks": len(blocks),
            "detections_in": n_in, "rows": len(ref), "identical": same,
            "share_decided_in_reduce": round(decided / n_in, 3), "share_read_by_reduce": round(sent / n_in, 3),
            "median_s": {key: round(statistics.median(v), 3) for key, v in times.items()},
            "runs_s": {key: [round(x, 3) for x in v] for key, v in times.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=4096)
    ap.add_argument("--objects", type=int, default=15000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    for tile, overlap, k in ((256, 32, 4), (256, 32, 8), (256, 32, 16), (512, 64, 8), (256, 128, 8)):
        print(json.dumps(run(args.side, tile, overlap, k, args.objects, args.rounds)), flush=True)


if __name__ == "__main__":
    main()
