"""Anchor coverage: every anchor of the tile (torchvision's AnchorGenerator, the old way) against
the nearest grid positions (``geodet.model.anchors._best_iou``), on a real scene's label sizes,
alone and with one scene-sized label added; both in one run, each repeated, medians and every
run shown. The two must give the same coverage.

    python benchmarks/bench_anchor_coverage.py [--repeats 3] [--skip-old-big]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def old_coverage(sizes, cfg, tile, thr, rng):
    from torchvision.ops import box_iou

    from geodet.model.anchors import _anchors

    anchors = _anchors(cfg, tile)
    stride_max = 2 ** cfg.levels[1]
    c = rng.uniform(tile / 2 - stride_max, tile / 2 + stride_max, size=(len(sizes), 2))
    boxes = torch.tensor(np.concatenate([c - sizes / 2, c + sizes / 2], 1), dtype=torch.float32)
    best = torch.zeros(len(boxes))
    for s in range(0, len(anchors), 200_000):
        best = torch.maximum(best, box_iou(boxes, anchors[s : s + 200_000]).max(dim=1).values)
    return float((best >= thr - 1e-6).float().mean())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-old-big", action="store_true", help="do not run the old way on the scene-sized label")
    args = ap.parse_args()
    from geodet.config import load_config
    from geodet.io.labels import labels_to_boxes, read_labels
    from geodet.io.scene import Scene
    from geodet.model.anchors import COVERAGE_TILE, anchor_coverage

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "trees"
    sc = Scene(str(data / "yell_541000.tif"))
    b = labels_to_boxes(read_labels(data / "yell_541000.gpkg"), sc, None).boxes
    sizes = np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
    cfg = load_config("small_objects").model
    print(f"CPU: {torch.cpu.get_capabilities().get('cpu_name')}, torch threads {torch.get_num_threads()}; "
          f"{len(sizes)} label boxes of yell_541000, config small_objects")
    for name, s in (("labels", sizes), ("labels + one of 1249 px", np.vstack([sizes, [[1249.0, 1249.0]]]))):
        tile = int(max(COVERAGE_TILE, 2 ** np.ceil(np.log2(float(s.max()) * 2 + 64))))
        runs = {"new": [], "old": []}
        values = {}
        for _ in range(args.repeats):
            for way in ("new", "old"):
                if way == "old" and args.skip_old_big and name != "labels":
                    continue
                t0 = time.perf_counter()
                if way == "new":
                    values[way] = anchor_coverage(s, cfg)
                else:
                    values[way] = old_coverage(s, cfg, tile, cfg.fg_iou, np.random.default_rng(0))
                runs[way].append(time.perf_counter() - t0)
        line = f"{name} (tile {tile} px): new {statistics.median(runs['new']):.3f} s " \
               f"{[round(r, 3) for r in runs['new']]}"
        if runs["old"]:
            line += f", old {statistics.median(runs['old']):.3f} s {[round(r, 3) for r in runs['old']]}, " \
                    f"ratio {statistics.median(runs['old']) / statistics.median(runs['new']):.0f}x; coverage equal: " \
                    f"{values['new'] == values['old']} ({values['new']:.3f})"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
