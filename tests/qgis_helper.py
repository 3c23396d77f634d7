"""Run by QGIS's own Python (Debian's python3 with python3-qgis), headless: what QGIS makes of
geodet's outputs, a rendered picture, geodet's Processing algorithms run the way Processing runs
them (``processing.run`` and ``processing.runAndLoadResults``, with Cancel), and what the provider
says at load. Prints one JSON object. Used by tests/test_qgis.py; not a test module itself.

    python3 qgis_helper.py inspect FILE [FILE...]
    python3 qgis_helper.py render RASTER VECTOR PNG
    python3 qgis_helper.py run PLUGIN_DIR SPEC_JSON
    python3 qgis_helper.py loaded PLUGIN_DIR [CHOSEN]
"""

import json
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from qgis.core import Qgis, QgsApplication, QgsRasterLayer, QgsVectorLayer  # noqa: E402

app = QgsApplication([], False)
app.initQgis()
messages = []


def _note(message, tag, level):
    if level >= Qgis.Warning:
        messages.append(f"{tag}: {message}")


QgsApplication.messageLog().messageReceived.connect(_note)


def describe(layer) -> dict:
    r = layer.renderer()
    lab = layer.labeling()
    settings = lab.settings() if lab is not None else None
    fields = {f.name(): f.typeName() for f in layer.fields()}
    return {
        "valid": layer.isValid(), "crs": layer.crs().authid(), "features": layer.featureCount(),
        "renderer": r.type() if r else None,
        "categories": len(r.categories()) if r is not None and r.type() == "categorizedSymbol" else 0,
        "attr": r.classAttribute() if r is not None and r.type() == "categorizedSymbol" else None,
        "rules": [c.filterExpression() for c in r.rootRule().children()] if r is not None and r.type() == "RuleRenderer" else [],
        "drawn": sum(1 for _ in layer.getFeatures()) if r is None or r.type() != "RuleRenderer" else _drawn(layer, r),
        "labels": bool(layer.labelsEnabled()),
        # minimumScale: the most zoomed-out scale (a denominator) at which labels show; 0 = no limit
        "label_min_scale": settings.minimumScale if settings else None,
        "label_max_scale": settings.maximumScale if settings else None,
        "label_scale_visibility": settings.scaleVisibility if settings else None,
        "label_field": settings.fieldName if settings else None,
        "fields": fields,
    }


def _drawn(layer, renderer) -> int:
    """How many features the rule-based renderer draws."""
    from qgis.core import QgsRenderContext

    ctx = QgsRenderContext()
    renderer.startRender(ctx, layer.fields())
    n = sum(1 for f in layer.getFeatures() if renderer.willRenderFeature(f, ctx))
    renderer.stopRender(ctx)
    return n


def inspect(paths) -> dict:
    out = {}
    for p in paths:
        before = len(messages)
        entry = {}
        if p.endswith(".csv"):
            uri = f"file://{p}?type=csv&wktField=wkt&crs=EPSG:32633&geomType=Polygon"
            dt = QgsVectorLayer(uri, "d", "delimitedtext")
            entry["delimitedtext"] = describe(dt)
        layer = QgsVectorLayer(p, "d", "ogr")
        entry["ogr"] = describe(layer)
        entry["messages"] = messages[before:]
        out[p] = entry
    return out


