"""The GPU path, measured: one script for a CUDA machine that prints one JSON (and writes it).

    python benchmarks/gpu_check.py [--out gpu_check.json] [--budget 380] [--quick]

On CUDA it measures, within ``--budget`` seconds (parts that would overrun are skipped and
named in the JSON; a part that fails is recorded with its error and the rest still run):
- the network core alone per preset (batch 32, fp32/fp16/bf16 autocast, channels_last, CUDA
  events): tiles/s and achieved FLOP/s as a share of the card's dense bf16 peak;
- end-to-end detection tiles/s per preset (cpu, small_objects, trees) at batch 8, 16 and 32,
  with fp32, fp16 and bf16 autocast, DataLoader workers 4 (0, 4 and 8 at batch 16 fp16; pinned
  memory on), with the share of time in read, network core, decode+NMS and stitch, and the
  GPU memory peak;
- training steps/s and images/s of the small_objects preset at batch 8 and 16 with AMP
  (DataLoader workers, pinned memory, channels_last);
- DDP over NCCL (a one-process group; gloo on a CPU): the trainer's own step through a DDP wrapper;
- the same scene's detections on CUDA against the CPU's (boxes matched; AP50 of both).
Without CUDA it runs the same plumbing on the CPU at one small setting and says that the CUDA
parts were skipped, so the script itself is tested (tests/test_gpu_check.py).

The JSON is rewritten after every measurement, so a run cut short still leaves what it measured.
"""

import argparse
import faulthandler
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

# dense bf16 tensor-core peaks (TFLOP/s) of cards this may meet, by name fragment (first match)
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0,
                    "H100 PCIe": 756.0, "H100": 756.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                    "V100": 125.0, "T4": 65.0}
PRECISION_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, what: str, needs_s: float) -> bool:
        if time.perf_counter() + needs_s > self.end:
            self.skipped.append(what)
            return False
        return True


