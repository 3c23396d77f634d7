"""``geodet pretrain``: self-supervised pretraining of the detector's backbone on unlabelled scenes."""

from __future__ import annotations

from .common import PRESETS_HELP, add_device, bands, finite, positive, positive_int, seed


def add_parser(sub, common) -> None:
    p = sub.add_parser("pretrain", parents=[common], help="pretrain the backbone on your unlabelled imagery",
                       description="Self-supervised pretraining (dense VICReg, with lightly's loss) of the detector's "
                                   "own backbone and FPN on unlabelled scenes at the model's ground resolution: any "
                                   "band count, 8- or 16-bit. Writes a model file to start training from: geodet "
                                   "train --init OUT.pt (it is not a detector by itself).")
    p.add_argument("scenes", nargs="+", metavar="SCENE", help="unlabelled scenes (GeoTIFFs) to learn from")
    p.add_argument("--out", "-o", required=True, help="the pretrained model file (.pt)")
    p.add_argument("--config", help=PRESETS_HELP)
    p.add_argument("--time-limit", type=finite, metavar="MINUTES",
                   help="minutes to pretrain for: the learning-rate schedule spans them (give this, --max-steps, or "
                        "both)")
    p.add_argument("--max-steps", type=positive_int, help="cap the run at this many optimiser steps")
    p.add_argument("--bands", type=bands, help="scene bands to use (default: the config's)")
    p.add_argument("--gsd", type=positive, help="pretrain at this ground resolution (scenes resampled on read)")
    p.add_argument("--batch-size", type=positive_int, help="chips per step (default: the config's train.batch_size)")
    p.add_argument("--lr", type=finite, help="peak learning rate (default: the config's train.lr)")
    add_device(p)
    p.add_argument("--seed", type=seed, help="random seed (default: the config's train.seed)")


def run(args) -> int:
    from .. import progress
    from ..config import load_config
    from ..training.pretrain import pretrain

    cfg = load_config(args.config, {"scene.bands": args.bands, "scene.gsd_m": args.gsd, "train.batch_size": args.batch_size,
                                    "train.lr": args.lr, "train.device": args.device, "train.seed": args.seed})
    progress.plan(1)
    out = pretrain(args.scenes, args.out, cfg, args.time_limit, progress=not args.quiet, max_steps=args.max_steps)
    print(f"pretrained backbone: {out} (start training from it: geodet train --init {out} ...)")
    return 0
