"""``geodet demo``: the whole job on synthetic scenes, offline, in a few minutes."""

from __future__ import annotations

from .common import positive_int


def add_parser(sub, common) -> None:
    m = sub.add_parser("demo", parents=[common], help="the whole job on synthetic scenes, offline, in minutes",
                       description="Make synthetic train/test scenes, train the CPU preset briefly, detect over the "
                                   "test scene, evaluate, and write detections, a quicklook and metrics.")
    m.add_argument("--out", "-o", default="demo_out", help="output folder (demo_out)")
    m.add_argument("--minutes", type=float, default=4.0, help="training budget in minutes (4)")
    m.add_argument("--size", type=positive_int, default=1024, help="synthetic scene side in pixels (1024)")
    m.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from ..demo import run_demo

    run_demo(args.out, minutes=args.minutes, size=args.size, seed=args.seed, progress=not args.quiet)
    return 0
