"""Pictures of geodet in a real QGIS window, for the README: run by QGIS itself under Xvfb, with
geodet's plugin installed and enabled in the profile (``geodet qgis-plugin --plugins-dir ...``):

    xvfb-run -s "-screen 0 1600x1000x24" qgis --profiles-path PROFILES --nologo --noversioncheck \\
        --code tests/qgis_screens.py

Environment: GEODET_SCREENS_SCENE (a raster), GEODET_SCREENS_MODEL (model.pt), GEODET_SCREENS_OUT
(a folder), GEODET_SCREENS_PART (the part of the scene to show: x0,y0,x1,y1 as fractions, y from
the top). It opens the scene, shows the Processing toolbox with geodet's groups, opens Detect
objects with the scene and the model filled in and runs it from the dialog (as a user clicks
Run), then zooms onto the result, which loads styled. It saves ``qgis_toolbox_detect.png`` (the
window with the toolbox and the dialog) and ``qgis_result.png`` (the styled result on the map),
and ``screens.json``: the dialog's progress bar over the run, the loaded layer's name and
renderer, and any warning in QGIS's message log or Python's warnings. Not a test module."""

import json
import os
import warnings

from qgis.core import Qgis, QgsApplication, QgsProject, QgsRectangle
from qgis.PyQt.QtCore import QTimer
from qgis.PyQt.QtWidgets import QDockWidget, QProgressBar, QTextEdit
from qgis.utils import iface

SCENE = os.environ["GEODET_SCREENS_SCENE"]
MODEL = os.environ["GEODET_SCREENS_MODEL"]
OUT = os.environ["GEODET_SCREENS_OUT"]
DETECTIONS = os.path.join(OUT, "detections.gpkg")
report = {"progress": [], "log_warnings": [], "python_warnings": []}
state = {}


def _log(message, tag, level):
    if level >= Qgis.Warning:
        report["log_warnings"].append(f"{tag}: {message}")


QgsApplication.messageLog().messageReceived.connect(_log)
warnings.simplefilter("always")
_showwarning = warnings.showwarning


def _warned(message, category, filename, lineno, file=None, line=None):
    report["python_warnings"].append(f"{category.__name__}: {message} ({filename}:{lineno})")
    _showwarning(message, category, filename, lineno, file, line)


warnings.showwarning = _warned


def later(ms, fn):
    QTimer.singleShot(ms, fn)


def grab_screen(name):
    screen = QgsApplication.primaryScreen()
    screen.grabWindow(0).save(os.path.join(OUT, name), "PNG")


def show_toolbox():
    window = iface.mainWindow()
    window.setGeometry(QgsApplication.primaryScreen().geometry())  # Xvfb has no window manager to maximise it
    browser = window.findChild(QDockWidget, "Browser")
    if browser is not None:
        browser.hide()
    state["scene"] = iface.addRasterLayer(SCENE, "scene")
    dock = iface.mainWindow().findChild(QDockWidget, "ProcessingToolbox")
    dock.show()
    dock.raise_()
    tree = next(w for w in dock.findChildren(object) if type(w).__name__ == "QgsProcessingToolboxTreeView")
    model = tree.model()
    for row in range(model.rowCount()):
        index = model.index(row, 0)
        if model.data(index) == "geodet":
            tree.expandRecursively(index)
            tree.setCurrentIndex(model.index(0, 0, model.index(0, 0, index)))
            later(500, lambda i=index: tree.scrollTo(i, tree.PositionAtTop))  # once the expanded rows are laid out
    later(1500, open_dialog)


def open_dialog():
    import processing

    dialog = processing.createAlgorithmDialog("geodet:detect", {"INPUT": state["scene"], "MODEL": MODEL,
                                                                "OUTPUT": DETECTIONS})
    state["dialog"] = dialog
    screen = QgsApplication.primaryScreen().geometry()
    dialog.resize(760, 600)
    dialog.show()
    dialog.move(screen.width() // 2 - 520, 150)  # over the map, beside the toolbox (after show: Qt centres it)
    later(2000, lambda: (grab_screen("qgis_toolbox_detect.png"), run_dialog()))


def run_dialog():
    dialog = state["dialog"]
    dialog.runAlgorithm()  # what the Run button does
    state["bar"] = dialog.findChild(QProgressBar)
    later(100, watch)


def watch():
    bar = state["bar"]
    value = bar.value()
    done = 100 in report["progress"]  # after the run the dialog resets its bar: not part of the run
    if not done and (not report["progress"] or report["progress"][-1] != value):
        report["progress"].append(value)
    layers = [layer for layer in QgsProject.instance().mapLayers().values() if layer.source().startswith(DETECTIONS)]
    if layers:
        state["layer"] = layers[0]
        later(1500, show_result)
    elif len(report["progress"]) < 100000:
        later(100, watch)


def show_result():
    dialog, layer = state["dialog"], state["layer"]
    log = dialog.findChild(QTextEdit)
    report["dialog_log"] = log.toPlainText()[-3000:] if log is not None else None
    dialog.close()
    renderer = layer.renderer()
    report.update({"layer_name": layer.name(), "renderer": renderer.type(), "labels": layer.labelsEnabled(),
                   "features": layer.featureCount()})
    fx0, fy0, fx1, fy1 = (float(v) for v in os.environ.get("GEODET_SCREENS_PART", "0,0,0.6,0.6").split(","))
    e = state["scene"].extent()  # the part to show: fractions of the scene, y from the top
    canvas = iface.mapCanvas()
    canvas.setExtent(QgsRectangle(e.xMinimum() + fx0 * e.width(), e.yMaximum() - fy1 * e.height(),
                                  e.xMinimum() + fx1 * e.width(), e.yMaximum() - fy0 * e.height()))
    canvas.refresh()
    later(5000, finish)


def finish():
    grab_screen("qgis_result.png")
    with open(os.path.join(OUT, "screens.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    QgsProject.instance().setDirty(False)
    os._exit(0)  # QGIS's own exit asks about the unsaved project


later(3000, show_toolbox)
