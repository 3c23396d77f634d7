"""Synthetic vehicles: train on one scene for at most N minutes on this CPU, then whole-scene
AP50 on a different scene (another seed).

    python benchmarks/bench_accuracy_synthetic.py [--minutes 10] [--size 2048] [--config cpu]
        [--precision auto|fp32|bf16] [--threads N] [--lr LR]

``--precision`` is the training precision (auto: bf16 autocast on a CPU with native bf16, else
fp32); detection runs geodet's default path, which the result names.
"""

import argparse
import json
import time
from pathlib import Path

from geodet.config import SceneLabels, load_config
from geodet.pipeline.scenes import detect_scene
from geodet.evaluation import evaluate
from geodet.model import load_model
from geodet.synthetic import make_scene
from geodet.training.trainer import Trainer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--config", default="cpu")
    ap.add_argument("--workdir", default="/tmp/geodet-bench/synthetic")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    tr = make_scene(wd / "train.tif", wd / "train.gpkg", size=args.size, seed=101)
    te = make_scene(wd / "test.tif", wd / "test.gpkg", size=args.size, seed=202)
    cfg = load_config(args.config)
    cfg.train.scenes = [SceneLabels(str(tr.image), str(tr.labels))]
    cfg.train.time_limit_min = args.minutes
    cfg.train.epochs = 10_000
    cfg.train.precision = args.precision
    cfg.train.device = args.device
    if args.lr is not None:
        cfg.train.lr = args.lr
    t0 = time.perf_counter()
    path = Trainer(cfg, wd / f"run_{args.config}", progress=False, overwrite=True).run()
    t_train = time.perf_counter() - t0
    model = load_model(path)
    t1 = time.perf_counter()
    frame = detect_scene(te.image, model, progress=False, device=None if args.device == "auto" else args.device)
    t_det = time.perf_counter() - t1
    m = evaluate(frame, te.labels, scene=te.image)
    backend = frame.attrs["report"].get("backend") or {}
    res = {"config": args.config, "lr": cfg.train.lr, "train_precision": args.precision, "threads": args.threads, "device": args.device,
           "detect_backend": f"{backend.get('backend')} {backend.get('precision')}",
           "train_minutes": round(t_train / 60, 2), "steps": model.card.trained_steps,
           "train_objects": tr.n_objects, "test_objects": te.n_objects, "detect_seconds": round(t_det, 1),
           **{k: m[k] for k in ("AP", "AP50", "AP75", "precision", "recall", "f1")}}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
