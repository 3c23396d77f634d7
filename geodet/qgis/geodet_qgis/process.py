"""The geodet child process, without QGIS: a clean environment, no console window on Windows, its
lines read whatever bytes they hold, and a stop that is polite first and certain after a grace.

Stopping takes three steps, each only if the one before was not enough:

1. polite: SIGTERM on POSIX; on Windows standard input is closed (geodet, started with
   GEODET_STOP_ON_EOF=1, then stops as on Ctrl+C). Training finishes its step and saves
   last.pt; detection stops at once. Every temporary file is removed by geodet itself. (A GUI
   program cannot send a console control event to a child started without a console window, so
   Windows' polite step is the pipe; one signal only, since a second means "stop now".)
2. firm, at half the grace: SIGTERM again (POSIX) or CTRL_BREAK to the child's own process
   group (Windows): geodet stops now, still removing its temporary files.
3. certain, after ``grace`` seconds: the child's process group (POSIX) or tree (Windows) is
   killed.

No QGIS import here, so the tests exercise it with plain Python and mocked Windows calls.
"""

import ntpath
import os
import posixpath
import queue
import signal
import subprocess
import threading
import time

# QGIS's launchers (OSGeo4W, the macOS bundle) set these for QGIS's own Python, GDAL and PROJ; the
# user's geodet has its own, and would start with the wrong ones
QGIS_VARIABLES = ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "GDAL_DATA", "GDAL_DRIVER_PATH",
                  "PROJ_LIB", "PROJ_DATA", "QT_PLUGIN_PATH")
SYSTEM_PREFIXES = ("/", "/usr", "/usr/local", "/opt/homebrew")  # shared with everything else: never stripped
CREATE_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)
CREATE_NEW_PROCESS_GROUP = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200)
CTRL_BREAK_EVENT = getattr(signal, "CTRL_BREAK_EVENT", 1)
DRAIN_SECONDS = 3.0  # after the child exits, how long a grandchild may keep its pipes open


def _norm(path: str, os_name: str) -> str:
    mod = ntpath if os_name == "nt" else posixpath
    return mod.normcase(mod.normpath(path))


def _inside(path: str, prefix: str, os_name: str) -> bool:
    sep = "\\" if os_name == "nt" else "/"
    path, prefix = _norm(path, os_name), _norm(prefix, os_name)
    return path == prefix or path.startswith(prefix.rstrip(sep) + sep)


def child_environment(base, executable: str, qgis_prefixes, os_name: str = None) -> dict:
    """The environment for ``executable``: ``base`` without QGIS's Python, GDAL and PROJ
    variables (and, on Windows, without PATH entries inside QGIS's own install), everything else
    the user set kept. A geodet installed into QGIS's own Python keeps QGIS's environment."""
    os_name = os_name or os.name
    env = dict(base)
    prefixes = [p for p in qgis_prefixes if p and _norm(p, os_name) not in {_norm(s, os_name) for s in SYSTEM_PREFIXES}]
    if not any(_inside(executable, p, os_name) for p in prefixes):
        for name in list(env):
            if name.upper() in QGIS_VARIABLES:
                del env[name]
        if os_name == "nt" and prefixes:
            path_key = next((k for k in env if k.upper() == "PATH"), "PATH")
            kept = [e for e in env.get(path_key, "").split(";") if e and not any(_inside(e, p, os_name) for p in prefixes)]
            env[path_key] = ";".join(kept)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"  # the lines are read as UTF-8 whatever the system's code page
    env["GEODET_STOP_ON_EOF"] = "1"
    return env


