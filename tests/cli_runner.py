"""Run a ``geodet`` command in a process of its own, as ``python -m geodet.cli ARGS`` does, without
paying for the imports each time.

Importing torch, torchvision and geodet takes about 6 s of every new process on a 2-core machine,
more than most commands the tests run. Here each command is a process forked from a server that
has imported them once (multiprocessing's forkserver, with those modules preloaded): ``main(ARGS)``
runs in the forked process with its own standard streams (real file descriptors, captured to
files), environment, working directory, signal handlers, logging and allocator; its return code is
the exit code, an uncaught exception prints its traceback and exits 1, ``atexit`` handlers run, as in
a fresh interpreter. What only a fresh interpreter shows (importing geodet changes nothing, Ctrl-C
and a closed stdin, a launcher's SIGINT disposition) is tested with real ``python -m geodet.cli``
processes (tests/test_package.py, test_cli_progress.py, test_cli.py's signal tests), as is
everything where the platform has no forkserver."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import tempfile

# imported once by the server; a module that fails to import is skipped there and imported by
# the command itself
PRELOAD = ["torch", "torchvision", "rasterio", "geopandas", "geodet.cli", "geodet.pipeline.job",
           "geodet.training.trainer"]
_CONTEXT: list = []


def _forkserver():
    if not _CONTEXT:
        ctx = mp.get_context("forkserver") if "forkserver" in mp.get_all_start_methods() else None
        if ctx is not None:
            ctx.set_forkserver_preload(PRELOAD)
        _CONTEXT.append(ctx)
    return _CONTEXT[0]


def _command(argv, env, cwd, out_path, err_path):
    """The forked process: ``python -m geodet.cli ARGV`` from its ``main`` on."""
    import atexit
    import traceback

    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)
    sys.argv = [sys.executable, *argv]
    if env.get("OMP_NUM_THREADS", "").isdigit():  # the server's OpenMP read its own environment
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    try:
        from geodet.cli import main

        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:  # as the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


def run_geodet(*args, env=None, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    """``subprocess.run([python, -m, geodet.cli, *args], capture_output=True, text=True, env=env,
    cwd=cwd, timeout=timeout)``, the command forked from the preloaded server."""
    argv = [str(a) for a in args]
    env = dict(os.environ if env is None else env)
    ctx = _forkserver()
    if ctx is None:
        return subprocess.run([sys.executable, "-m", "geodet.cli", *argv], capture_output=True, text=True, env=env,
                              cwd=cwd, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="geodet-cli-") as d:
        out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
        for p in (out, err):
            open(p, "wb").close()
        proc = ctx.Process(target=_command, args=(argv, env, None if cwd is None else str(cwd), out, err),
                           name="geodet " + " ".join(argv[:1]))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(["geodet", *argv], timeout)
        with open(out, encoding="utf-8", errors="replace") as f:
            stdout = f.read()
        with open(err, encoding="utf-8", errors="replace") as f:
            stderr = f.read()
    return subprocess.CompletedProcess(["geodet", *argv], proc.exitcode, stdout, stderr)
