"""The tile reader of two checkouts of geodet, A/B over the same VRT mosaic: run it once per
checkout, alternating, and compare the medians (one process each, so the two never share a
machine state): the ring reader (uint8 raw, float32), the in-process reader, and one tile at a
time read raw into one batch buffer in the main process. One JSON line per run.

    git worktree add /tmp/before <commit>
    python benchmarks/ab_reader.py --make /tmp/ab          # writes /tmp/ab/mosaic.vrt
    for i in 1 2 3 4 5; do
      python benchmarks/ab_reader.py --root /tmp/before --vrt /tmp/ab/mosaic.vrt --label before
      python benchmarks/ab_reader.py --root . --vrt /tmp/ab/mosaic.vrt --label after
    done
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="the checkout to measure")
    ap.add_argument("--vrt", help="the mosaic to read")
    ap.add_argument("--make", help="write a 10240^2 mosaic (a 2048^2 synthetic scene 5 x 5) into this folder")
    ap.add_argument("--label", default="")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    root = str(Path(args.root).resolve())
    sys.path[:0] = [root, root + "/benchmarks"]
    import numpy as np
    import torch

    import geodet

    if not geodet.__file__.startswith(root):
        sys.exit(f"geodet came from {geodet.__file__}, not {root}")
    if args.make:
        from gpu_check import mosaic_vrt

        from geodet.synthetic import make_scene

        wd = Path(args.make)
        wd.mkdir(parents=True, exist_ok=True)
        make_scene(wd / "scene.tif", wd / "scene.gpkg", size=2048, seed=5)
        print(mosaic_vrt(wd / "scene.tif", wd / "mosaic.vrt", 5))
        return
    from gpu_measure import _reader_rate

    from geodet.io.scene import gdal_env
    from geodet.pipeline.reader import open_scene, read_batches, scene_grid
    from geodet.pipeline.ring import ring_batches
    from geodet.pipeline.settings import resolve_detect_settings

    s = resolve_detect_settings(None, tile_size=256, overlap=32, batch_size=16)
    cpu, w = torch.device("cpu"), args.workers
    out = {"label": args.label, "commit_root": root}
    for name, fn in [(f"ring raw, {w} workers", lambda sc, g: ring_batches(sc, g, 16, w, raw=True)),
                     (f"ring float32, {w} workers", lambda sc, g: ring_batches(sc, g, 16, w)),
                     ("in process float32", lambda sc, g: read_batches(sc, g, 16))]:
        with open_scene(args.vrt, s) as sc, gdal_env():
            out[name] = round(_reader_rate(fn(sc, scene_grid(sc, s)), cpu)[0], 1)
    with open_scene(args.vrt, s) as sc, gdal_env():
        g = scene_grid(sc, s)
        buf = np.empty((16, sc.count, g.tile_size, g.tile_size), np.uint8)
        t0 = time.perf_counter()
        for i in range(len(g)):
            got, _ = sc.read_tile(g.tile(i), out=buf[i % 16], raw=True)
            if not np.shares_memory(got, buf):  # a checkout whose raw reads ignore ``out``: copied, as its ring did
                buf[i % 16] = got
        out["in process raw, one tile at a time"] = round(len(g) / (time.perf_counter() - t0), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
