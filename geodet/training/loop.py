"""The training loop's parts: the state of a run, one optimiser step, the clock that tells the
schedule how far along the run is and when to stop, the precision it trains in, the signals that
stop it politely, and how much of the CPU it got.

With a time limit the clock is the schedule: the learning rate's warm-up, hold and decay span the
minutes given (``schedule.Budget``); epochs and steps cap the run only when set. With several
ranks, rank 0's clock rules them all, so every rank follows one schedule and stops at one step.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import GeodetError
from ..model import GeodetModel
from .schedule import Budget

log = logging.getLogger(__name__)
STOPS = (None, "step cap", "time limit")  # why a run ends; a signal's name ends it otherwise


@dataclass
class Run:
    """What one training run works with, made by ``Trainer.setup``."""

    model: GeodetModel
    train_model: torch.nn.Module  # the model, or its DDP wrapper
    params: list
    opt: torch.optim.Optimizer
    sched: Optional[torch.optim.lr_scheduler.LambdaLR]
    scaler: torch.amp.GradScaler
    device: torch.device
    total: Optional[int]  # the step cap; None when only the clock ends the run
    step: int = 0
    epoch: int = 0
    best: float = -1.0
    autocast_dtype: Optional[torch.dtype] = None  # the network's forward under autocast of this type
    budget: Optional[Budget] = None
    progress: float = 0.0  # share of the run done (0..1), the LR schedule's clock
    teacher: Optional[object] = None  # self-training's EMA teacher (selftrain.EmaTeacher)
    rounds_done: int = 0
    last_ap50: float = 0.0  # the latest validation's
    data: Optional[object] = None  # the chip dataset (a self-training round gives it the teacher's boxes)
    given_back: bool = False  # whether the validation strips train again (train.val_give_back)
    val_areas: Optional[list] = None  # the validation areas [x0, y0, x1, y1] (kept in last.pt)


class CpuShare:
    """The share of wall time x torch threads that this process spent on the CPU since creation:
    near 1 when training had its cores, far lower when other programs took them."""

    def __init__(self):
        import resource

        self._t = time.perf_counter()
        r = resource.getrusage(resource.RUSAGE_SELF)
        self._cpu = r.ru_utime + r.ru_stime

    def share(self) -> float | None:
        import resource

        wall = time.perf_counter() - self._t
        r = resource.getrusage(resource.RUSAGE_SELF)
        threads = max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
        return None if wall <= 0 else (r.ru_utime + r.ru_stime - self._cpu) / (wall * threads)


def training_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast type for training: fp16 on CUDA, bf16 on CPUs with native bf16, else none."""
    from ..pipeline.backends import cpu_features

    precision = (precision or "auto").lower()
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise GeodetError(f"train.precision must be auto, fp32, bf16 or fp16, got '{precision}'")
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16":
        raise GeodetError("train.precision fp16 is for CUDA; on a CPU use bf16 (CPUs with native bf16) or fp32")
    native = cpu_features()["bf16"]
    if precision == "bf16" and not native:
        raise GeodetError("train.precision bf16: this CPU has no native bf16 (AVX512_BF16 or AMX) and geodet does not "
                          "emulate it: use fp32 or auto")
    return torch.bfloat16 if native else None


class StopSignals:
    """SIGINT and SIGTERM ask the run to stop after the current step (``requested`` names the
    signal); a second one stops at once. Installed only in the main thread."""

    def __init__(self):
        self.requested: Optional[str] = None
        self._old: dict = {}

    def _handler(self, signum, _frame):
        if self.requested is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: stopping after this step and saving last.pt", self.requested)

    def __enter__(self):
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for s in old:
                signal.signal(s, self._handler)
            self._old = old
        except ValueError:  # not the main thread
            self._old = {}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def clock(r: Run, warmup: int, world: int) -> Optional[str]:
    """Update the run's progress and say whether the budget is spent. Rank 0's clock rules every
    rank (one small broadcast per step), so all ranks follow one schedule and stop at the same step."""
    b = r.budget
    b.note_step(r.step)
    if world == 1:  # (several ranks would have to agree to stop: they share rank 0's clock instead)
        b.check_warmup(r.step, warmup)
    values = [b.progress(r.step), float(STOPS.index(b.stop_reason(r.step)))]
    if world > 1:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=r.device)
        dist.broadcast(t, 0)
        values = t.tolist()
    r.progress = values[0]
    return STOPS[int(values[1])]


def train_step(r: Run, images, targets, grad_clip: float, warmup: int, world: int) -> dict:
    """One optimiser step; returns the losses as floats (and the budget's stop reason under
    ``"stop"``, None to go on)."""
    images = images.to(r.device, non_blocking=True)
    targets = [{k: v.to(r.device) for k, v in t.items()} for t in targets]
    with torch.autocast(r.device.type, dtype=r.autocast_dtype or torch.float32, enabled=r.autocast_dtype is not None):
        losses = r.train_model(images, targets)
        loss = losses["classification"] + losses["bbox_regression"]
    if not torch.isfinite(loss):
        raise GeodetError(f"training diverged at step {r.step} (loss {loss.item()}): lower the learning rate (--lr, "
                          "or train.lr in a config)")
    r.opt.zero_grad(set_to_none=True)
    r.scaler.scale(loss).backward()
    r.scaler.unscale_(r.opt)
    torch.nn.utils.clip_grad_norm_(r.params, grad_clip)
    r.scaler.step(r.opt)
    r.scaler.update()
    if r.teacher is not None:
        r.teacher.update(r.model)
    r.step += 1
    stop = clock(r, warmup, world)
    r.sched.step()
    return {"loss": loss.item(), "classification": losses["classification"].item(),
            "bbox_regression": losses["bbox_regression"].item(), "stop": stop}
