"""``geodet demo``: the whole job on synthetic scenes, offline, in a few minutes."""

from __future__ import annotations

from .common import GeodetError, deprecated, finite, positive_int, seed

DETECT_SECONDS = 20.0  # about what the demo's detection takes on 2 cores: its share of the progress


def add_parser(sub, common) -> None:
    m = sub.add_parser("demo", parents=[common], help="the whole job on synthetic scenes, offline, in minutes",
                       description="Make synthetic train/test scenes, train the CPU preset briefly, detect over the "
                                   "test scene, evaluate, and write detections, a quicklook and metrics.")
    m.add_argument("--out", "-o", default="demo_out", help="output folder (demo_out)")
    m.add_argument("--time-limit", type=finite, default=4.0, metavar="MINUTES", help="training budget in minutes (4)")
    m.add_argument("--size", type=positive_int, default=1024, help="synthetic scene side in pixels (1024; at least 64)")
    m.add_argument("--seed", type=seed, default=0, help="seed of the synthetic scenes and of training (0)")
    deprecated(m, "--minutes", "use --time-limit", dest="time_limit", type=finite)


def run(args) -> int:
    from .. import progress
    from ..demo import run_demo

    if not args.time_limit > 0:  # (as train and pretrain say it)
        raise GeodetError(f"--time-limit must be a positive number of minutes, got {args.time_limit:g}")
    progress.plan([args.time_limit * 60, DETECT_SECONDS])
    run_demo(args.out, minutes=args.time_limit, size=args.size, seed=args.seed, progress=not args.quiet)
    return 0