def render(raster, vector, png, part=None) -> dict:
    """Render the vector over the raster into ``png``; ``part`` "x0,y0,x1,y1" (fractions of the
    raster's extent, y from the top) zooms in."""
    from qgis.core import QgsMapRendererParallelJob, QgsMapSettings, QgsRectangle
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    r = QgsRasterLayer(raster, "scene")
    v = QgsVectorLayer(vector, "detections", "ogr")
    s = QgsMapSettings()
    s.setLayers([v, r])
    s.setDestinationCrs(r.crs())
    e = r.extent()
    if part:
        fx0, fy0, fx1, fy1 = (float(v) for v in part.split(","))
        e = QgsRectangle(e.xMinimum() + fx0 * e.width(), e.yMaximum() - fy1 * e.height(),
                         e.xMinimum() + fx1 * e.width(), e.yMaximum() - fy0 * e.height())
    s.setExtent(e)
    s.setOutputSize(QSize(800, 800))
    s.setBackgroundColor(QColor(255, 255, 255))
    job = QgsMapRendererParallelJob(s)
    job.start()
    job.waitForFinished()
    img = job.renderedImage()
    ok = img.save(png, "PNG")
    return {"saved": ok, "raster_valid": r.isValid(), "vector_valid": v.isValid(), "renderer": v.renderer().type()}


def _provider(plugin_dir):
    """Processing initialised and geodet's provider registered, as QGIS does at start."""
    sys.path.insert(0, "/usr/share/qgis/python/plugins")
    sys.path.insert(0, plugin_dir)
    from processing.core.Processing import Processing

    Processing.initialize()
    from geodet_qgis.provider import GeodetProvider

    provider = GeodetProvider()
    QgsApplication.processingRegistry().addProvider(provider)
    _kept.append(provider)  # as the plugin keeps it: the registry alone does not keep Python's part alive
    return provider


_kept: list = []


def _alive(pid) -> list:
    """Processes that are ``pid`` or in its session (what the runner started and its children)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and (int(entry) == pid or int(fields[3]) == pid):  # state, ..., session id
            found.append(int(entry))
    return found


def _open_layers(layers) -> dict:
    """Layers opened in the project as a user opens them: {NAME: {"uri", "provider", "raster",
    "crs" (set on the layer in QGIS, as Layer Properties > Source does)}}; returns NAME: layer id."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsProject

    ids = {}
    for name, d in layers.items():
        if d.get("raster"):
            layer = QgsRasterLayer(d["uri"], name, d.get("provider", "gdal"))
        else:
            layer = QgsVectorLayer(d["uri"], name, d.get("provider", "ogr"))
        if d.get("crs"):
            layer.setCrs(QgsCoordinateReferenceSystem(d["crs"]))
        QgsProject.instance().addMapLayer(layer)
        ids[name] = layer.id()
    return ids


def _layer_ids(value, ids):
    """A parameter's value with "@NAME" (alone or in a list) replaced by that layer's id."""
    if isinstance(value, list):
        return [_layer_ids(v, ids) for v in value]
    return ids[value[1:]] if isinstance(value, str) and value.startswith("@") else value


