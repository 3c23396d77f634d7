"""``geodet train``: train a detector on GeoTIFFs with vector labels."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import (PRESETS_HELP, GeodetError, add_device, bands, deprecated, finite, nonneg_int, positive, positive_int,
                     quiet_ray, ray_amount, seed)

PAIRING = ("scenes and labels pair by position: the first --labels file belongs to the first SCENE, the second to "
           "the second, and so on; name the scenes before the options, since an option that takes several files "
           "takes every name up to the next option")


def add_parser(sub, common) -> None:
    tr = sub.add_parser("train", parents=[common], help="train a model on GeoTIFFs with vector labels",
                        description="Train a RetinaNet on scenes with vector labels. Writes RUN_DIR/model.pt (the end of "
                                    "the schedule, or with train.keep: best the best validation AP50), RUN_DIR/last.pt "
                                    "(for --resume) and RUN_DIR/metrics.csv. Classes "
                                    "come from the labels' class column (--class-column, default 'label'); '' trains "
                                    "one class, 'object'. Scenes: geodet train A.tif B.tif --labels A.gpkg B.gpkg "
                                    "(" + PAIRING + ").")
    tr.add_argument("scenes", nargs="*", metavar="SCENE",
                    help="training scenes (GeoTIFFs; default: the config's train.scenes)")
    tr.add_argument("--labels", action="extend", nargs="+", default=[], metavar="LABELS",
                    help="vector labels, one file per SCENE in the same order (boxes or points, any format and CRS)")
    tr.add_argument("--config", help=PRESETS_HELP)
    tr.add_argument("--labelled-area", action="extend", nargs="+", default=[], metavar="POLYGONS",
                    help="polygons of where the labels are complete (any vector format and CRS): one file for every "
                         "scene, or one per SCENE in order; chips are drawn inside, the loss ignores the rest (never "
                         "taught as background) and the validation strip is cut from it (default: the whole scene)")
    tr.add_argument("--unlabelled", action="extend", nargs="+", default=[], metavar="SCENE",
                    help="scenes without labels to learn from (self-training: a teacher model labels them, and the rest "
                         "of each labelled scene outside --labelled-area, in rounds after a burn-in on the labels)")
    tr.add_argument("--self-training", action="store_true",
                    help="self-train on the rest of each labelled scene outside --labelled-area (on by itself with "
                         "--unlabelled)")
    tr.add_argument("--val-scene", action="extend", nargs="+", default=[], metavar="SCENE",
                    help="validation scenes (default: a strip held out of the training scenes)")
    tr.add_argument("--val-labels", action="extend", nargs="+", default=[], metavar="LABELS",
                    help="labels of the --val-scene scenes, one file per scene in the same order")
    tr.add_argument("--class-column", default=None, help="class column of the labels ('' for one class)")
    tr.add_argument("--out", "-o", required=True, metavar="RUN_DIR", help="run folder (created)")
    tr.add_argument("--epochs", type=positive_int, help="cap the run at this many epochs (default: 10 without "
                                                            "--time-limit, no cap with it)")
    tr.add_argument("--steps-per-epoch", type=positive_int,
                    help="optimiser steps per epoch (default: the config's train.steps_per_epoch)")
    tr.add_argument("--max-steps", type=positive_int, help="cap the run at this many optimiser steps")
    tr.add_argument("--time-limit", type=finite, metavar="MINUTES",
                    help="train for this many minutes: the learning-rate schedule spans them and training, final "
                         "validation included, ends near the limit (--epochs/--max-steps cap it only when given)")
    tr.add_argument("--pretrained", help="none, or imagenet: start the backbone from torchvision's ImageNet weights "
                                         "(3-band RGB scenes only; fetched once into torch's cache, hash-checked)")
    tr.add_argument("--batch-size", type=positive_int, help="chips per step (default: the config's train.batch_size)")
    tr.add_argument("--lr", type=finite, help="peak learning rate (default: the config's train.lr)")
    tr.add_argument("--tile-size", type=positive_int, help="chip and tile side in pixels (default: the config's)")
    tr.add_argument("--overlap", type=nonneg_int, help="tile overlap in pixels for validation (default: the config's)")
    tr.add_argument("--bands", type=bands, help="scene bands to train on, e.g. 1,2,3 (default: the config's, else all)")
    tr.add_argument("--gsd", type=positive, help="train at this ground resolution (scenes resampled on read)")
    add_device(tr)
    tr.add_argument("--workers", type=nonneg_int, help="DataLoader workers for chip reading (default: the config's)")
    tr.add_argument("--seed", type=seed, help="random seed (default: the config's train.seed)")
    tr.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    tr.add_argument("--overwrite", action="store_true",
                    help="replace the run RUN_DIR holds (its model.pt, last.pt and metrics.csv): it is set aside once "
                         "every input has been read, and goes once this run has its model (a failure or a stop before "
                         "then puts it back); a folder holding a run is otherwise refused")
    tr.add_argument("--init", help="start from this model file (geodet train, import or pretrain): its architecture, "
                                   "weights, tile size and GSD; new classes re-initialise only the last classification conv")
    tr.add_argument("--freeze-stages", type=nonneg_int, help="freeze the backbone's first N stages (1 stem, 2 +layer1, "
                                                              "... 5 +layer4)")
    tr.add_argument("--engine", choices=["local", "ray"], default="local",
                    help="local (default); ray: distributed data-parallel training under Ray Train (needs geodet[ray]); "
                         "the run folder must be shared storage for several machines")
    tr.add_argument("--address", help="ray: the cluster to join; default: start a local Ray instance")
    tr.add_argument("--ray-workers", type=positive_int, default=2, help="ray: training processes (default 2)")
    tr.add_argument("--gpus-per-worker", type=ray_amount, default=0.0, help="ray: GPUs per training process")
    tr.add_argument("--cpus-per-worker", type=ray_amount, default=1.0, help="ray: CPUs per training process")
    tr.add_argument("--max-failures", type=nonneg_int, default=2,
                    help="ray: restarts after a worker failure, each resuming from RUN_DIR/last.pt (default 2)")
    deprecated(tr, "--scene", "name the scenes first: geodet train SCENE... --labels LABELS...", dest="scene_flag",
               append=True)


def train_config(args):
    """The run's config: the YAML (or preset), then the flags."""
    from ..config import SceneLabels, load_config

    cfg = load_config(args.config, {
        "train.epochs": args.epochs, "train.steps_per_epoch": args.steps_per_epoch, "train.max_steps": args.max_steps,
        "train.time_limit_min": args.time_limit, "train.batch_size": args.batch_size, "train.lr": args.lr,
        "tiling.tile_size": args.tile_size, "tiling.overlap": args.overlap, "scene.bands": args.bands,
        "scene.gsd_m": args.gsd, "train.device": args.device, "train.num_workers": args.workers,
        "train.seed": args.seed, "train.class_column": args.class_column, "train.init": args.init,
        "train.freeze_backbone_stages": args.freeze_stages, "model.pretrained": args.pretrained,
    })
    scenes = training_scenes(args)
    if len(scenes) != len(args.labels):
        raise GeodetError(f"give one --labels file per scene, in the scenes' order ({_names(scenes, 'scene')}; "
                          f"{_names(args.labels, 'labels file')}): {PAIRING}")
    if len(args.val_scene) != len(args.val_labels):
        raise GeodetError(f"give one --val-labels file per --val-scene, in the same order "
                          f"({_names(args.val_scene, 'scene')}; {_names(args.val_labels, 'labels file')})")
    if scenes:
        cfg.train.scenes = [SceneLabels(s, lab) for s, lab in zip(scenes, args.labels)]
    if not cfg.train.scenes:
        raise GeodetError("no training scenes: name them, geodet train SCENE... --labels LABELS..., or list "
                          "train.scenes in the config")
    if args.val_scene:
        cfg.train.val_scenes = [SceneLabels(s, lab) for s, lab in zip(args.val_scene, args.val_labels)]
    if args.unlabelled:
        cfg.train.unlabelled = list(args.unlabelled)
    if args.self_training:
        cfg.train.self_training = True
    if args.labelled_area:
        n, k = len(cfg.train.scenes), len(args.labelled_area)
        if k not in (1, n):
            raise GeodetError(f"--labelled-area: give one file for every scene or one per scene, in the scenes' order "
                              f"({n} scene(s), {k} labelled areas)")
        for pair, area in zip(cfg.train.scenes, args.labelled_area * n if k == 1 else args.labelled_area):
            pair.labelled_area = area
    return cfg


