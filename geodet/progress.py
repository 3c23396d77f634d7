"""The one progress helper, for all long work (detection, tiling, training, pretraining).

Modes (``set_mode``; the ``geodet`` command sets it from ``--progress`` and ``-q``):

- ``bar``: tqdm bars, for a terminal or a notebook;
- ``lines``: a plain line when a stage starts, a few times a minute, and when it ends (a
  redirected log gets a readable record, not carriage-return frames);
- ``json``: one JSON object per line on stderr, for programs that drive geodet (its QGIS provider);
- ``none``: nothing;
- ``auto`` (the default): ``bar`` on a terminal or in a notebook, ``lines`` otherwise.

A command says how many stages its work has (``plan``); each progress bar that is shown is the
next stage, and ``progress`` in a JSON line is the whole command's fraction, so a driving
program's bar goes from 0 to 1 once. JSON lines:

    {"stage": "detect a.tif", "stage_index": 1, "stage_count": 2, "done": 40, "total": 100,
     "unit": "tile", "stage_progress": 0.4, "progress": 0.2}

``stage_index`` counts from 1; ``stage_count`` is null when nobody planned the stages (then
``progress`` is the stage's own fraction). Other lines: ``{"message": ...}``. Importing this
module changes nothing in the caller's process.

A stop asked for by a driving program (``request_stop``: the ``geodet`` command's standard input
closed) is also checked at every progress update in the main thread, so it cannot be lost: a
Ctrl-C raised where a library swallows exceptions (a C extension probing an attribute) would
otherwise let the work run to its end.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from typing import Sequence

MODES = ("auto", "bar", "lines", "json", "none")
JSON_INTERVAL = 0.25  # seconds between JSON lines of one stage (the first and last are always written)
LINE_INTERVAL = 15.0  # seconds between plain lines: a few a minute

_STATE: dict = {"mode": "auto", "weights": None, "index": 0, "reported": 0.0}
_STOP: dict = {"asked": False, "told": []}  # a driver's stop; the SIGINT handlers already told of it


def request_stop() -> None:
    """Stop as on Ctrl+C, from a thread other than the main one (the stop-on-EOF watcher):
    interrupt the main thread now and, should that interrupt be lost, again at its next progress
    update. A SIGINT handler of the work's own (training's: finish the step, save, stop) is told
    once, never twice (a second one means stop at once); without one, every later update raises
    ``KeyboardInterrupt``. With SIGINT ignored or left to the OS (which would kill at once), only
    the updates stop the work."""
    handler = signal.getsignal(signal.SIGINT)
    _STOP["told"].append(handler)
    if callable(handler):
        if hasattr(signal, "pthread_kill"):  # a real SIGINT to the main thread: it also ends a blocking wait
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        else:  # Windows: Python's own interrupt (taken at the main thread's next Python step)
            import _thread

            _thread.interrupt_main()
    now = signal.getsignal(signal.SIGINT)
    if now is not handler:  # a handler installed meanwhile may be the one that got it: never tell it twice
        _STOP["told"].append(now)
    _STOP["asked"] = True  # last: an update in between must not tell the handler a second time


def _check_stop() -> None:
    """At a progress update: carry out a stop that was asked for and has not taken effect."""
    if not _STOP["asked"] or threading.current_thread() is not threading.main_thread():
        return
    handler = signal.getsignal(signal.SIGINT)
    if handler is signal.default_int_handler or not callable(handler):
        raise KeyboardInterrupt
    if not any(handler is h for h in _STOP["told"]):  # installed since: tell it once
        _STOP["told"].append(handler)
        handler(signal.SIGINT, None)


def set_mode(mode: str) -> None:
    """One of ``MODES``."""
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
    _STATE["mode"] = mode


def mode() -> str:
    """The mode in effect: ``auto`` resolved for where stderr goes now."""
    m = _STATE["mode"]
    if m == "auto":
        return "bar" if _interactive() else "lines"
    return m


def _interactive() -> bool:
    if "ipykernel" in sys.modules:  # a notebook: tqdm.auto draws a widget there
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def plan(stages: int | Sequence[float]) -> None:
    """The work ahead has ``stages`` stages (a count, or their relative weights, e.g. the expected
    seconds of each). Every shown progress bar after this is the next stage."""
    weights = [1.0] * int(stages) if isinstance(stages, int) else [float(w) for w in stages]
    if not weights or any(w <= 0 for w in weights):
        raise ValueError(f"stages must be a positive count or positive weights, got {stages!r}")
    _STATE.update(weights=weights, index=0, reported=0.0)


def finish(done: bool = True) -> None:
    """Forget the plan. When the work is ``done``, json mode first writes ``progress`` 1.0 if no
    stage did (a stage that was skipped, or work after the last bar)."""
    if done and _STATE["weights"] is not None and mode() == "json" and _STATE["reported"] < 1.0:
        _write_json({"stage": None, "stage_index": _STATE["index"], "stage_count": len(_STATE["weights"]),
                     "progress": 1.0})
    _STATE.update(weights=None, index=0, reported=0.0)


def _begin_stage() -> tuple[int, int | None]:
    """(index from 1, count or None) of a new stage; an unplanned extra stage grows the count."""
    _STATE["index"] += 1
    weights = _STATE["weights"]
    if weights is None:
        return _STATE["index"], None
    while len(weights) < _STATE["index"]:
        weights.append(weights[-1])
    return _STATE["index"], len(weights)


def _overall(index: int, fraction: float) -> float:
    """The whole plan's fraction at ``fraction`` of stage ``index``, never less than reported."""
    weights = _STATE["weights"]
    if weights is None:
        return fraction
    done = sum(weights[: index - 1]) + weights[index - 1] * fraction
    value = max(_STATE["reported"], min(1.0, done / sum(weights)))
    _STATE["reported"] = value
    return value


