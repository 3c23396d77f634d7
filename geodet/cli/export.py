"""``geodet export``: a model to ONNX (fp32, or int8 calibrated and checked on real tiles)."""

from __future__ import annotations

import argparse

from .common import GeodetError, bands, number, positive_int, warn_deprecated


def add_parser(sub, common) -> None:
    x = sub.add_parser("export", parents=[common], help="export a model to ONNX (fp32, or int8 calibrated on scenes)",
                       description="Export a geodet model to a self-describing ONNX file for ONNX Runtime: the network "
                                   "core with the model card in its metadata; boxes are decoded by geodet exactly as "
                                   "for the torch model. The export is checked against the torch model on tiles of the "
                                   "calibration scenes (int8: tiles other than those it is calibrated on; without "
                                   "scenes, a synthetic scene) and refused (no file written) when it differs, or, for int8, "
                                   "when the check tiles hold no detection to compare (fp32 is then checked on its "
                                   "outputs alone, said).")
    x.add_argument("--model", "-m", help="model.pt from geodet train or import (required)")
    x.add_argument("--out", "-o", required=True, help="output .onnx file")
    # the model was positional before -m/--model (a hidden positional; run() warns when it is used)
    x.add_argument("model_positional", nargs="?", metavar="MODEL", help=argparse.SUPPRESS)
    x.add_argument("--int8", action="store_true", help="static int8 quantization (QDQ, per-channel weights)")
    x.add_argument("--calibrate", action="extend", nargs="+", default=[], metavar="SCENE",
                   help="scenes to read calibration and check tiles from (required with --int8)")
    x.add_argument("--calib-tiles", type=positive_int, default=32,
                   help="calibration tiles (32, as many again to check; fewer where the scenes have fewer tiles)")
    x.add_argument("--min-agreement", type=number(0, 1), default=None,
                   help="int8: least detection F1 against fp32 at the operating point (0.95)")
    x.add_argument("--bands", type=bands,
                   help="scene bands to read the calibration and check scenes with, e.g. 3,2,1 (default: the model's)")
    x.add_argument("--check-labels", help="labels of a scene: also report AP50 of torch fp32 and of the export")
    x.add_argument("--check-scene", help="the scene of --check-labels (default: the first --calibrate scene)")
    x.add_argument("--class-column", default="label",
                   help="class column of --check-labels (label); '' ignores classes (a one-class model's detections "
                        "are scored class-agnostically anyway)")


def model_path(args) -> str:
    """-m MODEL, or the old positional MODEL (with a deprecation line)."""
    if args.model_positional:
        if args.model:
            raise GeodetError(f"two models given ({args.model_positional} and -m {args.model}): give one, with -m")
        warn_deprecated("geodet export MODEL", "use geodet export -m MODEL")
        return args.model_positional
    if not args.model:
        raise GeodetError("no model given: geodet export -m MODEL.pt -o MODEL.onnx")
    return args.model


def run(args) -> int:
    if args.check_scene and not args.check_labels:
        raise GeodetError("--check-scene is the scene of --check-labels: give its labels too (or leave out "
                          "--check-scene)")
    from .. import progress
    from ..model.onnx import INT8_MIN_AGREEMENT
    from ..pipeline.backends import describe_agreement
    from ..pipeline.export import export_model

    progress.plan(1)
    result = export_model(model_path(args), args.out, int8=args.int8, calibrate=args.calibrate, calib_tiles=args.calib_tiles,
                          check_scene=args.check_scene, check_labels=args.check_labels,
                          min_agreement=INT8_MIN_AGREEMENT if args.min_agreement is None else args.min_agreement,
                          class_column=args.class_column, bands=args.bands, progress=not args.quiet)
    fp = result["fp32"]
    print(f"export check on {result['tiles']} tiles of {result['check_tiles_from']}: fp32 logit difference "
          f"{fp['max_relative_logit_diff']:.2g} "
          f"(relative, limit {fp['limit']:g}; absolute {fp['max_logit_diff']:.2g}), detections "
          f"{describe_agreement(fp['detections'])}")
    if "int8" in result:
        q = result["int8"]
        n, c = q["calibration_tiles"], result["tiles"]
        # the two sets never share a tile; fewer than asked when the scenes hold fewer valid tiles
        short = (f" (not {args.calib_tiles} each: the calibration scenes gave {n + c} tiles with valid pixels)"
                 if n < args.calib_tiles else "")
        print(f"int8: calibrated on {n} tile(s), checked on {c} other tile(s){short}; "
              f"detections against fp32 {describe_agreement(q['detections'])} at score >= "
              f"{q['detections']['min_score']:.3g} (needs {q['min_agreement']}); kept in float: "
              f"{len(q['float_nodes'])} output conv(s) and the reshapes after them")
    for name, m in (result.get("labels_check") or {}).items():
        print(f"{name}: AP50 {m['ap50']:.4f}, AP {m['ap']:.4f}, {m['detections']} detections")
    print(f"wrote {args.out}")
    return 0
