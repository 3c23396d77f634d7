"""``evaluate`` on a whole dense scene: faster-coco-eval given the scene as one image (as
geodet did before) against the split into small images that give the same matches (the
default), in one process, rounds interleaved.

    geodet detect SCENE.tif --model MODEL.pt -o DETS.gpkg
    python benchmarks/bench_evaluate.py DETS.gpkg LABELS.gpkg --scene SCENE.tif [--rounds 3]

Prints every run, the medians and whether every metric (the PR curve and per-class figures
included) is identical between the two.
"""

import argparse
import statistics
import time
from unittest import mock

import geodet.evaluation as ev


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("detections")
    ap.add_argument("labels")
    ap.add_argument("--scene")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    plain = ev.coco_metrics
    times = {"one image": [], "split": []}
    results = {}
    for _ in range(a.rounds):
        for mode in times:
            with mock.patch.object(ev, "coco_metrics", lambda *p, **k: plain(*p, **k, split=mode == "split")):
                t = time.perf_counter()
                m = ev.evaluate(a.detections, a.labels, scene=a.scene)
                times[mode].append(time.perf_counter() - t)
            results[mode] = m
            print(f"{mode}: {times[mode][-1]:.1f} s  AP50 {m['AP50']:.4f}  AP {m['AP']:.4f}", flush=True)
    same = dict(results["split"]) == dict(results["one image"])
    m = results["split"]
    print(f"\n{m['n_detections']} detections, {m['n_labels']} labels; identical metrics: {same}")
    print("| evaluation | median | every run |\n|---|---|---|")
    for mode, ts in times.items():
        print(f"| {mode} | {statistics.median(ts):.1f} s | {', '.join(f'{t:.1f}' for t in ts)} |")
    print(f"speed-up: {statistics.median(times['one image']) / statistics.median(times['split']):.1f}x")


if __name__ == "__main__":
    main()
