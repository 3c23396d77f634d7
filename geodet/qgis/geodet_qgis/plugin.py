"""The plugin: registers geodet's Processing provider (in the GUI and in qgis_process)."""

from qgis.core import QgsApplication


class GeodetPlugin:
    def __init__(self, iface):
        self.iface = iface
        self.provider = None

    def initProcessing(self):  # noqa: N802  (QGIS calls it, also headless in qgis_process)
        from .provider import GeodetProvider

        self.provider = GeodetProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self):  # noqa: N802
        self.initProcessing()

    def unload(self):
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
