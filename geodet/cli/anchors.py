"""``geodet anchors``: label box sizes at the model's GSD, anchor coverage and fitted anchors."""

from __future__ import annotations

from .common import PRESETS_HELP, GeodetError, deprecated


def add_parser(sub, common) -> None:
    a = sub.add_parser("anchors", parents=[common], help="label box sizes, fitted anchors and anchor coverage",
                       description="Print the label boxes' size distribution at the model's GSD, the anchor coverage "
                                   "of the config, and anchors fitted to the boxes with their coverage; with -o, write "
                                   "the config with the fitted anchors.")
    a.add_argument("scene", nargs="?", metavar="SCENE", help="the labelled scene (GeoTIFF)")
    a.add_argument("--labels", required=True, help="vector labels of the scene (any OGR format or GeoParquet, any CRS)")
    a.add_argument("--config", help=PRESETS_HELP)
    a.add_argument("--class-column", default=None,
                   help="class column of the labels (default: the config's, label); '' for one class")
    a.add_argument("--out", "-o", help="write the config with the fitted anchors to this YAML file")
    deprecated(a, "--scene", "name the scene first: geodet anchors SCENE --labels LABELS", dest="scene_flag")
    deprecated(a, "--write-config", "use -o/--out", dest="out")


def run(args) -> int:
    from ..config import load_config, save_config
    from ..io.labels import describe_counts, load_scene_labels
    from ..io.scene import scene_from_config
    from ..model.anchors import anchor_coverage, fit_anchors, size_summary

    scene_flag = getattr(args, "scene_flag", None)
    if scene_flag and args.scene:
        raise GeodetError(f"two scenes given ({args.scene} and --scene {scene_flag}): name one, geodet anchors SCENE "
                          "--labels LABELS")
    scene = args.scene or scene_flag
    if not scene:
        raise GeodetError("no scene given: geodet anchors SCENE --labels LABELS")
    if args.out:  # before any work: a folder, a file it cannot write, another kind of file
        from ..io.writers import check_output_path

        check_output_path(args.out, suffixes=(".yaml", ".yml"), example="anchors.yaml")
    cfg = load_config(args.config)
    sc = scene_from_config(scene, cfg.scene)
    col = args.class_column if args.class_column is not None else cfg.train.class_column
    lb = load_scene_labels(sc, args.labels, col or None, unknown="keep", point_box_m=cfg.train.point_box_m)
    if not len(lb):
        raise GeodetError(f"{args.labels}: no usable label in {scene} ({describe_counts(lb.counts)})")
    sizes = lb.boxes[:, 2:] - lb.boxes[:, :2]
    unit = "m/px" if getattr(sc, "unit_m", None) else "degrees/px" if sc.crs is not None and sc.crs.is_geographic \
        else "CRS units/px"
    print(f"label boxes at {sc.pixel_gsd:.4g} {unit}:")
    print(size_summary(sizes))
    m = cfg.model
    if m.resize_min_size:  # torchvision's resize of each tile: anchors meet the boxes at the network's scale
        from ..model.network import resize_factor

        side = cfg.tiling.tile_size
        f = resize_factor(m.resize_min_size, side)
        sizes = sizes * f
        print(f"as the network sees them (each {side} px tile resized x{f:.3g} to model.resize_min_size):")
        print(size_summary(sizes))
    cur = anchor_coverage(sizes, m)
    used = f"sizes {m.anchor_size_list} (model.anchor_size_list)" if m.anchor_size_list else f"sizes {m.anchor_sizes}"
    print(f"\nconfig anchors: levels P{m.levels[0]}-P{m.levels[1]}, {used}, ratios {m.aspect_ratios}, "
          f"{m.scales_per_octave} scale(s)/octave: coverage {cur:.3f} (IoU >= {m.fg_iou})")
    fit = fit_anchors(sizes, m.levels, m.scales_per_octave, base_cfg=m)
    print(f"fitted anchors: sizes {fit.anchor_sizes}, ratios {fit.aspect_ratios}: coverage {fit.coverage:.3f}")
    if args.out:
        cfg.model.anchor_sizes, cfg.model.aspect_ratios = fit.anchor_sizes, fit.aspect_ratios
        cfg.model.anchor_size_list = None  # else the list, not the fitted sizes, would make the anchors
        from ..io.writers import atomic_path

        with atomic_path(args.out) as tmp:  # a temporary file renamed into place, missing folders made
            save_config(cfg, tmp)
        print(f"wrote {args.out}")
    return 0
