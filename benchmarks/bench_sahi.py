"""geodet against SAHI 0.12.8 with identical weights on the same scene: wall time, peak memory
(VmHWM of a fresh process each) and AP50 of the merged result against the labels. geodet runs
three ways: torch fp32 (``--backend torch --precision fp32``), its default (no flag: the fastest
vouched path, see pipeline/choice.py) and int8 (``--precision int8``). Fresh processes, modes
interleaved over ``--rounds`` rounds; derived models are cached (a first run per model makes
them, and its time is printed separately).

    pip install sahi==0.12.8
    python benchmarks/bench_sahi.py --model MODEL.pt [--size 4096] [--rounds 3]
    python benchmarks/bench_sahi.py --model TREES.pt --scene osbs_029.tif --labels osbs_029.gpkg

Both run the geodet model at native tile size (SAHI is given the torchvision-style model with its
native-size transform, and no image_size); SAHI uses get_sliced_prediction with
perform_standard_pred=False, the same slice size and overlap ratio, and its default GREEDYNMM/IOS
merge. Scores down to the model card's threshold are kept by both.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    mode, scene, model_path = sys.argv[1:4]
    from geodet.model import load_model
    model = load_model(model_path)
    card = model.card
    t0 = time.perf_counter()
    if mode.startswith("geodet"):
        from geodet.pipeline.scenes import detect_scene
        kw = {"geodet-fp32": dict(backend="torch", precision="fp32"), "geodet-default": {},
              "geodet-int8": dict(precision="int8")}[mode]
        f = detect_scene(scene, model, progress=False, **kw)
        backend = f.attrs["report"]["backend"]
        boxes, scores = f[["px_x0", "px_y0", "px_x1", "px_y1"]].to_numpy(), f["score"].to_numpy()
        labels = np.array([card.classes.index(n) for n in f["label"]])
    else:
        import rasterio
        from sahi.models.torchvision import TorchVisionDetectionModel
        from sahi.predict import get_sliced_prediction
        with rasterio.open(scene) as src:
            image = src.read().transpose(1, 2, 0)  # SAHI works on the whole image in memory
        dm = TorchVisionDetectionModel(model=model.net, confidence_threshold=card.model.score_threshold,
                                       category_mapping={str(i): n for i, n in enumerate(card.classes)},
                                       device="cpu", load_at_init=True)
        t, o = card.tile_size, card.overlap / card.tile_size
        res = get_sliced_prediction(image, dm, slice_height=t, slice_width=t, overlap_height_ratio=o,
                                    overlap_width_ratio=o, perform_standard_pred=False, verbose=0)
        preds = res.object_prediction_list
        boxes = np.array([p.bbox.to_xyxy() for p in preds], float).reshape(-1, 4)
        scores = np.array([p.score.value for p in preds], float)
        labels = np.array([p.category.id for p in preds], int)
    dt = time.perf_counter() - t0
    hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    np.savez(sys.argv[4], boxes=boxes, scores=scores, labels=labels)
    run = f"{backend['backend']} {backend['precision']}" if mode.startswith("geodet") else "torch fp32"
    print(json.dumps({"seconds": dt, "peak_mb": hwm / 1024, "n": len(boxes), "ran": run}))
""")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--workdir", default="/tmp/geodet-bench")
    ap.add_argument("--scene", help="a labelled scene instead of the synthetic one")
    ap.add_argument("--labels")
    ap.add_argument("--class-column", default="label", help="'' for class-agnostic AP")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-sahi", action="store_true", help="geodet's backends only (e.g. on a real scene)")
    args = ap.parse_args()
    import numpy as np

    from geodet.evaluation import coco_metrics
    from geodet.io.labels import load_scene_labels
    from geodet.model import load_model
    from geodet.io.scene import Scene
    from geodet.synthetic import make_scene

    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    if args.scene:
        scene, labels = Path(args.scene), Path(args.labels)
    else:
        scene = wd / f"vehicles_{args.size}.tif"
        labels = wd / f"vehicles_{args.size}.gpkg"
        if not scene.exists():
            make_scene(scene, labels, size=args.size, seed=7)
    classes = load_model(args.model).card.classes
    col = args.class_column
    truth = load_scene_labels(Scene(scene), labels, col or None, classes=classes, unknown="keep" if not col else "drop")
    env = dict(os.environ, GEODET_CACHE=str(wd / "cache"))
    modes = (["sahi"] if not args.no_sahi else []) + ["geodet-fp32", "geodet-default", "geodet-int8"]

    def once(mode):
        out = wd / f"{mode}.npz"
        r = subprocess.run([sys.executable, "-c", CHILD, mode, str(scene), args.model, str(out)], capture_output=True,
                           text=True, env=env)
        if r.returncode:
            print(mode, "failed:", r.stderr[-1500:])
            return None
        res = json.loads(r.stdout.strip().splitlines()[-1])
        d = np.load(out)
        labels_pred = d["labels"] if col else np.zeros(len(d["labels"]), int)
        m = coco_metrics(d["boxes"], d["scores"], labels_pred, truth.boxes, truth.labels if col else
                         np.zeros(len(truth.labels), int), classes if col else ["object"])
        return {**res, "AP50": m["AP50"], "AP": m["AP"]}

    for mode in ("geodet-default", "geodet-int8"):  # first runs make and cache the derived models
        r = once(mode)
        if r:
            print(f"first run of {mode} (makes and checks its derived model): {r['seconds']:.1f} s, ran {r['ran']}")
    runs = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            r = once(mode)
            if r:
                runs[mode].append(r)
    print("| tool | ran | wall time (median) | every run | speed-up vs SAHI | peak RSS | detections | AP50 | AP |")
    print("|---|---|---|---|---|---|---|---|---|")
    sahi = statistics.median(r["seconds"] for r in runs["sahi"]) if runs.get("sahi") else float("nan")
    for mode, rs in runs.items():
        if not rs:
            continue
        t = statistics.median(r["seconds"] for r in rs)
        every = ", ".join(f"{r['seconds']:.1f}" for r in rs)
        r = rs[-1]
        print(f"| {mode} | {r['ran']} | {t:.1f} s | {every} | {sahi / t:.2f}x | {max(x['peak_mb'] for x in rs):.0f} MB | "
              f"{r['n']} | {r['AP50']:.3f} | {r['AP']:.3f} |")


if __name__ == "__main__":
    main()
