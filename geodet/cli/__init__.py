"""The ``geodet`` command: one module per command (``geodet/cli/detect.py`` for ``geodet detect``,
as rasterio's ``rio`` is built), each a thin ``add_parser`` + ``run`` over the Python API.

Expected failures (GeodetError) print one line ``geodet: error: ...`` and exit 2, usage errors
too; anything else prints one line with a hint to rerun with --verbose and exits 1. Tracebacks
only with --verbose. ``geodet detect`` exits 3 when it wrote a partial result (unreadable tiles
skipped with ``--on-read-error skip``, or scenes of a multi-scene job that could not be read).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys

from ..errors import GeodetError
from . import anchors, data, demo, detect, evaluate, export, imports, merge, pretrain, qgis, suggest, tile, train
from .common import EXIT_PARTIAL, Parser, common_flags, setup_logging  # noqa: F401  (EXIT_PARTIAL: API)

log = logging.getLogger("geodet")

# command name -> module (add_parser, run), in the order of --help
MODULES = {"tile": tile, "train": train, "pretrain": pretrain, "detect": detect, "merge": merge, "export": export, "import": imports,
           "evaluate": evaluate, "suggest": suggest, "anchors": anchors, "data": data, "qgis-plugin": qgis,
           "demo": demo}
COMMANDS = {name: m.run for name, m in MODULES.items()}


def build_parser() -> Parser:
    common = common_flags()
    p = Parser(
        prog="geodet", parents=[common],
        description="Find dense small objects (vehicles, trees, buildings, boats) in whole-scene GeoTIFFs.",
        epilog="Run 'geodet COMMAND --help' for a command's options. Start with 'geodet demo'. Exit codes: 0 done, "
               "2 bad input or setting (one line says what to do), 3 partial result written (detect: unreadable tiles "
               "or scenes, listed in the report; merge: unfinished scenes left out), 1 unexpected error, 130 "
               "interrupted.",
    )
    from .. import __version__

    p.add_argument("--version", action="version", version=f"geodet {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for m in MODULES.values():
        m.add_parser(sub, common)
    return p


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def _forget_caught_interrupt() -> None:
    """Clear CPython's note of an unhandled KeyboardInterrupt. Code run from a string (``exec``,
    ``eval``: dataclasses, torch.fx, the ONNX exporter) that a Ctrl-C or SIGTERM stops leaves the
    note set even when geodet catches the interrupt, and ``python -m geodet.cli`` then ends by
    SIGINT (exit -2) rather than with 130. Evaluating a string clears it again."""
    eval("None")  # noqa: S307  (a constant: it runs nothing of anyone's)


def _stop_when_stdin_closes() -> None:
    """GEODET_STOP_ON_EOF=1 (set by programs that drive geodet, such as its QGIS provider): when
    standard input closes (the driver cancelled, or went away), stop as on Ctrl+C. It works the
    same on every OS, where signals do not (Windows has no SIGTERM for a process without a console).
    The stop is also checked at every progress update (``progress.request_stop``), so an interrupt
    that a library swallows does not let the work run on."""
    import threading
    import time

    from .. import progress

    if not callable(signal.getsignal(signal.SIGINT)):
        # started with SIGINT ignored (a background job of a non-interactive shell): the stop is
        # delivered as SIGINT, whose handler must then be Python's
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def watch():
        # os.read on the descriptor, not sys.stdin: a daemon thread blocked inside the buffered
        # reader holds its lock and aborts the interpreter's shutdown
        try:
            fd = sys.stdin.fileno()
        except (OSError, ValueError, AttributeError):  # no stdin at all: stopping is the driver's kill then
            return
        while True:
            try:
                if not os.read(fd, 65536):
                    break
            except BlockingIOError:  # a non-blocking pipe (its flag is shared with whoever made it)
                time.sleep(0.1)
            except OSError:  # closed or unreadable: nothing to watch
                return
        progress.request_stop()  # SIGINT in the main thread: KeyboardInterrupt, or training's stop

    threading.Thread(target=watch, name="geodet-stop-on-eof", daemon=True).start()


def _stdout_gone() -> int:
    """The reader of our output went away (``geodet evaluate ... | head -2``): stop quietly, as a
    Unix tool killed by SIGPIPE would."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    return 128 + signal.SIGPIPE


def _unexpected(exc: BaseException, verbose: bool) -> int:
    """One line for an error geodet did not expect (exit 1); the traceback with --verbose."""
    if verbose:
        log.error("unexpected error", exc_info=exc)
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    print(f"geodet: unexpected error: {type(exc).__name__}: {msg} (rerun with --verbose for details)", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose = getattr(args, "verbose", False)
    args.quiet = getattr(args, "quiet", False)
    if not args.command:
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    from .. import progress

    # -q or GEODET_NO_PROGRESS: none; else bars on a terminal and plain lines elsewhere (a log file)
    mode = getattr(args, "progress", None) or ("none" if args.quiet or os.environ.get("GEODET_NO_PROGRESS") else "auto")
    progress.set_mode(mode)
    args.quiet = mode == "none"
    if args.command in ("detect", "tile"):
        from ..memory import tune_memory

        # streaming whole scenes: keep memory flat in the scene size, at ~15% of detection speed
        # (training is 1.7x faster without it, so train and demo leave glibc as it is)
        tune_memory()
    previous = signal.signal(signal.SIGTERM, _sigterm)
    if hasattr(signal, "SIGBREAK"):  # Windows: CTRL_BREAK to the process group, e.g. from the QGIS provider
        signal.signal(signal.SIGBREAK, _sigterm)
    if os.environ.pop("GEODET_STOP_ON_EOF", None) == "1":  # popped: geodet's own children do not watch
        _stop_when_stdin_closes()
    from ..io.writers import WRITTEN

    WRITTEN.clear()
    try:
        code = COMMANDS[args.command](args)
        if code in (0, EXIT_PARTIAL):
            progress.finish()
        return code
    except GeodetError as exc:
        if args.verbose:
            log.exception("details")
        print(f"geodet: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _stdout_gone()
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            return _unexpected(exc, args.verbose)
        name = os.path.basename(str(exc.filename or "a file name").rstrip("/"))
        print(f"geodet: error: {name[:40]}{'...' if len(name) > 40 else ''}: the name is too long for the file "
              "system: choose a shorter one", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from ..io.writers import WRITTEN

        if WRITTEN:  # whole files renamed into place before the interrupt: say which, not that nothing was
            print(f"geodet: interrupted after writing {', '.join(str(p) for p in WRITTEN[:5])}; nothing else was written",
                  file=sys.stderr)
        else:
            print("geodet: interrupted; no partial output was written", file=sys.stderr)
        return 130
    except Exception as exc:  # unexpected: one line, details with --verbose
        return _unexpected(exc, args.verbose)
    finally:
        progress.finish(done=False)
        signal.signal(signal.SIGTERM, previous)
        _forget_caught_interrupt()


if __name__ == "__main__":
    sys.exit(main())
