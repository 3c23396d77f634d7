"""geodet's QGIS plugin (``geodet_qgis``, a Processing provider), shipped inside the package so
that ``geodet qgis-plugin`` can install it or zip it from any install, wheels included. geodet
never imports the plugin: it runs in QGIS's Python and calls the geodet command."""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from importlib.resources import files
from pathlib import Path

from ..errors import GeodetError

PLUGIN = "geodet_qgis"
RECORD = "geodet.json"  # the geodet executable that installed the plugin, read by its provider


def geodet_executable() -> str | None:
    """The ``geodet`` command of this environment: the one running, else the script beside this
    Python (``bin/geodet``, ``Scripts/geodet.exe``), else PATH's."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0).lower() in ("geodet", "geodet.exe") and os.path.isfile(argv0):
        return os.path.abspath(argv0)
    here = os.path.dirname(os.path.abspath(sys.executable))
    names = ("geodet.exe",) if os.name == "nt" else ("geodet",)
    for folder in (here, os.path.join(here, "Scripts"), os.path.join(sys.prefix, "bin")):
        for name in names:
            candidate = os.path.join(folder, name)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
    return shutil.which("geodet")


def record(executable: str | None, earlier: list[str] = ()) -> bytes:
    """The record: the executable, geodet's version, and the executables earlier installs into this
    folder recorded (the provider moves QGIS's setting off one of those to the new one)."""
    from .. import __version__

    earlier = [e for e in dict.fromkeys(earlier) if e and e != executable]
    return json.dumps({"executable": executable, "version": f"geodet {__version__}", "earlier": earlier},
                      indent=1).encode("utf-8")


def earlier_executables(folder: Path) -> list[str]:
    """The executables an installed plugin's record names (its own and its earlier ones)."""
    try:
        old = json.loads((folder / RECORD).read_text(encoding="utf-8"))
        names = [old.get("executable"), *(old.get("earlier") or [])]
    except (OSError, ValueError, AttributeError, TypeError):
        return []
    return [str(n) for n in names if isinstance(n, str) and n]


def plugin_files(executable: str | None = None, earlier: list[str] = ()) -> list[tuple[str, bytes]]:
    """(path inside the plugin folder, content) of every file of the plugin, with the record of
    ``executable`` (the geodet its provider runs) where one is given."""
    root = files("geodet") / "qgis" / PLUGIN
    out = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.is_file() and not entry.name.endswith(".pyc") and entry.name != RECORD:
            out.append((entry.name, entry.read_bytes()))
    if executable:
        out.append((RECORD, record(executable, earlier)))
    return out


def default_plugin_dir() -> Path:
    """QGIS 3's plugin folder of the default profile for this user."""
    if os.name == "nt":
        base = Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming")) / "QGIS" / "QGIS3"
    elif os.uname().sysname == "Darwin":
        base = Path.home() / "Library" / "Application Support" / "QGIS" / "QGIS3"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "QGIS" / "QGIS3"
    return base / "profiles" / "default" / "python" / "plugins"


def install_plugin(plugins_dir: str | Path | None = None, executable: str | None = None) -> Path:
    """Copy the plugin into ``plugins_dir`` (default: the default profile's), recording
    ``executable`` as the geodet it runs; returns its folder. The new plugin is written beside the
    old one and swapped in whole, so a reinstall leaves no file the new version does not have."""
    import tempfile

    target = Path(plugins_dir) if plugins_dir else default_plugin_dir()
    folder = target / PLUGIN
    stage = old = None
    try:
        target.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{PLUGIN}-new-", dir=target))
        for name, data in plugin_files(executable, earlier_executables(folder)):
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            (stage / name).write_bytes(data)
        os.chmod(stage, 0o755)  # mkdtemp's folder is the user's alone; QGIS's plugin folders are readable
        if folder.is_symlink():  # a developer's link to a checkout: replaced, its target left alone
            folder.unlink()
        elif folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{PLUGIN}-old-", dir=target)) / PLUGIN
            os.replace(folder, old)
        os.replace(stage, folder)
        stage = None
    except OSError as exc:
        if old is not None and old.exists() and not folder.exists():
            try:
                os.replace(old, folder)  # the swap failed half-way: the old plugin goes back
            except OSError:
                pass  # left in its .geodet_qgis-old-* folder (not deleted below)
        raise GeodetError(f"cannot install the QGIS plugin in {folder}: {exc.strerror or exc}") from None
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        if old is not None and folder.exists():  # the old plugin is removed only once one is in place
            shutil.rmtree(old.parent, ignore_errors=True)
    return folder


def zip_plugin(path: str | Path, executable: str | None = None) -> Path:
    """The plugin as a zip for QGIS's Plugins > Manage and Install Plugins > Install from ZIP
    (recording ``executable``: on another machine the provider finds it missing and ignores it)."""
    from ..io.writers import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in plugin_files(executable):
                z.writestr(f"{PLUGIN}/{name}", data)
    return path
