"""``geodet detect``: detect objects over whole scenes and write one georeferenced file."""

from __future__ import annotations

import argparse
import sys

from .common import (EXIT_PARTIAL, FORMATS, GeodetError, add_device, bands, nonneg_int, positive, positive_int,
                     quiet_ray, ray_amount, share)


def add_parser(sub, common) -> None:
    d = sub.add_parser("detect", parents=[common], help="detect objects over whole scenes",
                       description="Detect objects over one or more whole scenes and write GeoJSON (EPSG:4326), "
                                   "GeoPackage, FlatGeobuf, Shapefile, GeoParquet (scene CRS) or CSV, plus "
                                   "OUT.report.json; vector files come with a QGIS style. Missing output folders are "
                                   "created.")
    d.add_argument("scenes", nargs="*", metavar="SCENE",
                   help="scenes: GeoTIFFs, or any raster GDAL reads (local, shared or /vsicurl/... paths)")
    d.add_argument("--model", "-m", required=True, help="model file: model.pt from geodet train or import, MODEL.onnx from geodet "
                                                       "export, or a torchvision RetinaNet to import on the fly (a Hugging "
                                                       "Face folder or hf://ORG/NAME; cached)")
    d.add_argument("--out", "-o", required=True, help="output file: .geojson, .gpkg, .fgb, .shp, .csv or .parquet")
    d.add_argument("--format", choices=FORMATS, help="the format, where the file name does not say it")
    d.add_argument("--tile-size", type=positive_int, help="default: the model card's")
    d.add_argument("--overlap", type=nonneg_int, help="default: the model card's")
    d.add_argument("--batch-size", type=positive_int, default=None, help="tiles per model call (8)")
    d.add_argument("--score-threshold", type=share, help="default: the model card's")
    d.add_argument("--detections-per-tile", type=positive_int, help="most boxes kept per tile (default: the model card's)")
    add_device(d)
    d.add_argument("--backend", choices=["auto", "torch", "onnx"], default=None,
                   help="auto (default): the fastest path whose accuracy is vouched for; torch; onnx (ONNX Runtime)")
    d.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16", "int8"], default=None,
                   help="auto (default); fp32; bf16 (CPUs with native bf16); fp16 (CUDA); int8 (onnx backend, checked "
                        "against fp32 on the scene's tiles)")
    d.add_argument("--on-read-error", choices=["fail", "skip"], default=None,
                   help="a tile that cannot be read (damaged file, failed remote read): fail (default; nothing is "
                        "written) or skip (the other tiles run, the unreadable windows are listed in the report, "
                        "exit code 3)")
    d.add_argument("--workers", type=nonneg_int, default=None, help="tile-reading worker processes (default: none on a 2-core CPU, a few with CUDA)")
    d.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time augmentation: also run every tile flipped and turned (8 views), the boxes fused; "
                        "about 8x the detection time for a little more AP (docs/benchmarks.md, Few labels S10); "
                        "torch only (default: detect.tta of --config, else off)")
    d.add_argument("--adapt", action="store_true",
                   help="first re-estimate the model's batch-norm statistics on these scenes (AdaBN: 64 tiles, no "
                        "labels, seconds to a minute on a CPU), for a model trained on another site, season or "
                        "sensor; measured on one pair of sites (docs/benchmarks.md, Few labels S10); .pt models "
                        "with batch norm, torch only, the local engine")
    d.add_argument("--bands", type=bands, help="scene bands to feed the model, e.g. 3,2,1")
    d.add_argument("--gsd", type=positive, help="resample scenes to this GSD (default: the model card's)")
    d.add_argument("--csv-geometry", choices=["wkt", "pixel"], default=None, help="CSV: WKT polygons or pixel boxes only")
    d.add_argument("--quicklook", help="also write a PNG per scene with the detections drawn")
    d.add_argument("--min-score", type=share, default=None,
                   help="quicklook: draw boxes scoring at least this (default: the model's operating point, "
                        "the best-F1 score at validation)")
    d.add_argument("--config", help="YAML config for detect/output settings")
    d.add_argument("--scene-list", help="a text file of scene paths (local, shared or GDAL virtual paths such as "
                                        "/vsicurl/https://...), one per line, added to SCENE...; a relative path "
                                        "names a file beside the list")
    d.add_argument("--stac", help="a STAC ItemCollection or Item (a local JSON file): one scene per item, from the "
                                  "asset --asset names (or each item's one GeoTIFF asset); https/s3/gs/az hrefs are "
                                  "read through GDAL")
    d.add_argument("--asset", help="--stac: the asset key to read (e.g. visual, image)")
    d.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local (default): this process; ray: blocks of tiles over a Ray cluster's actor pool "
                        "(needs geodet[ray]); --out is then a folder of per-scene GeoParquet (see geodet merge)")
    d.add_argument("--address", help="ray: the cluster to join (e.g. ray://head:10001 or auto); default: start a "
                                     "local Ray instance")
    d.add_argument("--ray-workers", type=positive_int, default=2,
                   help="ray: detection actors, each loading the model once (default 2; --workers stays the "
                        "tile readers inside each)")
    d.add_argument("--gpus-per-worker", type=ray_amount, default=0.0,
                   help="ray: GPUs per actor (e.g. 1, or 0.5 to share)")
    d.add_argument("--cpus-per-worker", type=ray_amount, default=1.0, help="ray: CPUs per actor (default 1)")
    d.add_argument("--block-tiles", type=positive_int, default=8,
                   help="ray: a work item is a K x K block of the scene's tiles (default 8)")
    d.add_argument("--retries", type=nonneg_int, default=2, help="ray: rounds that rerun failed blocks (default 2)")


