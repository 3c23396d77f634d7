"""Optimiser, learning-rate schedule and the training budget.

The schedule is a function of the run's *progress* (0 to 1), not of a nominal step count: with a
time limit the progress is the share of the training budget spent (the budget less what the final
validation and save will take), so the warm-up, the hold at the peak and the cosine decay span
the minutes the user gave, whatever this machine's step rate is. A step or epoch cap the user set
also counts: the progress is then the larger of the two shares.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import GeodetError

DECAY_SHARE = 0.3  # the LR holds at its peak, then follows a cosine to 0 over the run's last 30%
DEFAULT_EPOCHS = 10  # the run's length when neither a time limit nor a step or epoch cap is set
VALIDATION_SHARE = 0.1  # validation may use about this share of the budget
WARMUP_SHARE_MAX = 0.5  # a budget whose warm-up alone would take more than this share is refused


def lr_factor(step: int, warmup: int, progress: float) -> float:
    """Linear warm-up over ``warmup`` steps, a hold at the peak, then a cosine decay to 0 over the
    last ``DECAY_SHARE`` of the run's ``progress`` (0..1). Short budgets need the peak LR for most
    of the run (docs/benchmarks.md, "Accuracy")."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    d = (min(1.0, progress) - (1 - DECAY_SHARE)) / DECAY_SHARE
    return 1.0 if d <= 0 else 0.5 * (1 + math.cos(math.pi * d))


@dataclass
class Budget:
    """How long a run trains: a step cap (``total``, None for none) and a time limit (seconds,
    None for none), at least one of them set. Tracks the clock, the step rate and the cost of
    validation, and answers: how far along is the run, is it time to stop, is it time to validate.

    The time budget reserves what the last validation took (and the save after it), so that the
    final validation ends within the limit, not after it."""

    total: Optional[int]
    seconds: Optional[float]
    start_step: int = 0  # the step the run (or its resumption) started at: the clock and the rate count from it
    started: float = field(default_factory=time.perf_counter)
    val_seconds: float = 0.0  # the longest validation so far (with its save)
    last_val: float = 0.0  # clock time of the last validation's end
    validations: int = 0
    final_passes: float = 1.0  # the final validation costs this many validations (TTA's operating point: 9)
    _rate_t0: Optional[float] = None
    _rate_s0: int = 0

    def __post_init__(self):
        if self.total is None and self.seconds is None:
            raise GeodetError("a training run needs a step cap or a time limit")
        self.last_val = self.started

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def train_seconds(self) -> Optional[float]:
        """The seconds training may use: the limit less the final validation's reserve."""
        if self.seconds is None:
            return None
        return max(1.0, self.seconds - 1.2 * self.val_seconds * self.final_passes)

    def progress(self, step: int) -> float:
        p = 0.0
        if self.total is not None:  # a resumed run continues the capped run's schedule
            p = step / max(1, self.total)
        if self.seconds is not None:
            p = max(p, self.elapsed() / self.train_seconds())
        return min(1.0, p)

    def clock(self, step: int) -> float:
        """Seconds of a timed run's bar done: the clock, or as far as a step cap that ends the run
        first has gone (the bar reached 30-50% and jumped to the end where the cap came first)."""
        done = self.elapsed()
        if self.total is not None and self.seconds is not None:
            done = max(done, (step - self.start_step) / max(1, self.total - self.start_step) * self.seconds)
        return done

    def stop_reason(self, step: int) -> Optional[str]:
        if self.total is not None and step >= self.total:
            return "step cap"
        if self.seconds is not None and self.elapsed() >= self.train_seconds():
            return "time limit"
        return None

    def note_step(self, step: int) -> None:
        """Record the step rate from after the first steps (start-up costs excluded)."""
        if step - self.start_step == 3:
            self._rate_t0, self._rate_s0 = time.perf_counter(), step

    def steps_per_second(self, step: int) -> Optional[float]:
        if self._rate_t0 is None or step <= self._rate_s0:
            return None
        dt = time.perf_counter() - self._rate_t0
        return (step - self._rate_s0) / dt if dt > 0 else None

    def check_warmup(self, step: int, warmup: int) -> None:
        """Refuse a time limit too short to finish the warm-up: as soon as the measured step rate
        says so, or when the limit is reached inside the warm-up."""
        if self.seconds is None or step >= warmup:
            return
        rate = self.steps_per_second(step)
        if rate is None or step - self._rate_s0 < 3:
            if self.stop_reason(step) != "time limit":
                return
            rate = (step - self.start_step) / max(self.elapsed(), 1e-9)
        need = (warmup - self.start_step) / max(rate, 1e-9)
        if need > WARMUP_SHARE_MAX * self.seconds or self.stop_reason(step) == "time limit":
            raise GeodetError(
                f"a time limit of {self.seconds / 60:.3g} min is too short: the {warmup}-step warm-up alone takes about "
                f"{need / 60:.2g} min at this machine's {rate:.2g} steps/s; give --time-limit "
                f"{math.ceil(need / WARMUP_SHARE_MAX / 60 * 2) / 2:g} or more, or a smaller train.warmup_steps")

    def due_validation(self, final: bool) -> bool:
        """Validate at the end, and otherwise when the time since the last validation is at least
        ``1 / VALIDATION_SHARE`` times what a validation costs (about 10% of the time at most)."""
        if final or self.validations == 0:
            return True
        return time.perf_counter() - self.last_val >= self.val_seconds / VALIDATION_SHARE

    def note_validation(self, seconds: float) -> None:
        self.validations += 1
        self.val_seconds = max(self.val_seconds, seconds)
        self.last_val = time.perf_counter()


def make_optimizer(params, tc) -> torch.optim.Optimizer:
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.lr, momentum=0.9, weight_decay=tc.weight_decay)
    raise GeodetError(f"train.optimizer must be adamw or sgd, got '{tc.optimizer}'")


def step_cap(tc) -> Optional[int]:
    """The steps a run (``TrainConfig`` ``tc``) may take: the smaller of max_steps and epochs x
    steps_per_epoch where set (both are caps); none with a time limit (the clock ends the run);
    else the default number of epochs."""
    if tc.max_steps is not None:
        return tc.max_steps if tc.epochs is None else min(tc.max_steps, tc.epochs * tc.steps_per_epoch)
    if tc.epochs is not None:
        return tc.epochs * tc.steps_per_epoch
    if tc.time_limit_min is not None:
        return None
    return DEFAULT_EPOCHS * tc.steps_per_epoch