def training_scenes(args) -> list[str]:
    """The named scenes, or those of the deprecated --scene flag (not both: the pairing would be a guess)."""
    flagged = getattr(args, "scene_flag", None) or []
    if flagged and args.scenes:
        raise GeodetError(f"scenes given both by name ({', '.join(args.scenes)}) and with --scene "
                          f"({', '.join(flagged)}): name them all, geodet train SCENE... --labels LABELS...")
    return list(args.scenes or flagged)


def _names(items, what) -> str:
    listed = f": {', '.join(map(str, items))}" if items else ""
    return f"{len(items)} {what}{'' if len(items) == 1 else 's'}{listed}"


def run(args) -> int:
    from .. import progress
    from ..training.trainer import Interrupted, Trainer

    cfg = train_config(args)
    out = Path(args.out)
    if args.resume and cfg.train.init:  # the checkpoint's weights would silently replace the start model's
        raise GeodetError(f"--resume continues {out / 'last.pt'}, whose weights replace --init {cfg.train.init}: give one "
                          "of them (--init starts a new run in a new folder)")
    if out.exists() and not out.is_dir():
        raise GeodetError(f"run folder path is a file: {out}")
    for parent in out.parents:  # the run folder is geodet's: create it and any missing parents
        if parent.exists() and not parent.is_dir():
            raise GeodetError(f"cannot create the run folder {out}: {parent} is a file")
    progress.plan(1)
    if args.engine == "ray":
        from ..training.ray_train import train_ray
        from ..training.records import check_run_folder, put_back, set_aside

        replaced, aside = check_run_folder(out, args.resume, args.overwrite), None
        if replaced:  # as in one process, the old run steps aside once this run's inputs are read (before Ray starts)
            import copy

            Trainer(copy.deepcopy(cfg), out).prepare()
            aside = set_aside(replaced, out)
        quiet_ray()
        try:
            res = train_ray(cfg, out, address=args.address, workers=args.ray_workers,
                            gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                            max_failures=args.max_failures, resume=args.resume)
        except BaseException:
            put_back(aside, out)  # the old run as it was where this one left no file of its own
            raise
        put_back(aside, out, done=True)
        print(f"model: {res.get('model', out / 'model.pt')} (trained by {res.get('world_size', '?')} Ray workers)\n"
              f"last checkpoint: {out / 'last.pt'}\nmetrics: {out / 'metrics.csv'}")
        return 0
    try:
        path = Trainer(cfg, out, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite).run()
    except Interrupted as exc:
        print(f"geodet: {exc}", file=sys.stderr)
        return 130
    print(f"model: {path}\nlast checkpoint: {out / 'last.pt'}\nmetrics: {out / 'metrics.csv'}")
    return 0