class Results:
    """The JSON being built; written to ``path`` after every change."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = Path(path), data
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, key: str, row) -> None:
        self.data.setdefault(key, []).append(row)
        print(f"gpu_check {key}: {json.dumps(row)}", file=sys.stderr, flush=True)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)

    def part(self, name: str, fn, *args) -> None:
        """Run one part; a failure is recorded (last lines of its traceback) and the run goes on."""
        t0 = time.perf_counter()
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - a check records every failure and goes on
            tb = traceback.format_exc().strip().splitlines()
            self.data.setdefault("errors", {})[name] = {"error": f"{type(exc).__name__}: {exc}"[:500],
                                                        "traceback": tb[-12:]}
            print(f"gpu_check {name} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        self.data.setdefault("part_seconds", {})[name] = round(time.perf_counter() - t0, 1)
        self.save()


def card_peak(name: str) -> float | None:
    for frag, tflops in BF16_PEAK_TFLOPS.items():
        if frag.lower() in name.lower():
            return tflops * 1e12
    return None


def core_flops(model, tile: int) -> float:
    """FLOPs (2 per multiply-add) of the network core on one tile."""
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


def mosaic_vrt(src: Path, dst: Path, n: int) -> Path:
    """A VRT repeating ``src`` n x n times (no pixels copied): a large scene that costs no disk."""
    import rasterio

    with rasterio.open(src) as ds:
        w, h, t, count, wkt = ds.width, ds.height, ds.transform, ds.count, ds.crs.to_wkt()
        dtype = {"uint8": "Byte", "uint16": "UInt16"}[ds.dtypes[0]]
    bands = []
    for b in range(1, count + 1):
        sources = "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="1">{src.name}</SourceFilename><SourceBand>{b}</SourceBand>'
            f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
            f'<DstRect xOff="{j * w}" yOff="{i * h}" xSize="{w}" ySize="{h}"/></SimpleSource>'
            for i in range(n) for j in range(n))
        bands.append(f'<VRTRasterBand dataType="{dtype}" band="{b}">{sources}</VRTRasterBand>')
    dst.write_text(f'<VRTDataset rasterXSize="{w * n}" rasterYSize="{h * n}"><SRS>{wkt}</SRS>'
                   f'<GeoTransform>{t.c}, {t.a}, {t.b}, {t.f}, {t.d}, {t.e}</GeoTransform>{"".join(bands)}</VRTDataset>')
    return dst


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def core_row(model, device, batch, precision, flops, peak, iters):
    """The network core alone on random tiles already on the device."""
    from geodet.model.onnx import ExportCore

    core = ExportCore(model).eval().to(device)
    x = torch.rand(batch, model.card.n_bands, model.card.tile_size, model.card.tile_size, device=device) * 255
    if device.type == "cuda":
        core = core.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = PRECISION_DTYPES[precision]
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for _ in range(3):
            core(x)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            core(x)
        sync(device)
    dt = (time.perf_counter() - t0) / iters
    rate = batch / dt
    return {"batch": batch, "precision": precision, "ms_per_batch": round(dt * 1e3, 2), "tiles_per_s": round(rate, 1),
            "core_tflops": round(flops * rate / 1e12, 2),
            "share_of_bf16_peak": round(flops * rate / peak, 4) if peak else None}


def detect_row(scene, model, device, batch, precision, workers, **kw):
    from geodet.pipeline.scenes import detect_scene

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    frame = detect_scene(str(scene), model, device=str(device), batch_size=batch, num_workers=workers, progress=False,
                         backend="torch", precision=precision, **kw)
    dt = time.perf_counter() - t0
    rep = frame.attrs["report"]
    sec = rep["seconds"]
    stages = {k: sec.get(k, 0.0) for k in ("read_wait", "model_core", "model_decode", "stitch")}
    total = sum(stages.values()) or 1.0
    return {
        "batch": batch, "precision": precision, "workers": workers, "tiles": rep["tiles_run"],
        "tiles_per_s": round(rep["tiles_run"] / dt, 1), "seconds": round(dt, 2), "detections": len(frame),
        "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
        "share": {k: round(v / total, 3) for k, v in stages.items()},
        "backend": rep.get("backend"),
        "gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None,
    }, frame


def train_cfg(scene, labels, device, batch, steps, workers):
    from geodet.config import SceneLabels, load_config

    cfg = load_config("small_objects")
    cfg.train.scenes = [SceneLabels(str(scene), str(labels))]
    cfg.train.batch_size = batch
    cfg.train.max_steps = steps
    cfg.train.steps_per_epoch = steps
    cfg.train.epochs = 1
    cfg.train.device = str(device)
    cfg.train.num_workers = workers
    return cfg


def train_rate(scene, labels, device, batch, steps, out, workers):
    from geodet.training.trainer import Trainer

    cfg = train_cfg(scene, labels, device, batch, steps, workers)
    t0 = time.perf_counter()
    path = Trainer(cfg, out, progress=False).run()
    dt = time.perf_counter() - t0
    import csv

    with open(Path(out) / "metrics.csv", newline="") as f:
        secs = [float(r["seconds"]) for r in csv.DictReader(f) if r["loss"]]  # training rows: elapsed seconds
    warm = secs[len(secs) // 3:]  # skip the first third (kernel selection, first-touch, worker start)
    rate = (len(warm) - 1) / (warm[-1] - warm[0]) if len(warm) > 2 and warm[-1] > warm[0] else steps / dt
    return {"batch": batch, "steps": steps, "steps_per_s": round(rate, 3), "images_per_s": round(rate * batch, 2),
            "workers": workers, "amp": str(cfg.train.precision) if device.type == "cuda" else None,
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None,
            "seconds_total": round(dt, 1)}, path


def ddp_row(scene, labels, device, steps, batch):
    """The trainer's own step through DistributedDataParallel on a one-process group (NCCL on
    CUDA, gloo on a CPU)."""
    import socket

    import torch.distributed as dist

    from geodet.training.trainer import Trainer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        with tempfile.TemporaryDirectory() as d:
            tr = Trainer(train_cfg(scene, labels, device, batch, steps, 4 if device.type == "cuda" else 0), d,
                         progress=False)
            r = tr.setup()
            r.train_model = torch.nn.parallel.DistributedDataParallel(
                r.model, device_ids=[r.device] if device.type == "cuda" else None)
            data, kw = tr._loader(r)
            losses, t0 = [], None
            for i, (images, targets) in enumerate(torch.utils.data.DataLoader(data, **kw)):
                if i == 2:
                    sync(r.device)
                    t0 = time.perf_counter()
                losses.append(tr.step(r, images, targets)["loss"])
                if len(losses) >= steps:
                    break
            sync(r.device)
            t = torch.ones(1, device=r.device)
            dist.all_reduce(t)
            return {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "steps": len(losses),
                    "steps_per_s": round((len(losses) - 2) / (time.perf_counter() - t0), 3),
                    "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
                    "all_finite": bool(np.isfinite(losses).all()), "all_reduce_ok": float(t.item()) == 1.0}
    finally:
        dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    ap.add_argument("--budget", type=float, default=380.0, help="seconds for everything (default 380)")
    ap.add_argument("--quick", action="store_true", help="the CPU plumbing check only (tests)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    budget = Budget(args.budget)
    faulthandler.dump_traceback_later(args.budget + 90, exit=True)  # a hang prints where, then ends
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    from geodet.evaluation import evaluate
    from geodet.synthetic import make_scene

    wd = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-"))
    wd.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    res = Results(args.out, {
        "device": name, "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "cpu_count": os.cpu_count(),
        "bf16_peak_tflops": (card_peak(name) or 0) / 1e12 or None, "notes": [], "skipped_for_time": budget.skipped})
    if not cuda:
        res.data["notes"].append("CUDA not available: CUDA parts skipped (CPU plumbing check at one small setting)")
        print("gpu_check: CUDA not available: CUDA parts skipped; checking the plumbing on the CPU", file=sys.stderr)
    # scenes: a 4096^2 synthetic tile repeated 3 x 3 in a VRT (12288^2) for detection on CUDA
    base = make_scene(wd / "scene.tif", wd / "scene.gpkg", size=4096 if cuda else 384, seed=11)
    scene = mosaic_vrt(wd / "scene.tif", wd / "mosaic.vrt", 3) if cuda else base.image
    train_scene = make_scene(wd / "train.tif", wd / "train.gpkg", size=2048 if cuda else 384, seed=12)
    small = make_scene(wd / "cmp.tif", wd / "cmp.gpkg", size=1024, seed=13) if cuda else None
    res.data["detect_scene_px"] = 3 * 4096 if cuda else 384
    classes = ["car", "truck"]
    presets = ["cpu", "small_objects", "trees"] if cuda else ["cpu"]
    batches = [8, 16, 32] if cuda else [8]
    precisions = ["fp32", "fp16", "bf16"] if cuda else ["fp32"]
    peak = card_peak(name) if cuda else None
    models, flops = {}, {}

    def build(preset):
        models[preset] = preset_model(preset, classes)
        flops[preset] = core_flops(models[preset], models[preset].card.tile_size)

    for preset in presets:
        res.part(f"build {preset}", build, preset)

    def cores(preset):
        for p in precisions:
            if budget.allows(f"core {preset} {p}", 10):
                row = core_row(models[preset], device, 32 if cuda else 2, p, flops[preset], peak, 20 if cuda else 2)
                res.add("core", {"preset": preset, "gflops_per_tile": round(flops[preset] / 1e9, 2), **row})

    for preset in (p for p in presets if p in models):
        res.part(f"core {preset}", cores, preset)

    def detect_grid(preset):
        model = models[preset]
        if cuda:  # warm up (CUDA context, kernels) on a small scene, untimed
            for p in precisions:
                detect_row(small.image, model, device, 8, p, 0)
        for b in batches:
            for p in precisions:
                for w in ([0, 4, 8] if cuda and (b, p) == (16, "fp16") else [4 if cuda else 0]):
                    # leaves 150 s for training, DDP and the CUDA-CPU comparison
                    if budget.allows(f"detect {preset} batch {b} {p} workers {w}", 175 if cuda else 5):
                        row, _ = detect_row(scene, model, device, b, p, w)
                        row["preset"] = preset
                        row["core_share_of_bf16_peak_end_to_end"] = (
                            round(flops[preset] * row["tiles_per_s"] / peak, 4) if peak else None)
                        res.add("detect", row)

    for preset in (p for p in presets if p in models):
        res.part(f"detect {preset}", detect_grid, preset)

    trained = {}

    def train(b):
        if budget.allows(f"train small_objects batch {b}", 60 if cuda else 30):
            row, path = train_rate(train_scene.image, train_scene.labels, device, b, 80 if cuda else 4,
                                   wd / f"run{b}", 8 if cuda else 0)
            trained[b] = path
            res.add("train", row)

    for b in ([8, 16] if cuda else [2]):
        res.part(f"train batch {b}", train, b)

    if budget.allows("DDP", 40 if cuda else 30):
        res.part("ddp", lambda: res.data.__setitem__(
            "ddp", ddp_row(train_scene.image, train_scene.labels, device, 12 if cuda else 4, 8 if cuda else 2)))

    def cuda_vs_cpu():
        from geodet.model import load_model
        from geodet.pipeline.backends import agreement
        from geodet.pipeline.scenes import detect_scene

        path = trained.get(16) or trained.get(8)
        model = load_model(path) if path else preset_model("small_objects", classes)
        out, frames = {"model": "trained here" if path else "random weights", "score_threshold": 0.05}, {}
        for dev in ("cuda", "cpu"):
            frames[dev] = detect_scene(small.image, model, device=dev, backend="torch", precision="fp32",
                                       progress=False, score_threshold=0.05)
            m = evaluate(frames[dev], small.labels, scene=small.image)
            out[dev] = {"detections": len(frames[dev]), "AP50": round(float(m["AP50"]), 4)}
        cols = ["px_x0", "px_y0", "px_x1", "px_y1"]

        def as_det(f):
            return {"boxes": f[cols].to_numpy(np.float32), "scores": f["score"].to_numpy(np.float32),
                    "labels": f["label"].astype("category").cat.codes.to_numpy()}

        out["matched"] = agreement([as_det(frames["cpu"])], [as_det(frames["cuda"])], 0.0)
        out["ap50_difference"] = round(abs(out["cuda"]["AP50"] - out["cpu"]["AP50"]), 4)
        res.data["cuda_vs_cpu"] = out

    if cuda and budget.allows("CUDA against CPU detections", 45):
        res.part("cuda_vs_cpu", cuda_vs_cpu)
    faulthandler.cancel_dump_traceback_later()
    res.save()
    print(json.dumps(res.data, indent=1))
    return 1 if res.data.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
