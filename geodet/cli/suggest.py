"""``geodet suggest``: the tiles most worth labelling next, as polygons to open in QGIS."""

from __future__ import annotations

from .common import add_device, deprecated, positive_int


def add_parser(sub, common) -> None:
    g = sub.add_parser("suggest", parents=[common], help="which tiles to label next (where the model is least sure)",
                       description="Run a model over scenes and write the cells most worth labelling next: those with "
                                   "the most detections scored near the model's operating point (the decisions it could "
                                   "get either way), spread over the scenes. Label the objects inside them in QGIS, "
                                   "then train again (geodet train --init MODEL --labelled-area ...).")
    g.add_argument("scenes", nargs="+", metavar="SCENE", help="scenes to look over (GeoTIFFs)")
    g.add_argument("--model", "-m", required=True, help="model.pt (trained with validation: it needs an operating point)")
    g.add_argument("--out", "-o", required=True, help="output .gpkg (or .geojson, .fgb, .shp), styled for QGIS")
    g.add_argument("--count", type=positive_int, default=20, help="cells to suggest (20)")
    g.add_argument("--cell-size", type=positive_int, help="cell side in pixels (default: the model's tile size)")
    g.add_argument("--labelled-area", help="polygons already labelled: cells mostly inside them are not suggested")
    add_device(g)
    deprecated(g, "--n", "use --count", dest="count", type=positive_int)


def run(args) -> int:
    from .. import progress
    from ..io.writers import check_output_path, output_format
    from ..pipeline.job import load_detector_file
    from ..training.suggest import suggest_tiles, write_suggestions

    fmt = output_format(args.out)
    check_output_path(args.out, fmt)
    model = load_detector_file(args.model)
    progress.plan(len(args.scenes))  # one detection pass per scene
    frame = suggest_tiles(model, args.scenes, n=args.count, cell=args.cell_size, labelled_area=args.labelled_area,
                          progress=not args.quiet, device=args.device)
    write_suggestions(frame, args.out)
    print(f"{len(frame)} cell(s) of {frame.attrs['cell_px']} px to label next -> {args.out} (ranked by uncertainty "
          f"around the operating point {frame.attrs['operating_point']:.3g})")
    for _, r in frame.head(5).iterrows():
        print(f"  #{r['rank']}: {r['scene']} row {r['cell_row']}, col {r['cell_col']}: {r['reason']}")
    return 0
