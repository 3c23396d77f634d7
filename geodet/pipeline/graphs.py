"""A function of one CUDA batch captured as a CUDA graph and replayed.

A small network's batch is a few hundred short kernels; launched one by one from Python, the
launches take about as long as the card takes to run them. A graph replays them all in one
launch. Only fixed shapes can be captured: a smaller batch (a scene's last) is padded to the
captured size, and its extra rows are dropped from the outputs.
"""

from __future__ import annotations

import logging

import torch

from ..errors import brief

log = logging.getLogger(__name__)


def cudnn_autotune():
    """cuDNN's algorithm search for this call's convolutions (fixed shapes: it pays), without
    changing the process's settings."""
    b = torch.backends.cudnn
    return b.flags(enabled=b.enabled, benchmark=True, deterministic=b.deterministic, allow_tf32=b.allow_tf32)


class GraphedBatch:
    """``fn(x)`` (a tuple of tensors whose first dimension is the batch's) captured for inputs
    shaped like ``example``; call it with a batch of that shape or a smaller one."""

    def __init__(self, fn, example: torch.Tensor, warmup: int = 3):
        self.static_in = example.clone()  # keeps the example's memory format (channels_last)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with cudnn_autotune():
            with torch.cuda.stream(side):  # warm-up (allocations, cuDNN's search) off the capture
                for _ in range(warmup):
                    fn(self.static_in)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = fn(self.static_in)

    @property
    def batch_size(self) -> int:
        return int(self.static_in.shape[0])

    def fits(self, x: torch.Tensor) -> bool:
        return x.shape[1:] == self.static_in.shape[1:] and x.shape[0] <= self.batch_size and x.dtype == self.static_in.dtype

    def __call__(self, x: torch.Tensor) -> tuple:
        n = int(x.shape[0])
        self.static_in[:n].copy_(x)
        if n < self.batch_size:
            self.static_in[n:].zero_()
        self.graph.replay()
        # views of the graph's outputs: read them (on this stream) before the next replay
        return tuple(o[:n] for o in self.static_out)


def try_capture(fn, example: torch.Tensor, what: str):
    """A ``GraphedBatch``, or None (with a warning) when ``fn`` cannot be captured here."""
    try:
        return GraphedBatch(fn, example)
    except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager launches
        log.warning("%s: CUDA graph capture failed (%s: %s); launching its kernels one by one", what,
                    type(exc).__name__, brief(exc, 200))
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - an invalidated capture may report again here; eager runs go on
            log.debug("synchronising after the failed capture", exc_info=True)
        return None
