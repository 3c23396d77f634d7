"""Peak RSS of tiling (windowed reads of every tile) and of detection with a perfect detector,
for a 4000^2 and a 16000^2 uint8 RGB scene, each in its own subprocess, plus tiler throughput
against a plain rasterio windowed-read loop over the same windows (same run, ratio).

    python benchmarks/bench_memory.py [--sizes 4000 16000] [--workdir /tmp/geodet-bench]
"""

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path


CHILD = textwrap.dedent("""
    import json, resource, sys, time, numpy as np
    sys.path.insert(0, {tests!r})
    mode, path = sys.argv[1], sys.argv[2]
    import geodet
    from geodet.io.scene import Scene, gdal_env
    from geodet.pipeline.grid import TileGrid
    if mode != "plain":
        geodet.tune_memory()  # what the geodet command does; the API leaves it to the caller
    t0 = time.perf_counter()
    if mode == "tile":
        sc = Scene(path)
        g = TileGrid(sc.width, sc.height, 512, 64)
        with gdal_env():  # as geodet's own loops do
            for t in g:
                sc.read_tile(t)
        n = len(g)
    elif mode == "plain":
        import rasterio
        from rasterio.windows import Window
        with rasterio.open(path) as src:
            g = TileGrid(src.width, src.height, 512, 64)
            for t in g:
                src.read(window=t.window()).astype(np.float32) / 255
        n = len(g)
    else:
        from helpers import PerfectDetector
        from geodet.pipeline.scenes import detect_scene
        n = len(detect_scene(path, PerfectDetector(), tile_size=512, overlap=64, progress=False))
    dt = time.perf_counter() - t0
    hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]  # peak of this exec
    print(json.dumps({{"n": n, "seconds": dt, "peak_mb": hwm / 1024}}))
""")


def make_scene(path, size):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import packed_boxes, write_id_scene

    if not path.exists():
        boxes = packed_boxes(size, size, 4, 24, seed=1, gap_choices=(30, 60, 90))
        write_id_scene(path, boxes, size, size, block=1024)
    return path


def run(mode, path):
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    r = subprocess.run([sys.executable, "-c", CHILD.format(tests=tests), mode, str(path)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[4000, 16000])
    ap.add_argument("--workdir", default="/tmp/geodet-bench")
    args = ap.parse_args()
    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    res = {}
    for size in args.sizes:
        p = make_scene(wd / f"scene_{size}.tif", size)
        res[size] = {m: run(m, p) for m in ("tile", "plain", "detect")}
        t, pl, d = res[size]["tile"], res[size]["plain"], res[size]["detect"]
        print(f"{size}^2: tiler peak {t['peak_mb']:.0f} MB, {t['n'] / t['seconds']:.1f} tiles/s vs plain rasterio loop "
              f"{pl['n'] / pl['seconds']:.1f} tiles/s (ratio {pl['seconds'] / t['seconds']:.2f}); "
              f"detect (perfect detector) peak {d['peak_mb']:.0f} MB, {d['n']} objects, {d['seconds']:.0f} s")
    if len(args.sizes) == 2:
        a, b = args.sizes
        print(f"peak ratio {b}^2 / {a}^2: tiler {res[b]['tile']['peak_mb'] / res[a]['tile']['peak_mb']:.2f}, "
              f"detect {res[b]['detect']['peak_mb'] / res[a]['detect']['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
