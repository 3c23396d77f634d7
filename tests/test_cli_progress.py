"""Progress that fits where it goes: bars on a terminal, plain lines a few times a minute in a log,
nothing with -q, and JSON lines whose ``progress`` goes from 0 to 1 once over a whole command."""

import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from geodet import progress

ENV = {k: v for k, v in os.environ.items() if k != "GEODET_NO_PROGRESS"}
ENV["OMP_NUM_THREADS"] = "1"


class Stderr(io.StringIO):
    terminal = False

    def isatty(self):
        return self.terminal


@pytest.fixture
def stderr(monkeypatch):
    """A captured, non-terminal stderr (set when the test runs: pytest's own capture takes
    sys.stderr back after the fixtures) and a clean progress state."""
    monkeypatch.setattr(progress, "_STATE", {"mode": "auto", "weights": None, "index": 0, "reported": 0.0})
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    buf = Stderr()

    def use():
        monkeypatch.setattr(sys, "stderr", buf)
        return buf

    return use


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    return now


def test_auto_is_lines_off_a_terminal_and_bar_on_one(stderr, monkeypatch):
    stderr = stderr()
    assert progress.mode() == "lines"
    stderr.terminal = True
    assert progress.mode() == "bar"
    for m in ("json", "none", "lines", "bar"):
        progress.set_mode(m)
        assert progress.mode() == m
    with pytest.raises(ValueError):
        progress.set_mode("fancy")


def test_lines_a_few_times_a_minute_without_carriage_returns(stderr, clock):
    stderr = stderr()
    bar = progress.progress_bar(total=1200, desc="train (20 min)", unit="s")
    for _ in range(1200):  # 20 minutes, a tick a second
        clock[0] += 1
        bar.n += 1
        bar.set_postfix(step=bar.n, loss="0.5")
        bar.refresh()
    bar.close()
    text = stderr.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert 60 * 20 / progress.LINE_INTERVAL <= len(lines) <= 60 * 20 / progress.LINE_INTERVAL + 2  # ~4 a minute
    assert lines[0].startswith("train (20 min): 0/1200 s (0%), 0:00 elapsed")
    assert "600/1200 s (50%), 10:00 elapsed, ~10:00 left, step 600, loss 0.5" in text
    assert lines[-1].startswith("train (20 min): 1200/1200 s (100%), ended after 20:00")


def test_quiet_and_disabled_bars_write_nothing(stderr):
    stderr = stderr()
    progress.set_mode("none")
    with progress.progress_bar(total=10, desc="x") as bar:
        bar.update(10)
    progress.set_mode("lines")
    with progress.progress_bar(total=10, desc="x", enabled=False) as bar:
        bar.update(4)
        assert bar.n == 4
    assert stderr.getvalue() == ""


