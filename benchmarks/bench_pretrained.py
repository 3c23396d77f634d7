"""From scratch against fine-tuned from an imported torchvision RetinaNet, at the same CPU budget,
on the shared tree crowns: train on yell_541000, evaluate on the held-out osbs_029 and soap_061.

    python benchmarks/bench_pretrained.py --minutes 5 [--import-from hf://weecology/deepforest-tree]

Without ``--import-from`` (no internet here) the imported checkpoint is a torchvision
``retinanet_resnet50_fpn`` with random weights saved as a Hugging Face folder, so the fine-tuned
row measures the code path a user with DeepForest's weights runs (import, 2x resampling to
0.05 m, ResNet-50 at 800 px tiles, frozen stages), not the value of pretraining.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "trees"


def run(cmd):
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0, r.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--import-from", help="a DeepForest-style source (default: random torchvision weights)")
    ap.add_argument("--data", default=str(SHARED))
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    d = Path(args.data)
    wd = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pretrained-"))
    wd.mkdir(parents=True, exist_ok=True)
    geodet = [sys.executable, "-m", "geodet.cli", "-q"]
    source = args.import_from
    if source is None:
        import torch
        from safetensors.torch import save_file
        from torchvision.models.detection import retinanet_resnet50_fpn

        torch.manual_seed(0)
        tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=1)
        folder = wd / "random_retinanet"
        folder.mkdir(exist_ok=True)
        save_file({"model." + k: v.contiguous() for k, v in tv.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"num_classes": 1, "label_dict": {"Tree": 0},
                                                        "score_thresh": 0.05, "nms_thresh": 0.15}))
        source = str(folder)
    imported = wd / "imported.pt"
    run(geodet + ["import", source, "-o", str(imported), "--gsd", "0.1", "--tile-size", "400"])
    train = [str(d / "yell_541000.tif"), "--labels", str(d / "yell_541000.gpkg"), "--time-limit",
             str(args.minutes), "--class-column", ""]
    rows = []
    for name, extra in (("from scratch (trees preset, R18)", ["--config", "trees"]),
                        ("fine-tuned from the import (R50, 800 px at 0.05 m, 2 stages frozen)",
                         ["--init", str(imported), "--freeze-stages", "2", "--batch-size", "2"])):
        out = wd / ("scratch" if "scratch" in name else "finetune")
        secs, _ = run(geodet + ["train", *train, *extra, "--out", str(out)])
        steps = sum(1 for line in (out / "metrics.csv").read_text().splitlines()[1:] if line.split(",")[2])
        row = {"model": name, "train_s": round(secs), "steps": steps}
        for held in ("osbs_029", "soap_061"):
            det = out / f"{held}.gpkg"
            run(geodet + ["detect", str(d / f"{held}.tif"), "-m", str(out / "model.pt"), "-o", str(det)])
            _, text = run(geodet + ["evaluate", str(det), str(d / f"{held}.gpkg"), "--scene", str(d / f"{held}.tif"),
                                    "--class-column", "", "-o", str(out / f"{held}.json")])
            m = json.loads((out / f"{held}.json").read_text())
            row[held] = {"AP50": round(m["AP50"], 3), "precision": round(m["precision"], 2),
                         "recall": round(m["recall"], 2), "detections": m["n_detections"], "labels": m["n_labels"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| model | steps in budget | osbs_029 AP50 (P / R) | soap_061 AP50 (P / R) |\n|---|---|---|---|")
    for r in rows:
        cells = [f"{r[h]['AP50']:.3f} ({r[h]['precision']:.2f} / {r[h]['recall']:.2f}; {r[h]['detections']} boxes, "
                 f"{r[h]['labels']} crowns)" for h in ("osbs_029", "soap_061")]
        print(f"| {r['model']} | {r['steps']} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
