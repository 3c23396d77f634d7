"""The GPU path, measured: one script for a CUDA machine that prints one JSON (and writes it).

    python benchmarks/gpu_check.py [--out gpu_check.json] [--budget 300] [--quick]

On CUDA it measures, within ``--budget`` seconds (a part that would overrun is skipped and named
in the JSON; a part that fails is recorded with its error and the rest still run), on a 12288^2
mosaic (a 4096^2 synthetic scene repeated 3 x 3 in a VRT):
- per preset (cpu, small_objects, trees): the network core alone (batch 32, channels_last, fp32,
  fp16 and bf16 autocast, and fp16 as one CUDA graph): tiles/s and the share of the card's dense
  bf16 peak; the read bound (a bare parallel rasterio loop over the grid's windows, with the
  pipeline's workers) and the pipeline's reader alone; end to end (``detect_scene``, the CUDA
  default: fp16, batch 32, the core as a CUDA graph, NMS for the batch, stitching in bands), with
  its share of the core-alone rate and of the read bound (the cpu preset also with more workers);
- a dense model (small_objects trained here for 80 steps: training steps/s on the way): end to
  end tiles/s (it was 120 before; the goal is 3x), and a batch's decoding alone, torchvision's NMS
  tile by tile against the one-pass pair NMS, with their agreement;
- stitching about 900,000 detections (benchmarks/bench_stitch.py): one Stitcher against the bands;
- CUDA against the CPU: the trained model's detections on a 1024^2 scene, CUDA fp32 and fp16
  against CPU fp32, F1 at the operating point (goal 0.999);
- DDP over NCCL (a one-process group) when time is left;
- ``goals``: each goal of issue 39 with its figure and whether it was met.
Without CUDA it runs the same code on the CPU at small sizes and says that the CUDA parts were
skipped, so the script itself is tested (tests/test_gpu_check.py).

The JSON is rewritten after every measurement, so a run cut short still leaves what it measured.
"""

import argparse
import dataclasses
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu_measure as gm  # noqa: E402
from gpu_measure import sync  # noqa: E402

# dense bf16 tensor-core peaks (TFLOP/s) of cards this may meet, by name fragment (first match)
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0,
                    "H100 PCIe": 756.0, "H100": 756.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                    "V100": 125.0, "T4": 65.0}


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


def train_cfg(scene, labels, device, batch, steps, workers):
    from geodet.config import SceneLabels, load_config

    cfg = load_config("small_objects")
    if device.type != "cuda":  # the plumbing on a CPU: the same network on smaller tiles (a 512 px step takes ~9 s)
        cfg.tiling.tile_size, cfg.tiling.overlap = 192, 32
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
    path = Trainer(cfg, out, progress=False, overwrite=True).run()
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

    from geodet.training.loop import train_step
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
                losses.append(train_step(r, images, targets, tr.cfg.train.grad_clip, tr.warmup, 1)["loss"])
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


OLD_DENSE_TILES_PER_S = 120.0  # the dense model end to end before issue 39 (docs/benchmarks.md, GPU)


