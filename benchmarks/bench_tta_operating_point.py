"""Does a model's operating point (the best-F1 score measured at validation, without TTA) still
fit its test-time-augmented detections? TTA's fused score is the views' summed score over the
number of views, so an object some views miss scores lower than without TTA.

For each model that ``bench_few_labels.py`` trained (its run folders and its results file), on the
same test part it was scored on: precision, recall and F1 (IoU 0.4, classes as that benchmark
scores them) at the card's operating point, without and with TTA, and the best F1 of each with
the score where it is reached. One JSON line per model in ``--results``; ``--summary`` prints
the table.

    python benchmarks/bench_tta_operating_point.py --runs /tmp/geodet-bench/s2 \\
        --from docs/few_labels/results_s10.jsonl --rows area+ctx+gb+tta,area+ctx+gb+atss+giou+tta
    python benchmarks/bench_tta_operating_point.py --summary
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "few_labels" / "tta_operating_point.jsonl"


def at_and_best(frame, labels, scene, classes: bool, op: float) -> dict:
    """P/R/F1 at IoU 0.4 with the detections cut at ``op``, and the best F1 over every cut."""
    from geodet.evaluation import evaluate

    col = "label" if classes else ""
    cut = frame[frame.score >= op].copy()
    cut["score"] = 1.0  # one cut: P and R of exactly these detections
    at = evaluate(cut, labels, scene=scene, iou=0.4, class_column=col)
    best = evaluate(frame, labels, scene=scene, iou=0.4, class_column=col)

    def f1(m):
        p, r = m["precision"], m["recall"]
        return 0.0 if p + r == 0 else 2 * p * r / (p + r)

    return {"P_at_op": round(at["precision"], 4), "R_at_op": round(at["recall"], 4), "F1_at_op": round(f1(at), 4),
            "best_F1": round(f1(best), 4), "best_at": round(float(best.get("score_threshold") or 0), 4)}


def one(run: Path, rec: dict, work: Path) -> dict:
    import shapely

    from bench_few_labels import features, scenario_setup
    from geodet.model import load_model
    from geodet.model.tta import TtaModel
    from geodet.pipeline.scenes import detect_scene

    model = load_model(run / "model.pt")
    op = float(model.card.operating_point)
    _cfg, _pair, tests, _unl = scenario_setup(rec["scenario"], features(rec["row"]), work)
    out = {"scenario": rec["scenario"], "row": rec["row"], "seed": rec["seed"], "operating_point": round(op, 4)}
    for name, scene, labels, classes, outside in tests:
        for kind, det in (("plain", model), ("tta", TtaModel(model))):
            frame = detect_scene(scene, det, progress=False)
            if outside is not None and len(frame):
                b = frame.geometry.bounds
                keep = ~shapely.contains_xy(outside, ((b.minx + b.maxx) / 2).to_numpy(),
                                            ((b.miny + b.maxy) / 2).to_numpy())
                frame = frame[keep]
            out[kind] = at_and_best(frame, labels, scene, classes, op)
    return out


def summary(rows: list[dict]) -> str:
    lines = ["| scenario | row | seed | op | F1 at op, plain | F1 at op, TTA | best F1 plain (at) | best F1 TTA (at) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, t = r["plain"], r["tta"]
        lines.append(f"| {r['scenario']} | {r['row']} | {r['seed']} | {r['operating_point']:.3f} | {p['F1_at_op']:.3f} "
                     f"| {t['F1_at_op']:.3f} | {p['best_F1']:.3f} ({p['best_at']:.2f}) | {t['best_F1']:.3f} "
                     f"({t['best_at']:.2f}) |")
    d = [r["tta"]["F1_at_op"] - r["plain"]["F1_at_op"] for r in rows]
    g = [r["tta"]["best_F1"] - r["tta"]["F1_at_op"] for r in rows]
    if rows:
        lines.append(f"\nTTA minus plain F1, both at the card's operating point: mean {np.mean(d):+.3f} "
                     f"[{min(d):+.3f} to {max(d):+.3f}]; TTA's best F1 minus its F1 at the operating point: mean "
                     f"{np.mean(g):+.3f} [{min(g):+.3f} to {max(g):+.3f}] ({len(rows)} models)")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="/tmp/geodet-bench/s2", help="bench_few_labels.py's --workdir")
    ap.add_argument("--from", dest="source", default="docs/few_labels/results_s10.jsonl",
                    help="bench_few_labels.py's results: which runs, and their scenarios")
    ap.add_argument("--rows", default="", help="comma-separated rows to take (default: every row)")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--summary", action="store_true")
    args = ap.parse_args()
    results = Path(args.results)
    if args.summary:
        print(summary([json.loads(x) for x in results.read_text().splitlines() if x.strip()]))
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = set(filter(None, args.rows.split(",")))
    done = set()
    if results.exists():
        done = {(r["scenario"], r["row"], r["seed"]) for r in map(json.loads, results.read_text().splitlines()) if r}
    work = Path(args.runs)
    for line in Path(args.source).read_text().splitlines():
        rec = json.loads(line)
        if (rows and rec["row"] not in rows) or (rec["scenario"], rec["row"], rec["seed"]) in done:
            continue
        budget = f"{rec['minutes']:g}min" if rec.get("minutes") else f"{rec['steps_cap']}steps"
        run = work / "runs" / f"{rec['scenario'].replace(':', '_').replace('>', '-')}_{rec['row']}_s{rec['seed']}_{budget}"
        if not (run / "model.pt").exists():
            print(f"skipped (no model): {run}", file=sys.stderr)
            continue
        out = one(run, rec, work)
        print(json.dumps(out), flush=True)
        with open(results, "a") as f:
            f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
