"""Tile reading in worker processes that write each batch into a ring of shared batch buffers.

A DataLoader moves every batch between processes through a shared-memory segment made for it
(created, mapped, faulted in and unlinked once per batch) and, on CUDA, copies it again into
pinned memory in a thread of the main process: on a 2-core CPU that transport alone carried about
6,000 uint8 256-px tiles a second, a third of what two processes read (docs/benchmarks.md, "The
tile reader"). Here the workers are forked once per scene, read a batch's tiles straight into a
slot of one shared anonymous mapping (no /dev/shm file, so a container's small /dev/shm does not
limit it), and send back only the slot number and the tiles' descriptions. The batches, their
order and their pixels are ``read_batches``'s (tested).

Used where the platform forks cheaply and safely (Linux); elsewhere ``tile_batches`` keeps the
DataLoader.
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import sys
import time

import numpy as np

log = logging.getLogger(__name__)

RING_MAX_BYTES = 1 << 30  # at most 1 GiB of batch buffers (fewer batches read ahead past that)
POLL_S = 1.0  # how often a wait for a batch checks that the workers are alive
STOP_GRACE_S = 1.0  # a reader still busy this long after being asked to stop is terminated


def ring_available() -> bool:
    """Whether this platform runs the ring reader (Linux: fork and shared anonymous mappings)."""
    return sys.platform.startswith("linux")


def _worker(scene, grid, ring, stop, tasks, results, raw: bool, min_valid_fraction: float, parent: int,
            die_with_parent: bool) -> None:
    """One reader process: takes ``(batch, slot, indices)`` from ``tasks`` until ``None`` (or
    ``stop[0]`` is set), reads the tiles into ``ring[slot]`` (kept tiles first, as
    ``read_batches`` does) and reports ``(batch, slot, tiles, skipped, failed, error)``."""
    import signal

    from ..errors import ReadError
    from ..io.scene import gdal_env

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the CLI's handler: terminate() ends a reader at once
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent around the fork
    if die_with_parent:
        _die_with_parent(parent)
    # exit without flushing unread results when stopped early (the main process reads them all otherwise)
    results.cancel_join_thread()
    with gdal_env():
        while True:
            task = tasks.get()
            if task is None or stop[0]:
                return
            k, slot, indices = task
            tiles, skipped, failed = [], [], []
            try:
                out = ring[slot]
                for i in indices:
                    if stop[0]:
                        return
                    tile = grid.tile(i)
                    try:
                        _, frac = scene.read_tile(tile, out=out[len(tiles)], raw=raw)
                    except ReadError as exc:
                        failed.append((tile, str(exc), exc.info))
                        continue
                    (tiles if frac > min_valid_fraction else skipped).append(tile)
                results.put((k, slot, tiles, skipped, failed, None))
            except Exception as exc:  # reported to the main process, which raises it
                results.put((k, slot, None, None, None, _portable(exc)))


def _from_main_thread() -> bool:
    """Whether the ring starts in the main thread: the kernel's parent-death signal follows the
    thread that forked, so readers forked from another thread (which may end while the process
    lives on) do without it; the main process stops them itself."""
    import threading

    return threading.current_thread() is threading.main_thread()


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this reader when the process that started it dies (the OOM killer, a
    firm kill of QGIS's child or a Ray actor): otherwise it would wait for tasks for ever, holding
    the ring and the scene. A parent already gone before this is noticed here."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it can cross to the main process (GeodetError can): it pickles and rebuilds from
    its reduction (a copy, so nothing is unpickled here), else a RuntimeError with its text."""
    import copy
    import pickle

    try:
        pickle.dumps(exc)
        copy.deepcopy(exc)  # rebuilt as unpickling would: an exception whose __init__ the args do not fit fails
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def ring_slots(workers: int, prefetch: int, slot_bytes: int) -> int:
    """Batch buffers: ``prefetch`` per worker and two held by the caller (the batch being run
    and the one before it), fewer read ahead where that would pass ``RING_MAX_BYTES``."""
    want = workers * prefetch + 2
    fit = max(workers + 2, RING_MAX_BYTES // max(1, slot_bytes))
    return min(want, fit)


def ring_batches(scene, grid, batch_size: int, workers: int, min_valid_fraction: float = 0.0, indices=None,
                 on_read_error: str = "fail", raw: bool = False, pin: bool = False, prefetch: int = 2):
    """Batches ``(images [n, C, T, T] or None, tiles, skipped, failed)`` read by ``workers``
    processes, in order, equal to ``read_batches``'s (``raw``: uint8 tiles for scaling on a GPU).

    ``images`` is a view of a shared slot, valid until the batch after the next is asked for;
    with ``pin`` (CUDA) it is copied into page-locked memory at once, so the host-to-device
    copy may run asynchronously while the slot is reused. A worker that dies (killed, out of
    memory) raises ``GeodetError`` instead of waiting forever; leaving the loop early (an
    error, a break, Ctrl-C) stops the workers."""
    import torch

    from ..errors import ReadError
    from .reader import _check_policy

    _check_policy(on_read_error)
    scene.stats  # computed once here, not in every worker
    indices = list(range(len(grid))) if indices is None else list(indices)
    batch_size = max(1, min(int(batch_size), len(indices)))  # slots no larger than the tiles that run
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if not batches:
        return
    ring = None
    try:
        ring = _Ring(scene, grid, batches, batch_size, workers, raw, min_valid_fraction, prefetch)
        ring.issue()
        for k in range(len(batches)):
            slot, tiles, skipped, failed, error = ring.wait_for(k)
            if error is not None:
                raise error
            if on_read_error == "fail" and failed:
                _tile, message, info = failed[0]
                raise ReadError(message, info)
            images = torch.from_numpy(ring.slots[slot, : len(tiles)]) if tiles else None
            if pin and images is not None:
                images = images.pin_memory()  # the slot is free again at once
                ring.free.append(slot)
            else:
                ring.held.append(slot)
            yield images, tiles, skipped, failed
            # asked for the next batch: the one before this is done with (one batch in flight)
            while len(ring.held) > 1:
                ring.free.append(ring.held.pop(0))
            ring.issue()
    finally:
        if ring is not None:
            ring.stop()


class _Ring:
    """The shared batch buffers, the worker processes and the bookkeeping of ``ring_batches``:
    which slots are free, held by the caller, or being read; which batches are issued or done."""

    def __init__(self, scene, grid, batches, batch_size, workers, raw, min_valid_fraction, prefetch):
        import multiprocessing as mp

        dtype = np.uint8 if raw else np.float32
        shape = (batch_size, scene.count, grid.tile_size, grid.tile_size)
        slot_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        workers = max(1, min(int(workers), len(batches)))
        n_slots = min(ring_slots(workers, prefetch, slot_bytes), len(batches) + 2)
        # MAP_SHARED | MAP_ANONYMOUS: inherited by the forked workers, outside /dev/shm
        self.buf = mmap.mmap(-1, n_slots * slot_bytes)
        self.slots = np.frombuffer(self.buf, dtype).reshape((n_slots, *shape))
        self.stop_flag = mmap.mmap(-1, 1)  # set to 1: readers end after their current tile
        ctx = mp.get_context("fork")  # each worker opens its own handle (``Scene.handle`` reopens after a fork)
        self.tasks, self.results = ctx.SimpleQueue(), ctx.Queue()
        self.procs = [ctx.Process(target=_worker, name=f"geodet-reader-{w}", daemon=True,
                                  args=(scene, grid, self.slots, self.stop_flag, self.tasks, self.results, raw,
                                        min_valid_fraction, os.getpid(), _from_main_thread()))
                      for w in range(workers)]
        import signal

        # a Ctrl-C between a fork and the reader's own handlers waits, blocked, and is then ignored there
        # (a Ctrl-C held back meanwhile is raised as the mask is restored: still inside the try)
        try:
            masked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                for p in self.procs:
                    p.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, masked)
        except BaseException:
            self.stop()  # the readers started so far (the caller's ``finally`` has no ring yet)
            raise
        self.batches = batches
        self.free, self.held = list(range(n_slots)), []
        self.issued, self.done = 0, {}

    def issue(self) -> None:
        """Hand the next batches to the workers, one per free slot."""
        while self.free and self.issued < len(self.batches):
            self.tasks.put((self.issued, self.free.pop(0), self.batches[self.issued]))
            self.issued += 1

    def wait_for(self, k: int):
        """Batch ``k``'s ``(slot, tiles, skipped, failed, error)``, checking meanwhile that the
        workers are alive."""
        from ..errors import GeodetError

        while k not in self.done:
            try:
                item = self.results.get(timeout=POLL_S)
            except queue.Empty:
                dead = [p for p in self.procs if p.exitcode is not None]
                if dead:
                    code = dead[0].exitcode
                    why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                    raise GeodetError(
                        f"a tile-reading process stopped ({why}; out of memory?): run again, or with --workers 0 "
                        "to read tiles in the main process") from None
                continue
            self.done[item[0]] = item[1:]
        return self.done.pop(k)

    def stop(self) -> None:
        """End the readers: at once after their current tile when batches are left (an error, a
        break, Ctrl-C), else as they go idle; any still running after ``STOP_GRACE_S`` are
        terminated, then killed."""
        self.stop_flag[0] = 1
        started = [p for p in self.procs if p.pid is not None]
        for p in started:
            if p.exitcode is None:
                try:
                    self.tasks.put(None)
                except (OSError, ValueError):
                    break
        deadline = time.monotonic() + STOP_GRACE_S
        for p in started:
            p.join(max(0.0, deadline - time.monotonic()))
        for sig in ("terminate", "kill"):
            left = [p for p in started if p.exitcode is None]
            for p in left:
                getattr(p, sig)()
            for p in left:
                p.join(1.0)
