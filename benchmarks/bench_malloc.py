"""What ``geodet.tune_memory()`` (glibc's mmap threshold fixed at 1 MiB) costs in speed: training
steps/s (CPU preset, 45 steps, no validation) and detection tiles/s on the 4096^2 pipeline scene,
in a fresh process each, with the tuning or without:

    python benchmarks/bench_malloc.py untuned --model MODEL.pt
    python benchmarks/bench_malloc.py tuned --model MODEL.pt
"""

import argparse
import csv
import tempfile
import time
from pathlib import Path

import geodet


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["tuned", "untuned"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--workdir", default="/tmp/geodet-bench")
    args = ap.parse_args()
    if args.mode == "tuned":
        assert geodet.tune_memory()
    from geodet.config import SceneLabels, load_config
    from geodet.model import load_model
    from geodet.pipeline.scenes import detect_scene
    from geodet.synthetic import make_scene
    from geodet.training.trainer import Trainer

    wd = Path(args.workdir)
    if not (wd / "synthetic10" / "train.tif").exists():
        (wd / "synthetic10").mkdir(parents=True, exist_ok=True)
        make_scene(wd / "synthetic10" / "train.tif", wd / "synthetic10" / "train.gpkg", size=2048, seed=101)
    if not (wd / "vehicles_4096.tif").exists():
        make_scene(wd / "vehicles_4096.tif", wd / "vehicles_4096.gpkg", size=4096, seed=7)
    cfg = load_config("cpu")
    cfg.train.scenes = [SceneLabels(str(wd / "synthetic10" / "train.tif"), str(wd / "synthetic10" / "train.gpkg"))]
    cfg.train.val_fraction = 0.0
    cfg.train.max_steps = cfg.train.steps_per_epoch = 45
    out = tempfile.mkdtemp()
    Trainer(cfg, out, progress=False, overwrite=True).run()
    rows = [r for r in csv.DictReader(open(Path(out) / "metrics.csv")) if r["loss"]]
    train = (len(rows) - 5) / (float(rows[-1]["seconds"]) - float(rows[4]["seconds"]))
    model = load_model(args.model)
    detect_scene(wd / "synthetic10" / "train.tif", model, progress=False)  # warm-up
    t = time.perf_counter()
    frame = detect_scene(wd / "vehicles_4096.tif", model, progress=False)
    n = frame.attrs["report"]["tiles_run"]
    print(f"{args.mode}: train {train:.3f} steps/s; detect {n / (time.perf_counter() - t):.2f} tiles/s")


if __name__ == "__main__":
    main()