def _events(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_json_progress_moves_once_from_0_to_1_over_planned_stages(stderr, clock):
    stderr = stderr()
    progress.set_mode("json")
    progress.plan(2)
    for name in ("detect a.tif", "detect b.tif"):
        with progress.progress_bar(total=4, desc=name, unit="tile") as bar:
            for _ in range(4):
                clock[0] += 1
                bar.update(1)
    with progress.progress_bar(total=2, desc="disabled", enabled=False) as bar:  # not a stage
        bar.update(2)
    progress.finish()
    ev = _events(stderr.getvalue())
    overall = [e["progress"] for e in ev]
    assert overall[0] == 0.0 and overall[-1] == 1.0 and overall == sorted(overall)
    assert {(e["stage"], e["stage_index"], e["stage_count"]) for e in ev} == {("detect a.tif", 1, 2),
                                                                             ("detect b.tif", 2, 2)}
    first_b = next(e for e in ev if e["stage"] == "detect b.tif")
    assert first_b["stage_progress"] == 0.0 and first_b["progress"] == 0.5
    assert ev[-1]["done"] == 4 and ev[-1]["unit"] == "tile"


def test_json_weights_unplanned_stages_and_finish(stderr, clock):
    stderr = stderr()
    progress.set_mode("json")
    progress.plan([3, 1])
    with progress.progress_bar(total=10, desc="train") as bar:
        clock[0] += 1
        bar.update(5)
    assert _events(stderr.getvalue())[-1]["progress"] == 0.375  # half of 3/4
    progress.finish()  # the second stage never showed a bar: the command still ends at 1
    assert _events(stderr.getvalue())[-1]["progress"] == 1.0
    stderr.truncate(0), stderr.seek(0)
    progress.plan(1)
    for _ in range(2):  # a stage more than planned (a retry round): the bar holds, never goes back
        with progress.progress_bar(total=2, desc="blocks") as bar:
            bar.update(2)
    overall = [e["progress"] for e in _events(stderr.getvalue())]
    assert overall == sorted(overall) and overall[-1] <= 1.0
    progress.finish(done=False)
    with progress.progress_bar(total=4, desc="library use") as bar:  # no plan: the stage's own fraction
        clock[0] += 1
        bar.update(1)
    ev = next(e for e in _events(stderr.getvalue()) if e["stage"] == "library use" and e["done"] == 1)
    assert ev["stage_count"] is None and ev["progress"] == 0.25


def _detect(tmp_path, model, scenes, *flags):
    """``geodet detect`` in a process of its own, its stderr a file (not a terminal; cli_runner.py)."""
    from cli_runner import run_geodet

    return run_geodet(*flags, "detect", *scenes, "-m", model, "-o", tmp_path / "d.gpkg", env=ENV, timeout=600)


def test_a_two_scene_detect_moves_a_driving_programs_bar_once(tmp_path, tiny_model, synth):
    other = tmp_path / "other.tif"  # a second scene (one scene twice is refused)
    shutil.copy(synth.image, other)
    r = _detect(tmp_path, tiny_model, [synth.image, other], "--progress", "json")
    assert r.returncode == 0, r.stderr
    ev = [e for e in _events(r.stderr) if "progress" in e]
    overall = [e["progress"] for e in ev]
    assert overall[0] == 0.0 and overall[-1] == 1.0 and overall == sorted(overall), overall
    assert {e["stage_index"] for e in ev if e["stage"]} == {1, 2} and {e["stage_count"] for e in ev} == {2}


def test_export_moves_a_driving_programs_bar_over_its_stages(tmp_path, tiny_model, synth):
    from cli_runner import run_geodet

    r = run_geodet("--progress", "json", "export", "-m", tiny_model, "-o", tmp_path / "m.onnx", "--calibrate",
                   synth.image, "--calib-tiles", "2", env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    overall = [e["progress"] for e in _events(r.stderr) if "progress" in e]
    assert overall[0] == 0.0 and overall[-1] == 1.0 and overall == sorted(overall) and len(overall) >= 3, overall


def test_a_redirected_log_gets_lines_and_q_gets_none(tmp_path, tiny_model, synth):
    r = _detect(tmp_path, tiny_model, [synth.image])  # stderr is a pipe here, not a terminal
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("detect s.tif:")]
    assert "\r" not in r.stderr and 2 <= len(lines) <= 4, r.stderr
    assert "(100%), ended after" in lines[-1]
    r = _detect(tmp_path, tiny_model, [synth.image], "-q")
    assert r.returncode == 0 and "detect s.tif:" not in r.stderr and "\r" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------
# a driver's stop (standard input closed) cannot be lost


@pytest.fixture
def python_sigint():
    """SIGINT handled by Python, as the stop-on-EOF watcher makes it (a test run started as a
    background job of a non-interactive shell has it ignored)."""
    import signal

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def _stop_swallowed() -> None:
    """A stop asked for from another thread (as the stop-on-EOF watcher does), its interrupt
    swallowed in the main thread."""
    import threading
    import time

    asking = threading.Thread(target=progress.request_stop)
    try:
        asking.start()
        time.sleep(30)  # the interrupt ends the wait
        raise AssertionError("no interrupt came")
    except KeyboardInterrupt:
        pass  # swallowed
    asking.join()


@pytest.mark.parametrize("mode", ["none", "json", "bar"])
def test_a_stop_swallowed_by_a_library_is_carried_out_at_the_next_update(stderr, monkeypatch, python_sigint, mode):
    """The interrupt a stop makes can be raised where a C extension swallows it (an attribute
    probe); the next progress update in the main thread raises it again."""
    monkeypatch.setattr(progress, "_STOP", {"asked": False, "told": []})
    progress.set_mode(mode)
    bar = progress.progress_bar(total=10, desc="work")
    bar.update(1)  # no stop asked: nothing happens
    _stop_swallowed()
    with pytest.raises(KeyboardInterrupt):
        bar.update(1)
    with pytest.raises(KeyboardInterrupt):  # and at every later one
        bar.update(1)
    bar.close()


def test_a_stop_tells_a_handler_of_the_work_once(stderr, monkeypatch, python_sigint):
    """Training's own SIGINT handler (finish the step, save, stop; a second signal: stop at once)
    is told once, also when it was installed after the stop was asked for (the first interrupt
    lost before it), never twice."""
    import signal

    monkeypatch.setattr(progress, "_STOP", {"asked": False, "told": []})
    progress.set_mode("none")
    bar = progress.progress_bar(total=10)
    _stop_swallowed()  # lost before the work's handler was installed
    calls = []
    old = signal.signal(signal.SIGINT, lambda s, f: calls.append(s))
    try:
        for _ in range(3):
            bar.update(1)
        assert calls == [signal.SIGINT] and bar.n == 3
    finally:
        signal.signal(signal.SIGINT, old)


def _run_until_stdin_closes(script: str, blocking: bool = True, sigint_ignored: bool = False):
    """Run ``script`` in a child whose standard input is a pipe (``blocking`` or not; started
    with SIGINT ignored, as a background job of a non-interactive shell is), close the pipe once
    the child prints ``ready``; its return code and output."""
    import select

    r, w = os.pipe()
    os.set_blocking(r, blocking)
    argv = [sys.executable, "-c", script]
    if sigint_ignored:  # a launcher that ignores SIGINT and execs the child (it inherits that)
        argv = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                "os.execv(sys.executable, [sys.executable, '-c', sys.argv[1]])", script]
    proc = subprocess.Popen(argv, stdin=r, stdout=subprocess.PIPE, text=True, env=ENV)
    os.close(r)
    try:
        assert select.select([proc.stdout], [], [], 60)[0], "the child did not start"
        assert proc.stdout.readline().strip() == "ready"
        os.close(w)
        w = None
        out, _ = proc.communicate(timeout=20)
    finally:
        if w is not None:
            os.close(w)
        proc.kill()
        proc.wait()
        proc.stdout.close()
    return proc.returncode, out.split()


