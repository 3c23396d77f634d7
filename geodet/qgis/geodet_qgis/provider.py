"""geodet's Processing provider: the toolbox entry, its algorithms and its one setting (the path
of the geodet executable)."""

import os

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .runner import SETTING

# what geodet writes and QGIS 3.22 opens (GeoParquet needs a GDAL built with Arrow, which Debian's is not)
OUTPUT_EXTENSIONS = ["gpkg", "geojson", "fgb", "shp", "csv"]


class GeodetProvider(QgsProcessingProvider):
    def id(self):
        return "geodet"

    def name(self):
        return "geodet"

    def longName(self):  # noqa: N802
        return "geodet: dense small-object detection"

    def icon(self):
        return QIcon(os.path.join(os.path.dirname(__file__), "icon.svg"))

    def load(self):
        try:
            from processing.core.ProcessingConfig import ProcessingConfig, Setting

            ProcessingConfig.settingIcons[self.name()] = self.icon()
            ProcessingConfig.addSetting(Setting(self.name(), SETTING, "Path to the geodet executable (empty: 'geodet' "
                                                "on PATH)", "", valuetype=Setting.FILE))
            ProcessingConfig.readSettings()
        except ImportError:  # no Processing Python module: the environment variable or PATH decide
            pass
        self.refreshAlgorithms()
        return True

    def unload(self):
        try:
            from processing.core.ProcessingConfig import ProcessingConfig

            ProcessingConfig.removeSetting(SETTING)
        except ImportError:
            pass

    def loadAlgorithms(self):  # noqa: N802
        from .algorithms import ALGORITHMS

        for cls in ALGORITHMS:
            self.addAlgorithm(cls())

    def supportedOutputVectorLayerExtensions(self):  # noqa: N802
        return list(OUTPUT_EXTENSIONS)

    def defaultVectorFileExtension(self, hasGeometry=True):  # noqa: N802
        return "gpkg"