def run(plugin_dir, spec_json) -> dict:
    """Run algorithms as Processing does; ``spec``: {"runs": [{"alg", "params", "load" (through
    processing.runAndLoadResults), "cancel_at" (a progress percentage), "layers" (see
    _open_layers; a parameter "@NAME" is that layer)}]}. Per run: results or error, the progress
    bar's values and texts, the feedback's lines, the layers it loaded, the geodet processes left,
    Python warnings and warnings in QGIS's message log."""
    import gc
    import warnings

    from qgis.core import QgsProcessingContext, QgsProcessingException, QgsProcessingFeedback, QgsProject

    _provider(plugin_dir)
    import processing

    spec = json.loads(spec_json)
    out = []
    for r in spec["runs"]:
        before_msgs = len(messages)
        ids = _open_layers(r.get("layers", {}))
        before_layers = set(QgsProject.instance().mapLayers())
        record = {"progress": [], "texts": [], "infos": [], "commands": [], "debug": [], "errors": []}
        cancel_at = r.get("cancel_at")

        class Feedback(QgsProcessingFeedback):
            def pushInfo(self, info):  # noqa: N802
                record["infos"].append(info)
                super().pushInfo(info)

            def pushCommandInfo(self, info):  # noqa: N802
                record["commands"].append(info)
                super().pushCommandInfo(info)

            def pushDebugInfo(self, info):  # noqa: N802
                record["debug"].append(info)
                super().pushDebugInfo(info)

            def reportError(self, error, fatalError=False):  # noqa: N802
                record["errors"].append(error)
                super().reportError(error, fatalError)

            def setProgressText(self, text):  # noqa: N802
                record["texts"].append(text)
                super().setProgressText(text)

        feedback = Feedback()

        def progressed(value, feedback=feedback):
            record["progress"].append(round(value, 2))
            if cancel_at is not None and value >= cancel_at and not feedback.isCanceled():
                feedback.cancel()

        feedback.progressChanged.connect(progressed)
        context = QgsProcessingContext()
        context.setProject(QgsProject.instance())
        params = {k: _layer_ids(v, ids) for k, v in r["params"].items()}
        alg = r["alg"]
        if r.get("model"):  # the algorithm as the one child of a Graphical Modeler model
            alg, params = _one_child_model(alg, params)
        error = results = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if r.get("load"):
                    results = processing.runAndLoadResults(alg, params, feedback=feedback, context=context)
                else:
                    results = processing.run(alg, params, feedback=feedback, context=context)
            except QgsProcessingException as exc:
                error = str(exc)
            gc.collect()
        pid = next((int(d.split("process ")[1].rstrip(")")) for d in record["debug"] if "geodet started" in d), None)
        added = [QgsProject.instance().mapLayer(i) for i in set(QgsProject.instance().mapLayers()) - before_layers]
        record.update({
            "error": error, "results": {k: str(v) for k, v in (results or {}).items()},
            "canceled": feedback.isCanceled(), "pid": pid, "alive": _alive(pid) if pid else [],
            "layers": [dict(describe(layer), name=layer.name(), source=layer.source()) for layer in added],
            "warnings": [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught],
            "messages": messages[before_msgs:],
        })
        out.append(record)
    return {"runs": out}


def _one_child_model(alg_id, params):
    """A model whose one child is ``alg_id`` with ``params`` (its OUTPUT the model's output)."""
    from qgis.core import (QgsProcessingModelAlgorithm, QgsProcessingModelChildAlgorithm,
                           QgsProcessingModelChildParameterSource, QgsProcessingModelOutput)

    model = QgsProcessingModelAlgorithm("geodet in a model", "tests")
    child = QgsProcessingModelChildAlgorithm(alg_id)
    child.generateChildId(model)
    for name, value in params.items():
        if name != "OUTPUT":
            child.addParameterSources(name, [QgsProcessingModelChildParameterSource.fromStaticValue(value)])
    output = QgsProcessingModelOutput("result", "result")
    output.setChildOutputName("OUTPUT")
    child.setModelOutputs({"result": output})
    model.addChildAlgorithm(child)
    _kept.append(model)
    return model, {f"{child.childId()}:result": params["OUTPUT"]}


def loaded(plugin_dir, chosen=None) -> dict:
    """What the provider says at load in QGIS's log, and the executable setting it reads; ``chosen``
    is then set in the options, as a user sets the path there."""
    logged = []
    QgsApplication.messageLog().messageReceived.connect(lambda m, tag, level: logged.append([tag, int(level), m]))
    _provider(plugin_dir)
    from processing.core.ProcessingConfig import ProcessingConfig

    at_load = ProcessingConfig.getSetting("GEODET_EXECUTABLE")
    if chosen:
        ProcessingConfig.setSettingValue("GEODET_EXECUTABLE", chosen)

    return {"log": [x for x in logged if x[0] == "geodet"], "at_load": at_load,
            "setting": ProcessingConfig.getSetting("GEODET_EXECUTABLE"),
            "groups": sorted({(a.group(), a.id()) for a in QgsApplication.processingRegistry().providerById(
                "geodet").algorithms()})}


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    result = {"inspect": lambda: inspect(args), "render": lambda: render(*args), "run": lambda: run(*args),
              "loaded": lambda: loaded(*args)}[cmd]()
    print("JSON:" + json.dumps(result, default=str))
    app.exitQgis()
