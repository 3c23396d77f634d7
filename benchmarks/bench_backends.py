"""CPU backends with the same weights on the same tiles: torch fp32, torch bf16 (only where the CPU
has native bf16), ONNX Runtime fp32 and ONNX Runtime int8 (calibrated on tiles of the scene and
checked by ``geodet export``'s check). One process; tiles pre-read once; backends interleaved
over ``--rounds`` rounds; medians. Stages per tile: network core, decode + NMS, read, stitch.

    python benchmarks/bench_backends.py --model MODEL.pt --scene SCENE.tif [--tiles 64] [--rounds 5]

Achieved operations per second are given as a share of this CPU's peak for each precision:
cores x clock x operations per cycle per core. The per-cycle figures are assumptions stated in
the output (two 256-bit FMA pipes: 32 fp32 FLOP/cycle; int8 without VNNI via vpmaddubsw/vpmaddwd
about 64 op/cycle; with VNNI 128 op/cycle; native bf16 64 FLOP/cycle).
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch


def peak_ops(precision: str, feats: dict, cores: int, ghz: float) -> float:
    per_cycle = {"fp32": 32, "bf16": 64, "int8": 128 if feats["vnni"] else 64}[precision]
    return cores * ghz * 1e9 * per_cycle


def cpu_ghz() -> float:
    try:
        mhz = [float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz")]
        return max(mhz) / 1000
    except (OSError, ValueError):
        return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--scene", required=True)
    ap.add_argument("--tiles", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from torch.utils.flop_counter import FlopCounterMode

    from geodet.io.scene import Scene
    from geodet.model import load_model
    from geodet.model.onnx import ExportCore, load_onnx
    from geodet.pipeline.backends import OnnxDetector, TorchDetector, cpu_features
    from geodet.pipeline.convert import build_onnx, calibration_tiles
    from geodet.pipeline.grid import TileGrid
    from geodet.pipeline.settings import resolve_detect_settings
    from geodet.pipeline.stitch import Stitcher

    model = load_model(args.model)
    card = model.card
    s = resolve_detect_settings(card, device="cpu", batch_size=args.batch_size)
    feats = cpu_features()
    sc = Scene(args.scene, bands=card.bands, percentiles=card.percentiles)
    grid = TileGrid(sc.width, sc.height, s.tile_size, s.overlap)
    idx = np.unique(np.linspace(0, len(grid) - 1, min(args.tiles, len(grid))).round().astype(int))
    t0 = time.perf_counter()
    tiles = [sc.read_tile(grid.tile(int(i)))[0] for i in idx]
    read_ms = (time.perf_counter() - t0) / len(tiles) * 1000
    tile_objs = [grid.tile(int(i)) for i in idx]

    detectors = {"torch fp32": TorchDetector(model, torch.device("cpu"), s, "fp32")}
    if feats["bf16"]:
        detectors["torch bf16"] = TorchDetector(model, torch.device("cpu"), s, "bf16")
    tmp = tempfile.mkdtemp(prefix="bench-backends-")
    calib, check, ref, _ = calibration_tiles(model, [args.scene], 32, s)
    for precision in ("fp32", "int8"):
        path = os.path.join(tmp, f"{precision}.onnx")
        t_exp = time.perf_counter()
        check_result = build_onnx(model, path, precision, calib, check, s, min_agreement=0.0, reference=ref)
        print(f"export {precision}: {time.perf_counter() - t_exp:.1f} s; check: "
              + json.dumps(check_result.get(precision if precision == "int8" else "fp32", {}).get("detections")))
        detectors[f"onnx {precision}"] = OnnxDetector(load_onnx(path), s)

    x1 = torch.from_numpy(tiles[0][None].astype(np.float32))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        ExportCore(model).eval()(x1)
    flops_per_tile = fc.get_total_flops()

    def run(det):
        det.timings.clear()
        outs = []
        for i in range(0, len(tiles), args.batch_size):
            batch = torch.from_numpy(np.stack(tiles[i : i + args.batch_size]))
            with torch.inference_mode():
                outs.extend(det(batch))
        t0 = time.perf_counter()
        st = Stitcher(grid, s.match_iou)
        for tile, o in zip(tile_objs, outs):
            st.add(tile, o["boxes"].numpy(), o["scores"].numpy(), o["labels"].numpy())
        n = len(st.finish())
        stitch = time.perf_counter() - t0
        return det.timings["core"], det.timings["decode"], stitch, n

    for det in detectors.values():  # warm-up: first calls build kernels
        run(det)
    rows = {k: [] for k in detectors}
    for r in range(args.rounds):
        for name, det in detectors.items():
            rows[name].append(run(det))
    n = len(tiles)
    cores, ghz = args.threads, cpu_ghz()
    print(f"\nCPU: {feats['isa']}, bf16 native: {feats['bf16']}, VNNI: {feats['vnni']}; {cores} threads at {ghz:.2f} GHz; "
          f"{n} tiles of {s.tile_size} px, batch {args.batch_size}; {flops_per_tile / 1e9:.2f} GFLOP per tile (core)")
    print("| backend | core ms/tile | decode+NMS ms/tile | read ms/tile | stitch ms/tile | end-to-end tiles/s | "
          "core speed-up | share of peak | detections | every round (core ms/tile) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = statistics.median(c for c, _, _, _ in rows["torch fp32"]) / n * 1000
    out = {}
    for name, rs in rows.items():
        core = statistics.median(c for c, _, _, _ in rs) / n * 1000
        dec = statistics.median(d for _, d, _, _ in rs) / n * 1000
        sti = statistics.median(x for _, _, x, _ in rs) / n * 1000
        total = core + dec + read_ms + sti
        prec = name.split()[1]
        share = flops_per_tile / (core / 1000) / peak_ops(prec, feats, cores, ghz)
        every = ", ".join(f"{c / n * 1000:.1f}" for c, _, _, _ in rs)
        print(f"| {name} | {core:.1f} | {dec:.1f} | {read_ms:.1f} | {sti:.1f} | {1000 / total:.1f} | "
              f"{base / core:.2f}x | {share:.0%} | {rs[0][3]} | {every} |")
        out[name] = {"core_ms": core, "decode_ms": dec, "read_ms": read_ms, "stitch_ms": sti, "tiles_per_s": 1000 / total,
                     "share_of_peak": share, "rounds_core_ms": [c / n * 1000 for c, _, _, _ in rs]}
    if not feats["bf16"]:
        print("torch bf16: not run (this CPU has no native bf16, and geodet does not emulate it)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": feats, "ghz": ghz, "flops_per_tile": flops_per_tile, "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
