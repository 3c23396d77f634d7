"""``geodet anchors``: label box sizes at the model's GSD, anchor coverage and fitted anchors."""

from __future__ import annotations

from .common import PRESETS_HELP


def add_parser(sub, common) -> None:
    a = sub.add_parser("anchors", parents=[common], help="label box sizes, fitted anchors and anchor coverage",
                       description="Print the label boxes' size distribution at the model's GSD, the anchor coverage "
                                   "of the config, and anchors fitted to the boxes with their coverage.")
    a.add_argument("--scene", required=True)
    a.add_argument("--labels", required=True)
    a.add_argument("--config", help=PRESETS_HELP)
    a.add_argument("--class-column", default=None)
    a.add_argument("--write-config", help="write the config with the fitted anchors to this YAML file")


def run(args) -> int:
    from ..config import load_config, save_config
    from ..io.labels import load_scene_labels
    from ..io.scene import scene_from_config
    from ..model.anchors import anchor_coverage, fit_anchors, size_summary

    cfg = load_config(args.config)
    sc = scene_from_config(args.scene, cfg.scene)
    col = args.class_column if args.class_column is not None else cfg.train.class_column
    lb = load_scene_labels(sc, args.labels, col or None, unknown="keep", point_box_m=cfg.train.point_box_m)
    sizes = lb.boxes[:, 2:] - lb.boxes[:, :2]
    print(f"label boxes at {sc.pixel_gsd:.4g} m/px:")
    print(size_summary(sizes))
    m = cfg.model
    cur = anchor_coverage(sizes, m)
    print(f"\nconfig anchors: levels P{m.levels[0]}-P{m.levels[1]}, sizes {m.anchor_sizes}, ratios {m.aspect_ratios}, "
          f"{m.scales_per_octave} scale(s)/octave: coverage {cur:.3f} (IoU >= {m.fg_iou})")
    fit = fit_anchors(sizes, m.levels, m.scales_per_octave, base_cfg=m)
    print(f"fitted anchors: sizes {fit.anchor_sizes}, ratios {fit.aspect_ratios}: coverage {fit.coverage:.3f}")
    if args.write_config:
        cfg.model.anchor_sizes, cfg.model.aspect_ratios = fit.anchor_sizes, fit.aspect_ratios
        save_config(cfg, args.write_config)
        print(f"wrote {args.write_config}")
    return 0
