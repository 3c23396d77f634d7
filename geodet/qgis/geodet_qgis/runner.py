"""Running the geodet command from QGIS: find the executable of the user's environment, stream its
``--progress json`` lines into the Processing feedback (one bar from 0 to 100), honour Cancel
(``process.Child``: polite, then killed), and turn geodet's one-line errors into
QgsProcessingException. After Cancel it says truthfully what is left."""

import json
import os
import shutil
import sys
from pathlib import Path

from qgis.core import QgsProcessingException

from .process import Child, child_environment

SETTING = "GEODET_EXECUTABLE"
PARTIAL = 3  # geodet's exit code for a partial result that was written
RECORD = Path(__file__).with_name("geodet.json")  # written by `geodet qgis-plugin`: the geodet that installed it
HELP = ("install geodet in a Python environment (pip install geodet) and run 'geodet qgis-plugin' from it, or set "
        "the path of its 'geodet' executable in Settings > Options > Processing > Providers > geodet")


def recorded_executable():
    """(path, version) recorded by ``geodet qgis-plugin``, or (None, None)."""
    try:
        record = json.loads(RECORD.read_text(encoding="utf-8"))
        return record.get("executable") or None, record.get("version")
    except (OSError, ValueError, AttributeError):
        return None, None


def earlier_recorded() -> list:
    """The executables that earlier installs of the plugin into this folder recorded."""
    try:
        earlier = json.loads(RECORD.read_text(encoding="utf-8")).get("earlier") or []
        return [e for e in earlier if isinstance(e, str)]
    except (OSError, ValueError, AttributeError):
        return []


def usable(path) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def configured_executable() -> str:
    """The path set in Processing's options, else the GEODET_EXECUTABLE environment variable."""
    value = ""
    try:
        from processing.core.ProcessingConfig import ProcessingConfig

        value = ProcessingConfig.getSetting(SETTING) or ""
    except Exception:  # Processing's Python module is not loaded (a bare QgsApplication)
        pass
    return str(value or os.environ.get(SETTING, ""))


def find_executable() -> str:
    """The geodet to run: the configured one, else the one that installed the plugin, else PATH's."""
    exe = configured_executable()
    if exe:
        if not usable(exe):
            raise QgsProcessingException(f"geodet executable not found or not executable: {exe}: {HELP}")
        return exe
    recorded, _ = recorded_executable()
    if usable(recorded):
        return recorded
    found = shutil.which("geodet")
    if not found:
        if recorded:
            raise QgsProcessingException(f"the geodet that installed this plugin, {recorded}, is no longer there (was "
                                         f"its environment removed or moved?), and none is on PATH: {HELP}")
        raise QgsProcessingException(f"the geodet command was not found: {HELP}")
    return found


def qgis_prefixes() -> list:
    """Where QGIS's own Python (and, on Windows, its OSGeo4W tree) lives."""
    prefixes = [sys.prefix, getattr(sys, "base_prefix", sys.prefix), os.environ.get("OSGEO4W_ROOT", "")]
    try:
        from qgis.core import QgsApplication

        prefixes.append(QgsApplication.prefixPath())
    except Exception:
        pass
    return [p for p in prefixes if p]


class Progress:
    """geodet's JSON lines into the feedback: the whole command's fraction moves the bar, and the
    stage's name is shown once when it begins."""

    def __init__(self, feedback):
        self.feedback, self.stage, self.value = feedback, None, 0.0

    def take(self, line: str) -> bool:
        """Handle ``line`` if it is one of geodet's JSON lines; False otherwise."""
        if not line.startswith("{"):
            return False
        try:
            event = json.loads(line)
        except ValueError:
            return False
        if not isinstance(event, dict):
            return False
        if "message" in event:
            self.feedback.pushInfo(str(event["message"]))
            return True
        if "progress" not in event:
            return False
        stage = event.get("stage")
        if stage and stage != self.stage:
            self.stage = stage
            count = event.get("stage_count")
            text = f"{stage} ({event.get('stage_index')} of {count})" if count and count > 1 else str(stage)
            self.feedback.setProgressText(text)
        if event.get("progress") is not None:
            self.value = max(self.value, 100.0 * float(event["progress"]))  # older geodets restart per stage
            self.feedback.setProgress(self.value)
        return True


def run_geodet(args, feedback, executable=None, grace: float = 5.0, on_cancel=None):
    """Run ``geodet --progress json ARGS...``; returns its standard output. A failure raises
    QgsProcessingException with geodet's own one-line message; Cancel raises one that says what
    is left (``on_cancel(killed)`` returns that sentence)."""
    exe = executable or find_executable()
    cmd = [exe, "--progress", "json", *[str(a) for a in args]]
    feedback.pushCommandInfo(" ".join(cmd))
    env = child_environment(os.environ, exe, qgis_prefixes())
    child = Child(cmd, env, grace=grace)
    try:
        child.start()
    except OSError as exc:
        raise QgsProcessingException(f"cannot start {exe}: {exc}: {HELP}") from None
    feedback.pushDebugInfo(f"geodet started (process {child.pid})")
    progress, out, errors = Progress(feedback), [], []
    try:
        for tag, line in child.lines(feedback.isCanceled):
            if tag == "out":
                out.append(line)
                feedback.pushInfo(line)
            elif not progress.take(line):
                errors.append(line)
                if not line.startswith(("geodet: error", "geodet: unexpected")):  # those become the exception
                    feedback.pushInfo(line)
    finally:
        child.close()
    rc = child.returncode
    if child.stopped:
        how = "stopped by force after %g s" % grace if child.killed else "stopped"
        left = on_cancel(child.killed) if on_cancel else "nothing half-written is kept"
        raise QgsProcessingException(f"geodet: cancelled ({how}); {left}")
    message = next((e for e in reversed(errors) if e.startswith("geodet:") and "warning" not in e[:16]), None)
    if rc == PARTIAL:  # written, with unreadable tiles or scenes listed in the report
        feedback.reportError(message or "geodet wrote a partial result (see its report)", False)
    elif rc != 0:
        raise QgsProcessingException(message or f"geodet exited with code {rc}: " + " | ".join(errors[-3:]))
    return "\n".join(out)


def temporary_leftovers(outputs, since: float) -> list:
    """geodet's temporary files beside ``outputs`` made since ``since`` (epoch seconds): what a
    killed run can leave (a run that stops politely removes them itself)."""
    found = []
    for out in outputs:
        p = Path(out)
        if not p.parent.is_dir():
            continue
        for entry in p.parent.iterdir():
            ours = entry.name.startswith(f".{p.stem}.") or entry.name.startswith("geodet-export-")
            try:
                if ours and entry.stat().st_mtime >= since - 1:
                    found.append(entry)
            except OSError:
                pass
    return found


def remove_leftovers(outputs, since: float) -> int:
    n = 0
    for entry in temporary_leftovers(outputs, since):
        try:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            n += 1
        except OSError:
            pass
    return n


def describe_outputs(outputs, since: float, killed: bool) -> str:
    """What a cancelled run left of ``outputs``: nothing, or an earlier file untouched."""
    if killed:
        remove_leftovers(outputs, since)
    parts = []
    for out in outputs:
        p = Path(out)
        if not p.exists():
            parts.append(f"{p.name} was not written")
        elif p.stat().st_mtime < since:
            parts.append(f"the earlier {p.name} is unchanged")
        else:  # renamed into place just before Cancel arrived: it is complete
            parts.append(f"{p.name} was completed before the stop")
    return "; ".join(parts) if parts else "nothing was written"

