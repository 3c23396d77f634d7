"""Box decoding and NMS: the batch-vectorised decoder against torchvision's per-image loop (the
decoder geodet had before), on one device, in one process, interleaved.

    python benchmarks/bench_decode.py [--device cuda] [--rounds 5] [--out decode.json]

Two measurements, each old against new in alternating rounds, medians and every run shown:
- decode alone: the network core's outputs for a batch of real tiles, decoded by both;
- end to end: ``detect_scene`` over a 12288^2 mosaic (a 4096^2 synthetic scene repeated 3 x 3
  in a VRT) with the old decoder and per-tile host copies patched in, against the current code.
Models: the presets with random weights (few boxes pass the threshold: the fixed per-tile cost)
and a small_objects model trained here for ``--train-steps`` (dense output: NMS at work).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))


def old_decode(box_coder, head_outputs, anchors, image_shapes, score_thresh, nms_thresh, detections_per_img,
               topk_candidates):
    from test_decode import per_image_reference

    return per_image_reference(box_coder, head_outputs, anchors, image_shapes, score_thresh, nms_thresh,
                               detections_per_img, topk_candidates)


def old_batch_to_host(outputs):
    return [(o["boxes"].float().cpu().numpy(), o["scores"].float().cpu().numpy(), o["labels"].cpu().numpy())
            for o in outputs]


class Patched:
    """The old decoder and per-tile copies, patched in for the ``with`` block."""

    def __enter__(self):
        import geodet.model.decode as dec
        import geodet.pipeline.detect as det

        self.saved = (dec.decode_levels, det.batch_to_host)
        dec.decode_levels, det.batch_to_host = old_decode, old_batch_to_host

    def __exit__(self, *exc):
        import geodet.model.decode as dec
        import geodet.pipeline.detect as det

        dec.decode_levels, det.batch_to_host = self.saved


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_only(model, tiles, device, rounds):
    """ms per tile of decoding the core's outputs for one batch, old and new."""
    from geodet.model.decode import decode_levels, feature_shapes

    net = model.net.eval().to(device)
    card = model.card
    x = tiles.to(device)
    with torch.inference_mode():
        image_list, _ = net.transform(list(x))
        cls, reg = net.core(image_list.tensors)
        h, w = image_list.tensors.shape[-2:]
        shapes = feature_shapes(net.levels, h, w)
        anchors = net.decoder.anchors(h, w, shapes, device)
        a = net.anchor_generator.num_anchors_per_location()[0]
        per = [hh * ww * a for hh, ww in shapes]
        heads = {"cls_logits": list(cls.float().split(per, 1)), "bbox_regression": list(reg.float().split(per, 1))}
        anc = [list(anchors.split(per))] * len(x)
        m = card.model
        args = (net.box_coder, heads, anc, image_list.image_sizes, m.score_threshold, m.nms_iou,
                m.detections_per_tile, m.topk_candidates)
        runs = {"old": [], "new": []}
        counts = {}
        for f in (old_decode, decode_levels):  # warm-up
            f(*args)
        for _ in range(rounds):
            for name, f in (("old", old_decode), ("new", decode_levels)):
                sync(device)
                t0 = time.perf_counter()
                out = f(*args)
                sync(device)
                runs[name].append((time.perf_counter() - t0) * 1e3 / len(x))
                counts[name] = sum(len(o["scores"]) for o in out)
    return {"batch": len(x), "boxes": counts, "ms_per_tile": {k: [round(v, 3) for v in r] for k, r in runs.items()},
            "median_ms_per_tile": {k: round(statistics.median(r), 3) for k, r in runs.items()},
            "speedup": round(statistics.median(runs["old"]) / statistics.median(runs["new"]), 2)}


def end_to_end(model, scene, device, batch, workers, precision, rounds):
    from geodet.pipeline.scenes import detect_scene

    def once():
        sync(device)
        t0 = time.perf_counter()
        frame = detect_scene(str(scene), model, device=str(device), batch_size=batch, num_workers=workers,
                             precision=precision, backend="torch", progress=False)
        dt = time.perf_counter() - t0
        rep = frame.attrs["report"]
        return rep["tiles_run"] / dt, frame, {k: round(v, 3) for k, v in rep["seconds"].items()
                                               if k in ("read_wait", "model_core", "model_decode", "stitch")}

    runs, stages, frames = {"old": [], "new": []}, {}, {}
    for _ in range(rounds):
        for name in ("old", "new"):
            if name == "old":
                with Patched():
                    rate, frames[name], stages[name] = once()
            else:
                rate, frames[name], stages[name] = once()
            runs[name].append(round(rate, 1))
    cols = ["px_x0", "px_y0", "px_x1", "px_y1", "score"]
    a = frames["old"].sort_values(cols)[cols].to_numpy()
    b = frames["new"].sort_values(cols)[cols].to_numpy()
    return {"batch": batch, "workers": workers, "precision": precision, "tiles_per_s": runs,
            "median_tiles_per_s": {k: statistics.median(v) for k, v in runs.items()},
            "speedup": round(statistics.median(runs["new"]) / statistics.median(runs["old"]), 2),
            "last_stage_seconds": stages, "detections": {k: len(f) for k, f in frames.items()},
            "identical_detections": bool(a.shape == b.shape and np.array_equal(a, b))}


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

    from geodet.synthetic import make_scene

    device = torch.device(args.device)
    wd = Path(args.workdir or tempfile.mkdtemp(prefix="bench-decode-"))
    wd.mkdir(parents=True, exist_ok=True)
    base = make_scene(wd / "scene.tif", wd / "scene.gpkg", size=args.size, seed=11)
    scene = mosaic_vrt(wd / "scene.tif", wd / "mosaic.vrt", 3)
    train = make_scene(wd / "train.tif", wd / "train.gpkg", size=2048, seed=12)
    res = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "scene_px": 3 * args.size, "decode": [], "end_to_end": []}

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))

    models = {p: preset_model(p, ["car", "truck"]) for p in args.presets.split(",")}
    if args.train_steps:
        row, path = train_rate(train.image, train.labels, device, 8, args.train_steps, wd / "run", 8 if device.type == "cuda" else 0)
        from geodet.model import load_model

        models["small_objects_trained"] = load_model(path)
        res["trained"] = row
    import rasterio

    with rasterio.open(base.image) as ds:
        for name, model in models.items():
            t = model.card.tile_size
            for batch in (16, 32) if device.type == "cuda" else (8,):
                n = ds.width // t
                tiles = torch.stack([torch.from_numpy(ds.read(window=((r * t, (r + 1) * t), (c * t, (c + 1) * t))).astype(np.float32))
                                     for r, c in ((i // n % n, i % n) for i in range(batch))])
                row = {"model": name, **decode_only(model, tiles, device, args.rounds)}
                res["decode"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                save()
    for name in args.e2e_models.split(","):
        model = models[name]
        for batch, workers, precision in ((16, 4, "fp16"), (16, 8, "fp16"), (32, 8, "fp16")) if device.type == "cuda" else ((8, 0, "fp32"),):
            row = {"model": name, **end_to_end(model, scene if device.type == "cuda" else base.image, device, batch,
                                               workers, precision, args.rounds)}
            res["end_to_end"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            save()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
