"""Optimiser and learning-rate schedule."""

from __future__ import annotations

import math

import torch

from ..errors import GeodetError

DECAY_SHARE = 0.3  # the LR holds at its peak, then follows a cosine to 0 over the run's last 30%


def lr_lambda(warmup: int, total: int, time_fraction=None):
    """Linear warm-up, a hold at the peak, then a cosine decay over the last ``DECAY_SHARE`` of the
    run. With a time limit the run's progress is the larger of the step and the time fraction, so
    the decay completes within the budget. Short budgets need the peak LR for most of the run."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        t = (step - warmup) / max(1, total - warmup)
        if time_fraction is not None:
            t = max(t, time_fraction())
        d = (min(1.0, t) - (1 - DECAY_SHARE)) / DECAY_SHARE
        return 1.0 if d <= 0 else 0.5 * (1 + math.cos(math.pi * d))

    return f


def make_optimizer(params, tc) -> torch.optim.Optimizer:
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.lr, momentum=0.9, weight_decay=tc.weight_decay)
    raise GeodetError(f"train.optimizer must be adamw or sgd, got '{tc.optimizer}'")
