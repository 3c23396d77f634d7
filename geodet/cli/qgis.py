"""``geodet qgis-plugin``: install geodet's QGIS Processing provider, or write it as a zip."""

from __future__ import annotations

from .common import GeodetError, deprecated


def add_parser(sub, common) -> None:
    q = sub.add_parser("qgis-plugin", parents=[common], help="install geodet's QGIS plugin (a Processing provider)",
                       description="Install the geodet plugin into QGIS (a 'geodet' entry in the Processing toolbox "
                                   "with the groups Detect, Train, Evaluate and Prepare), or write it as a zip for "
                                   "Plugins > Install from ZIP. The plugin runs this environment's geodet command, "
                                   "whose path it records for QGIS; enable it in QGIS's plugin manager, or headless "
                                   "with 'qgis_process plugins enable geodet_qgis'.")
    q.add_argument("--out", "-o", metavar="FILE.zip", help="write the plugin as a zip here instead of installing it")
    q.add_argument("--plugins-dir", help="QGIS plugin folder to install into (default: the default profile's, "
                                         "e.g. ~/.local/share/QGIS/QGIS3/profiles/default/python/plugins)")
    deprecated(q, "--zip", "use -o/--out", dest="out")


def run(args) -> int:
    from ..qgis import geodet_executable, install_plugin, zip_plugin

    if args.out and args.plugins_dir:
        raise GeodetError("-o writes the plugin as a zip and --plugins-dir installs it: give one of them")
    exe = geodet_executable()
    if args.out:
        print(f"wrote {zip_plugin(args.out, exe)} (QGIS: Plugins > Manage and Install Plugins > Install from ZIP)")
        return 0
    folder = install_plugin(args.plugins_dir, exe)
    runs = (f"It runs {exe} (recorded for QGIS: Settings > Options > Processing > Providers > geodet shows it, and "
            "QGIS started from a desktop launcher finds it)") if exe else \
        "No geodet executable was found here: set its path in Settings > Options > Processing > Providers > geodet"
    print(f"installed the geodet QGIS plugin in {folder}; enable 'geodet' in QGIS's plugin manager (or: qgis_process "
          f"plugins enable geodet_qgis). {runs}")
    return 0