def scene_list(args) -> tuple[list[str], list[str] | None]:
    """The scenes of ``detect``: named, listed in --scene-list, or the items of --stac; with the
    STAC item ids as scene ids when every scene comes from --stac."""
    scenes, ids = list(args.scenes), None
    if args.stac:
        from ..io.stac import stac_scenes

        items = stac_scenes(args.stac, args.asset)
        if not scenes and not args.scene_list:
            ids = [i for i, _ in items]
        scenes += [p for _, p in items]
    elif args.asset:
        raise GeodetError("--asset picks an asset of --stac items: give --stac ITEMS.json too")
    if args.scene_list:
        from ..textfiles import beside, read_user_text

        lines = read_user_text(args.scene_list, f"--scene-list {args.scene_list}").splitlines()
        # a relative entry names a file beside the list, as a config's paths do
        scenes += [beside(ln.strip(), args.scene_list, "the list") for ln in lines
                   if ln.strip() and not ln.lstrip().startswith("#")]
    if not scenes:
        raise GeodetError("no scenes given: name them, or give --scene-list FILE or --stac ITEMS.json")
    return scenes, ids


def _check_lists_kept(args) -> None:
    """Refuse, before any work, an output, report or quicklook named as a file the command reads
    besides its scenes and model (``--scene-list``, ``--stac``, ``--config``)."""
    from ..io.writers import check_not_an_input, report_path

    inputs = [(args.scene_list, "the scene list (--scene-list)"), (args.stac, "the STAC items (--stac)"),
              (args.config, "the config (--config)")]
    written = [args.out, args.quicklook] + ([report_path(args.out)] if args.engine != "ray" else [])
    for path in written:
        if path:
            check_not_an_input(path, inputs)


def _run_ray(args, cfg, scenes, ids) -> int:
    from .. import progress
    from ..pipeline.ray_engine import detect_ray

    quiet_ray()
    progress.plan(1)  # one bar counts the blocks of every scene
    try:
        summary = detect_ray(scenes, args.model, args.out, address=args.address, workers=args.ray_workers,
                             gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                             block_tiles=args.block_tiles, retries=args.retries, ids=ids, config=cfg,
                             progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"geodet: interrupted; finished blocks and scenes are kept in {args.out}: rerun the same command to run "
              "only what is missing", file=sys.stderr)
        return 130
    n_det = sum(x["detections"] for x in summary["scenes"])
    print(f"{summary['scenes_written']} scene(s) written ({n_det} detections), {summary['scenes_already_done']} already "
          f"done, {summary['blocks_run']} block(s) run -> {args.out} (geodet merge {args.out} -o all.gpkg)")
    if summary["failed_scenes"]:
        for f in summary["failed_scenes"]:
            print(f"geodet: scene failed: {f['scene']}: {f['error']}", file=sys.stderr)
        print(f"geodet: {len(summary['failed_scenes'])} scene(s) have no _SUCCESS.json; rerun the same command to run "
              "only what is missing", file=sys.stderr)
        return EXIT_PARTIAL if summary["scenes_written"] or summary["scenes_already_done"] else 2
    return 0