class Check:
    """The parts of one run, sharing its scenes, models and results."""

    def __init__(self, args):
        self.cuda = torch.cuda.is_available() and not args.quick
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.budget = Budget(args.budget)
        name = torch.cuda.get_device_name(0) if self.cuda else "cpu"
        self.peak = card_peak(name) if self.cuda else None
        self.res = Results(args.out, {
            "device": name, "torch": torch.__version__, "cuda": torch.version.cuda if self.cuda else None,
            "cudnn": torch.backends.cudnn.version() if self.cuda else None, "cpu_count": os.cpu_count(),
            "bf16_peak_tflops": (self.peak or 0) / 1e12 or None, "notes": [], "skipped_for_time": self.budget.skipped})
        self.wd = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-"))
        self.wd.mkdir(parents=True, exist_ok=True)
        self.batch = 32 if self.cuda else 4
        self.precision = "fp16" if self.cuda else "fp32"  # CUDA's default, and the CPU's
        self.models, self.flops, self.core_rate, self.read_rate = {}, {}, {}, {}
        self.trained = None

    def scenes(self):
        from geodet.synthetic import make_scene

        size = 4096 if self.cuda else 384
        self.base = make_scene(self.wd / "scene.tif", self.wd / "scene.gpkg", size=size, seed=11)
        self.scene = mosaic_vrt(self.wd / "scene.tif", self.wd / "mosaic.vrt", 3) if self.cuda else Path(self.base.image)
        self.train_scene = make_scene(self.wd / "train.tif", self.wd / "train.gpkg", size=2048 if self.cuda else 384,
                                      seed=12)
        self.small = make_scene(self.wd / "cmp.tif", self.wd / "cmp.gpkg", size=1024 if self.cuda else 384, seed=13)
        self.res.data["detect_scene_px"] = 3 * size if self.cuda else size

    def detector(self, model, batch=None, workers=None, graphs=True, precision=None):
        from geodet.pipeline.backends import TorchDetector
        from geodet.pipeline.settings import resolve_detect_settings

        s = resolve_detect_settings(model.card, batch_size=batch or self.batch, device=str(self.device),
                                    num_workers=workers)
        return TorchDetector(model, self.device, s, precision or self.precision, cuda_graphs=graphs), s

    def build(self, preset):
        self.models[preset] = preset_model(preset, ["car", "truck"])
        self.flops[preset] = core_flops(self.models[preset], self.models[preset].card.tile_size)

    def cores(self, preset):
        rows = ([(p, False) for p in ("fp32", "fp16", "bf16")] + [("fp16", True)]) if self.cuda else [("fp32", False)]
        for p, graph in rows:
            if self.budget.allows(f"core {preset} {p}{' graph' if graph else ''}", 10):
                row = gm.core_row(self.models[preset], self.device, self.batch, p, self.flops[preset], self.peak,
                                  20 if self.cuda else 2, graph=graph)
                row = {"preset": preset, "gflops_per_tile": round(self.flops[preset] / 1e9, 2), **row}
                if p == self.precision:
                    self.core_rate[preset] = max(self.core_rate.get(preset, 0.0), row["tiles_per_s"])
                self.res.add("core", row)

    def reads(self, preset, workers):
        _, s = self.detector(self.models[preset], workers=workers)
        row = gm.read_row(str(self.scene), s, self.device, workers)
        self.read_rate[preset, workers] = row["bare_tiles_per_s"]
        self.res.add("read_bound", {"preset": preset, **row})

    def detect(self, preset, workers=None, tag="default"):
        """End to end with the device's defaults (``workers``: the pipeline's, unless given)."""
        from geodet.pipeline.detect import default_workers

        model = self.models[preset] if preset in self.models else self.trained
        w = default_workers(self.device) if workers is None else workers
        det, _ = self.detector(model, workers=w)
        arch = "small_objects" if preset == "small_objects_trained" else preset  # the same network
        row, _ = gm.detect_row(self.scene, self.base.image, det, self.device, self.batch, w, self.flops.get(arch),
                               self.peak)
        core, read = self.core_rate.get(arch), self.read_rate.get((arch, w))
        row = {"preset": preset, "run": tag, **row,
               "share_of_core_alone": round(row["tiles_per_s"] / core, 3) if core else None,
               "share_of_read_bound": round(row["tiles_per_s"] / read, 3) if read else None}
        self.res.add("detect", row)
        return row

    def train(self):
        from geodet.model import load_model

        row, path = train_rate(self.train_scene.image, self.train_scene.labels, self.device, 16 if self.cuda else 2,
                               80 if self.cuda else 4, self.wd / "run", 8 if self.cuda else 0)
        self.res.add("train", row)
        self.trained = load_model(path)

    def dense(self):
        row = self.detect("small_objects_trained", tag="dense")
        self.res.data["dense"] = {"tiles_per_s": row["tiles_per_s"], "before": OLD_DENSE_TILES_PER_S,
                                  "speedup": round(row["tiles_per_s"] / OLD_DENSE_TILES_PER_S, 2),
                                  "detections": row["detections"]}

    def decode(self):
        from geodet.pipeline.backends import sample_tiles

        _, s = self.detector(self.trained)
        if not self.cuda:  # the few steps trained on a CPU leave every score low: compare many boxes anyway
            s = dataclasses.replace(s, score_threshold=0.0)
        tiles = sample_tiles(self.base.image, s, self.trained.card, self.batch)
        batch = torch.from_numpy(np.stack(tiles))
        self.res.add("decode", {"model": "small_objects_trained", **gm.decode_row(self.trained, batch, self.device, s,
                                                                                  3 if self.cuda else 1)})

    def stitch(self):
        import bench_stitch

        from geodet.pipeline.grid import TileGrid

        side, n = (12288, 940_000) if self.cuda else (1536, 6000)
        grid = TileGrid(side, side, 512, 64)
        views = bench_stitch.dense_views(grid, n)  # tiles also come at the dense goal, 360 tiles/s
        self.res.data["stitch"] = {"side": side, **bench_stitch.measure(grid, views, rate=360)}
        self.res.save()

    def cuda_vs_cpu(self):
        from geodet.pipeline.backends import check_score
        from geodet.pipeline.scenes import detect_scene

        op = check_score(self.trained.card)
        kw = dict(backend="torch", progress=False)
        ref = detect_scene(self.small.image, self.trained, device="cpu", precision="fp32", **kw)
        out = {"operating_point": op, "cpu_fp32_detections": len(ref)}
        for p in ("fp32", "fp16"):
            got = detect_scene(self.small.image, self.trained, device="cuda", precision=p, **kw)
            out[f"cuda_{p}"] = gm.agreement_row(ref, got, op)
        self.res.data["cuda_vs_cpu"] = out
        self.res.save()

    def goals(self) -> dict:
        """Issue 39's goals with the figures measured here."""
        d = self.res.data
        out = {}
        for row in d.get("detect", []):
            if row["run"] != "default":
                continue
            core, read = row.get("share_of_core_alone"), row.get("share_of_read_bound")
            out[f"{row['preset']} end to end >= 60% of the core, or >= 90% of the read bound"] = {
                "share_of_core_alone": core, "share_of_read_bound": read,
                "met": bool((core or 0) >= 0.6 or (read or 0) >= 0.9)}
        if "dense" in d:
            out["dense model >= 3x 120 tiles/s"] = {"tiles_per_s": d["dense"]["tiles_per_s"],
                                                    "met": d["dense"]["tiles_per_s"] >= 3 * OLD_DENSE_TILES_PER_S}
        st = d.get("stitch", {})
        if st.get("paced_after_last_tile_s") is not None:
            share = st["paced_after_last_tile_s"] / max(st["paced_tiles_s"], 1e-9)
            out["dense stitching does not show: <= 10% of the tiles' time after the last tile, rows equal"] = {
                "after_last_tile_s": st["paced_after_last_tile_s"], "tiles_s": st["paced_tiles_s"],
                "one_stitcher_finish_s": st.get("one_stitcher_finish_s"), "share": round(share, 3),
                "identical": st["identical"], "met": bool(st["identical"] and share <= 0.1)}
        for p in ("fp32", "fp16"):
            a = d.get("cuda_vs_cpu", {}).get(f"cuda_{p}")
            if a:
                out[f"CUDA {p} against CPU F1 >= 0.999 at the operating point"] = {
                    "f1": a["f1"], "met": a["f1"] is not None and a["f1"] >= 0.999}
        return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the measurements (default 300)")
    ap.add_argument("--quick", action="store_true", help="the CPU plumbing check only (tests)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    faulthandler.dump_traceback_later(args.budget + 90, exit=True)  # a hang prints where, then ends
    c = Check(args)
    res, budget = c.res, c.budget
    if not c.cuda:
        res.data["notes"].append("CUDA not available: CUDA parts skipped (the same code on the CPU at small sizes)")
        print("gpu_check: CUDA not available: CUDA parts skipped; checking the plumbing on the CPU", file=sys.stderr)
    from geodet.pipeline.detect import default_workers

    c.scenes()
    presets = ["cpu", "small_objects", "trees"] if c.cuda else ["cpu"]
    for preset in presets:
        res.part(f"build {preset}", c.build, preset)
    workers = default_workers(c.device) if c.cuda else 1  # the pipeline's readers (one on a small CPU)
    for preset in (p for p in presets if p in c.models):
        res.part(f"core {preset}", c.cores, preset)
        if budget.allows(f"read {preset}", 20 if c.cuda else 10):
            res.part(f"read {preset}", c.reads, preset, workers)
        if budget.allows(f"detect {preset}", 30 if c.cuda else 10):
            res.part(f"detect {preset}", c.detect, preset, workers)
    more = min(gm.cores() - 2, 14)
    if c.cuda and more > workers and budget.allows(f"cpu preset with {more} workers", 30):
        res.part("read cpu more workers", c.reads, "cpu", more)
        res.part("detect cpu more workers", c.detect, "cpu", more, f"{more} workers")
    if budget.allows("train", 45 if c.cuda else 30):
        res.part("train", c.train)
    if c.trained is not None:
        for name, fn, need in (("dense", c.dense, 30), ("decode", c.decode, 20)):
            if budget.allows(name, need if c.cuda else 10):
                res.part(name, fn)
    if budget.allows("stitch", 30 if c.cuda else 10):
        res.part("stitch", c.stitch)
    if c.cuda and c.trained is not None and budget.allows("CUDA against CPU", 45):
        res.part("cuda_vs_cpu", c.cuda_vs_cpu)
    if budget.allows("DDP", 30):
        res.part("ddp", lambda: res.data.__setitem__(
            "ddp", ddp_row(c.train_scene.image, c.train_scene.labels, c.device, 12 if c.cuda else 4, 8 if c.cuda else 2)))
    res.data["goals"] = c.goals()
    faulthandler.cancel_dump_traceback_later()
    res.save()
    print(json.dumps(res.data, indent=1))
    return 1 if res.data.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
