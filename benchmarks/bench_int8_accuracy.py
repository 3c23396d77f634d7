"""Whole-scene accuracy of int8 against torch fp32 with the same weights, in one process:
torch fp32, int8 as ``geodet export --int8`` makes it, and int8 with onnxruntime's
``reduce_range`` (7-bit weights, its remedy for u8s8 saturation on CPUs without VNNI).

    python benchmarks/bench_int8_accuracy.py --model MODEL.pt --scene SCENE.tif --labels LABELS.gpkg
        [--calib-tiles 32] [--workdir /tmp/geodet-bench/int8]

One JSON line per variant: AP50, AP, detections, and the export check's figures.
"""

import argparse
import functools
import json
from pathlib import Path

from geodet.evaluation import evaluate
from geodet.model import load_model
from geodet.model.onnx import load_onnx
from geodet.pipeline.detect import detect_scene
from geodet.pipeline.export import export_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--scene", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--calib-tiles", type=int, default=32)
    ap.add_argument("--workdir", default="/tmp/geodet-bench/int8")
    a = ap.parse_args()
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    model = load_model(a.model)
    import onnxruntime.quantization as quantization

    plain = quantization.quantize_static
    for variant in ("torch fp32", "int8", "int8 reduce_range"):
        check = None
        if variant == "torch fp32":
            frame = detect_scene(a.scene, model, progress=False, backend="torch", precision="fp32")
        else:
            quantization.quantize_static = (functools.partial(plain, reduce_range=True)
                                            if variant.endswith("reduce_range") else plain)
            out = wd / f"{variant.replace(' ', '_')}.onnx"
            check = export_model(model, out, int8=True, calibrate=[a.scene], calib_tiles=a.calib_tiles)["int8"]
            frame = detect_scene(a.scene, load_onnx(out), progress=False)
        m = evaluate(frame, a.labels, scene=a.scene)
        print(json.dumps({"variant": variant, "AP50": round(m["AP50"], 4), "AP": round(m["AP"], 4),
                          "detections": len(frame), "export_check": check}))
    quantization.quantize_static = plain


if __name__ == "__main__":
    main()
