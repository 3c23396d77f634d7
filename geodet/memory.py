"""Process-wide memory tuning, applied only when asked for (the ``geodet`` command asks).

Importing geodet changes nothing in the user's process; ``tune_memory()`` is the one explicit call
that does, for programs that stream very large scenes through the Python API.
"""

from __future__ import annotations

import sys

_TUNED = False


def tune_memory() -> bool:
    """Keep tile-sized buffers on mmap so they go back to the OS when freed (glibc only).

    glibc raises its mmap threshold after large frees, after which every per-tile temporary lands
    on a heap that never shrinks: peak memory then grows with the number of tiles (measured: 3.5 GB
    vs 0.8 GB for a 16000^2 scene). Fixing the threshold keeps memory flat in the scene size.

    It has a price: every large tensor is then mapped and unmapped each time, which measured 15%
    slower detection and 41% slower training on this project's 2-core CPU (docs/benchmarks.md).
    It changes the allocator of the whole process, so geodet never does it on import: ``geodet
    detect`` and ``geodet tile`` call it (they stream whole scenes); training does not; API users
    streaming very large scenes may. Returns whether it applied.
    """
    global _TUNED
    if _TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(-3, 1 << 20) == 1  # M_MMAP_THRESHOLD: 1 MiB, fixed
        ok &= libc.mallopt(-1, 1 << 24) == 1  # M_TRIM_THRESHOLD: return heap tops over 16 MiB
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    _TUNED = bool(ok)
    return _TUNED
