"""``geodet merge``: gather a ray run's finished scenes into one file."""

from __future__ import annotations

from .common import EXIT_PARTIAL, FORMATS


def add_parser(sub, common) -> None:
    mg = sub.add_parser("merge", parents=[common], help="gather a ray run's finished scenes into one file",
                        description="Gather the finished scenes (scene=*/_SUCCESS.json) of a geodet detect --engine "
                                    "ray output folder into one file, with a scene column; scenes in several CRSs are "
                                    "written as geodet detect writes them (a GeoPackage layer per CRS; EPSG:4326 with "
                                    "a crs column in single-CRS formats).")
    mg.add_argument("folder", metavar="FOLDER", help="the --out folder of geodet detect --engine ray")
    mg.add_argument("--out", "-o", required=True, help="output file: .gpkg, .geojson, .fgb, .shp, .parquet, .csv")
    mg.add_argument("--format", choices=FORMATS, help="the format, where the file name does not say it")


def run(args) -> int:
    from ..pipeline.ray_engine import merge_outputs

    merged = merge_outputs(args.folder, args.out, args.format)
    print(f"{len(merged)} detections from {merged.attrs.get('scenes', 0)} scene(s) -> {args.out}")
    left = merged.attrs.get("unfinished") or []
    if left:  # a partial result, as detect's exit code says one
        import sys

        print(f"geodet: warning: {len(left)} scene(s) of {args.folder} are not finished and were left out "
              f"({', '.join(left[:5])}{', ...' if len(left) > 5 else ''}): run the same geodet detect --engine ray "
              "command again to finish them, then merge again", file=sys.stderr)
        return EXIT_PARTIAL
    return 0
