"""The one progress helper: tqdm bars that stay silent when disabled or not on a terminal, or, for
programs that drive geodet (its QGIS provider), one JSON object per line on stderr.

The ``geodet`` command chooses the mode (``--progress bar|json|none``) with ``set_mode``; the
library itself defaults to bars and changes nothing in the caller's process on import.
"""

from __future__ import annotations

import json
import sys
import time

from tqdm.auto import tqdm

_MODE = {"mode": "bar"}
JSON_INTERVAL = 0.25  # seconds between JSON lines of one bar (the last line is always written)


def set_mode(mode: str) -> None:
    """``bar`` (tqdm), ``json`` (JSON lines on stderr) or ``none``."""
    if mode not in ("bar", "json", "none"):
        raise ValueError(f"progress mode must be bar, json or none, got {mode!r}")
    _MODE["mode"] = mode


def mode() -> str:
    return _MODE["mode"]


def progress_bar(total=None, desc: str = "", unit: str = "it", enabled: bool = True, **kwargs):
    """A tqdm bar (rate and time left included), a JSON-lines reporter with the same methods, or a
    silent bar when ``enabled`` is False or the mode is ``none``."""
    if enabled and _MODE["mode"] == "json":
        return JsonProgress(total=total, desc=desc, unit=unit, initial=kwargs.get("initial", 0))
    return tqdm(
        total=total, desc=desc, unit=unit, disable=not enabled or _MODE["mode"] == "none", file=sys.stderr,
        dynamic_ncols=True, mininterval=0.5, **kwargs,
    )


def message(text: str) -> None:
    """A line for a driving program in json mode (``{"message": ...}``); nothing otherwise."""
    if _MODE["mode"] == "json":
        sys.stderr.write(json.dumps({"message": text}) + "\n")
        sys.stderr.flush()


class JsonProgress:
    """tqdm's interface (``update``, ``n``, ``refresh``, ``set_postfix``, ``close``, a context
    manager) writing ``{"stage", "done", "total", "unit", "progress"}`` lines to stderr."""

    def __init__(self, total=None, desc: str = "", unit: str = "it", initial: int = 0):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.postfix: dict = {}
        self._last = 0.0
        self._closed = False
        self._emit(force=True)

    def _emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < JSON_INTERVAL:
            return
        self._last = now
        line = {"stage": self.desc, "done": self.n, "total": self.total, "unit": self.unit,
                "progress": round(min(1.0, self.n / self.total), 4) if self.total else None}
        if self.postfix:
            line["info"] = self.postfix
        sys.stderr.write(json.dumps(line) + "\n")
        sys.stderr.flush()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._emit()

    def refresh(self) -> None:
        self._emit()

    def set_postfix(self, **kwargs) -> None:
        self.postfix = {k: str(v) for k, v in kwargs.items()}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._emit(force=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