def progress_bar(total=None, desc: str = "", unit: str = "it", enabled: bool = True, **kwargs):
    """A progress reporter with tqdm's interface (``update``, ``n``, ``total``, ``refresh``,
    ``set_postfix``, ``close``, a context manager): a tqdm bar, plain lines, JSON lines, or a
    silent one when ``enabled`` is False or the mode is ``none``. A shown one is the next stage."""
    m = mode()
    if not enabled or m == "none":
        return Silent(total=total, initial=kwargs.get("initial", 0))
    index, count = _begin_stage()
    if m == "bar":
        from tqdm.auto import tqdm

        prefix = f"[{index}/{count}] " if count and count > 1 else ""
        return _bar_class(tqdm)(total=total, desc=prefix + desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                                mininterval=0.5, **kwargs)
    cls = JsonProgress if m == "json" else LineProgress
    return cls(total=total, desc=desc, unit=unit, initial=kwargs.get("initial", 0), index=index, count=count)


_BARS: dict = {}  # tqdm class (tqdm.auto's: a notebook's or a terminal's) -> its subclass below


def _bar_class(tqdm):
    """``tqdm``, checking for a stop at every update and refresh (made when first needed: tqdm
    is imported late; its monitor thread's refreshes are not the main thread's, so never stop)."""
    if tqdm not in _BARS:
        class Bar(tqdm):
            def update(self, n=1):
                _check_stop()
                return super().update(n)

            def refresh(self, *args, **kwargs):
                _check_stop()
                return super().refresh(*args, **kwargs)

        _BARS[tqdm] = Bar
    return _BARS[tqdm]


def message(text: str) -> None:
    """A line for a driving program in json mode (``{"message": ...}``); nothing otherwise."""
    if mode() == "json":
        _write_json({"message": text})


def _write_json(obj: dict) -> None:
    sys.stderr.write(json.dumps(obj) + "\n")
    sys.stderr.flush()


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Silent:
    """tqdm's interface, doing nothing (counts kept for callers that read ``n``)."""

    def __init__(self, total=None, initial: int = 0, **_):
        self.total, self.n = total, initial

    def update(self, n: int = 1) -> None:
        _check_stop()
        self.n += n

    def refresh(self) -> None:
        _check_stop()  # timed work sets ``n`` and refreshes

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _Reporter(Silent):
    """A stage that writes a report at its start, at most every ``interval`` seconds, and at close."""

    interval = 1.0

    def __init__(self, total=None, desc: str = "", unit: str = "it", initial: int = 0, index: int = 1,
                 count: int | None = None):
        super().__init__(total=total, initial=initial)
        self.desc, self.unit, self.index, self.count = desc, unit, index, count
        self.postfix: dict = {}
        self._start = time.monotonic()
        self._last = 0.0
        self._closed = False
        self._emit(force=True)

    def fraction(self) -> float | None:
        return min(1.0, max(0.0, self.n / self.total)) if self.total else None

    def _emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            self.write(now - self._start)

    def write(self, elapsed: float) -> None:
        raise NotImplementedError

    def update(self, n: int = 1) -> None:
        _check_stop()
        self.n += n
        self._emit()

    def refresh(self) -> None:
        _check_stop()
        self._emit()

    def set_postfix(self, **kwargs) -> None:
        self.postfix = {k: str(v) for k, v in kwargs.items()}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._emit(force=True)


class JsonProgress(_Reporter):
    interval = JSON_INTERVAL

    def write(self, elapsed: float) -> None:
        frac = self.fraction()
        line = {"stage": self.desc, "stage_index": self.index, "stage_count": self.count, "done": self.n,
                "total": self.total, "unit": self.unit,
                "stage_progress": None if frac is None else round(frac, 4),
                "progress": None if frac is None else round(_overall(self.index, frac), 4)}
        if self.postfix:
            line["info"] = self.postfix
        _write_json(line)


class LineProgress(_Reporter):
    interval = LINE_INTERVAL

    def write(self, elapsed: float) -> None:
        frac = self.fraction()
        head = f"[{self.index}/{self.count}] " if self.count and self.count > 1 else ""
        done = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        if self._closed:
            state = f"ended after {_clock(elapsed)}"
        elif frac:
            state = f"{_clock(elapsed)} elapsed, ~{_clock(elapsed * (1 - frac) / frac)} left"
        else:
            state = f"{_clock(elapsed)} elapsed"
        pct = f" ({100 * frac:.0f}%)" if frac is not None else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        sys.stderr.write(f"{head}{self.desc or 'working'}: {done}{pct}, {state}{extra}\n")
        sys.stderr.flush()
