"""Run by QGIS's own Python (Debian's python3 with python3-qgis), headless: what QGIS makes of
geodet's outputs, a rendered picture, and geodet's Processing algorithms run in process (to
cancel one). Prints one JSON object. Used by tests/test_qgis.py; not a test module itself.

    python3 qgis_helper.py inspect FILE [FILE...]
    python3 qgis_helper.py render RASTER VECTOR PNG
    python3 qgis_helper.py cancel PLUGIN_DIR RASTER MODEL OUTPUT
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


def cancel(plugin_dir, raster, model, output) -> dict:
    """Run geodet:detect in process with a feedback that cancels at the first progress report."""
    sys.path.insert(0, "/usr/share/qgis/python/plugins")
    sys.path.insert(0, plugin_dir)
    from processing.core.Processing import Processing
    from qgis.core import QgsProcessingContext, QgsProcessingException, QgsProcessingFeedback

    Processing.initialize()
    from geodet_qgis.provider import GeodetProvider

    provider = GeodetProvider()
    QgsApplication.processingRegistry().addProvider(provider)
    alg = QgsApplication.processingRegistry().createAlgorithmById("geodet:detect")

    class Canceling(QgsProcessingFeedback):
        def setProgress(self, progress):  # noqa: N802
            super().setProgress(progress)
            if progress > 0:
                self.cancel()

    feedback = Canceling()
    context = QgsProcessingContext()
    error = None
    try:
        alg.run({"INPUT": raster, "MODEL": model, "OUTPUT": output}, context, feedback)
    except QgsProcessingException as exc:
        error = str(exc)
    # QgsProcessingAlgorithm.run returns (results, ok) and logs the exception instead of raising
    return {"error": error, "messages": messages, "canceled": feedback.isCanceled(),
            "exists": os.path.exists(output), "left": sorted(os.listdir(os.path.dirname(output)))}


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    result = {"inspect": lambda: inspect(args), "render": lambda: render(*args), "cancel": lambda: cancel(*args)}[cmd]()
    print("JSON:" + json.dumps(result, default=str))
    app.exitQgis()
