"""geodet's Processing provider: the toolbox entry, its algorithms, and its one setting (the path of
the geodet executable), which ``geodet qgis-plugin`` records and the provider reads. At load it
says in QGIS's log which geodet it will run and its version, or how to set one."""

import os
import subprocess

from qgis.core import Qgis, QgsMessageLog, QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .formats import detection_extensions
from .process import child_environment, popen_options
from .runner import (HELP, SETTING, configured_executable, earlier_recorded, find_executable, qgis_prefixes,
                     recorded_executable, usable)

LOG_TAG = "geodet"
ADOPTED = "geodet/adopted_executable"  # the recorded path last put into the setting


def describe_geodet():
    """(level, message) for the log: which geodet runs and its version, or how to set one."""
    try:
        exe = find_executable()
    except Exception as exc:  # QgsProcessingException: not configured and not on PATH
        return Qgis.Warning, str(exc)
    try:
        r = subprocess.run([exe, "--version"], capture_output=True, text=True, encoding="utf-8", errors="replace",
                           timeout=60, env=child_environment(os.environ, exe, qgis_prefixes()), stdin=subprocess.DEVNULL,
                           **popen_options())
        version = (r.stdout or r.stderr).strip().splitlines()[-1] if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        version = None
    if not version:
        return Qgis.Warning, f"{exe} did not answer 'geodet --version': {HELP}"
    return Qgis.Info, f"runs {exe} ({version}); set another in Settings > Options > Processing > Providers > geodet"


def adopt_recorded(config):
    """Put the geodet that ran 'geodet qgis-plugin' last into Processing's setting (shown in the
    options) where the setting is empty, no longer usable, or still the one an earlier install put
    there: reinstalling from another environment moves QGIS to it, as the installer says. A path
    the user chose in the options stays, as does the GEODET_EXECUTABLE environment variable."""
    recorded, _ = recorded_executable()
    if not usable(recorded) or os.environ.get(SETTING):
        return
    from qgis.core import QgsSettings

    settings = QgsSettings()
    current = configured_executable()
    adopted = settings.value(ADOPTED, "") or ""
    if current != recorded and (not usable(current) or current == adopted or current in earlier_recorded()):
        config.setSettingValue(SETTING, recorded)
    if configured_executable() == recorded:
        settings.setValue(ADOPTED, recorded)


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
            ProcessingConfig.addSetting(Setting(self.name(), SETTING, "Path to the geodet executable (empty: the one "
                                                "that installed the plugin, else 'geodet' on PATH)", "",
                                                valuetype=Setting.FILE))
            ProcessingConfig.readSettings()
            adopt_recorded(ProcessingConfig)
        except ImportError:  # no Processing Python module: the environment variable, the record or PATH decide
            pass
        level, message = describe_geodet()
        QgsMessageLog.logMessage(message, LOG_TAG, level)
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
        return detection_extensions()

    def defaultVectorFileExtension(self, hasGeometry=True):  # noqa: N802
        return "gpkg"
