"""``geodet evaluate``: COCO AP and precision/recall of detections against labels."""

from __future__ import annotations

import sys

from .common import EXIT_PARTIAL, GeodetError, deprecated, number, positive


def add_parser(sub, common) -> None:
    e = sub.add_parser("evaluate", parents=[common], help="COCO AP and precision/recall against labels",
                       description="Evaluate detections (any format geodet writes) against labels (any OGR vector or "
                                   "GeoParquet). Classes are compared by name; detections of one class that no label "
                                   "has (a one-class model) are scored class-agnostically. Prints a table; -o writes "
                                   "the metrics as JSON.")
    e.add_argument("detections", metavar="DETECTIONS", help="detections: a file geodet detect wrote")
    e.add_argument("labels", metavar="LABELS", help="the true objects (boxes or polygons, any CRS)")
    e.add_argument("--scene", help="evaluate in this scene's pixel grid (size ranges in its pixels); required when "
                                   "the detections come from several scenes")
    e.add_argument("--iou", type=number(0, 1, low_open=True, high_open=True), default=0.5, help="IoU for precision/recall/F1 (0.5)")
    e.add_argument("--class-column", default="label", help="class column of the labels (label); '' ignores classes")
    e.add_argument("--point-box", type=positive, default=1.0, metavar="METRES",
                   help="point labels are squares of this side on the ground (1; as train.point_box_m)")
    e.add_argument("--out", "-o", help="write the metrics here (JSON)")
    e.add_argument("--plot", help="write a precision-recall plot (PNG) here")
    deprecated(e, "--json", "use -o/--out", dest="out")


def run(args) -> int:
    from ..evaluation import evaluate, format_table, plot_pr
    from ..io.writers import check_not_an_input, check_output_path, write_json

    inputs = [(args.detections, "the detections"), (args.labels, "the labels"), (args.scene, "the scene")]
    for p, suffix, example in ((args.out, ".json", "metrics.json"), (args.plot, ".png", "pr.png")):
        if p:
            check_output_path(p, suffixes=(suffix,), example=example)
            check_not_an_input(p, inputs)
    m = evaluate(args.detections, args.labels, scene=args.scene, iou=args.iou, class_column=args.class_column,
                 point_box_m=args.point_box)
    print(format_table(m))
    if m.get("warning"):
        print(f"warning: {m['warning']}")
    if m.get("note"):
        print(f"note: {m['note']}")
    if args.out:
        write_json({k: v for k, v in m.items() if k != "pr_curve"}, args.out)
    if args.plot:
        try:
            plot_pr(m, args.plot)
        except Exception as exc:  # noqa: BLE001 - whatever stopped the picture, the metrics are written
            if not args.out:
                raise
            from ..errors import brief

            why = str(exc) if isinstance(exc, GeodetError) else f"the plot was not drawn: {brief(exc)}"
            print(f"geodet: partial result: {why} (the metrics are written to {args.out})", file=sys.stderr)
            return EXIT_PARTIAL
    return 0
