"""What every ``geodet`` command shares: the parser that errs in one line, argument types,
logging, progress and exit codes."""

from __future__ import annotations

import argparse
import logging
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
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    common.add_argument("--progress", choices=["bar", "json", "none"], default=argparse.SUPPRESS,
                        help="bar (default on a terminal), none, or json: one JSON object per line on stderr "
                             "({\"progress\": 0.42, \"stage\": ..., \"done\": n, \"total\": m}), for programs such as "
                             "geodet's QGIS provider")
    return common


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
                        if verbose else "%(message)s", stream=sys.stderr)
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
