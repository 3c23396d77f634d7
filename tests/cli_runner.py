"""Run a ``geodet`` command in a process of its own, as ``python -m geodet.cli ARGS`` does, without
paying for the imports each time.

Importing torch, torchvision and geodet takes about 6 s of every new process on a 2-core machine,
more than most commands the tests run. Here each command is a process forked from a server that
has imported them once (multiprocessing's forkserver, with those modules preloaded). The forked
process runs ``main(ARGS)`` with its own standard streams (real file descriptors, captured to
files; stdin is /dev/null), environment, working directory and signal handlers; its return code is
the exit code, an uncaught exception prints its traceback and exits 1 (a KeyboardInterrupt dies by
SIGINT), and it ends as an interpreter does: non-daemon threads joined, garbage collected (an
"Exception ignored" in a finaliser is printed), atexit handlers run, C streams flushed.

What it cannot give: settings that libraries read when they are imported (thread-pool sizes,
``PYTHON*``, GDAL and PROJ data paths, the allocator's) are the server's, so a command whose
environment differs from the server's in those runs in a new interpreter instead; every forked
command shares the server's string-hash seed. What only a fresh interpreter shows (importing
geodet changes nothing, Ctrl-C and a closed stdin, a launcher's SIGINT disposition, the end-to-end
path in test_cli.py) is tested with real ``python -m geodet.cli`` processes, as is everything where
the platform has no forkserver or the server cannot start."""

from __future__ import annotations

import locale
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile

# imported once by the server (the forkserver skips a module that raises ImportError; a server
# that dies on another error sends every command to a new interpreter, below)
PRELOAD = ["torch", "torchvision", "rasterio", "geopandas", "geodet.cli", "geodet.pipeline.job",
           "geodet.training.trainer"]
# read when a library is imported, not when a command runs: the server's values hold for its children
IMPORT_TIME = ("OMP_", "MKL_", "OPENBLAS_", "KMP_", "GOTO", "PYTHON", "GDAL_DATA", "PROJ_DATA", "PROJ_LIB",
               "MALLOC_", "LD_", "CUDA_", "TORCH")
SERVER_ENV = {"OMP_NUM_THREADS": "1"}  # the tests' commands run single-threaded
_SERVER: dict = {}


def _import_time(env) -> dict:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME)}


def _forkserver():
    """The forkserver context, started with SERVER_ENV; None where there is none or it failed."""
    if "ctx" not in _SERVER:
        ctx = mp.get_context("forkserver") if "forkserver" in mp.get_all_start_methods() else None
        saved = dict(os.environ)
        if ctx is not None:
            ctx.set_forkserver_preload(PRELOAD)
            os.environ.update(SERVER_ENV)  # the server inherits the environment it is started with
            try:
                from multiprocessing import forkserver

                forkserver.ensure_running()
            except Exception:  # noqa: BLE001 - no server: new interpreters
                ctx = None
            finally:
                os.environ.clear()
                os.environ.update(saved)
        _SERVER.update(ctx=ctx, env={**saved, **SERVER_ENV})
    return _SERVER["ctx"]


def _command(argv, env, cwd, out_path, err_path, server_env):
    """The forked process: ``python -m geodet.cli ARGV`` from its ``main`` on."""
    import atexit
    import gc
    import signal
    import threading
    import traceback

    # what the server's imports added to its environment stays, as a new interpreter's imports add it
    added = {k: v for k, v in os.environ.items() if k not in server_env}
    os.environ.clear()
    os.environ.update({**added, **env})
    if cwd is not None:
        os.chdir(cwd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    # as the interpreter opens them for files: stdout block-buffered, stderr line-buffered
    sys.stdout = open(1, "w", encoding=sys.__stdout__.encoding, errors=sys.__stdout__.errors, closefd=False)
    sys.stderr = open(2, "w", encoding=sys.__stderr__.encoding, errors="backslashreplace", closefd=False,
                      buffering=1)
    sys.argv = [sys.executable, *argv]
    try:
        from geodet.cli import main

        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
        if not isinstance(code, (int, type(None))):
            print(code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:  # as the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    code = 0 if code is None else code
    try:  # the interpreter's own ending: threads, finalisers, atexit, C streams
        if hasattr(threading, "_shutdown"):
            threading._shutdown()
        gc.collect()
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            import ctypes

            ctypes.CDLL(None).fflush(None)
        except (OSError, AttributeError):
            pass
        if code == -signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code & 0xFF)


def _read(path) -> str:
    with open(path, "rb") as f:
        return f.read().decode(locale.getpreferredencoding(False))


def run_geodet(*args, env=None, cwd=None, timeout=600, fresh=False) -> subprocess.CompletedProcess:
    """``subprocess.run([python, -m, geodet.cli, *args], capture_output=True, text=True, env=env,
    cwd=cwd, timeout=timeout)``, the command forked from the preloaded server where it can be
    (``fresh``: always a new interpreter)."""
    argv = [str(a) for a in args]
    env = dict(os.environ if env is None else env)
    ctx = None if fresh else _forkserver()
    if ctx is None or _import_time(env) != _import_time(_SERVER["env"]):
        return subprocess.run([sys.executable, "-m", "geodet.cli", *argv], capture_output=True, text=True, env=env,
                              cwd=cwd, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="geodet-cli-") as d:
        out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
        for p in (out, err):
            open(p, "wb").close()
        proc = ctx.Process(target=_command, args=(argv, env, None if cwd is None else str(cwd), out, err,
                                                  _SERVER["env"]), name="geodet " + " ".join(argv[:1]))
        try:
            try:
                proc.start()
            except (EOFError, ConnectionError, OSError):  # the server died (a preload failed): new interpreters
                _SERVER["ctx"] = None
                return run_geodet(*args, env=env, cwd=cwd, timeout=timeout)
            proc.join(timeout)
            if proc.is_alive():
                raise subprocess.TimeoutExpired(["geodet", *argv], timeout, output=_read(out), stderr=_read(err))
            return subprocess.CompletedProcess(["geodet", *argv], proc.exitcode, _read(out), _read(err))
        finally:
            if proc.is_alive():  # a timeout, or the test itself interrupted
                proc.kill()
                proc.join()
