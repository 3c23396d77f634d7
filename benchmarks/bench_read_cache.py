"""GDAL's block cache and the tile reader: the pipeline's reader (in-process, and with DataLoader
workers) over a VRT mosaic of a synthetic scene, with geodet's cap (128 MiB) against the cap as it
was written before S10 (GDAL_CACHEMAX=128, which rasterio passes to GDALSetCacheMax64 as 128
bytes: no block cache), and a bare rasterio loop over the same windows. Alternating runs, medians,
every run printed.

    python benchmarks/bench_read_cache.py [--size 2048] [--tiles 600] [--runs 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2048, help="side of the synthetic scene (the mosaic is 3 x 3 of it)")
    ap.add_argument("--tiles", type=int, default=600)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import rasterio
    from rasterio.windows import Window

    import geodet.io.gdal as gdal_mod
    from gpu_check import mosaic_vrt
    from geodet.io.scene import gdal_env
    from geodet.pipeline.detect import tile_batches
    from geodet.pipeline.reader import open_scene, scene_grid
    from geodet.pipeline.settings import resolve_detect_settings
    from geodet.synthetic import make_scene

    wd = Path(tempfile.mkdtemp(prefix="geodet-read-cache-"))
    make_scene(wd / "scene.tif", wd / "scene.gpkg", size=args.size, seed=5)
    vrt = str(mosaic_vrt(wd / "scene.tif", wd / "mosaic.vrt", 3))
    rows = {}

    def rate(cap_mb, workers):
        gdal_mod.GDAL_CACHE_MB = cap_mb
        s = resolve_detect_settings(None, tile_size=256, overlap=32, num_workers=workers, batch_size=16)
        sc = open_scene(vrt, s)
        grid = scene_grid(sc, s)
        t0, n = time.perf_counter(), 0
        with gdal_env():
            for _images, tiles, skipped, _ in tile_batches(sc, grid, s, torch.device("cpu"), indices=range(args.tiles)):
                n += len(tiles) + len(skipped)
        sc.close()
        return n / (time.perf_counter() - t0)

    def bare():
        s = resolve_detect_settings(None, tile_size=256, overlap=32)
        grid = scene_grid(open_scene(vrt, s), s)
        t0 = time.perf_counter()
        with rasterio.open(vrt) as ds:
            for i in range(args.tiles):
                x0, y0, x1, y1 = grid.tile(i).valid
                ds.read([1, 2, 3], window=Window(x0, y0, x1 - x0, y1 - y0))
        return args.tiles / (time.perf_counter() - t0)

    cases = {"bare rasterio loop": bare,
             "reader in-process, 128 MiB cap": lambda: rate(128, 0),
             "reader in-process, 128-byte cap (before S10)": lambda: rate(128 / 1024 / 1024, 0),
             f"reader, {args.workers} workers, 128 MiB cap": lambda: rate(128, args.workers),
             f"reader, {args.workers} workers, 128-byte cap (before S10)": lambda: rate(128 / 1024 / 1024, args.workers)}
    for _ in range(args.runs):
        for name, fn in cases.items():
            rows.setdefault(name, []).append(round(fn(), 1))
    gdal_mod.GDAL_CACHE_MB = 128
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    isa = [k for k in ("avx2", "avx512_f", "avx512_bf16", "avx512_vnni", "amx_bf16") if caps.get(k)]
    out = {"cpu": f"{caps.get('cpu_name', '?')} ({', '.join(isa)}), {caps.get('num_logical_cores', '?')} cores",
           "tiles": args.tiles, "mosaic_px": 3 * args.size, "tiles_per_s": rows,
           "median": {k: statistics.median(v) for k, v in rows.items()}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
