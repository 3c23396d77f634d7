"""The QGIS provider's child process (``geodet_qgis/process.py``, plain Python): a clean
environment, no console window on Windows, any bytes on its pipes, and a stop that is polite
first and certain after a grace, grandchildren included. Windows is exercised with mocks; POSIX
with real processes. No QGIS needed."""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest

from geodet.qgis.geodet_qgis import process
from geodet.qgis.geodet_qgis.process import CREATE_NEW_PROCESS_GROUP, CREATE_NO_WINDOW, CTRL_BREAK_EVENT, Child

posix = pytest.mark.skipif(os.name == "nt", reason="real POSIX processes")


def test_windows_environment_loses_qgis_python_gdal_and_proj_and_keeps_the_users():
    base = {"PYTHONHOME": r"C:\OSGeo4W\apps\Python312", "PythonPath": r"C:\OSGeo4W\apps\qgis\python",
            "GDAL_DATA": r"C:\OSGeo4W\apps\gdal\share\gdal", "PROJ_LIB": r"C:\OSGeo4W\share\proj",
            "PROJ_DATA": r"C:\OSGeo4W\share\proj", "GDAL_DRIVER_PATH": r"C:\OSGeo4W\apps\gdal\lib\gdalplugins",
            "QT_PLUGIN_PATH": r"C:\OSGeo4W\apps\Qt5\plugins", "OSGEO4W_ROOT": r"C:\OSGeo4W",
            "Path": r"C:\OSGeo4W\bin;C:\OSGeo4W\apps\qgis\bin;C:\Users\me\venv\Scripts;C:\Windows\system32",
            "GDAL_HTTP_MAX_RETRY": "9", "CUDA_VISIBLE_DEVICES": "1", "GEODET_CACHE": r"D:\cache"}
    env = process.child_environment(base, r"C:\Users\me\venv\Scripts\geodet.exe", [r"C:\OSGeo4W", r"c:\osgeo4w\apps\Python312"],
                                    os_name="nt")
    for name in ("PYTHONHOME", "PythonPath", "GDAL_DATA", "PROJ_LIB", "PROJ_DATA", "GDAL_DRIVER_PATH", "QT_PLUGIN_PATH"):
        assert name not in env, name
    assert env["Path"] == r"C:\Users\me\venv\Scripts;C:\Windows\system32"
    assert env["GDAL_HTTP_MAX_RETRY"] == "9" and env["CUDA_VISIBLE_DEVICES"] == "1" and env["GEODET_CACHE"] == r"D:\cache"
    assert env["PYTHONIOENCODING"] == "utf-8" and env["GEODET_STOP_ON_EOF"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    # a geodet installed into QGIS's own Python needs QGIS's environment: it is kept
    inside = process.child_environment(base, r"C:\OSGeo4W\apps\Python312\Scripts\geodet.exe", [r"C:\OSGeo4W"],
                                       os_name="nt")
    assert inside["PYTHONHOME"] == base["PYTHONHOME"] and inside["Path"] == base["Path"]


def test_posix_environment_and_system_prefixes():
    base = {"PYTHONPATH": "/Applications/QGIS.app/Contents/Resources/python", "PROJ_LIB": "/Applications/QGIS.app/proj",
            "PATH": "/usr/bin:/bin", "AWS_REGION": "eu-west-1"}
    env = process.child_environment(base, "/home/me/venv/bin/geodet", ["/usr", "/Applications/QGIS.app/Contents"],
                                    os_name="posix")
    assert "PYTHONPATH" not in env and "PROJ_LIB" not in env
    assert env["PATH"] == "/usr/bin:/bin" and env["AWS_REGION"] == "eu-west-1"
    # /usr is everybody's (Debian's QGIS): a geodet in /usr/local is not "inside QGIS"
    env = process.child_environment(base, "/usr/local/bin/geodet", ["/usr"], os_name="posix")
    assert "PYTHONPATH" not in env


def test_start_options():
    assert process.popen_options("nt") == {"creationflags": CREATE_NO_WINDOW | CREATE_NEW_PROCESS_GROUP}
    assert CREATE_NO_WINDOW == 0x08000000 and CREATE_NEW_PROCESS_GROUP == 0x200
    assert process.popen_options("posix") == {"start_new_session": True}


class FakeWindowsChild:
    """Popen's surface over real pipes, for a process that ignores every polite request."""

    pid = 4242

    def __init__(self, cmd, **kw):
        self.kw, self.returncode = kw, None
        r_out, self.w_out = os.pipe()
        r_err, self.w_err = os.pipe()
        self.stdout = open(r_out, encoding=kw["encoding"], errors=kw["errors"])
        self.stderr = open(r_err, encoding=kw["encoding"], errors=kw["errors"])
        self.stdin = open(os.pipe()[1], "w")
        os.write(self.w_err, b'{"stage": "detect a.tif", "progress": 0.1}\n' + b"bad \xff\xfe bytes\n")

    def poll(self):
        return self.returncode

    def end(self, code):
        if self.returncode is None:
            self.returncode = code
            os.close(self.w_out)
            os.close(self.w_err)

    def kill(self):
        self.end(1)

    def wait(self, timeout=None):
        return self.returncode


def test_windows_no_console_polite_firm_then_killed(monkeypatch):
    made, signals, runs = [], [], []

    def popen(cmd, **kw):
        made.append(FakeWindowsChild(cmd, **kw))
        return made[-1]

    def run(cmd, **kw):
        runs.append((cmd, kw))
        made[0].end(1)  # taskkill ends it
        return subprocess.CompletedProcess(cmd, 0)

    child = Child(["geodet.exe", "detect"], {}, grace=0.6, os_name="nt", popen=popen, run=run,
                  kill=lambda pid, sig: signals.append((pid, sig)))
    with child:
        kw = made[0].kw
        assert kw["creationflags"] == CREATE_NO_WINDOW | CREATE_NEW_PROCESS_GROUP and "start_new_session" not in kw
        assert kw["encoding"] == "utf-8" and kw["errors"] == "replace" and kw["stdin"] == subprocess.PIPE
        t0 = time.monotonic()
        got = list(child.lines(cancelled=lambda: True, poll=0.02))
    assert ("err", "bad \ufffd\ufffd bytes") in got
    assert made[0].stdin.closed  # the polite step: geodet stops when its stdin closes
    assert signals == [(4242, CTRL_BREAK_EVENT)]  # the firm step, at half the grace
    assert runs and runs[0][0] == ["taskkill", "/F", "/T", "/PID", "4242"]
    assert runs[0][1]["creationflags"] == CREATE_NO_WINDOW  # no console window for taskkill either
    assert child.stopped and child.killed and time.monotonic() - t0 < 5


def test_windows_paths_follow_os_name(monkeypatch):
    """With os.name and subprocess mocked as on Windows, the defaults take the Windows paths."""
    made, runs, signals = [], [], []

    def popen(cmd, **kw):
        made.append(FakeWindowsChild(cmd, **kw))
        return made[-1]

    monkeypatch.setattr(os, "name", "nt")
    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: runs.append(cmd) or made[0].end(1))
    monkeypatch.setattr(os, "kill", lambda pid, sig: signals.append(sig))
    assert process.popen_options() == {"creationflags": CREATE_NO_WINDOW | CREATE_NEW_PROCESS_GROUP}
    env = process.child_environment({"PYTHONHOME": r"C:\QGIS\apps\Python312", "Path": r"C:\QGIS\bin;C:\me"},
                                    r"C:\me\geodet.exe", [r"C:\QGIS"])
    assert "PYTHONHOME" not in env and env["Path"] == r"C:\me"
    with Child(["geodet.exe"], env, grace=0.4) as child:
        list(child.lines(cancelled=lambda: True, poll=0.02))
    assert made[0].kw["creationflags"] == CREATE_NO_WINDOW | CREATE_NEW_PROCESS_GROUP
    assert made[0].stdin.closed and signals == [CTRL_BREAK_EVENT] and runs[0][:3] == ["taskkill", "/F", "/T"]


