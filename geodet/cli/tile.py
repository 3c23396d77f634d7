"""``geodet tile``: cut a scene into overlapping georeferenced chips."""

from __future__ import annotations

import logging

from .common import PRESETS_HELP, GeodetError, bands, nonneg_int, number, positive, positive_int

log = logging.getLogger(__name__)


def add_parser(sub, common) -> None:
    t = sub.add_parser("tile", parents=[common], help="cut a scene into overlapping georeferenced chips",
                       description="Cut a scene into overlapping GeoTIFF chips (exact georeferencing, original dtype "
                                   "and bands), a chips.gpkg of footprints and, with --labels, COCO annotations.")
    t.add_argument("scene", metavar="SCENE", help="GeoTIFF (or any raster GDAL reads)")
    t.add_argument("--out", "-o", required=True, help="output folder (created)")
    t.add_argument("--tile-size", type=positive_int, default=None, help="tile side in pixels (default: the config's tiling.tile_size)")
    t.add_argument("--overlap", type=nonneg_int, default=None, help="overlap in pixels (default: the config's tiling.overlap)")
    t.add_argument("--overlap-m", type=number(0), default=None, help="overlap in metres instead of pixels")
    t.add_argument("--labels", help="vector labels (shapefile, GeoPackage, GeoJSON) for annotations.json")
    t.add_argument("--class-column", default=None,
                   help="class column of the labels (default: the config's, label); '' for one class, 'object'")
    t.add_argument("--min-visibility", type=number(0, 1, low_open=True), default=0.5, help="keep a clipped box if this share is inside (0.5)")
    t.add_argument("--bands", type=bands, default=None, help="bands to keep, e.g. 1,2,3 (default: all)")
    t.add_argument("--gsd", type=positive, default=None, help="resample to this ground resolution in metres")
    t.add_argument("--min-valid", type=number(0, 1, high_open=True), default=0.0, help="skip chips with this valid fraction or less (0)")
    t.add_argument("--config", help=PRESETS_HELP)


def run(args) -> int:
    from .. import progress
    from ..config import load_config
    from ..pipeline.chips import write_chips

    if args.overlap is not None and args.overlap_m is not None:
        raise GeodetError("--overlap and --overlap-m both set the overlap: give one (pixels, or metres)")
    cfg = load_config(args.config, {"tiling.tile_size": args.tile_size, "tiling.overlap": args.overlap,
                                    "tiling.overlap_m": args.overlap_m, "scene.gsd_m": args.gsd})
    t = cfg.tiling
    if args.overlap is None and t.overlap_m is None and "tiling.overlap" not in cfg.explicit and 4 * t.overlap > t.tile_size:
        # the default overlap is for the default tile size: a small tile would step a few pixels at a time
        log.warning("--tile-size %d with the default overlap of %d px would step %d px: overlap %d px instead (pass "
                    "--overlap to choose)", t.tile_size, t.overlap, t.tile_size - t.overlap, t.tile_size // 8)
        t.overlap = t.tile_size // 8
    progress.plan(1)
    summary = write_chips(args.scene, args.out, cfg.tiling.tile_size, cfg.tiling.overlap, overlap_m=cfg.tiling.overlap_m,
                          bands=args.bands, gsd_m=cfg.scene.gsd_m, labels=args.labels,
                          class_column=cfg.train.class_column if args.class_column is None else args.class_column,
                          min_visibility=args.min_visibility,
                          min_valid_fraction=args.min_valid, progress=not args.quiet)
    print(summary)
    return 0
