"""geodet's QGIS plugin (``geodet_qgis``, a Processing provider), shipped inside the package so
that ``geodet qgis-plugin`` can install it or zip it from any install, wheels included. geodet
never imports the plugin: it runs in QGIS's Python and calls the geodet command."""

from __future__ import annotations

import os
import zipfile
from importlib.resources import files
from pathlib import Path

from ..errors import GeodetError

PLUGIN = "geodet_qgis"


def plugin_files() -> list[tuple[str, bytes]]:
    """(path inside the plugin folder, content) of every file of the plugin."""
    root = files("geodet") / "qgis" / PLUGIN
    out = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.is_file() and not entry.name.endswith(".pyc"):
            out.append((entry.name, entry.read_bytes()))
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


def install_plugin(plugins_dir: str | Path | None = None) -> Path:
    """Copy the plugin into ``plugins_dir`` (default: the default profile's); returns its folder."""
    target = Path(plugins_dir) if plugins_dir else default_plugin_dir()
    folder = target / PLUGIN
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in plugin_files():
            (folder / name).write_bytes(data)
    except OSError as exc:
        raise GeodetError(f"cannot install the QGIS plugin in {folder}: {exc.strerror or exc}") from None
    return folder


def zip_plugin(path: str | Path) -> Path:
    """The plugin as a zip for QGIS's Plugins > Manage and Install Plugins > Install from ZIP."""
    from ..io.writers import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in plugin_files():
                z.writestr(f"{PLUGIN}/{name}", data)
    return path
