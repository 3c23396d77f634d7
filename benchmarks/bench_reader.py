"""The tile reader with worker processes: the ring reader (batches written into shared buffers)
against torch's DataLoader (the reader before it), the reader in the main process, and the bare
parallel rasterio loop over the same windows (the read bound), in one run. uint8 tiles raw (as
CUDA reads them) and scaled to float32 (as the CPU reads them with workers). Alternating runs,
medians, every run printed: tiles/s after the first batch, and the seconds to the first batch.
The transport alone (workers that fill tiles with zeros, reading nothing) is measured too.

    python benchmarks/bench_reader.py [--size 2048] [--mosaic 5] [--workers 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2048, help="side of the synthetic scene")
    ap.add_argument("--mosaic", type=int, default=5, help="the scene repeated N x N in a VRT")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    from gpu_check import mosaic_vrt
    from gpu_measure import _reader_rate, bare_read_rate

    from geodet.io.scene import gdal_env
    from geodet.pipeline.reader import TileDataset, make_collate, open_scene, read_batches, scene_grid, worker_init
    from geodet.pipeline.ring import ring_batches
    from geodet.pipeline.settings import resolve_detect_settings
    from geodet.synthetic import make_scene

    wd = Path(tempfile.mkdtemp(prefix="geodet-bench-reader-"))
    make_scene(wd / "scene.tif", wd / "scene.gpkg", size=args.size, seed=5)
    vrt = str(mosaic_vrt(wd / "scene.tif", wd / "mosaic.vrt", args.mosaic))
    s = resolve_detect_settings(None, tile_size=args.tile, overlap=args.overlap, batch_size=args.batch)
    cpu = torch.device("cpu")

    def opened():
        sc = open_scene(vrt, s)
        return sc, scene_grid(sc, s)

    def ring(raw):
        sc, g = opened()
        with gdal_env():
            return _reader_rate(ring_batches(sc, g, args.batch, args.workers, raw=raw), cpu)

    def loader(raw):
        sc, g = opened()
        dl = torch.utils.data.DataLoader(TileDataset(sc, g, raw=raw), batch_size=args.batch, num_workers=args.workers,
                                         collate_fn=make_collate(0.0), worker_init_fn=worker_init, prefetch_factor=2)
        with gdal_env():
            return _reader_rate(dl, cpu)

    def in_process():
        sc, g = opened()
        with gdal_env():
            return _reader_rate(read_batches(sc, g, args.batch), cpu)

    def bare(reuse=True):
        sc, g = opened()
        return bare_read_rate(vrt, sc.bands, g, args.workers, args.batch, reuse=reuse), None, len(g)

    class Zeros:
        """A scene of zeros that reads nothing: the readers' transport alone."""

        stats, count, dtype = {}, 3, None

        def read_tile(self, tile, out=None, raw=False):
            if out is None:
                return np.zeros((3, tile.height, tile.width), np.uint8 if raw else np.float32), 1.0
            out[...] = 0
            return out, 1.0

    def transport(kind):
        _, g = opened()
        if kind == "ring":
            return _reader_rate(ring_batches(Zeros(), g, args.batch, args.workers, raw=True), cpu)
        dl = torch.utils.data.DataLoader(TileDataset(Zeros(), g, raw=True), batch_size=args.batch,
                                         num_workers=args.workers, collate_fn=make_collate(0.0),
                                         worker_init_fn=worker_init, prefetch_factor=2)
        return _reader_rate(dl, cpu)

    w = args.workers
    cases = {f"transport alone (uint8 zeros, nothing read): ring, {w} workers": lambda: transport("ring"),
             f"transport alone (uint8 zeros, nothing read): DataLoader, {w} workers": lambda: transport("dl"),
             f"bare parallel rasterio loop, {w} processes, into one buffer each (the read bound; pool start included)": bare,
             f"bare parallel rasterio loop, {w} processes, a new array a tile (pool start included)": lambda: bare(False),
             f"ring reader, {w} workers, uint8 raw": lambda: ring(True),
             f"DataLoader, {w} workers, uint8 raw": lambda: loader(True),
             f"ring reader, {w} workers, float32": lambda: ring(False),
             f"DataLoader, {w} workers, float32": lambda: loader(False),
             "in the main process, float32": in_process}
    rates, firsts = {}, {}
    for _ in range(args.runs):
        for name, fn in cases.items():
            rate, first, n = fn()
            rates.setdefault(name, []).append(round(rate, 1))
            if first is not None:  # the bare loop has no batches
                firsts.setdefault(name, []).append(round(first, 3))
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    isa = [k for k in ("avx2", "avx512_f", "avx512_bf16", "avx512_vnni", "amx_bf16") if caps.get(k)]
    with open_scene(vrt, s) as sc:
        tiles = len(scene_grid(sc, s))
    out = {"cpu": f"{caps.get('cpu_name', '?')} ({', '.join(isa)}), {caps.get('num_logical_cores', '?')} cores",
           "mosaic_px": args.mosaic * args.size, "tiles": tiles, "tile": args.tile, "batch": args.batch,
           "tiles_per_s_after_first_batch": rates, "first_batch_s": firsts,
           "median_tiles_per_s": {k: statistics.median(v) for k, v in rates.items()},
           "median_first_batch_s": {k: statistics.median(v) for k, v in firsts.items()}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
