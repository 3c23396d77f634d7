"""Seam exactness with tiles that disagree, and the stitcher on a real model's output.

    python benchmarks/bench_seams.py [--seeds 3] [--ref HEAD~1]
    python benchmarks/bench_seams.py --model MODEL.pt --scene S.tif --labels S.gpkg [--ref REF]

1. A perfect per-tile detector on scenes of overlapping objects (painted one after another, so
   later ones partly cover earlier ones) reports, per tile, the box of each object's *visible*
   pixels there: duplicates and misses (IoU 0.9) against each object's visible box in the scene.
2. With ``--model``: the model runs once over the scene; its tile outputs are replayed through
   the current stitcher and, with ``--ref``, through ``geodet/stitch.py`` as it was at that git
   revision. Prints boxes after stitching and AP50/AP/precision/recall for each.
"""

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

CASES = [  # side, objects, tile, overlap, min size, max size
    (3000, 3948, 512, 64, 6, 48),
    (1800, 1492, 256, 48, 6, 40),
    (3000, 2429, 512, 64, 6, 128),
    (2000, 1500, 256, 32, 6, 64),
]


def stitcher_at(ref):
    """The ``Stitcher`` class of geodet/stitch.py at git revision ``ref`` (None: the current one)."""
    if ref is None:
        from geodet.pipeline.stitch import Stitcher

        return Stitcher
    root = Path(__file__).resolve().parents[1]

    def show(path):
        r = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=root, capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else None

    def load(name, src):
        path = Path(tempfile.mkdtemp()) / f"{name}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(f"geodet.pipeline.{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod

    src = show("geodet/pipeline/stitch.py")
    if src is None:  # revisions before the package had folders import the grid as ``.tiling``
        src = show("geodet/stitch.py").replace("from .tiling import", "from .grid import")
    seams = show("geodet/pipeline/seams.py")
    if seams is not None:
        load("_seams_ref", seams)
        src = src.replace("from .seams import", "from ._seams_ref import")
    mod = load("_stitch_ref", src)
    return mod.Stitcher


def perfect(args, versions):
    from helpers import match_counts, occluded_ids, visible_boxes, visible_tile_feeds

    from geodet.pipeline.grid import TileGrid

    print("| scene | tile / overlap | objects (side) | seed | " + " | ".join(f"{v} dup / miss" for v in versions) + " |")
    print("|---|---|---|---|" + "---|" * len(versions))
    for side, n, tile, ov, lo, hi in CASES:
        for seed in range(args.seeds):
            ids = occluded_ids(side, side, n, lo, hi, seed=seed + side + n)
            _, truth = visible_boxes(ids)
            grid = TileGrid(side, side, tile, ov)
            feeds = list(visible_tile_feeds(ids, grid))
            cells = []
            for name, cls in versions.items():
                st = cls(grid)
                for f in feeds:
                    st.add(*f)
                out = st.finish()
                dup, miss = match_counts(out.boxes, truth, iou=0.9)
                cells.append(f"{dup} / {miss}")
            print(f"| {side}^2, {len(truth)} visible | {tile} / {ov} | {lo}-{hi} px | {seed} | " + " | ".join(cells) + " |")


class Replay:
    """Runs the model once, recording each batch's outputs; later runs replay them in order."""

    def __init__(self, model):
        self.model, self.card, self.calls, self.i = model, model.card, [], None

    def __call__(self, batch):
        if self.i is None:
            out = self.model(batch)
            self.calls.append([{k: v.detach().clone() for k, v in o.items()} for o in out])
            return out
        out = self.calls[self.i]
        self.i += 1
        return out


def real(args, versions):
    import geodet.pipeline.detect as detect
    from geodet.evaluation import evaluate
    from geodet.pipeline.scenes import detect_scene
    from geodet.model import load_model

    model = load_model(args.model)
    rec = Replay(model.eval())
    print(f"model {args.model} on {args.scene} (tile size {args.tile_size or model.card.tile_size}, "
          f"overlap {args.overlap if args.overlap is not None else model.card.overlap})")
    print("| stitcher | boxes before stitch | boxes after | AP50 | AP | precision | recall | stitch s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cls in versions.items():
        detect.Stitcher = cls
        rec.i = None if not rec.calls else 0
        t0 = time.perf_counter()
        frame = detect_scene(args.scene, rec, progress=False, tile_size=args.tile_size, overlap=args.overlap)
        rep = frame.attrs["report"]
        m = evaluate(frame, args.labels, scene=args.scene, class_column=args.class_column)
        print(f"| {name} | {rep['detections_before_stitch']} | {len(frame)} | {m['AP50']:.4f} | {m['AP']:.4f} | "
              f"{m['precision']:.3f} | {m['recall']:.3f} | {rep['seconds']['stitch']:.2f} |")
        del t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ref", help="also run geodet/stitch.py as of this git revision")
    ap.add_argument("--model")
    ap.add_argument("--scene")
    ap.add_argument("--labels")
    ap.add_argument("--class-column", default="")
    ap.add_argument("--tile-size", type=int, help="default: the model card's")
    ap.add_argument("--overlap", type=int, help="default: the model card's")
    args = ap.parse_args()
    versions = {"current": stitcher_at(None)}
    if args.ref:
        versions[args.ref] = stitcher_at(args.ref)
    if args.model:
        real(args, versions)
    else:
        perfect(args, versions)


if __name__ == "__main__":
    main()