def popen_options(os_name: str = None) -> dict:
    """Windows: no console window, and a process group of its own (CTRL_BREAK reaches it and not
    QGIS). POSIX: a session of its own, so that a kill reaches its grandchildren too."""
    if (os_name or os.name) == "nt":
        return {"creationflags": CREATE_NO_WINDOW | CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _pump(stream, q, tag):
    """Lines into ``q``; the end marker always follows, whatever happened to the stream."""
    try:
        for line in iter(stream.readline, ""):
            q.put((tag, line.rstrip("\r\n")))
    except (OSError, ValueError):  # the pipe went away
        pass
    finally:
        q.put((tag, None))


class Child:
    """One geodet run: ``lines(cancelled)`` yields (``"out"`` or ``"err"``, line) until the
    process and every holder of its pipes are gone; then ``returncode``, ``stopped`` (Cancel
    asked it to stop) and ``killed`` (it had to be killed) say how it ended. Use it as a context
    manager: leaving it closes the pipes and reaps the process."""

    def __init__(self, cmd, env, grace: float = 5.0, os_name: str = None, popen=None, run=None, kill=None):
        self.cmd, self.env, self.grace, self.os_name = list(cmd), env, grace, os_name or os.name
        self._popen = popen or subprocess.Popen  # looked up now: tests replace them
        self._run = run or subprocess.run
        self._kill = kill or os.kill
        self.proc = None
        self.returncode = None
        self.stopped = self.killed = False
        self._threads: list = []
        self._queue: queue.Queue = queue.Queue()

    def start(self) -> "Child":
        self.proc = self._popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, encoding="utf-8", errors="replace", bufsize=1, env=self.env,
                                **popen_options(self.os_name))
        for stream, tag in ((self.proc.stdout, "out"), (self.proc.stderr, "err")):
            t = threading.Thread(target=_pump, args=(stream, self._queue, tag), daemon=True, name=f"geodet-{tag}")
            t.start()
            self._threads.append(t)
        return self

    @property
    def pid(self):
        return self.proc.pid if self.proc is not None else None

    def stop(self) -> None:
        """The polite stop: SIGTERM (POSIX), or stdin closed (Windows)."""
        self.stopped = True
        if self.os_name == "nt":
            self._close_stdin()
        elif self.proc.poll() is None:
            self._signal(signal.SIGTERM)

    def interrupt(self) -> None:
        """The firm stop: SIGTERM again (POSIX), or CTRL_BREAK to its process group (Windows)."""
        if self.proc.poll() is None:
            self._signal(CTRL_BREAK_EVENT if self.os_name == "nt" else signal.SIGTERM)

    def _signal(self, signum) -> None:
        try:
            self._kill(self.proc.pid, signum)
        except OSError:  # gone already, or (Windows) no console to carry the event
            pass

    def _close_stdin(self) -> None:
        try:
            if self.proc.stdin and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except OSError:
            pass

    def kill(self) -> None:
        """The certain stop: the process group (POSIX) or the process tree (Windows)."""
        self.killed = self.proc.poll() is None
        self._kill_tree()

    def _kill_tree(self) -> None:
        if self.os_name == "nt":
            try:
                self._run(["taskkill", "/F", "/T", "/PID", str(self.proc.pid)], capture_output=True,
                          creationflags=CREATE_NO_WINDOW, timeout=30)
            except (OSError, subprocess.SubprocessError):
                pass
            if self.proc.poll() is None:
                self.proc.kill()
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session's group: grandchildren included
        except OSError:  # the group is gone already
            pass
        if self.proc.poll() is None:
            self.proc.kill()

    def lines(self, cancelled=lambda: False, poll: float = 0.1):
        open_streams, stop_deadline, exited_at, forced_at = len(self._threads), None, None, None
        interrupted = False
        while open_streams:
            now = time.monotonic()
            if not self.stopped and cancelled():
                self.stop()
                stop_deadline = now + self.grace
            if exited_at is None and self.proc.poll() is not None:
                exited_at = now
            if stop_deadline is not None and not interrupted and now >= stop_deadline - self.grace / 2:
                self.interrupt()
                interrupted = True
            if forced_at is None:
                if stop_deadline is not None and now >= stop_deadline:
                    self.kill()  # Cancel was not enough, or its children hold the pipes
                    forced_at = now
                elif exited_at is not None and now - exited_at > DRAIN_SECONDS:
                    self._kill_tree()  # it ended, but something it started still holds the pipes
                    forced_at = now
            elif now - forced_at > self.grace:
                break  # a holder out of reach (Windows, after the child's end): stop waiting
            try:
                tag, line = self._queue.get(timeout=poll)
            except queue.Empty:
                continue
            if line is None:
                open_streams -= 1
                continue
            yield tag, line
        self.returncode = self._wait()

    def _wait(self):
        try:
            return self.proc.wait(timeout=self.grace + 5)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait()

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.stop()
            try:
                self.proc.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                self.kill()
                self.proc.wait()
        readers = dict(zip(("out", "err"), self._threads))
        for tag, stream in (("out", self.proc.stdout), ("err", self.proc.stderr)):
            thread = readers.get(tag)
            if thread is not None:
                thread.join(timeout=1)
            # a stream whose reader still runs is left to it (closing under a blocked read can hang)
            if stream is not None and (thread is None or not thread.is_alive()):
                try:
                    stream.close()
                except OSError:
                    pass
        self._close_stdin()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
        return False
