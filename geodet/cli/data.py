"""``geodet data``: write a small real sample (scenes and labels) to try geodet on."""

from __future__ import annotations


def add_parser(sub, common) -> None:
    from ..data import SAMPLES

    d = sub.add_parser("data", parents=[common], help="write a small real sample to try geodet on",
                       description="Write a sample shipped with geodet: 'trees' is two 400 x 400 px RGB scenes of NEON "
                                   "aerial imagery (0.1 m, CC0) with hand-drawn crown boxes (DeepForest's sample "
                                   "annotations, MIT).")
    d.add_argument("name", choices=sorted(SAMPLES), help="the sample")
    d.add_argument("--out", "-o", default="sample", help="folder to write it to (sample)")


def run(args) -> int:
    from ..data import write_sample

    paths = write_sample(args.name, args.out)
    for scene, p in paths.items():
        print(f"{scene}: {p['scene']} with labels {p['labels']}")
    return 0
