"""A batch on its way through a detector: the reader's tiles to the model's input on the device,
and the detections back to the host in one copy.

A detector may split its work in two (``start``: the network core, asynchronous on CUDA;
``finish``: thresholds, NMS and the copy to the host), so that the per-tile loop can hand out
the previous batch's tiles while the card runs the next core. Detections come back packed, one
float32 row ``(x0, y0, x1, y1, score, label, tile)`` per box, in one copy per batch; on CUDA the
copy goes, without blocking, into pinned memory, on a stream of its own (beside the next batch's
core), and the host waits for it only when it reads the tiles.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

UINT8_SCALE = float(np.float32(1 / 255))  # Scene.scale's factor: x * it is bit for bit the host's scaling


@dataclass
class PendingBatch:
    """A batch's detections, packed ``[N, 7]`` on the host (pinned, still arriving on CUDA until
    ``ready`` has passed), tile after tile."""

    host: torch.Tensor
    n_tiles: int
    ready: object = None  # a CUDA event recorded after the copy

    def per_tile(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(boxes float32 [n, 4], scores float32 [n], labels int64 [n])`` per tile."""
        if self.ready is not None:
            self.ready.synchronize()
        a = self.host.numpy()
        counts = np.bincount(a[:, 6].astype(np.int64), minlength=self.n_tiles)
        cuts = np.cumsum(counts)[:-1]
        return list(zip(np.split(a[:, :4], cuts), np.split(a[:, 4], cuts), np.split(a[:, 5].astype(np.int64), cuts)))


def pack(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, tiles: torch.Tensor,
         n_tiles: int) -> PendingBatch:
    """Flat detections (tile after tile) packed into one float32 array and sent to the host: on
    CUDA without blocking, into pinned memory (the event says when it has arrived)."""
    packed = torch.cat([boxes.reshape(-1, 4).float(), scores.reshape(-1, 1).float(), labels.reshape(-1, 1).float(),
                        tiles.reshape(-1, 1).float()], 1)
    if packed.device.type == "cuda":
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        side = _copy_stream(packed.device)
        side.wait_stream(torch.cuda.current_stream(packed.device))  # after the kernels that made it
        with torch.cuda.stream(side):  # beside the next batch's core, not after it
            host.copy_(packed, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(side)
        packed.record_stream(side)  # its memory is not reused before the copy is done
        return PendingBatch(host, n_tiles, ready)
    return PendingBatch(packed, n_tiles)


@functools.lru_cache(maxsize=None)
def _copy_stream(device: torch.device):
    """One stream per card for the copies to the host."""
    return torch.cuda.Stream(device=device)


def pack_outputs(outputs: Sequence[dict]) -> PendingBatch:
    """A plain detector's ``[{"boxes", "scores", "labels"}]`` packed the same way (synchronously:
    they may be numpy, or on any device)."""
    if not outputs:
        return PendingBatch(torch.zeros((0, 7)), 0)
    parts = [[torch.as_tensor(o[k]).cpu() for k in ("boxes", "scores", "labels")] for o in outputs]
    counts = torch.tensor([len(p[1].reshape(-1)) for p in parts])
    tiles = torch.repeat_interleave(torch.arange(len(outputs)), counts)
    cat = [torch.cat([p[i].reshape(-1, 4) if i == 0 else p[i].reshape(-1) for p in parts]) for i in range(3)]
    return pack(*cat, tiles, len(outputs))


def model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The reader's batch as the detector takes it, on ``device``: float32 in 0..1 (uint8 tiles,
    read raw to move a quarter of the bytes, are scaled here exactly as the host scales them),
    channels_last on CUDA."""
    x = images.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    if x.dtype == torch.uint8:
        x = x.float().mul_(UINT8_SCALE)
    return x


def _split(detector) -> bool:
    """Whether ``detector`` is one of geodet's backends, which split a batch in two (any other
    callable is only the detector protocol, whatever else it has)."""
    return getattr(detector, "backend", None) is not None and hasattr(detector, "start") and hasattr(detector, "finish")


def start_batch(detector, images: torch.Tensor, device: torch.device):
    """The first half of a batch: ``detector.start`` for geodet's backends (the core, asynchronous
    on CUDA), else the whole call (plain callables get autocast on CUDA)."""
    if _split(detector):
        return detector.start(images)
    plain = getattr(detector, "backend", None) is None
    with torch.inference_mode(), torch.autocast(device.type, enabled=plain and device.type == "cuda"):
        return detector(images)


def finish_batch(detector, started) -> PendingBatch:
    """The second half: the batch's detections on their way to the host."""
    if _split(detector):
        return detector.finish(started)
    return pack_outputs(started)
