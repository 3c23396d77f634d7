"""geodet for QGIS: a Processing provider that runs the geodet command of the user's own Python
environment (see ``runner.py``), so QGIS's Python never needs torch."""


def classFactory(iface):  # noqa: N802  (QGIS's plugin entry point)
    from .plugin import GeodetPlugin

    return GeodetPlugin(iface)
