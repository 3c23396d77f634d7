"""``geodet suggest``: the tiles most worth labelling next, as polygons to open in QGIS; and, once
they are labelled, ``--done`` adds them to the labelled area for the next round of training."""

from __future__ import annotations

import shlex
from pathlib import Path

from .common import add_device, bands, deprecated, positive_int

STRATEGY_HELP = ("how cells are ranked: uncertainty (default: the most detections scored near the operating point, "
                 "spread over the map), per-object (that doubt per object the cell holds: fewer labels per cell), "
                 "coreset (the cells least like any labelled one to the network), hybrid (core-set weighted by "
                 "per-object doubt)")


def add_parser(sub, common) -> None:
    g = sub.add_parser("suggest", parents=[common], help="which tiles to label next (where the model is least sure)",
                       description="Run a model over scenes and write the cells most worth labelling next: those with "
                                   "the most detections scored near the model's operating point (the decisions it could "
                                   "get either way), spread over the scenes. Label the objects inside them in QGIS, set "
                                   "their 'done' field to 1, add them to the labelled area (geodet suggest --done "
                                   "NEXT.gpkg --labelled-area AREA.gpkg), then train again (geodet train SCENE --labels "
                                   "... --labelled-area AREA.gpkg --init MODEL).")
    g.add_argument("scenes", nargs="*", metavar="SCENE", help="scenes to look over (GeoTIFFs)")
    g.add_argument("--model", "-m", help="model.pt (trained with validation: it needs an operating point)")
    g.add_argument("--out", "-o", help="output .gpkg (or .geojson, .fgb, .shp), styled for QGIS")
    g.add_argument("--count", type=positive_int, default=20, help="cells to suggest (20)")
    g.add_argument("--cell-size", type=positive_int, help="cell side in pixels (default: the model's tile size)")
    g.add_argument("--labelled-area", help="polygons already labelled: cells mostly inside them are not suggested "
                                           "(with --done: the file the labelled cells are added to, made if missing)")
    g.add_argument("--bands", type=bands, help="scene bands to feed the model, e.g. 3,2,1 or 1,1,1 (default: the "
                                               "model's)")
    g.add_argument("--strategy", choices=["uncertainty", "per-object", "coreset", "hybrid"], default="uncertainty",
                   help=STRATEGY_HELP)
    g.add_argument("--done", metavar="CELLS", help="add the cells of this suggestions file that you labelled (its "
                                                   "'done' field set; all of them if none is set) to --labelled-area, "
                                                   "and stop: no model runs")
    add_device(g)
    deprecated(g, "--n", "use --count", dest="count", type=positive_int)


def run(args) -> int:
    from .. import progress
    from ..errors import GeodetError
    from ..io.writers import FORMATS, check_not_an_input, check_output_path, output_format
    from ..pipeline.job import load_detector_file
    from ..training.suggest import suggest_tiles, write_suggestions

    if args.done:
        return _done(args)
    missing = [flag for flag, v in (("SCENE", args.scenes), ("--model", args.model), ("--out", args.out)) if not v]
    if missing:
        raise GeodetError(f"geodet suggest needs {', '.join(missing)} (or --done CELLS --labelled-area AREA to add "
                          "labelled cells to the labelled area)")
    if FORMATS.get(Path(args.out).suffix.lower()) not in ("gpkg", "geojson", "fgb", "shp"):
        raise GeodetError(f"{Path(args.out).name}: suggestions are written as .gpkg, .geojson, .fgb or .shp (the cells "
                          "are polygons to label in QGIS): name the file so")
    fmt = output_format(args.out)
    if fmt not in ("gpkg", "geojson", "fgb", "shp"):
        raise GeodetError(f"suggestions are written as .gpkg, .geojson, .fgb or .shp, not {fmt}: the cells are "
                          "polygons to label in QGIS")
    check_not_an_input(args.out, [(args.labelled_area, "the labelled area (--labelled-area)"),
                                  (args.model, "the model"), *((s, "a scene of this job") for s in args.scenes)])
    check_output_path(args.out, fmt)
    model = load_detector_file(args.model)
    progress.plan(len(args.scenes))  # one detection pass per scene
    frame = suggest_tiles(model, args.scenes, n=args.count, cell=args.cell_size, labelled_area=args.labelled_area,
                          progress=not args.quiet, device=args.device, strategy=args.strategy, bands=args.bands)
    write_suggestions(frame, args.out)
    ranked = (f"{args.strategy} around the operating point {frame.attrs['operating_point']:.3g}"
              if args.strategy in ("uncertainty", "per-object") else
              "coreset: the cells least like the labelled ones to the network" if args.strategy == "coreset" else
              "hybrid: cells unlike the labelled ones, weighted by the model's doubt per object")
    print(f"{len(frame)} cell(s) of {frame.attrs['cell_px']} px to label next -> {args.out} (ranked by {ranked}); "
          f"label them, set 'done' to 1, then: geodet suggest --done {shlex.quote(str(args.out))} --labelled-area "
          "AREA.gpkg")
    for _, r in frame.head(5).iterrows():
        print(f"  #{r['rank']}: {r['scene']} row {r['cell_row']}, col {r['cell_col']}: {r['reason']}")
    return 0


def _done(args) -> int:
    from ..errors import GeodetError
    from ..training.suggest import add_done_cells

    if not args.labelled_area:
        raise GeodetError("--done needs --labelled-area AREA.gpkg: the file the labelled cells are added to (made "
                          "when missing)")
    if args.scenes or args.model or args.out:
        raise GeodetError("--done adds labelled cells to --labelled-area and runs no model: leave out SCENE, --model "
                          "and --out")
    added, total = add_done_cells(args.done, args.labelled_area)
    print(f"added {added} labelled cell(s) of {args.done} to {args.labelled_area} ({total} polygon(s) now); train "
          f"again: geodet train SCENE --labels LABELS --labelled-area {shlex.quote(args.labelled_area)} --init MODEL -o RUN")
    return 0