@pytest.mark.parametrize("blocking", [True, False])
def test_stdin_closing_stops_work_that_swallows_the_first_interrupt(blocking):
    """GEODET_STOP_ON_EOF's watcher, end to end in a child: its standard input closes (a blocking
    pipe, or a non-blocking one, whose flag the driver may have set) while the work swallows the
    first interrupt; the work stops at its next progress update."""
    script = (
        "import sys, time\n"
        "from geodet import progress\n"
        "from geodet.cli import _stop_when_stdin_closes\n"
        "progress.set_mode('none')\n"
        "_stop_when_stdin_closes()\n"
        "bar = progress.progress_bar(total=10**6)\n"
        "swallowed = 0\n"
        "try:\n"
        "    print('ready', flush=True)\n"
        "    for _ in range(600):\n"
        "        try:\n"
        "            time.sleep(0.05)\n"
        "        except KeyboardInterrupt:\n"
        "            swallowed += 1\n"
        "        bar.update(1)\n"
        "except KeyboardInterrupt:\n"
        "    print('stopped', swallowed, flush=True)\n"
        "    sys.exit(130)\n"
    )
    code, out = _run_until_stdin_closes(script, blocking)
    # swallowed once, or (the interrupt handled at the update itself, on a busy machine) not at all
    assert code == 130 and out[:1] == ["stopped"] and int(out[1]) <= 1, (code, out)


def test_stdin_closing_stops_a_child_started_with_sigint_ignored():
    """A driver that starts geodet with SIGINT ignored (a background job of a non-interactive
    shell): the stop still interrupts a wait that makes no progress update (Python's interrupt
    does nothing while SIGINT is ignored; a driven detect used to run to its end)."""
    script = (
        "import sys, time\n"
        "from geodet.cli import _stop_when_stdin_closes\n"
        "_stop_when_stdin_closes()\n"
        "try:\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(30)\n"
        "except KeyboardInterrupt:\n"
        "    print('stopped', flush=True)\n"
        "    sys.exit(130)\n"
    )
    assert _run_until_stdin_closes(script, sigint_ignored=True) == (130, ["stopped"])
