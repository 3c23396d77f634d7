"""The measurements of ``gpu_check.py``, each a function that returns one JSON row; on a CPU they
run the same code at small sizes (tests/test_gpu_check.py).

- ``core_row``: the network core alone (band normalisation, backbone, FPN, heads) on random
  tiles already on the device, eager or as one CUDA graph, between device synchronisations;
- ``read_row``: the read bound: a bare parallel rasterio loop over the grid's windows (processes,
  each with its own dataset, reading the bands, nothing else, the windows shared out in batches
  as DataLoader workers share them) and the pipeline's own reader (the ring reader on Linux:
  pinned memory), both with the workers the pipeline uses, and torch's DataLoader over the same
  tiles (the pipeline's reader before the ring reader) for comparison;
- ``detect_row``: ``detect_scene`` end to end with a prepared detector, after a warm-up scene;
- ``decode_row``: a batch's decoding and NMS alone, torchvision's per-tile NMS against the
  one-pass pair NMS, with the agreement of their detections;
- ``agreement_row``: two detection frames of one scene compared at a score (F1 of matches).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

PRECISION_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def core_row(model, device, batch, precision, flops, peak, iters, graph=False):
    """tiles/s of the network core alone (``graph``: replayed as one CUDA graph)."""
    from geodet.model.onnx import ExportCore

    core = ExportCore(model).eval().to(device)
    x = torch.rand(batch, model.card.n_bands, model.card.tile_size, model.card.tile_size, device=device) * 255
    if device.type == "cuda":
        core = core.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = PRECISION_DTYPES[precision]

    def run(t):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False):
            return core(t)

    with torch.inference_mode():
        if graph:
            from geodet.pipeline.graphs import GraphedBatch

            fn = GraphedBatch(run, x)
        else:
            fn = run
            for _ in range(3):
                fn(x)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(x)
        sync(device)
    dt = (time.perf_counter() - t0) / iters
    rate = batch / dt
    return {"batch": batch, "precision": precision, "cuda_graph": graph, "ms_per_batch": round(dt * 1e3, 3),
            "tiles_per_s": round(rate, 1), "core_tflops": round(flops * rate / 1e12, 2),
            "share_of_bf16_peak": round(flops * rate / peak, 4) if peak else None}


def _read_windows(path: str, bands: list, windows: list, reuse: bool = True) -> tuple[int, float]:
    """One process of the bare loop: its own dataset, its windows read in turn, into one buffer
    it reuses (``reuse``; as the pipeline's readers do) or into a new array each."""
    import rasterio
    from rasterio.windows import Window

    t0 = time.perf_counter()
    with rasterio.open(path) as ds:
        side = max([max(w, h) for _, _, w, h in windows], default=0)
        buf = np.empty((len(bands), side, side), ds.dtypes[bands[0] - 1]) if reuse else None
        for x, y, w, h in windows:
            ds.read(bands, window=Window(x, y, w, h), out=None if buf is None else buf[:, :h, :w])
    return len(windows), time.perf_counter() - t0


def bare_read_rate(path: str, bands: list, grid, workers: int, batch: int, reuse: bool = True) -> float:
    """tiles/s of ``workers`` processes reading the grid's windows, batch ``k`` of ``batch``
    consecutive windows by process ``k mod workers`` (as DataLoader workers share them), from the
    moment they are started to the last one's end. Each reads into one buffer (``reuse``, the
    read bound: a new tile-sized array a read costs page faults) or a new array a window."""
    windows = [(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in (t.valid for t in grid)]
    batches = [windows[i : i + batch] for i in range(0, len(windows), batch)]
    n = max(1, workers)
    shares = [[w for bt in batches[i::n] for w in bt] for i in range(n)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(n) as pool:
        done = list(pool.map(_read_windows, [path] * n, [bands] * n, shares, [reuse] * n))
    return sum(d[0] for d in done) / (time.perf_counter() - t0)


def _reader_rate(batches, device) -> tuple[float, float, int]:
    """(tiles/s after the first batch, seconds to the first batch, tiles) of a reader's batches,
    each moved to ``device`` as the pipeline moves it."""
    t0 = time.perf_counter()
    first, n, n0 = None, 0, 0
    for images, tiles, skipped, _ in batches:
        if images is not None and device.type == "cuda":
            images.to(device, non_blocking=True)
        n += len(tiles) + len(skipped)
        if first is None:
            sync(device)
            first, n0 = time.perf_counter(), n
    sync(device)
    end = time.perf_counter()
    if first is None:
        return 0.0, 0.0, 0
    steady = (n - n0) / (end - first) if n > n0 and end > first else n / max(end - t0, 1e-9)
    return steady, first - t0, n


def read_row(scene_path: str, settings, device, workers: int) -> dict:
    """The read bound of a preset's grid over a scene, and the pipeline's own reader's rate (the
    ring reader where it runs), with torch's DataLoader over the same tiles for comparison:
    tiles/s from start to end, and after the first batch with the time to it."""
    from geodet.io.scene import gdal_env
    from geodet.pipeline.detect import tile_batches
    from geodet.pipeline.reader import TileDataset, make_collate, open_scene, scene_grid, worker_init

    sc = open_scene(scene_path, settings)
    try:
        grid = scene_grid(sc, settings)
        bare = bare_read_rate(scene_path, sc.bands, grid, workers, settings.batch_size)
        row = {"workers": workers, "tiles": len(grid), "bare_tiles_per_s": round(bare, 1),
               "uint8_raw": device.type == "cuda" and sc.dtype == np.uint8}
        raw = row["uint8_raw"]
        with gdal_env():
            t0 = time.perf_counter()
            steady, first, n = _reader_rate(tile_batches(sc, grid, settings, device), device)
            row["pipeline_reader_tiles_per_s"] = round(n / (time.perf_counter() - t0), 1)
            row["pipeline_reader_steady_tiles_per_s"], row["pipeline_reader_first_batch_s"] = round(steady, 1), round(first, 3)
            if workers > 0:
                loader = torch.utils.data.DataLoader(
                    TileDataset(sc, grid, raw=raw), batch_size=settings.batch_size, num_workers=workers,
                    collate_fn=make_collate(settings.min_valid_fraction), pin_memory=device.type == "cuda",
                    worker_init_fn=worker_init, prefetch_factor=4 if device.type == "cuda" else 2)
                t0 = time.perf_counter()
                steady, first, n = _reader_rate(loader, device)
                row["dataloader_tiles_per_s"] = round(n / (time.perf_counter() - t0), 1)
                row["dataloader_steady_tiles_per_s"], row["dataloader_first_batch_s"] = round(steady, 1), round(first, 3)
    finally:
        sc.close()
    return row


def detect_row(scene, warm_scene, detector, device, batch, workers, flops=None, peak=None) -> tuple[dict, object]:
    """``detect_scene`` over ``scene`` with a prepared ``detector`` (a ``TorchDetector``), after a
    run over ``warm_scene`` (CUDA context, cuDNN's search, the CUDA graph, worker start-up)."""
    from geodet.pipeline.scenes import detect_scene

    kw = dict(device=str(device), batch_size=batch, num_workers=workers, progress=False)
    if warm_scene is not None:
        detect_scene(str(warm_scene), detector, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    frame = detect_scene(str(scene), detector, **kw)
    dt = time.perf_counter() - t0
    rep = frame.attrs["report"]
    sec = rep["seconds"]
    stages = {k: round(sec.get(k, 0.0), 3) for k in ("read_wait", "model", "model_core", "model_decode", "stitch")}
    rate = rep["tiles_run"] / dt
    return {
        "batch": batch, "precision": detector.precision, "workers": workers, "nms": detector.nms,
        "cuda_graph": detector.graph is not None, "tiles": rep["tiles_run"], "tiles_per_s": round(rate, 1),
        "seconds": round(dt, 3), "detections": len(frame), "detections_before_stitch": rep["detections_before_stitch"],
        "stage_seconds": stages,
        "core_share_of_bf16_peak_end_to_end": round(flops * rate / peak, 4) if flops and peak else None,
        "gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None,
    }, frame


def decode_row(model, tiles: torch.Tensor, device, settings, rounds: int) -> dict:
    """A batch's decoding (candidates, thresholds, NMS, cap) alone, ms per tile, torchvision's
    NMS tile by tile against the pair NMS, in alternating rounds; and how far their detections
    agree (F1 at the model's output threshold)."""
    from geodet.pipeline.backends import TorchDetector, agreement

    dets = {m: TorchDetector(model, device, settings, "fp32", cuda_graphs=False, nms=m) for m in ("per_image", "pairs")}
    with torch.inference_mode():
        found = dets["pairs"].start(tiles.to(device))
        found = tuple(t.clone() for t in found)
        runs, out = {m: [] for m in dets}, {}
        for r in range(rounds + 1):
            for m, det in dets.items():
                sync(device)
                t0 = time.perf_counter()
                out[m] = det.finish(found).per_tile()
                if r:  # the first round warms up
                    runs[m].append((time.perf_counter() - t0) * 1e3 / len(tiles))
    as_dicts = {m: [{"boxes": b, "scores": s, "labels": lb} for b, s, lb in o] for m, o in out.items()}
    agree = agreement(as_dicts["per_image"], as_dicts["pairs"], float(settings.score_threshold))
    med = {m: round(float(np.median(v)), 3) for m, v in runs.items()}
    return {"batch": len(tiles), "ms_per_tile": med, "runs_ms_per_tile": {m: [round(x, 3) for x in v] for m, v in runs.items()},
            "speedup": round(med["per_image"] / max(med["pairs"], 1e-9), 2),
            "detections": {m: int(sum(len(s) for _, s, _ in o)) for m, o in out.items()}, "agreement": agree}


def agreement_row(ref_frame, cand_frame, min_score: float) -> dict:
    """F1 of ``cand_frame``'s detections against ``ref_frame``'s (one scene: one 'tile')."""
    from geodet.pipeline.backends import agreement

    cols = ["px_x0", "px_y0", "px_x1", "px_y1"]

    def as_det(f):
        return {"boxes": f[cols].to_numpy(np.float32), "scores": f["score"].to_numpy(np.float32),
                "labels": f["label"].astype(str).to_numpy()}

    a, b = as_det(ref_frame), as_det(cand_frame)
    names = {n: i for i, n in enumerate(sorted(set(a["labels"]) | set(b["labels"])))}
    for d in (a, b):
        d["labels"] = np.array([names[n] for n in d["labels"]], np.int64)
    return agreement([a], [b], min_score)


def cores() -> int:
    return os.cpu_count() or 1
