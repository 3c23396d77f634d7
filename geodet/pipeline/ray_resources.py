"""The Ray engine's resources and process: what each worker asks for, checked before Ray starts
and against the nodes once it has; ``ray.init`` that keeps geodet's SIGTERM handler."""

from __future__ import annotations

import logging

import numpy as np

from ..errors import GeodetError

log = logging.getLogger(__name__)


def init_keeping_sigterm(ray, address) -> None:
    """``ray.init``, with the process's SIGTERM handler (geodet's: stop, remove what is half-written,
    exit 130) put back: Ray's core installs one that dumps a stack and aborts (exit 134), leaving
    scene folders behind."""
    import signal
    import threading

    before = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             configure_logging=False)
    if before is not None:  # None: a handler Python did not install, which Python cannot put back
        signal.signal(signal.SIGTERM, before)


def check_worker_resources(workers, gpus_per_worker, cpus_per_worker) -> None:
    """Refuse, before anything is written or Ray starts, what Ray would refuse once started (or
    take for something else): a pool of at least one actor, each asking for zero or more CPUs and
    GPUs, in shares no finer than Ray's 0.0001."""
    import math

    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise GeodetError(f"workers must be a whole number of at least 1, got {workers!r}")
    for name, v in (("gpus_per_worker", gpus_per_worker), ("cpus_per_worker", cpus_per_worker)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v) or v < 0 \
                or 0 < v < 1e-4:
            raise GeodetError(f"{name} must be zero or a positive number (a share such as 0.5 of one, or a whole "
                              f"number), got {v!r}")


def check_fits(ray, gpus_per_worker: float, cpus_per_worker: float, own: bool) -> None:
    """Whether one actor fits on a node of the Ray instance: an actor asking for more CPUs or GPUs
    than any node has waits for ever, the job showing "blocks 0/N". Refused on a local instance
    geodet started (``own``: nothing will be added to it); on a cluster joined, which an
    autoscaler may grow, said once and waited for."""
    nodes = [n.get("Resources") or {} for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= cpus_per_worker and r.get("GPU", 0) >= gpus_per_worker for r in nodes):
        return
    total = ray.cluster_resources()
    ask = f"{cpus_per_worker:g} CPU(s) and {gpus_per_worker:g} GPU(s)"
    has = f"{total.get('CPU', 0):g} CPU(s) and {total.get('GPU', 0):g} GPU(s)"
    if own:
        raise GeodetError(f"each Ray worker asks for {ask}, but the local Ray instance has {has}: lower "
                          "--cpus-per-worker / --gpus-per-worker, or join a larger cluster with --address")
    log.warning("no node of the Ray cluster has the %s each worker asks for (it has %s in all): the job waits until "
                "nodes are added (an autoscaler); Ctrl-C stops it, or lower --cpus-per-worker / --gpus-per-worker",
                ask, has)


def remove_empty(paths) -> None:
    """The folders a refused job made, where still empty (innermost first)."""
    for p in paths:
        try:
            p.rmdir()
        except OSError:
            pass
