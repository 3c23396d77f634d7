"""What every ``geodet`` command shares: the parser that errs in one line, argument types,
logging, progress and exit codes."""

from __future__ import annotations

import argparse
import math
import logging
import re
import sys

from ..errors import GeodetError  # noqa: F401  (the commands raise it)

EXIT_PARTIAL = 3  # output written, but some tiles or scenes could not be read (listed in the report)
PRESETS_HELP = "YAML config (a path, or a built-in preset: cpu, small_objects, trees, default, stock)"
FORMATS = ["geojson", "gpkg", "fgb", "shp", "csv", "parquet"]


def bands(text: str) -> list[int]:
    try:
        values = [int(b) for b in text.replace(" ", "").split(",") if b]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bands must be comma-separated numbers such as 1,2,3, got '{text}'") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"band numbers start at 1, got '{text}'")
    return values


def int_at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum``, with a one-line message otherwise."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be a positive number, got {v}" if minimum > 0 else f"must be zero or positive, got {v}")
        return v

    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def seed(text: str) -> int:
    """An argparse type: a random seed, a whole number from 0 to 2**32 - 1 (numpy's range)."""
    v = nonneg_int(text)
    if v > 2**32 - 1:
        raise argparse.ArgumentTypeError(f"must be at most {2**32 - 1}, got {v}")
    return v


def number(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite number (never nan or inf) in the range given, with a one-line
    message otherwise."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
        if (low is not None and (v < low or low_open and v == low)) or \
                (high is not None and (v > high or high_open and v == high)):
            lo = "" if low is None else f"{'more than' if low_open else 'at least'} {low:g}"
            hi = "" if high is None else f"{'less than' if high_open else 'at most'} {high:g}"
            raise argparse.ArgumentTypeError(f"must be {' and '.join(x for x in (lo, hi) if x)}, got {v:g}")
        return v

    return parse


finite = number()
positive = number(0, low_open=True)
share = number(0, 1)  # a fraction from 0 to 1


def ray_amount(text: str) -> float:
    """An argparse type: CPUs or GPUs per Ray actor, zero or more in shares no finer than Ray's
    0.0001; Ray refuses others only once it has started (and -1 means no limit elsewhere)."""
    v = finite(text)
    if v < 0 or 0 < v < 1e-4:
        raise argparse.ArgumentTypeError(f"must be zero or positive (a share such as 0.5, or a whole number), "
                                         f"got {v:g}")
    return v


DEVICE_METAVAR = "{auto,cpu,cuda,cuda:N}"


def device(text: str) -> str:
    """An argparse type: auto, cpu, cuda or cuda:N."""
    value = text.strip().lower()
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value):
        return value
    raise argparse.ArgumentTypeError(f"device must be auto, cpu, cuda or cuda:N (N: the GPU's number), got '{text}'")


def add_device(parser) -> None:
    parser.add_argument("--device", type=device, default=None, metavar=DEVICE_METAVAR,
                        help="auto (default: CUDA if present, else the CPU), cpu, cuda, or cuda:N for GPU number N")


_WARNED: set = set()


def warn_deprecated(old: str, new: str) -> None:
    """One line, once per spelling and process: an old spelling still works for a release."""
    if (old, new) not in _WARNED:
        _WARNED.add((old, new))
        sys.stderr.write(f"geodet: warning: {old} is deprecated and goes in the next release: {new}\n")


class DeprecatedAlias(argparse.Action):
    """An old spelling of a flag that still works for a release: hidden from --help, and one line
    on stderr says what replaces it. ``append=True`` collects repeated uses in a list."""

    def __init__(self, option_strings, dest, replacement: str = "", append: bool = False, **kwargs):
        kwargs["help"] = argparse.SUPPRESS
        kwargs.setdefault("default", argparse.SUPPRESS)  # never overwrite the new spelling's default
        self.replacement, self.append = replacement, append
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warn_deprecated(option_string or self.dest, self.replacement)
        if self.nargs == 0:
            values = True
        if self.append:
            values = list(getattr(namespace, self.dest, None) or []) + [values]
        setattr(namespace, self.dest, values)


def deprecated(parser, old: str, replacement: str, **kwargs) -> None:
    """Add ``old`` as a hidden alias (same dest as its replacement unless ``dest`` is given)."""
    parser.add_argument(old, action=DeprecatedAlias, replacement=replacement, **kwargs)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like GeodetError; the usage is one --help away
        sys.stderr.write(f"geodet: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def common_flags() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a flag given before the command (geodet -q detect ...) is not reset by the
    # command's own parser
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging and full tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress (same as --progress none)")
    common.add_argument("--progress", choices=["bar", "lines", "json", "none"], default=argparse.SUPPRESS,
                        help="bar (default on a terminal); lines (default otherwise, e.g. a log file: a plain line "
                             "a few times a minute); none; or json, for programs that drive geodet (its QGIS "
                             "provider): one object per line on stderr, {\"stage\", \"stage_index\", \"stage_count\", "
                             "\"done\", \"total\", \"stage_progress\", \"progress\"}, where progress is the whole "
                             "command's fraction and goes from 0 to 1 once")
    return common


def setup_logging(verbose: bool) -> None:
    # geodet's own lines at INFO; other libraries' only from WARNING (torch, the ONNX quantizer and
    # others log at INFO, some at exit), unless --verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
                        if verbose else "%(message)s", stream=sys.stderr)
    logging.getLogger("geodet").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("pyogrio", "rasterio", "fiona", "matplotlib", "PIL", "faster_coco_eval"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def quiet_ray() -> None:
    """The command's own lines only: Ray's INFO lines and notes go to its session logs (the
    command is this process's owner, so it may set Ray's variables here)."""
    import os

    from ..pipeline.ray_engine import require_ray

    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # (Ray's C++ core notes this once, in one line)
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    require_ray()  # importing Ray sets its loggers up; set their levels after that
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)
