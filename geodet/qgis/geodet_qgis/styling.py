"""Outputs that load styled wherever Processing loads them. Processing opens an algorithm's
outputs without their default style (``loadDefaultStyle = false``) and applies only what a
post-processor or its own settings give; geodet writes its style into every output (a
GeoPackage's ``layer_styles``, a ``.qml`` beside other formats), so the post-processor loads that
style, and names the layer after its file."""

from pathlib import Path

from qgis.core import QgsProcessingLayerPostProcessorInterface, QgsVectorLayer


class GeodetStyle(QgsProcessingLayerPostProcessorInterface):
    # QGIS holds the post-processor by a C++ pointer; these references keep the Python objects
    # alive until Processing has used them (a known pitfall of Python post-processors)
    _alive: list = []

    def __init__(self, path: str, name: str):
        super().__init__()
        self.path, self.name = path, name

    @classmethod
    def create(cls, path: str, name: str) -> "GeodetStyle":
        processor = cls(path, name)
        cls._alive = cls._alive[-63:] + [processor]
        return processor

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802  (QGIS's name)
        if not isinstance(layer, QgsVectorLayer):
            return
        layer.setName(self.name)
        message, ok = layer.loadDefaultStyle()  # the GeoPackage's layer_styles, else the .qml beside it
        if not ok:
            qml = Path(self.path).with_suffix(".qml")
            if qml.exists():
                message, ok = layer.loadNamedStyle(str(qml))
        if not ok and feedback is not None:
            feedback.pushInfo(f"geodet's style could not be applied to {self.name}: {message}")
        layer.triggerRepaint()


def _temporary(output: str) -> bool:
    """Whether ``output`` is a file Processing made for a temporary output (TEMPORARY_OUTPUT)."""
    import os

    try:
        from qgis.core import QgsProcessingUtils

        folder = QgsProcessingUtils.tempFolder()
    except Exception:  # an older QGIS, or none running
        return False
    return bool(folder) and os.path.abspath(output).startswith(os.path.abspath(folder) + os.sep)


def load_styled(context, output: str, name: str = "") -> None:
    """If Processing will load ``output`` (a vector file geodet wrote), load it with geodet's
    style and name it after the file (or ``name``)."""
    if not output or not context.willLoadLayerOnCompletion(output):
        return
    details = context.layerToLoadOnCompletionDetails(output)
    # a temporary output's file is named after the parameter (OUTPUT.gpkg): the layer keeps the
    # name Processing gives it (the output's description), as every algorithm's temporary layer does
    details.name = name or (details.name if details.name and _temporary(output) else Path(output).stem)
    details.forceName = True
    details.setPostProcessor(GeodetStyle.create(output, details.name))

