"""Whole-scene accuracy of int8 against torch fp32 with the same weights, in one process:
torch fp32, int8 as ``geodet export --int8`` makes it, int8 with onnxruntime's ``reduce_range``
(7-bit weights, its remedy for u8s8 saturation on CPUs without VNNI), and int8 as geodet made it
before session 8 (the nodes after the float output convs quantized, so the outputs were rounded).

    python benchmarks/bench_int8_accuracy.py --model MODEL.pt --scene SCENE.tif --labels LABELS.gpkg
        [--calibrate SCENE ...] [--calib-tiles 32] [--class-column label] [--workdir /tmp/geodet-bench/int8] [--sweep]

Calibration uses the evaluated scene itself unless ``--calibrate`` names others (e.g. the
training scene, to evaluate on a held-out one).

``--sweep`` adds the layer-sensitivity variants: int8 with more of the network kept in float
(stem, FPN, each subnet, layer1, layer3, the backbone, every conv), as geodet made it before
session 8 (the sweep that found the rounded outputs).

One JSON line per variant: AP50, AP, detections, and the export check's figures.
"""

import argparse
import functools
import json
from pathlib import Path

from geodet.evaluation import evaluate
from geodet.model import load_model
from geodet.model.onnx import load_onnx
from geodet.pipeline.scenes import detect_scene
import geodet.model.onnx as gonnx
import geodet.pipeline.convert as gexport
from geodet.pipeline.export import export_model

SWEEP = {
    "stem": ("/backbone/body/conv1/",),
    "fpn": ("/backbone/fpn/",),
    "box subnet": ("/head/regression_head/",),
    "class subnet": ("/head/classification_head/",),
    "layer1": ("/backbone/body/layer1/",),
    "layer3": ("/backbone/body/layer3/",),
    "fpn and subnets": ("/backbone/fpn/", "/head/"),
    "backbone": ("/backbone/body/",),
    "every conv": ("/",),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--scene", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--calibrate", nargs="+", help="calibration scenes (default: --scene)")
    ap.add_argument("--calib-tiles", type=int, default=32)
    ap.add_argument("--class-column", default="label", help="'' for class-agnostic AP")
    ap.add_argument("--workdir", default="/tmp/geodet-bench/int8")
    ap.add_argument("--sweep", action="store_true", help="also the layer-sensitivity variants (pre-S8 outputs)")
    a = ap.parse_args()
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    model = load_model(a.model)
    import onnxruntime.quantization as quantization

    plain, quantize, downstream = quantization.quantize_static, gexport.quantize_int8, gonnx._downstream
    variants = ["torch fp32", "int8", "int8 reduce_range", "int8 pre-S8"]
    variants += [f"int8 pre-S8, float: {k}" for k in SWEEP] if a.sweep else []
    for variant in variants:
        check = None
        if variant == "torch fp32":
            frame = detect_scene(a.scene, model, progress=False, backend="torch", precision="fp32")
        else:
            quantization.quantize_static = (functools.partial(plain, reduce_range=True)
                                            if variant.endswith("reduce_range") else plain)
            # before S8 the nodes after the float output convs were quantized
            gonnx._downstream = (lambda graph, names: []) if "pre-S8" in variant else downstream
            extra = SWEEP.get(variant.partition("float: ")[2], ())
            gexport.quantize_int8 = functools.partial(quantize, float_patterns=gonnx.FLOAT_NODE_PATTERNS + extra)
            out = wd / f"{variant.replace(' ', '_').replace(',', '').replace(':', '')}.onnx"
            check = export_model(model, out, int8=True, calibrate=a.calibrate or [a.scene],
                                 calib_tiles=a.calib_tiles)["int8"]
            frame = detect_scene(a.scene, load_onnx(out), progress=False)
        m = evaluate(frame, a.labels, scene=a.scene, class_column=a.class_column)
        print(json.dumps({"variant": variant, "AP50": round(m["AP50"], 4), "AP": round(m["AP"], 4),
                          "detections": len(frame), "export_check": check}))
    quantization.quantize_static, gexport.quantize_int8, gonnx._downstream = plain, quantize, downstream


if __name__ == "__main__":
    main()
