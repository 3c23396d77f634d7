"""Pictures of the labelling loop in a real QGIS window, for the README: run by QGIS itself under
Xvfb, with geodet's plugin installed and enabled in the profile (as ``tests/qgis_screens.py``):

    xvfb-run -s "-screen 0 1600x1000x24" qgis --profiles-path PROFILES --nologo --noversioncheck \\
        --code tests/qgis_loop_screens.py

Environment: GEODET_LOOP_SCENE (the raster), GEODET_LOOP_ROUNDS (JSON: a list of ``[MODEL, AREA]``
pairs, each round's model and the labelled area it was trained on, as
``benchmarks/bench_labelling_loop.py`` leaves them), GEODET_LOOP_CELL (cell size in pixels),
GEODET_LOOP_COUNT (cells per round), GEODET_LOOP_OUT (a folder). For each round it runs the
toolbox's "Suggest tiles to label" (``processing.runAndLoadResults``, as the dialog does) with the
round's model and labelled area, and saves the map (the scene, the labelled area in yellow, the
suggested cells as they load, styled with their rank) as ``loop_roundN.png``; ``loop.json`` has
each round's suggested cells (rank, uncertainty, reason) and any warning in QGIS's message log,
or the error that stopped it (then the exit status is 1). Not a test module."""

import json
import os

from qgis.core import Qgis, QgsApplication, QgsFillSymbol, QgsProject, QgsVectorLayer
from qgis.PyQt.QtCore import QTimer
from qgis.utils import iface

SCENE = os.environ["GEODET_LOOP_SCENE"]
ROUNDS = json.loads(os.environ["GEODET_LOOP_ROUNDS"])
CELL = int(os.environ.get("GEODET_LOOP_CELL", "128"))
COUNT = int(os.environ.get("GEODET_LOOP_COUNT", "4"))
OUT = os.environ["GEODET_LOOP_OUT"]
report = {"rounds": [], "log_warnings": []}
state = {"round": 0, "layers": []}


def _log(message, tag, level):
    if level >= Qgis.Warning:
        report["log_warnings"].append(f"{tag}: {message}")


QgsApplication.messageLog().messageReceived.connect(_log)


def finish(code=0):
    with open(os.path.join(OUT, "loop.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    QgsProject.instance().setDirty(False)
    os._exit(code)  # QGIS's own exit asks about the unsaved project


def later(ms, fn):
    def guarded():
        try:
            fn()
        except Exception as exc:  # an error dialog would keep QGIS (and xvfb-run) waiting for ever
            report["error"] = f"{type(exc).__name__}: {exc}"
            finish(1)

    QTimer.singleShot(ms, guarded)


def start():
    window = iface.mainWindow()
    window.setGeometry(QgsApplication.primaryScreen().geometry())
    state["scene"] = iface.addRasterLayer(SCENE, "scene")
    iface.mapCanvas().setExtent(state["scene"].extent())
    later(1000, one_round)


def one_round():
    import processing

    for layer in state["layers"]:
        QgsProject.instance().removeMapLayer(layer.id())
    state["layers"] = []
    r = state["round"]
    model, area = ROUNDS[r]
    labelled = QgsVectorLayer(area, f"labelled after round {r}", "ogr")
    labelled.setRenderer(labelled.renderer().clone())
    labelled.renderer().setSymbol(QgsFillSymbol.createSimple(
        {"color": "255,230,0,60", "outline_color": "255,200,0,255", "outline_width": "0.8"}))
    QgsProject.instance().addMapLayer(labelled)
    out = os.path.join(OUT, f"next_round{r + 1}.gpkg")
    result = processing.runAndLoadResults("geodet:suggest", {
        "INPUT": state["scene"], "MODEL": model, "COUNT": COUNT, "CELL_SIZE": CELL, "LABELLED_AREA": area,
        "STRATEGY": 0, "OUTPUT": out})
    cells = [layer for layer in QgsProject.instance().mapLayers().values() if layer.source().startswith(out)]
    state["layers"] = [labelled, *cells]
    rows = []
    if cells:
        for f in cells[0].getFeatures():
            rows.append({"rank": f["rank"], "uncertainty": round(float(f["uncertainty"]), 3), "reason": f["reason"]})
    report["rounds"].append({"model": model, "area": area, "output": result.get("OUTPUT"), "loaded": len(cells),
                             "renderer": cells[0].renderer().type() if cells else None,
                             "labels_shown": cells[0].labelsEnabled() if cells else None, "cells": rows})
    if not cells:
        raise RuntimeError(f"round {r + 1}: the suggested cells did not load")
    state["rendered"] = False
    canvas = iface.mapCanvas()
    canvas.mapCanvasRefreshed.connect(rendered)
    canvas.refreshAllLayers()
    later(1000, save_round)


def rendered():
    state["rendered"] = True


def save_round():
    canvas = iface.mapCanvas()
    if not state["rendered"] or canvas.isDrawing():  # the round's layers drawn, not the last round's
        later(500, save_round)
        return
    canvas.mapCanvasRefreshed.disconnect(rendered)
    r = state["round"]
    png = os.path.join(OUT, f"loop_round{r + 1}.png")
    canvas.saveAsImage(png)
    for world in (png[:-4] + ".pgw", png + ".aux.xml"):  # saveAsImage's world files: not wanted here
        if os.path.exists(world):
            os.remove(world)
    state["round"] += 1
    if state["round"] < len(ROUNDS):
        later(500, one_round)
    else:
        finish(0)


later(3000, start)