def _adapted(path, scenes, cfg, out, quicklook=None):
    """``--adapt``: the model file's network with its batch-norm statistics re-estimated on the
    scenes (AdaBN). Refused, before any work, where it cannot run, and after the job's own checks
    (output, quicklooks, the scenes, the device)."""
    from ..pipeline.job import check_job, load_detector_file
    from ..pipeline.settings import resolve_detect_settings
    from ..training.adapt import adapt_batch_norm

    if str(path).lower().endswith(".onnx"):
        raise GeodetError(f"--adapt needs the torch model (.pt): {path} is ONNX, whose batch norms are folded into its "
                          "convolutions; give the model.pt it was exported from, or drop --adapt")
    if cfg.detect.backend == "onnx" or cfg.detect.precision == "int8":
        raise GeodetError("--adapt runs the adapted network in torch: drop --backend onnx / --precision int8, or --adapt")
    readable = check_job(scenes, out, cfg, quicklook=quicklook, model=path)[3]  # what detection would refuse, first
    model = load_detector_file(path)
    if not hasattr(model, "modules"):
        raise GeodetError(f"--adapt needs a torch model (.pt): {path} is not one; drop --adapt")
    s = resolve_detect_settings(model.card, cfg)  # the scenes read as detection will read them
    if not readable:  # detection says why no scene can be read
        return path
    return adapt_batch_norm(model, readable, settings=s)


def run(args) -> int:
    from .. import progress
    from ..config import load_config
    from ..io.writers import report_path
    from ..pipeline.job import detect_to_file

    scenes, ids = scene_list(args)
    _check_lists_kept(args)
    cfg = load_config(args.config, {"detect.batch_size": args.batch_size, "detect.device": args.device,
                                    "detect.num_workers": args.workers, "detect.score_threshold": args.score_threshold,
                                    "detect.backend": args.backend, "detect.precision": args.precision,
                                    "detect.on_read_error": args.on_read_error, "detect.tta": args.tta,
                                    "tiling.tile_size": args.tile_size, "tiling.overlap": args.overlap,
                                    "model.detections_per_tile": args.detections_per_tile,
                                    "scene.bands": args.bands, "scene.gsd_m": args.gsd,
                                    "output.format": args.format, "output.csv_geometry": args.csv_geometry})
    if args.engine == "ray":
        if cfg.detect.tta:
            raise GeodetError("test-time augmentation (--tta, detect.tta) runs with the local engine only: drop --engine "
                              "ray, or turn tta off")
        if args.adapt:
            raise GeodetError("--adapt runs with the local engine only: drop --engine ray, or --adapt")
        return _run_ray(args, cfg, scenes, ids)
    model = _adapted(args.model, scenes, cfg, args.out, args.quicklook) if args.adapt else args.model
    progress.plan(len(scenes))  # one pass per scene
    frame = detect_to_file(scenes, model, args.out, config=cfg, quicklook=args.quicklook,
                           quicklook_min_score=args.min_score, progress=not args.quiet)
    report = frame.attrs["report"]
    skipped = sum(r["tiles_skipped"] for r in report["scenes"])
    print(f"{len(frame)} detections in {len(report['scenes'])} scene(s) ({skipped} empty tiles skipped) -> {args.out}")
    undrawn = len(report["scenes"]) - len(report.get("quicklooks") or []) if args.quicklook else 0
    if undrawn:  # said above (why); the detections are written
        print(f"geodet: partial result: {undrawn} quicklook(s) not drawn (the detections are written)", file=sys.stderr)
        if not report["partial"]:
            return EXIT_PARTIAL
    if report["partial"]:
        parts = []
        if report["tiles_unreadable"]:
            parts.append(f"{report['tiles_unreadable']} unreadable tile(s) skipped")
        if report["failed_scenes"]:
            parts.append(f"{len(report['failed_scenes'])} scene(s) failed: "
                         + ", ".join(f["scene"] for f in report["failed_scenes"]))
        print(f"geodet: partial result: {'; '.join(parts)} (windows and errors in {report_path(args.out)})",
              file=sys.stderr)
        return EXIT_PARTIAL
    return 0
