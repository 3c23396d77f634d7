"""Decoding and NMS on one device: torchvision's NMS tile by tile (``per_image``, the CPU's and
geodet's CUDA path before issue 39) against the one-pass pair NMS for the whole batch
(``pairs``, CUDA's default now), in one process, in alternating rounds.

    python benchmarks/bench_decode.py [--device cuda] [--rounds 3] [--out decode.json]

Two measurements, medians and every run shown:
- decode alone: a batch of real tiles through the core once, then its decoding by both
  (``gpu_measure.decode_row``), with the agreement of their detections;
- end to end: ``detect_scene`` over a 12288^2 mosaic (a 4096^2 synthetic scene repeated 3 x 3
  in a VRT) with each NMS, detections compared row for row.
Models: the presets with random weights (few boxes pass the threshold: the fixed per-batch cost)
and a small_objects model trained here for ``--train-steps`` (dense output: NMS at work).
Runs on the GPU machine through ``GPU_CHECK_RUN=benchmarks/bench_decode.py bash benchmarks/gpu_check.sh``.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def end_to_end(model, scene, warm, device, batch, workers, rounds):
    from gpu_measure import sync

    from geodet.pipeline.backends import TorchDetector
    from geodet.pipeline.scenes import detect_scene
    from geodet.pipeline.settings import resolve_detect_settings

    s = resolve_detect_settings(model.card, batch_size=batch, device=str(device), num_workers=workers)
    precision = "fp16" if device.type == "cuda" else "fp32"
    dets = {m: TorchDetector(model, device, s, precision, nms=m) for m in ("per_image", "pairs")}
    kw = dict(device=str(device), batch_size=batch, num_workers=workers, progress=False)
    runs, frames = {m: [] for m in dets}, {}
    for m, det in dets.items():
        detect_scene(str(warm), det, **kw)  # warm-up: cuDNN's search, the CUDA graph
    for _ in range(rounds):
        for m, det in dets.items():
            sync(device)
            t0 = time.perf_counter()
            frames[m] = detect_scene(str(scene), det, **kw)
            runs[m].append(round(frames[m].attrs["report"]["tiles_run"] / (time.perf_counter() - t0), 1))
    cols = ["label", "score", "px_x0", "px_y0", "px_x1", "px_y1"]
    a, b = (frames[m][cols].sort_values(cols[1:]).reset_index(drop=True) for m in dets)
    return {"batch": batch, "workers": workers, "precision": precision, "tiles_per_s": runs,
            "median_tiles_per_s": {m: statistics.median(v) for m, v in runs.items()},
            "speedup": round(statistics.median(runs["pairs"]) / statistics.median(runs["per_image"]), 2),
            "detections": {m: len(f) for m, f in frames.items()}, "same_detections": bool(a.equals(b))}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=4096, help="synthetic scene side (mosaic: 3 x 3 of it)")
    ap.add_argument("--train-steps", type=int, default=80)
    ap.add_argument("--presets", default="cpu,small_objects,trees")
    ap.add_argument("--e2e-models", default="cpu,small_objects_trained", help="models timed end to end")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_decode.json"))
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    from gpu_check import mosaic_vrt, preset_model, train_rate
    from gpu_measure import decode_row

    from geodet.model import load_model
    from geodet.pipeline.backends import sample_tiles
    from geodet.pipeline.settings import resolve_detect_settings
    from geodet.synthetic import make_scene

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    wd = Path(args.workdir or tempfile.mkdtemp(prefix="bench-decode-"))
    wd.mkdir(parents=True, exist_ok=True)
    base = make_scene(wd / "scene.tif", wd / "scene.gpkg", size=args.size, seed=11)
    scene = mosaic_vrt(wd / "scene.tif", wd / "mosaic.vrt", 3) if cuda else Path(base.image)
    train = make_scene(wd / "train.tif", wd / "train.gpkg", size=2048 if cuda else 384, seed=12)
    res = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
           "scene_px": 3 * args.size if cuda else args.size, "decode": [], "end_to_end": []}

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))

    models = {p: preset_model(p, ["car", "truck"]) for p in args.presets.split(",") if p}
    if args.train_steps:
        row, path = train_rate(train.image, train.labels, device, 8, args.train_steps, wd / "run", 8 if cuda else 0)
        models["small_objects_trained"] = load_model(path)
        res["trained"] = row
    for name, model in models.items():
        for batch in (16, 32) if cuda else (4,):
            s = resolve_detect_settings(model.card, batch_size=batch, device=str(device))
            tiles = torch.from_numpy(np.stack(sample_tiles(base.image, s, model.card, batch)))
            row = {"model": name, **decode_row(model, tiles, device, s, args.rounds)}
            res["decode"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            save()
    for name in (m for m in args.e2e_models.split(",") if m in models):
        for batch, workers in ((32, 8),) if cuda else ((4, 0),):
            row = {"model": name, **end_to_end(models[name], scene, base.image, device, batch, workers, args.rounds)}
            res["end_to_end"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            save()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
