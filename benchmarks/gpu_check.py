"""The GPU path, measured: one script for a CUDA machine that prints one JSON (and writes it).

    python benchmarks/gpu_check.py [--out gpu_check.json] [--budget 420] [--quick]

On CUDA it measures, within ``--budget`` seconds (parts that would overrun are skipped and
named in the JSON):
- detection tiles/s per preset (cpu, small_objects, trees) at batch 8, 16, 32, with fp32, fp16
  and bf16 autocast and DataLoader workers 0, 4, 8 (pinned memory on), with the share of time in
  read, network core, decode+NMS and stitch, and the GPU memory peak;
- training steps/s and images/s of the small_objects preset at batch 8 and 16 with AMP;
- the same scene's detections on CUDA against the CPU's (boxes matched; AP50 of both);
- achieved core FLOP/s as a share of the card's dense bf16 peak.
Without CUDA it runs the same plumbing on the CPU at one small setting and says that the CUDA
parts were skipped, so the script itself is tested (tests/test_gpu_check.py).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# dense bf16 tensor-core peaks (TFLOP/s) of cards this may meet, by name fragment
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "V100": 125.0, "T4": 65.0}


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds
        self.skipped: list[str] = []

    def allows(self, what: str, needs_s: float) -> bool:
        if time.perf_counter() + needs_s > self.end:
            self.skipped.append(what)
            return False
        return True


def card_peak(name: str) -> float | None:
    for frag, tflops in BF16_PEAK_TFLOPS.items():
        if frag.lower() in name.lower():
            return tflops * 1e12
    return None


def core_flops(model, tile: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from geodet.model.onnx import ExportCore

    core = ExportCore(model).eval().cpu()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        core(torch.rand(1, model.card.n_bands, tile, tile))
    return float(fc.get_total_flops())


def preset_model(name: str, classes):
    from geodet.config import load_config
    from geodet.model import build_model

    cfg = load_config(name)
    cfg.model.classes = list(classes)
    return build_model(cfg.model, tile_size=cfg.tiling.tile_size, overlap=cfg.tiling.overlap)


def detect_row(scene, model, device, batch, precision, workers):
    from geodet.pipeline.detect import detect_scene

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    frame = detect_scene(scene, model, device=str(device), batch_size=batch, num_workers=workers, progress=False,
                         backend="torch", precision=precision)
    dt = time.perf_counter() - t0
    rep = frame.attrs["report"]
    sec = rep["seconds"]
    stages = {k: sec.get(k, 0.0) for k in ("read_wait", "model_core", "model_decode", "stitch")}
    total = sum(stages.values()) or 1.0
    return {
        "batch": batch, "precision": precision, "workers": workers, "tiles": rep["tiles_run"],
        "tiles_per_s": round(rep["tiles_run"] / dt, 2), "seconds": round(dt, 2), "detections": len(frame),
        "share": {k: round(v / total, 3) for k, v in stages.items()},
        "gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None,
    }, frame


def train_rate(scene, labels, device, batch, steps, out):
    from geodet.config import SceneLabels, load_config
    from geodet.training.trainer import Trainer

    cfg = load_config("small_objects")
    cfg.train.scenes = [SceneLabels(str(scene), str(labels))]
    cfg.train.batch_size = batch
    cfg.train.max_steps = steps
    cfg.train.steps_per_epoch = steps
    cfg.train.epochs = 1
    cfg.train.device = str(device)
    cfg.train.num_workers = 4 if device.type == "cuda" else 0
    t0 = time.perf_counter()
    path = Trainer(cfg, out, progress=False).run()
    dt = time.perf_counter() - t0
    rows = [r.split(",") for r in (Path(out) / "metrics.csv").read_text().splitlines()[1:]]
    secs = [float(r[-1]) for r in rows if r[2]]  # training rows: elapsed seconds per step
    warm = secs[len(secs) // 3:]  # skip the first third (cudnn autotuning, first-touch)
    rate = (len(warm) - 1) / (warm[-1] - warm[0]) if len(warm) > 2 and warm[-1] > warm[0] else steps / dt
    return {"batch": batch, "steps": steps, "steps_per_s": round(rate, 3), "images_per_s": round(rate * batch, 2),
            "amp": "fp16" if device.type == "cuda" else None, "seconds_total": round(dt, 1)}, path


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for everything (default 420)")
    ap.add_argument("--quick", action="store_true", help="the CPU plumbing check only (tests)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    budget = Budget(args.budget)
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    from geodet.evaluation import evaluate
    from geodet.synthetic import make_scene

    wd = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-"))
    wd.mkdir(parents=True, exist_ok=True)
    size = 2048 if cuda else 384
    scene = make_scene(wd / "scene.tif", wd / "scene.gpkg", size=size, seed=11)
    train_scene = make_scene(wd / "train.tif", wd / "train.gpkg", size=2048 if cuda else 384, seed=12)
    out = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
           "cuda": torch.version.cuda if cuda else None, "scene_px": size, "detect": [], "train": [],
           "notes": []}
    if not cuda:
        out["notes"].append("CUDA not available: CUDA parts skipped (CPU plumbing check at one small setting)")
        print("gpu_check: CUDA not available: CUDA parts skipped; checking the plumbing on the CPU", file=sys.stderr)
    classes = ["car", "truck"]
    presets = ["cpu", "small_objects", "trees"] if cuda else ["cpu"]
    batches = [8, 16, 32] if cuda else [8]
    precisions = ["fp32", "fp16", "bf16"] if cuda else ["fp32"]
    workers = [0, 4, 8] if cuda else [0]
    peak = card_peak(out["device"]) if cuda else None
    for preset in presets:
        model = preset_model(preset, classes)
        flops = core_flops(model, model.card.tile_size)
        for b in batches:
            for p in precisions:
                for w in ([4] if cuda and (b, p) != (16, "fp16") else workers):
                    what = f"detect {preset} batch {b} {p} workers {w}"
                    if not budget.allows(what, 20 if cuda else 5):
                        continue
                    row, _ = detect_row(scene.image, model, device, b, p, w)
                    row["preset"] = preset
                    achieved = flops * row["tiles_per_s"]
                    row["core_tflops"] = round(achieved / 1e12, 3)
                    row["share_of_bf16_peak"] = round(achieved / peak, 4) if peak else None
                    out["detect"].append(row)
                    print(json.dumps(row), file=sys.stderr)
    for b in ([8, 16] if cuda else [2]):
        if not budget.allows(f"train small_objects batch {b}", 60 if cuda else 30):
            continue
        row, model_path = train_rate(train_scene.image, train_scene.labels, device, b, 60 if cuda else 4,
                                     wd / f"run{b}")
        out["train"].append(row)
        print(json.dumps(row), file=sys.stderr)
    if cuda and budget.allows("CUDA against CPU detections", 90):
        from geodet.model import load_model
        from geodet.pipeline.backends import agreement

        model = load_model(wd / "run16" / "model.pt") if (wd / "run16" / "model.pt").exists() else preset_model(
            "small_objects", classes)
        small = make_scene(wd / "cmp.tif", wd / "cmp.gpkg", size=1024, seed=13)
        res = {}
        frames = {}
        for dev in ("cuda", "cpu"):
            frames[dev] = __import__("geodet.pipeline.detect", fromlist=["x"]).detect_scene(
                small.image, model, device=dev, backend="torch", precision="fp32", progress=False)
            m = evaluate(frames[dev], small.labels, scene=small.image)
            res[dev] = {"detections": len(frames[dev]), "AP50": round(float(m["AP50"]), 4)}
        cols = ["px_x0", "px_y0", "px_x1", "px_y1"]

        def as_det(f):
            return {"boxes": f[cols].to_numpy(np.float32), "scores": f["score"].to_numpy(np.float32),
                    "labels": f["label"].astype("category").cat.codes.to_numpy()}

        res["matched"] = agreement([as_det(frames["cpu"])], [as_det(frames["cuda"])], 0.0)
        res["ap50_difference"] = round(abs(res["cuda"]["AP50"] - res["cpu"]["AP50"]), 4)
        out["cuda_vs_cpu"] = res
    out["skipped_for_time"] = budget.skipped
    text = json.dumps(out, indent=1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
