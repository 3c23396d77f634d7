"""Training steps/s of whichever geodet is on the path: the CPU preset on the accuracy benchmark's
training scene, 65 steps without validation, timed after 5 warm-up steps. Run it with two trees
to compare code versions on one machine, alternating:

    PYTHONPATH=/path/to/old/tree python benchmarks/bench_train_speed.py old
    python benchmarks/bench_train_speed.py new

(the scene comes from ``bench_accuracy_synthetic.py``'s workdir, made there if missing)
"""

import argparse
import csv
import tempfile
from pathlib import Path

from geodet.config import SceneLabels, load_config

try:
    from geodet.training.trainer import Trainer
except ImportError:  # revisions before the package had folders
    from geodet.train import Trainer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("label")
    ap.add_argument("--workdir", default="/tmp/geodet-bench/synthetic10")
    args = ap.parse_args()
    wd = Path(args.workdir)
    if not (wd / "train.tif").exists():
        from geodet.synthetic import make_scene

        wd.mkdir(parents=True, exist_ok=True)
        make_scene(wd / "train.tif", wd / "train.gpkg", size=2048, seed=101)
    cfg = load_config("cpu")
    cfg.train.scenes = [SceneLabels(str(wd / "train.tif"), str(wd / "train.gpkg"))]
    cfg.train.val_fraction = 0.0
    cfg.train.max_steps = cfg.train.steps_per_epoch = 65
    out = tempfile.mkdtemp()
    Trainer(cfg, out, progress=False, overwrite=True).run()
    rows = [r for r in csv.DictReader(open(Path(out) / "metrics.csv")) if r["loss"]]
    t5, tn = float(rows[4]["seconds"]), float(rows[-1]["seconds"])
    print(f"{args.label}: {(len(rows) - 5) / (tn - t5):.3f} steps/s")


if __name__ == "__main__":
    main()
