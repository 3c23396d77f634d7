"""Running the geodet command from QGIS: find the executable of the user's environment, stream its
``--progress json`` lines into the Processing feedback, honour Cancel, and turn geodet's one-line
errors into QgsProcessingException.

geodet writes every output through a temporary file renamed into place, so a cancelled run (the
process gets SIGTERM, which geodet treats as an interrupt) leaves no half-written file.
"""

import json
import os
import queue
import shutil
import subprocess
import threading

from qgis.core import QgsProcessingException

SETTING = "GEODET_EXECUTABLE"
PARTIAL = 3  # geodet's exit code for a partial result that was written
SETTINGS_KEY = "geodet/executable"
HELP = ("install geodet in a Python environment (pip install geodet), then set the path of its 'geodet' "
        "executable in Settings > Options > Processing > Providers > geodet")


def configured_executable() -> str:
    """The path set in Processing's options, else the GEODET_EXECUTABLE environment variable."""
    value = ""
    try:
        from processing.core.ProcessingConfig import ProcessingConfig

        value = ProcessingConfig.getSetting(SETTING) or ""
    except Exception:  # Processing's Python module is not loaded (a bare QgsApplication)
        pass
    if not value:
        from qgis.core import QgsSettings

        value = QgsSettings().value(SETTINGS_KEY, "") or ""
    return str(value or os.environ.get(SETTING, ""))


def find_executable() -> str:
    """The geodet executable to run: the configured one, else 'geodet' on PATH."""
    exe = configured_executable()
    if exe:
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            raise QgsProcessingException(f"geodet executable not found or not executable: {exe}: {HELP}")
        return exe
    found = shutil.which("geodet")
    if not found:
        raise QgsProcessingException(f"the geodet command is not on PATH: {HELP}")
    return found


def _pump(stream, q, tag):
    for line in iter(stream.readline, ""):
        q.put((tag, line.rstrip("\n")))
    q.put((tag, None))


def run_geodet(args, feedback, executable=None):
    """Run ``geodet --progress json ARGS...``; returns its standard output. Progress lines move
    the feedback's bar, other lines go to the log; Cancel stops the process. A failure raises
    QgsProcessingException with geodet's own one-line message."""
    exe = executable or find_executable()
    cmd = [exe, "--progress", "json", *[str(a) for a in args]]
    feedback.pushCommandInfo(" ".join(cmd))
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, env=env)
    except OSError as exc:
        raise QgsProcessingException(f"cannot start {exe}: {exc}: {HELP}") from None
    q = queue.Queue()
    threads = [threading.Thread(target=_pump, args=(proc.stdout, q, "out"), daemon=True),
               threading.Thread(target=_pump, args=(proc.stderr, q, "err"), daemon=True)]
    for t in threads:
        t.start()
    out, errors, open_streams, cancelled = [], [], 2, False
    while open_streams:
        if feedback.isCanceled() and not cancelled and proc.poll() is None:
            cancelled = True
            feedback.pushInfo("cancelling: stopping geodet (nothing half-written is kept)")
            proc.terminate()
        try:
            tag, line = q.get(timeout=0.1)
        except queue.Empty:
            continue
        if line is None:
            open_streams -= 1
            continue
        if tag == "out":
            out.append(line)
            feedback.pushInfo(line)
            continue
        event = None
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                event = None
        if isinstance(event, dict) and "progress" in event:
            if event.get("progress") is not None:
                feedback.setProgress(100.0 * float(event["progress"]))
            if event.get("stage"):
                feedback.setProgressText(str(event["stage"]))
        elif isinstance(event, dict) and "message" in event:
            feedback.pushInfo(str(event["message"]))
        else:
            errors.append(line)
            if line.startswith("geodet: error") or line.startswith("geodet: unexpected"):
                feedback.reportError(line)
            else:
                feedback.pushInfo(line)
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    if cancelled:
        raise QgsProcessingException("geodet: cancelled; no output was written")
    message = next((e for e in reversed(errors) if e.startswith("geodet:")), None)
    if rc == PARTIAL:  # written, with unreadable tiles or scenes listed in the report
        feedback.reportError(message or "geodet wrote a partial result (see its report)", False)
    elif rc != 0:
        raise QgsProcessingException(message or f"geodet exited with code {rc}: " + " | ".join(errors[-3:]))
    return "\n".join(out)
