"""Training on a Ray cluster: geodet's own distributed training loop (DDP, a shard of chips per
rank, checkpoints by rank 0) under Ray Train's ``TorchTrainer``, which starts the workers, sets up
the process group (NCCL on GPUs, gloo on CPUs) and restarts the group after a failure.

A restarted attempt resumes from the run folder's ``last.pt``, so the run folder must be on
storage every worker reaches (a shared file system) for a multi-node run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import GeodetError


def _train_loop(config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    from .trainer import Trainer

    out = Path(config["out"])
    # a restarted attempt continues from the last checkpoint instead of starting over
    resume = bool(config["resume"]) or (out / "last.pt").is_file()
    # without a checkpoint, what the folder holds is this job's (the driver refused or replaced an
    # older run): an attempt killed before its first checkpoint leaves metrics.csv to replace
    path = Trainer(config["cfg"], out, resume=resume, progress=False, overwrite=not resume).run()
    world = dist.get_world_size() if dist.is_initialized() else 1
    info = {"model": str(path), "world_size": world, "resumed": resume}
    if int(os.environ.get("RANK", "0")) == 0:  # the driver reads what rank 0 did
        tmp = out / ".ray_train.json.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, out / "ray_train.json")
    ray.train.report(info)


def train_ray(cfg, out_dir, *, address: str | None = None, workers: int = 2, gpus_per_worker: float = 0,
              cpus_per_worker: float = 1, max_failures: int = 2, resume: bool = False) -> dict:
    """Train ``cfg`` into ``out_dir`` with ``workers`` Ray Train workers (DDP). Without
    ``address`` a local Ray instance is started. A worker failure restarts the group up to
    ``max_failures`` times, resuming from ``out_dir/last.pt``. Returns rank 0's record (also in
    ``out_dir/ray_train.json``): ``{"model", "world_size", "resumed"}``."""
    from ..pipeline.ray_engine import require_ray

    ray = require_ray()
    try:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError:
        raise GeodetError("geodet train --engine ray needs Ray Train: pip install 'geodet[ray]'") from None
    from ..pipeline.ray_resources import check_fits, check_worker_resources, init_keeping_sigterm

    check_worker_resources(workers, gpus_per_worker, cpus_per_worker)
    out = Path(out_dir).resolve()
    started = not ray.is_initialized()
    if started:
        init_keeping_sigterm(ray, address)
    try:
        check_fits(ray, gpus_per_worker, cpus_per_worker, own=started and not address)
        out.mkdir(parents=True, exist_ok=True)
        resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"cfg": cfg, "out": str(out), "resume": resume},
            scaling_config=ScalingConfig(num_workers=int(workers), use_gpu=bool(gpus_per_worker),
                                         resources_per_worker=resources),
            run_config=RunConfig(name="geodet-train", storage_path=str(out / "ray"),
                                 failure_config=FailureConfig(max_failures=int(max_failures))),
        )
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps the workers' errors; one line for the user
        from .trainer import Interrupted

        cause = exc
        while getattr(cause, "__cause__", None) is not None and not isinstance(cause, (GeodetError, Interrupted)):
            cause = cause.__cause__
        if isinstance(cause, (GeodetError, Interrupted)):
            raise cause from None
        msg = str(exc).strip().splitlines()
        raise GeodetError(f"training on Ray failed: {type(exc).__name__}: {msg[0][:300] if msg else ''}") from None
    finally:
        if started:
            ray.shutdown()
    if result.error is not None:
        raise GeodetError(f"training on Ray failed: {result.error}")
    try:
        return json.loads((out / "ray_train.json").read_text())
    except (OSError, ValueError):
        raise GeodetError(f"training on Ray finished without rank 0's record ({out / 'ray_train.json'})") from None