def test_windows_child_that_stops_politely_is_not_killed():
    made, runs = [], []

    def popen(cmd, **kw):
        made.append(FakeWindowsChild(cmd, **kw))
        return made[-1]

    class Stdin:
        closed = False

        def close(self):
            self.closed = True
            made[0].end(130)  # geodet saw EOF and stopped

    child = Child(["geodet.exe"], {}, grace=5, os_name="nt", popen=popen, run=lambda *a, **k: runs.append(a),
                  kill=lambda *a: pytest.fail("no signal needed"))
    child.start()
    made[0].stdin = Stdin()
    list(child.lines(cancelled=lambda: True, poll=0.02))
    child.close()
    assert child.returncode == 130 and child.stopped and not child.killed and runs == []


def _script(tmp_path, body):
    path = tmp_path / "fake_geodet.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def _session(pid):
    """Processes still alive in the session the child led (itself and what it started)."""
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and (int(entry) == pid or int(fields[3]) == pid):
                alive.append(int(entry))
    return alive


def _gone(pid, within=3.0) -> bool:
    """Nothing of the session left (a killed process takes a moment to finish dying)."""
    deadline = time.monotonic() + within
    while _session(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _session(pid) == []


@posix
def test_a_polite_child_stops_on_sigterm_and_leaves_no_warning(tmp_path):
    cmd = _script(tmp_path, """
        import signal, sys, time
        def stop(*a):
            print("geodet: interrupted; no partial output was written", file=sys.stderr, flush=True)
            sys.exit(130)
        signal.signal(signal.SIGTERM, stop)
        print('{"progress": 0.5}', file=sys.stderr, flush=True)
        time.sleep(60)
        """)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Child(cmd, dict(os.environ), grace=10) as child:
            got = []
            for item in child.lines(cancelled=lambda: bool(got)):  # Cancel once the first line is in
                got.append(item)
        code, stopped, killed = child.returncode, child.stopped, child.killed
        del child
        gc.collect()
    assert ("err", "geodet: interrupted; no partial output was written") in got
    assert code == 130 and stopped and not killed
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


@posix
def test_a_stuck_child_and_a_grandchild_holding_the_pipes_are_killed(tmp_path):
    cmd = _script(tmp_path, """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stuck: deaf to Cancel
        subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "time.sleep(300)"])  # inherits stdout and stderr
        print("started", flush=True)
        time.sleep(300)
        """)
    t0 = time.monotonic()
    with Child(cmd, dict(os.environ), grace=1.0) as child:
        lines = list(child.lines(cancelled=lambda: time.monotonic() - t0 > 1.5))
    assert ("out", "started") in lines
    assert child.stopped and child.killed and child.returncode == -signal.SIGKILL
    assert time.monotonic() - t0 < 15
    assert _gone(child.pid)


@posix
def test_a_finished_child_whose_grandchild_keeps_the_pipes_does_not_hang(tmp_path):
    cmd = _script(tmp_path, """
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        sys.stdout.buffer.write(b"done \\xc3\\x28 \\xff\\n")
        """)
    t0 = time.monotonic()
    with Child(cmd, dict(os.environ), grace=1.0) as child:
        lines = list(child.lines())
    assert lines == [("out", "done \ufffd( \ufffd")]
    assert child.returncode == 0 and not child.stopped and not child.killed
    assert time.monotonic() - t0 < process.DRAIN_SECONDS + 5 and _gone(child.pid)
