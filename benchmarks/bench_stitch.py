"""Stitch time of a dense model's output: about 900,000 detections on a 12288^2 scene in 512 px
tiles (what the weakly trained small_objects model gave on the GPU check's mosaic), one
``Stitcher`` against CUDA's ``BandStitcher``, with the rows compared.

    python benchmarks/bench_stitch.py [--objects 940000] [--side 12288] [--rounds 3] [--rate 360]
                                      [--threads N] [--out stitch.json]

Objects of 6-30 px, two classes, packed densely; each tile reports what of them lies in its
window, jittered, sometimes missed or seen partly, plus false positives (a few of them large, as
a weak model's are). Reported per round: the one stitcher's seconds (its adds and its finish: the
finish is what shows after the last tile), and the band stitcher's seconds after the last tile
(bands already done, as when they keep up with the tiles) and in all (its bands one after
another and the reduces); with ``--rate``, the band stitcher also gets the tiles at that many
tiles/s (the loop sleeping between them as it waits on the card), and its seconds after the last
tile are measured: whether its threads keep up on this machine.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geodet.pipeline.bands import BandStitcher  # noqa: E402
from geodet.pipeline.grid import TileGrid  # noqa: E402
from geodet.pipeline.stitch import Stitcher  # noqa: E402


def dense_views(grid: TileGrid, n_objects: int, seed: int = 0) -> list:
    """``(tile, boxes, scores, labels)`` per tile in grid order, boxes in tile pixels."""
    rng = np.random.default_rng(seed)
    W, H = grid.width, grid.height
    xy = rng.uniform(0, [W, H], (n_objects, 2))
    wh = rng.uniform(6, 30, (n_objects, 2))
    objs = np.column_stack([xy, np.minimum(xy + wh, [W, H])])
    classes = rng.integers(0, 2, n_objects)
    order = np.argsort(objs[:, 0], kind="stable")
    objs, classes, xs = objs[order], classes[order], objs[order, 0]
    views = []
    for t in grid:
        x0, y0, x1, y1 = t.col_off, t.row_off, t.col_off + grid.tile_size, t.row_off + grid.tile_size
        idx = np.arange(np.searchsorted(xs, x0 - 31), np.searchsorted(xs, x1))
        o = objs[idx]
        near = (o[:, 2] > x0) & (o[:, 3] > y0) & (o[:, 1] < y1)  # the column's objects in this tile's rows
        idx, o = idx[near], o[near]
        cut = np.column_stack([np.maximum(o[:, :2], [x0, y0]), np.minimum(o[:, 2:], [x1, y1])])
        seen = (cut[:, 2] > cut[:, 0] + 1) & (cut[:, 3] > cut[:, 1] + 1) & (rng.random(len(o)) > 0.1)
        b = cut[seen] + rng.normal(0, 1.0, (int(seen.sum()), 4))
        part = rng.random(len(b)) < 0.15
        b[part, 2] = b[part, 0] + (b[part, 2] - b[part, 0]) * 0.55
        n_fp = int(rng.integers(0, 6))
        fp_xy = rng.uniform([x0, y0], [x1, y1], (n_fp, 2))
        fp = np.column_stack([fp_xy, fp_xy + rng.choice([8.0, 20.0, 150.0], (n_fp, 1)) * rng.uniform(0.7, 1.3, (n_fp, 2))])
        b = np.concatenate([b, fp]) - [x0, y0, x0, y0]
        labels = np.concatenate([classes[idx][seen], rng.integers(0, 2, n_fp)])
        views.append((t, b.astype(np.float32), rng.random(len(b)).astype(np.float32), labels))
    return views


def measure(grid: TileGrid, views: list, match_iou: float = 0.5, rate: float | None = None,
            threads: int | None = None) -> dict:
    """One round: seconds of the one stitcher (all of it shows after the last tile: its adds are
    in the loop, its merge in ``finish``), of the band stitcher after its last tile (bands already
    done, as when they kept up with the tiles) and in all; with ``rate``, tiles also come to a band
    stitcher at that many tiles/s (the loop sleeping between them, as it waits on the card) and
    the seconds after the last tile are measured; the rows compared."""
    t0 = time.perf_counter()
    one = Stitcher(grid, match_iou)
    for v in views:
        one.add(*v)
    t_add = time.perf_counter()
    a = one.finish()
    t1 = time.perf_counter()
    opts = {"threads": threads} if threads else {}
    bands = BandStitcher(grid, match_iou, **opts)
    for v in views:
        bands.add(*v)
    bands.wait()  # the bands in flight done, as they would be while the model ran
    t3 = time.perf_counter()
    b = bands.finish()
    t4 = time.perf_counter()
    same = all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("boxes", "scores", "labels", "tile_row", "tile_col"))
    out = {"detections_in": one.n_in, "rows": len(a), "identical": bool(same), "one_stitcher_s": round(t1 - t0, 3),
           "one_stitcher_finish_s": round(t1 - t_add, 3), "bands_after_last_tile_s": round(t4 - t3, 3),
           "bands_total_s": round(t4 - t1, 3), "band_starts": getattr(bands, "starts", None), "deferred": getattr(bands, "n_deferred", None)}
    if rate:
        paced = BandStitcher(grid, match_iou, **opts)
        start = time.perf_counter()
        for i, v in enumerate(views):
            pause = start + i / rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            paced.add(*v)
        t5 = time.perf_counter()
        c = paced.finish()
        t6 = time.perf_counter()
        same = all(np.array_equal(getattr(a, f), getattr(c, f)) for f in ("boxes", "scores", "labels", "tile_row", "tile_col"))
        out.update({"identical": out["identical"] and bool(same), "paced_tiles_s": round(t5 - start, 3),
                    "paced_after_last_tile_s": round(t6 - t5, 3)})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=940_000)
    ap.add_argument("--side", type=int, default=12288)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=None, help="also feed a band stitcher at this many tiles/s")
    ap.add_argument("--threads", type=int, default=None, help="the band stitcher's threads (default: its own)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    grid = TileGrid(args.side, args.side, args.tile, args.overlap)
    views = dense_views(grid, args.objects)
    runs = [measure(grid, views, rate=args.rate, threads=args.threads) for _ in range(args.rounds)]
    keys = ["one_stitcher_s", "one_stitcher_finish_s", "bands_after_last_tile_s", "bands_total_s"]
    keys += ["paced_tiles_s", "paced_after_last_tile_s"] if args.rate else []
    out = {"side": args.side, "tiles": len(grid), "rate": args.rate, "threads": args.threads,
           **{k: runs[0][k] for k in ("detections_in", "rows", "band_starts", "deferred")},
           "identical": all(r["identical"] for r in runs),
           "median_s": {k: statistics.median(r[k] for r in runs) for k in keys},
           "runs_s": {k: [r[k] for r in runs] for k in keys}}
    print(json.dumps(out))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
