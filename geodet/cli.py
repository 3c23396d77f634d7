"""The ``geodet`` command. Thin: each subcommand parses flags and calls the Python API.

Expected failures (GeodetError) print one line ``geodet: error: ...`` and exit 2; anything else
prints one line with a hint to rerun with --verbose and exits 1. Tracebacks only with --verbose.
``geodet detect`` exits 3 when it wrote a partial result (unreadable tiles skipped with
``--on-read-error skip``, or scenes of a multi-scene job that could not be read).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from .errors import GeodetError

log = logging.getLogger("geodet")

EXIT_PARTIAL = 3  # output written, but some tiles or scenes could not be read (listed in the report)


def _bands(text: str) -> list[int]:
    try:
        bands = [int(b) for b in text.replace(" ", "").split(",") if b]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bands must be comma-separated numbers such as 1,2,3, got '{text}'") from None
    if not bands or min(bands) < 1:
        raise argparse.ArgumentTypeError(f"band numbers start at 1, got '{text}'")
    return bands


def _int_at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum``, with a one-line message otherwise."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be a positive number, got {v}" if minimum > 0 else f"must be zero or positive, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like GeodetError
        self.print_usage(sys.stderr)
        sys.stderr.write(f"geodet: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a flag given before the command (geodet -q detect ...) is not reset by the
    # command's own parser
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging and full tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    p = _Parser(
        prog="geodet", parents=[common],
        description="Find dense small objects (vehicles, trees, buildings, boats) in whole-scene GeoTIFFs.",
        epilog="Run 'geodet COMMAND --help' for a command's options. Start with 'geodet demo'. Exit codes: 0 done, "
               "2 bad input or setting (one line says what to do), 3 partial result written (detect: unreadable tiles "
               "or scenes, listed in the report), 1 unexpected error, 130 interrupted.",
    )
    from . import __version__

    p.add_argument("--version", action="version", version=f"geodet {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    t = sub.add_parser("tile", parents=[common], help="cut a scene into overlapping georeferenced chips",
                       description="Cut a scene into overlapping GeoTIFF chips (exact georeferencing, original dtype "
                                   "and bands), a chips.gpkg of footprints and, with --labels, COCO annotations.")
    t.add_argument("scene", help="GeoTIFF (or any raster GDAL reads)")
    t.add_argument("--out", "-o", required=True, help="output folder (created)")
    t.add_argument("--tile-size", type=_positive_int, default=None, help="tile side in pixels (default: the config's tiling.tile_size)")
    t.add_argument("--overlap", type=_nonneg_int, default=None, help="overlap in pixels (default: the config's tiling.overlap)")
    t.add_argument("--overlap-m", type=float, default=None, help="overlap in metres instead of pixels")
    t.add_argument("--labels", help="vector labels (shapefile, GeoPackage, GeoJSON) for annotations.json")
    t.add_argument("--class-column", default=None, help="class column of the labels (default: label)")
    t.add_argument("--min-visibility", type=float, default=0.5, help="keep a clipped box if this share is inside (0.5)")
    t.add_argument("--bands", type=_bands, default=None, help="bands to keep, e.g. 1,2,3 (default: all)")
    t.add_argument("--gsd", type=float, default=None, help="resample to this ground resolution in metres")
    t.add_argument("--min-valid", type=float, default=0.0, help="skip chips with this valid fraction or less (0)")
    t.add_argument("--config", help="YAML config (a path, or a built-in preset: cpu, small_objects, trees, default, stock)")

    tr = sub.add_parser("train", parents=[common], help="train a model on GeoTIFFs with vector labels",
                        description="Train a RetinaNet on scenes with vector labels. Writes RUN_DIR/model.pt (best by "
                                    "validation AP50), RUN_DIR/last.pt (for --resume) and RUN_DIR/metrics.csv.")
    tr.add_argument("--config", help="YAML config (a path, or a built-in preset: cpu, small_objects, trees, default, stock)")
    tr.add_argument("--scene", action="append", default=[], help="training scene; repeat with --labels for each")
    tr.add_argument("--labels", action="append", default=[], help="labels of the --scene at the same position")
    tr.add_argument("--labelled-area", action="append", default=[], metavar="POLYGONS",
                    help="polygons of where the labels are complete (any vector format and CRS): once for every scene, "
                         "or once per --scene in order; chips are drawn inside, the loss ignores the rest (never "
                         "taught as background) and the validation strip is cut from it (default: the whole scene)")
    tr.add_argument("--val-scene", action="append", default=[], help="validation scene (else a held-out strip)")
    tr.add_argument("--val-labels", action="append", default=[], help="labels of the --val-scene at the same position")
    tr.add_argument("--class-column", default=None, help="class column of the labels ('' for one class)")
    tr.add_argument("--out", "-o", required=True, help="run folder")
    tr.add_argument("--epochs", type=_positive_int, help="cap the run at this many epochs (default: 10 without "
                                                             "--time-limit, no cap with it)")
    tr.add_argument("--steps-per-epoch", type=_positive_int)
    tr.add_argument("--max-steps", type=_positive_int, help="cap the run at this many optimiser steps")
    tr.add_argument("--time-limit", type=float, metavar="MINUTES",
                    help="train for this many minutes: the learning-rate schedule spans them and training, final "
                         "validation included, ends near the limit (--epochs/--max-steps cap it only when given)")
    tr.add_argument("--pretrained", help="none, or imagenet: start the backbone from torchvision's ImageNet weights "
                                         "(3-band RGB scenes only; fetched once into torch's cache, hash-checked)")
    tr.add_argument("--batch-size", type=_positive_int)
    tr.add_argument("--lr", type=float)
    tr.add_argument("--tile-size", type=_positive_int)
    tr.add_argument("--overlap", type=_nonneg_int)
    tr.add_argument("--bands", type=_bands)
    tr.add_argument("--gsd", type=float, help="train at this ground resolution (scenes resampled on read)")
    tr.add_argument("--device", help="auto, cpu or cuda")
    tr.add_argument("--workers", type=_nonneg_int, help="DataLoader workers for chip reading")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    tr.add_argument("--init", help="start from this model file (geodet train or geodet import): its architecture, "
                                   "weights, tile size and GSD; new classes re-initialise only the last classification conv")
    tr.add_argument("--freeze-stages", type=_nonneg_int, help="freeze the backbone's first N stages (1 stem, 2 +layer1, "
                                                               "... 5 +layer4)")
    tr.add_argument("--engine", choices=["local", "ray"], default="local",
                    help="local (default); ray: distributed data-parallel training under Ray Train (needs geodet[ray]); "
                         "the run folder must be shared storage for several machines")
    tr.add_argument("--address", help="ray: the cluster to join; default: start a local Ray instance")
    tr.add_argument("--ray-workers", type=_positive_int, default=2, help="ray: training processes (default 2)")
    tr.add_argument("--gpus-per-worker", type=float, default=0.0, help="ray: GPUs per training process")
    tr.add_argument("--cpus-per-worker", type=float, default=1.0, help="ray: CPUs per training process")
    tr.add_argument("--max-failures", type=_nonneg_int, default=2,
                    help="ray: restarts after a worker failure, each resuming from RUN_DIR/last.pt (default 2)")

    d = sub.add_parser("detect", parents=[common], help="detect objects over whole scenes",
                       description="Detect objects over one or more whole scenes and write GeoJSON (EPSG:4326), "
                                   "GeoPackage, FlatGeobuf, Shapefile, GeoParquet (scene CRS) or CSV, plus "
                                   "OUT.report.json; vector files come with a QGIS style.")
    d.add_argument("scenes", nargs="*", metavar="SCENE")
    d.add_argument("--model", "-m", required=True, help="model file: model.pt from geodet train or import, MODEL.onnx from geodet "
                                                       "export, or a torchvision RetinaNet to import on the fly (a Hugging "
                                                       "Face folder or hf://ORG/NAME; cached)")
    d.add_argument("--out", "-o", required=True, help="output file: .geojson, .gpkg, .fgb, .shp, .csv or .parquet")
    d.add_argument("--format", choices=["geojson", "gpkg", "fgb", "shp", "csv", "parquet"], help="override the format")
    d.add_argument("--tile-size", type=_positive_int, help="default: the model card's")
    d.add_argument("--overlap", type=_nonneg_int, help="default: the model card's")
    d.add_argument("--batch-size", type=_positive_int, default=None, help="tiles per model call (8)")
    d.add_argument("--score-threshold", type=float, help="default: the model card's")
    d.add_argument("--detections-per-tile", type=_positive_int, help="most boxes kept per tile (default: the model card's)")
    d.add_argument("--device", default=None, help="auto (CUDA if present), cpu, cuda")
    d.add_argument("--backend", choices=["auto", "torch", "onnx"], default=None,
                   help="auto (default): the fastest path whose accuracy is vouched for; torch; onnx (ONNX Runtime)")
    d.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16", "int8"], default=None,
                   help="auto (default); fp32; bf16 (CPUs with native bf16); fp16 (CUDA); int8 (onnx backend, checked "
                        "against fp32 on the scene's tiles)")
    d.add_argument("--on-read-error", choices=["fail", "skip"], default=None,
                   help="a tile that cannot be read (damaged file, failed remote read): fail (default; nothing is "
                        "written) or skip (the other tiles run, the unreadable windows are listed in the report, "
                        "exit code 3)")
    d.add_argument("--workers", type=_nonneg_int, default=None, help="tile-reading worker processes (default: none on a 2-core CPU, a few with CUDA)")
    d.add_argument("--bands", type=_bands, help="scene bands to feed the model, e.g. 3,2,1")
    d.add_argument("--gsd", type=float, help="resample scenes to this GSD (default: the model card's)")
    d.add_argument("--csv-geometry", choices=["wkt", "pixel"], default=None, help="CSV: WKT polygons or pixel boxes only")
    d.add_argument("--quicklook", help="also write a PNG per scene with the detections drawn")
    d.add_argument("--min-score", type=float, default=None,
                   help="quicklook: draw boxes scoring at least this (default: the model's operating point, "
                        "the best-F1 score at validation)")
    d.add_argument("--config", help="YAML config for detect/output settings")
    d.add_argument("--scene-list", help="a text file of scene paths (local, shared or GDAL virtual paths such as "
                                        "/vsicurl/https://...), one per line, added to SCENE...")
    d.add_argument("--stac", help="a STAC ItemCollection (JSON): one scene per item, from the asset --asset names (or "
                                  "each item's one GeoTIFF asset); https/s3/gs/az hrefs are read through GDAL")
    d.add_argument("--asset", help="--stac: the asset key to read (e.g. visual, image)")
    d.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local (default): this process; ray: blocks of tiles over a Ray cluster's actor pool "
                        "(needs geodet[ray]); --out is then a folder of per-scene GeoParquet (see geodet merge)")
    d.add_argument("--address", help="ray: the cluster to join (e.g. ray://head:10001 or auto); default: start a "
                                     "local Ray instance")
    d.add_argument("--ray-workers", type=_positive_int, default=2,
                   help="ray: detection actors, each loading the model once (default 2; --workers stays the "
                        "tile readers inside each)")
    d.add_argument("--gpus-per-worker", type=float, default=0.0, help="ray: GPUs per actor (e.g. 1, or 0.5 to share)")
    d.add_argument("--cpus-per-worker", type=float, default=1.0, help="ray: CPUs per actor (default 1)")
    d.add_argument("--block-tiles", type=_positive_int, default=8,
                   help="ray: a work item is a K x K block of the scene's tiles (default 8)")
    d.add_argument("--retries", type=_nonneg_int, default=2, help="ray: rounds that rerun failed blocks (default 2)")

    mg = sub.add_parser("merge", parents=[common], help="gather a ray run's finished scenes into one file",
                        description="Gather the finished scenes (scene=*/_SUCCESS.json) of a geodet detect --engine "
                                    "ray output folder into one GeoPackage, GeoJSON, FlatGeobuf or GeoParquet file, "
                                    "with a scene column; scenes in several CRSs go to EPSG:4326 with a crs column.")
    mg.add_argument("folder", help="the --out folder of geodet detect --engine ray")
    mg.add_argument("--out", "-o", required=True, help="output file: .gpkg, .geojson, .fgb, .parquet, .csv")
    mg.add_argument("--format", choices=["geojson", "gpkg", "fgb", "shp", "csv", "parquet"], help="override the format")

    x = sub.add_parser("export", parents=[common], help="export a model to ONNX (fp32, or int8 calibrated on scenes)",
                       description="Export a geodet model to a self-describing ONNX file for ONNX Runtime: the network "
                                   "core with the model card in its metadata; boxes are decoded by geodet exactly as "
                                   "for the torch model. The export is checked against the torch model on tiles of the "
                                   "calibration scenes and refused (no file written) when it differs.")
    x.add_argument("model", help="model.pt from geodet train")
    x.add_argument("--out", "-o", required=True, help="output .onnx file")
    x.add_argument("--int8", action="store_true", help="static int8 quantization (QDQ, per-channel weights)")
    x.add_argument("--calibrate", nargs="+", default=[], metavar="SCENE",
                   help="scenes to read calibration and check tiles from (required with --int8)")
    x.add_argument("--calib-tiles", type=_positive_int, default=32, help="calibration tiles (32; as many again check)")
    x.add_argument("--min-agreement", type=float, default=None,
                   help="int8: least detection F1 against fp32 at the operating point (0.95)")
    x.add_argument("--check-labels", help="labels of a scene: also report AP50 of torch fp32 and of the export")
    x.add_argument("--check-scene", help="the scene of --check-labels (default: the first --calibrate scene)")

    im = sub.add_parser("import", parents=[common], help="turn a torchvision RetinaNet (e.g. DeepForest's) into a geodet model",
                        description="Import a torchvision RetinaNet checkpoint as a geodet model file with a complete card. "
                                    "SOURCE: a Hugging Face model folder (config.json + model.safetensors or "
                                    "pytorch_model.bin, as DeepForest publishes them), hf://ORG/NAME (fetched where the "
                                    "network allows, else read from the Hugging Face cache), or a plain state_dict "
                                    "(.pt/.pth/.safetensors). torchvision's resize to --min-size becomes a ground "
                                    "resolution in the card (scenes are resampled on read).")
    im.add_argument("source")
    im.add_argument("--out", "-o", required=True, help="geodet model file to write (.pt)")
    im.add_argument("--gsd", type=float, help="ground resolution (m) of the imagery the model ran on at home "
                                              "(default: none, scenes run at their native resolution)")
    im.add_argument("--tile-size", type=_positive_int, help="window size it ran on at home (DeepForest: patch_size, "
                                                            "400); default: the config's, else --min-size")
    im.add_argument("--min-size", type=_positive_int, help="torchvision's resize target (default: 800)")
    im.add_argument("--bands", type=_bands, help="scene bands for the network's inputs (default 1,2,3)")
    im.add_argument("--classes", help="class names, comma-separated, in the head's order (default: config.json's "
                                      "label_dict)")
    im.add_argument("--score-threshold", type=float)
    im.add_argument("--detections-per-tile", type=_positive_int, help="default 300, as torchvision")

    e = sub.add_parser("evaluate", parents=[common], help="COCO AP and precision/recall against labels",
                       description="Evaluate detections (any format geodet writes) against labels (any OGR vector).")
    e.add_argument("detections")
    e.add_argument("labels")
    e.add_argument("--scene", help="evaluate in this scene's pixel grid (size ranges in its pixels)")
    e.add_argument("--iou", type=float, default=0.5, help="IoU for precision/recall/F1 (0.5)")
    e.add_argument("--class-column", default="label", help="class column of the labels (label); '' ignores classes")
    e.add_argument("--json", help="write the metrics here")
    e.add_argument("--plot", help="write a precision-recall plot (PNG) here")

    a = sub.add_parser("anchors", parents=[common], help="label box sizes, fitted anchors and anchor coverage",
                       description="Print the label boxes' size distribution at the model's GSD, the anchor coverage "
                                   "of the config, and anchors fitted to the boxes with their coverage.")
    a.add_argument("--scene", required=True)
    a.add_argument("--labels", required=True)
    a.add_argument("--config", help="YAML config (a path, or a built-in preset: cpu, small_objects, trees, default, stock)")
    a.add_argument("--class-column", default=None)
    a.add_argument("--write-config", help="write the config with the fitted anchors to this YAML file")

    m = sub.add_parser("demo", parents=[common], help="the whole job on synthetic scenes, offline, in minutes",
                       description="Make synthetic train/test scenes, train the CPU preset briefly, detect over the "
                                   "test scene, evaluate, and write detections, a quicklook and metrics.")
    m.add_argument("--out", "-o", default="demo_out", help="output folder (demo_out)")
    m.add_argument("--minutes", type=float, default=4.0, help="training budget in minutes (4)")
    m.add_argument("--size", type=_positive_int, default=1024, help="synthetic scene side in pixels (1024)")
    m.add_argument("--seed", type=int, default=0)
    return p


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
                        if verbose else "%(message)s", stream=sys.stderr)
    for noisy in ("pyogrio", "rasterio", "fiona", "matplotlib", "PIL", "faster_coco_eval"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_tile(args) -> int:
    from .io.chips import write_chips
    from .config import load_config

    cfg = load_config(args.config, {"tiling.tile_size": args.tile_size, "tiling.overlap": args.overlap,
                                    "tiling.overlap_m": args.overlap_m, "scene.gsd_m": args.gsd})
    summary = write_chips(args.scene, args.out, cfg.tiling.tile_size, cfg.tiling.overlap, overlap_m=cfg.tiling.overlap_m,
                          bands=args.bands, gsd_m=cfg.scene.gsd_m, labels=args.labels,
                          class_column=args.class_column or cfg.train.class_column, min_visibility=args.min_visibility,
                          min_valid_fraction=args.min_valid, progress=not args.quiet)
    print(summary)
    return 0


def _train_config(args):
    from .config import SceneLabels, load_config

    cfg = load_config(args.config, {
        "train.epochs": args.epochs, "train.steps_per_epoch": args.steps_per_epoch, "train.max_steps": args.max_steps,
        "train.time_limit_min": args.time_limit, "train.batch_size": args.batch_size, "train.lr": args.lr,
        "tiling.tile_size": args.tile_size, "tiling.overlap": args.overlap, "scene.bands": args.bands,
        "scene.gsd_m": args.gsd, "train.device": args.device, "train.num_workers": args.workers,
        "train.seed": args.seed, "train.class_column": args.class_column, "train.init": args.init,
        "train.freeze_backbone_stages": args.freeze_stages, "model.pretrained": args.pretrained,
    })
    for flag, a, b in (("--scene/--labels", args.scene, args.labels), ("--val-scene/--val-labels", args.val_scene, args.val_labels)):
        if len(a) != len(b):
            raise GeodetError(f"{flag}: give one labels file per scene ({len(a)} scene(s), {len(b)} labels)")
    if args.scene:
        cfg.train.scenes = [SceneLabels(s, lab) for s, lab in zip(args.scene, args.labels)]
    if args.labelled_area:
        n, k = len(cfg.train.scenes), len(args.labelled_area)
        if k not in (1, n):
            raise GeodetError(f"--labelled-area: give one file for every scene or one per --scene ({n} scene(s), {k} "
                              "labelled areas)")
        for pair, area in zip(cfg.train.scenes, args.labelled_area * n if k == 1 else args.labelled_area):
            pair.labelled_area = area
    if args.val_scene:
        cfg.train.val_scenes = [SceneLabels(s, lab) for s, lab in zip(args.val_scene, args.val_labels)]
    return cfg


def _cmd_train(args) -> int:
    from .training.trainer import Interrupted, Trainer

    cfg = _train_config(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise GeodetError(f"run folder path is a file: {out}")
    for parent in out.parents:  # the run folder is geodet's: create it and any missing parents
        if parent.exists() and not parent.is_dir():
            raise GeodetError(f"cannot create the run folder {out}: {parent} is a file")
    if args.engine == "ray":
        from .training.ray_train import train_ray

        _quiet_ray()
        res = train_ray(cfg, out, address=args.address, workers=args.ray_workers, gpus_per_worker=args.gpus_per_worker,
                        cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures, resume=args.resume)
        print(f"model: {res.get('model', out / 'model.pt')} (trained by {res.get('world_size', '?')} Ray workers)\n"
              f"last checkpoint: {out / 'last.pt'}\nmetrics: {out / 'metrics.csv'}")
        return 0
    try:
        path = Trainer(cfg, out, resume=args.resume, progress=not args.quiet).run()
    except Interrupted as exc:
        print(f"geodet: {exc}", file=sys.stderr)
        return 130
    print(f"model: {path}\nlast checkpoint: {out / 'last.pt'}\nmetrics: {out / 'metrics.csv'}")
    return 0


def _scene_list(args) -> tuple[list[str], list[str] | None]:
    """The scenes of ``detect``: named, listed in --scene-list, or the items of --stac; with the
    STAC item ids as scene ids when every scene comes from --stac."""
    scenes, ids = list(args.scenes), None
    if args.stac:
        from .io.stac import stac_scenes

        items = stac_scenes(args.stac, args.asset)
        if not scenes and not args.scene_list:
            ids = [i for i, _ in items]
        scenes += [p for _, p in items]
    elif args.asset:
        raise GeodetError("--asset picks an asset of --stac items: give --stac ITEMS.json too")
    if args.scene_list:
        try:
            lines = Path(args.scene_list).read_text().splitlines()
        except OSError as exc:
            raise GeodetError(f"--scene-list {args.scene_list}: cannot be read ({exc.strerror})") from None
        scenes += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not scenes:
        raise GeodetError("no scenes given: name them, or give --scene-list FILE or --stac ITEMS.json")
    return scenes, ids


def _quiet_ray() -> None:
    """The command's own lines only: Ray's INFO lines and notes go to its session logs (the
    command is this process's owner, so it may set Ray's variables here)."""
    from .pipeline.ray_engine import require_ray

    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # (Ray's C++ core notes this once, in one line)
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    require_ray()  # importing Ray sets its loggers up; set their levels after that
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _cmd_detect_ray(args, cfg, scenes, ids) -> int:
    from .pipeline.ray_engine import detect_ray

    _quiet_ray()
    try:
        summary = detect_ray(scenes, args.model, args.out, address=args.address, workers=args.ray_workers,
                             gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                             block_tiles=args.block_tiles, retries=args.retries, ids=ids, config=cfg,
                             progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"geodet: interrupted; finished blocks and scenes are kept in {args.out}: rerun the same command to run "
              "only what is missing", file=sys.stderr)
        return 130
    return _ray_summary(args, summary)


def _ray_summary(args, summary) -> int:
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


def _cmd_merge(args) -> int:
    from .pipeline.ray_engine import merge_outputs

    merged = merge_outputs(args.folder, args.out, args.format)
    print(f"{len(merged)} detections from {merged['scene'].nunique() if len(merged) else 0} scene(s) -> {args.out}")
    return 0


def _cmd_detect(args) -> int:
    from .config import load_config
    from .io.writers import report_path
    from .pipeline.job import detect_to_file

    scenes, ids = _scene_list(args)
    cfg = load_config(args.config, {"detect.batch_size": args.batch_size, "detect.device": args.device,
                                    "detect.num_workers": args.workers, "detect.score_threshold": args.score_threshold,
                                    "detect.backend": args.backend, "detect.precision": args.precision,
                                    "detect.on_read_error": args.on_read_error,
                                    "tiling.tile_size": args.tile_size, "tiling.overlap": args.overlap,
                                    "model.detections_per_tile": args.detections_per_tile,
                                    "scene.bands": args.bands, "scene.gsd_m": args.gsd,
                                    "output.format": args.format, "output.csv_geometry": args.csv_geometry})
    if args.engine == "ray":
        return _cmd_detect_ray(args, cfg, scenes, ids)
    frame = detect_to_file(scenes, args.model, args.out, config=cfg, quicklook=args.quicklook,
                           quicklook_min_score=args.min_score, progress=not args.quiet)
    report = frame.attrs["report"]
    skipped = sum(r["tiles_skipped"] for r in report["scenes"])
    print(f"{len(frame)} detections in {len(report['scenes'])} scene(s) ({skipped} empty tiles skipped) -> {args.out}")
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


def _cmd_export(args) -> int:
    from .model.onnx import INT8_MIN_AGREEMENT
    from .pipeline.export import export_model

    result = export_model(args.model, args.out, int8=args.int8, calibrate=args.calibrate, calib_tiles=args.calib_tiles,
                          check_scene=args.check_scene, check_labels=args.check_labels,
                          min_agreement=INT8_MIN_AGREEMENT if args.min_agreement is None else args.min_agreement)
    fp = result["fp32"]
    print(f"export check on {result['tiles']} tiles: fp32 logit difference {fp['max_relative_logit_diff']:.2g} "
          f"(relative, limit {fp['limit']:g}; absolute {fp['max_logit_diff']:.2g}), detections F1 "
          f"{fp['detections']['f1']:.4f}")
    if "int8" in result:
        q = result["int8"]
        print(f"int8: detections F1 against fp32 {q['detections']['f1']:.4f} at score >= "
              f"{q['detections']['min_score']:.3g} (needs {q['min_agreement']}); kept in float: "
              f"{len(q['float_nodes'])} output conv(s) and the reshapes after them")
    for name, m in (result.get("labels_check") or {}).items():
        print(f"{name}: AP50 {m['ap50']:.4f}, AP {m['ap']:.4f}, {m['detections']} detections")
    print(f"wrote {args.out}")
    return 0


def _cmd_import(args) -> int:
    from .io.writers import check_output_path
    from .model import save_model
    from .model.imports import import_retinanet

    out = check_output_path(args.out)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    model = import_retinanet(args.source, gsd_m=args.gsd, tile_size=args.tile_size, min_size=args.min_size,
                             bands=args.bands, classes=classes, score_threshold=args.score_threshold,
                             detections_per_tile=args.detections_per_tile)
    save_model(model, out)
    c = model.card
    res = f"{c.gsd_m:g} m" if c.gsd_m else "the scene's native resolution"
    print(f"imported a {c.model.backbone} RetinaNet: classes {', '.join(c.classes)}; tiles of {c.tile_size} px at {res}; "
          f"score threshold {c.model.score_threshold:g}, NMS IoU {c.model.nms_iou:g} -> {out}")
    return 0


def _cmd_evaluate(args) -> int:
    from .evaluation import evaluate, format_table, plot_pr
    from .io.writers import check_output_path, write_json

    for p in (args.json, args.plot):
        if p:
            check_output_path(p)
    if not 0 < args.iou < 1:
        raise GeodetError(f"--iou must be between 0 and 1, got {args.iou}")
    m = evaluate(args.detections, args.labels, scene=args.scene, iou=args.iou, class_column=args.class_column)
    print(format_table(m))
    if m.get("warning"):
        print(f"warning: {m['warning']}")
    if args.json:
        write_json({k: v for k, v in m.items() if k != "pr_curve"}, args.json)
    if args.plot:
        plot_pr(m, args.plot)
    return 0


def _cmd_anchors(args) -> int:
    from .model.anchors import anchor_coverage, fit_anchors, size_summary
    from .config import load_config, save_config
    from .io.labels import load_scene_labels
    from .io.scene import scene_from_config

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


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, minutes=args.minutes, size=args.size, seed=args.seed, progress=not args.quiet)
    return 0


COMMANDS = {"tile": _cmd_tile, "train": _cmd_train, "detect": _cmd_detect, "export": _cmd_export, "import": _cmd_import,
            "evaluate": _cmd_evaluate, "merge": _cmd_merge,
            "anchors": _cmd_anchors, "demo": _cmd_demo}


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose = getattr(args, "verbose", False)
    args.quiet = getattr(args, "quiet", False)
    if not args.command:
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
    if args.command in ("detect", "tile"):
        from .memory import tune_memory

        # streaming whole scenes: keep memory flat in the scene size, at ~15% of detection speed
        # (training is 1.7x faster without it, so train and demo leave glibc as it is)
        tune_memory()
    if os.environ.get("GEODET_NO_PROGRESS"):
        args.quiet = True
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        return COMMANDS[args.command](args)
    except GeodetError as exc:
        if args.verbose:
            log.exception("details")
        print(f"geodet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("geodet: interrupted; no partial output was written", file=sys.stderr)
        return 130
    except Exception as exc:  # unexpected: one line, details with --verbose
        if args.verbose:
            log.exception("unexpected error")
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"geodet: unexpected error: {type(exc).__name__}: {msg} (rerun with --verbose for details)", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
