"""geodet against SAHI 0.12.8 with identical weights on the same scene: wall time, peak memory
(VmHWM of a fresh process each) and AP50 of the merged result against the labels.

    pip install sahi==0.12.8
    python benchmarks/bench_sahi.py --model MODEL.pt [--size 4096]

Both run the geodet model at native tile size (SAHI is given the torchvision-style model with its
native-size transform, and no image_size); SAHI uses get_sliced_prediction with
perform_standard_pred=False, the same slice size and overlap ratio, and its default GREEDYNMM/IOS
merge. Scores down to the model card's threshold are kept by both.
"""

import argparse
import json
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
    if mode == "geodet":
        from geodet.pipeline.detect import detect_scene
        f = detect_scene(scene, model, progress=False)
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
    print(json.dumps({"seconds": dt, "peak_mb": hwm / 1024, "n": len(boxes)}))
""")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--workdir", default="/tmp/geodet-bench")
    args = ap.parse_args()
    import numpy as np

    from geodet.evaluation import coco_metrics
    from geodet.io.labels import load_scene_labels
    from geodet.model import load_model
    from geodet.io.scene import Scene
    from geodet.synthetic import make_scene

    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    scene = wd / f"vehicles_{args.size}.tif"
    labels = wd / f"vehicles_{args.size}.gpkg"
    if not scene.exists():
        make_scene(scene, labels, size=args.size, seed=7)
    classes = load_model(args.model).card.classes
    truth = load_scene_labels(Scene(scene), labels, "label", classes=classes)
    for mode in ("geodet", "sahi"):
        out = wd / f"{mode}.npz"
        r = subprocess.run([sys.executable, "-c", CHILD, mode, str(scene), args.model, str(out)], capture_output=True,
                           text=True)
        if r.returncode:
            print(mode, "failed:", r.stderr[-1500:])
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        d = np.load(out)
        m = coco_metrics(d["boxes"], d["scores"], d["labels"], truth.boxes, truth.labels, classes)
        print(f"| {mode} | {res['seconds']:.1f} s | {res['peak_mb']:.0f} MB | {res['n']} | {m['AP50']:.3f} | {m['AP']:.3f} |")


if __name__ == "__main__":
    print("| tool | wall time | peak RSS | detections | AP50 | AP |\n|---|---|---|---|---|---|")
    main()
