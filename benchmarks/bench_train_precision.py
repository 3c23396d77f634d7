"""CPU training in fp32 against bf16 autocast, side by side: the synthetic accuracy benchmark
(``bench_accuracy_synthetic.py``: train on one synthetic scene for N minutes, whole-scene AP50 on
another) run twice at the same time, each on its own physical cores with the same thread count,
one per training precision. Same scenes, same seed, same time: steps made and held-out AP.

    python benchmarks/bench_train_precision.py [--minutes 10] [--threads 2] [--workdir DIR] [--out F]

bf16 needs a CPU with native bf16 (AVX512_BF16 or AMX); elsewhere only fp32 runs. Optionally
(``--cuda-blocks MODEL.pt``), while both train, the block path (``pipeline.blocks``) is checked against
``detect_scene`` on the GPU (both on CUDA): rows matched and the largest box difference.
Runs on the GPU machine through ``benchmarks/gpu_check.sh`` (``GPU_CHECK_RUN=``).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def physical_cores() -> list[list[int]]:
    """Logical CPUs grouped by physical core (hyperthread siblings together), usable by us."""
    allowed = sorted(os.sched_getaffinity(0))
    seen, cores = set(), []
    for cpu in allowed:
        if cpu in seen:
            continue
        f = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        sib = [cpu]
        if f.exists():
            sib = []
            for part in f.read_text().strip().split(","):
                a, _, b = part.partition("-")
                sib += list(range(int(a), int(b or a) + 1))
        sib = [c for c in sib if c in allowed]
        seen.update(sib)
        cores.append(sib)
    return cores


def cuda_blocks(workdir: Path, model_path: str, device: str = "cuda") -> dict:
    """The block path against detect_scene, both on CUDA, with a trained model on a synthetic
    scene it did not see."""
    import numpy as np
    import torch

    from geodet.pipeline.blocks import plan_scene, prepare_detector, reduce_scene, run_block
    from geodet.pipeline.scenes import detect_scene
    from geodet.synthetic import make_scene
    from geodet.model import load_model

    if device == "cuda" and not torch.cuda.is_available():
        return {"skipped": "no CUDA"}
    scene = make_scene(workdir / "blocks.tif", workdir / "blocks.gpkg", size=2048, seed=7).image
    model = load_model(model_path)
    kw = dict(backend="torch", precision="fp32", score_threshold=0.05, device=device)
    t0 = time.perf_counter()
    ref = detect_scene(str(scene), model, progress=False, **kw)
    t_ref = time.perf_counter() - t0
    plan = plan_scene(str(scene), model, block_tiles=4, **kw)
    runner = prepare_detector(model, plan, device)
    t0 = time.perf_counter()
    got = reduce_scene(plan, [run_block(plan, b, runner, device) for b in plan.blocks])
    t_blocks = time.perf_counter() - t0
    cols = ["px_x0", "px_y0", "px_x1", "px_y1"]
    a, b = ref[cols].to_numpy(), got[cols].to_numpy()
    same_shape = a.shape == b.shape
    # as sets: both sorted by their boxes rounded to 0.01 px, then compared
    def by_box(x):
        r = np.round(x, 2)
        return x[np.lexsort(r.T[::-1])]

    sorted_diff = float(np.abs(by_box(a) - by_box(b)).max()) if same_shape and len(a) else None
    sa, sb = np.sort(ref["score"].to_numpy()), np.sort(got["score"].to_numpy())
    return {"rows_detect_scene": len(ref), "rows_blocks": len(got), "blocks": len(plan.blocks),
            "identical": bool(same_shape and np.array_equal(a, b)),
            "max_abs_px_diff_row_for_row": float(np.abs(a - b).max()) if same_shape and len(a) else None,
            "max_abs_px_diff_sorted": sorted_diff,
            "max_sorted_score_diff": float(np.abs(sa - sb).max()) if len(sa) == len(sb) and len(sa) else None,
            "report": {k: got.attrs["report"][k] for k in ("detections_before_stitch", "boxes_decided_in_reduce",
                                                           "boxes_sent_to_reduce")},
            "seconds": {"detect_scene": round(t_ref, 2), "blocks": round(t_blocks, 2)}}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--workdir", default="/tmp/geodet-bench/train-precision")
    ap.add_argument("--cuda-blocks", metavar="MODEL.pt", help="also check the block path on CUDA with this model")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from geodet.pipeline.backends import cpu_features

    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out or (Path(os.environ["OUT"]) / "train_precision.json" if os.environ.get("OUT")
                                 else wd / "train_precision.json"))
    feats = cpu_features()
    precisions = ["fp32", "bf16"] if feats["bf16"] else ["fp32"]
    cores = physical_cores()
    need = args.threads * len(precisions)
    if len(cores) < need:
        sys.exit(f"bench_train_precision: {len(cores)} physical cores, {need} needed")
    res = {"cpu": feats, "minutes": args.minutes, "threads": args.threads, "runs": {}, "cores": {}}
    procs = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for i, prec in enumerate(precisions):
        cpus = [c[0] for c in cores[i * args.threads:(i + 1) * args.threads]]  # one logical CPU per physical core
        res["cores"][prec] = cpus
        cmd = [sys.executable, str(HERE / "bench_accuracy_synthetic.py"),
               "--minutes", str(args.minutes), "--size", str(args.size), "--precision", prec,
               "--threads", str(args.threads), "--device", "cpu", "--workdir", str(wd / prec)]
        procs[prec] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                       preexec_fn=lambda cpus=cpus: os.sched_setaffinity(0, cpus))
    if args.cuda_blocks:
        rest = [c for core in cores[need:] for c in core]
        if rest:  # keep this process off the training runs' cores
            import torch

            os.sched_setaffinity(0, rest)
            torch.set_num_threads(len(rest))
        try:
            res["cuda_blocks"] = cuda_blocks(wd, args.cuda_blocks)
        except Exception as exc:  # noqa: BLE001 - recorded, the training runs go on
            res["cuda_blocks"] = {"error": f"{type(exc).__name__}: {exc}"}
        out_path.write_text(json.dumps(res, indent=1))
        print(json.dumps({"cuda_blocks": res["cuda_blocks"]}), file=sys.stderr, flush=True)
    for prec, p in procs.items():
        stdout, stderr = p.communicate()
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        res["runs"][prec] = json.loads(lines[-1]) if p.returncode == 0 and lines else {
            "error": f"exit {p.returncode}", "stderr_tail": stderr[-2000:]}
        out_path.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
