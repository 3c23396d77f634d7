"""What every geodet algorithm shares: its toolbox group, turning QGIS inputs into paths the geodet
command reads, optional values left out when empty, checks before the run, and running the
command with a truthful report after Cancel."""

import os
import re
import time
from pathlib import Path

from qgis.core import (QgsProcessingAlgorithm, QgsProcessingException, QgsProcessingFeatureSourceDefinition,
                       QgsProcessingUtils)

from .runner import describe_outputs, run_geodet

DEVICES = ["auto", "cpu", "cuda"]
PRESETS = ["default", "cpu", "small_objects", "trees"]
VECTOR_FORMATS = ["gpkg", "shp", "geojson", "fgb"]  # what QGIS writes for geodet to read (layers, selections)
HOME = "https://github.com/geodet/geodet#use-it-from-qgis"


def is_empty(value) -> bool:
    """An optional value the user left empty: None, NULL, or '' (``qgis_process ... NAME=``)."""
    if value is None:
        return True
    try:
        from qgis.PyQt.QtCore import QVariant

        if isinstance(value, QVariant) and value.isNull():
            return True
    except ImportError:
        pass
    return isinstance(value, str) and value.strip().upper() in ("", "NULL", "NONE")


def extension(path: str) -> str:
    return Path(str(path).split("|")[0]).suffix.lower().lstrip(".")


def set_crs(layer):
    """The CRS set on ``layer`` in QGIS where it is not its file's (none, or another), else None."""
    crs, provider = layer.crs(), layer.dataProvider()
    if crs.isValid() and provider is not None and crs != provider.crs():
        return crs
    return None


def say_crs(layer, name, feedback):
    crs, own = layer.crs(), layer.dataProvider().crs()
    text = (f"{name}: the CRS set on {layer.name()} in QGIS ({crs.authid() or crs.description()}) is used, not its "
            f"file's ({own.authid() or own.description() or 'none'})")
    if not own.isValid():  # the file has none: QGIS may have assigned one by its own setting (project or default)
        text = ("warning: " + text + ": if QGIS assigned it, check that it is the layer's real CRS, or assign that "
                "to the file (Layer Properties > Source, then save, or Assign Projection)")
    feedback.pushInfo(text)


def raster_file(layer, name, feedback):
    """The file geodet reads for a raster layer: its own, or a small VRT over it with the CRS set on
    the layer in QGIS. Layers that are not files (XYZ, WMS, ...) are refused."""
    if layer.providerType() != "gdal":
        raise QgsProcessingException(
            f"{name}: {layer.name()} is a {layer.providerType()} layer, not a raster file, and geodet reads raster "
            "files: save it as a GeoTIFF first (Raster > Conversion > Translate, or Export > Save As)")
    crs = set_crs(layer)
    if crs is None:
        return layer.source()
    from osgeo import gdal
    from qgis.core import QgsCoordinateReferenceSystem

    say_crs(layer, name, feedback)
    srs = crs.authid()
    if not srs.startswith("EPSG:"):  # a CRS of the user's own: GDAL reads its WKT
        srs = crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED_GDAL)
    # named as the file (in a folder of its own): detections, reports and quicklooks name the scene as
    # the user knows it, not "scene.vrt"; GDAL tells a VRT by its content, whatever its name
    vrt = QgsProcessingUtils.generateTempFilename(Path(layer.source().split('|')[0].split("?")[0]).name or "scene.vrt")
    ds = gdal.Translate(vrt, layer.source(), format="VRT", outputSRS=srs)
    if ds is None:
        raise QgsProcessingException(f"{name}: cannot give {layer.name()} the CRS set in QGIS "
                                     f"({gdal.GetLastErrorMsg()}): assign it to the file instead (Raster > "
                                     "Projections > Assign Projection)")
    ds = None  # written on close
    return vrt


class GeodetAlgorithm(QgsProcessingAlgorithm):
    COMMAND = ""
    TITLE = ""
    GROUP = ""  # Detect, Train, Evaluate or Prepare
    HELP = ""
    GRACE = 5.0  # seconds a cancelled run gets to stop by itself before it is killed

    def name(self):
        return self.COMMAND

    def displayName(self):  # noqa: N802
        return self.TITLE

    def group(self):
        return self.GROUP

    def groupId(self):  # noqa: N802
        return self.GROUP.lower()

    def shortHelpString(self):  # noqa: N802
        return self.HELP + f" Runs 'geodet {self.COMMAND}'."

    def helpUrl(self):  # noqa: N802
        return HOME

    def createInstance(self):  # noqa: N802
        return type(self)()

    # -- checks before the run ---------------------------------------------------------------
    def checkParameterValues(self, parameters, context):  # noqa: N802
        ok, message = super().checkParameterValues(parameters, context)
        if not ok:
            return ok, message
        problem = self.check(parameters, context)
        return (False, problem) if problem else (True, "")

    def check(self, parameters, context):
        """What is wrong with ``parameters`` before the run (a sentence), or None."""
        return None

    def check_file(self, parameters, name, context, extensions, what):
        path = self.parameterAsFile(parameters, name, context) if not is_empty(parameters.get(name)) else ""
        if not path:
            return None
        if not os.path.isfile(path):
            return f"{what}: {path} does not exist"
        if extensions and extension(path) not in extensions:
            return f"{what}: {os.path.basename(path)} is not a {' or '.join('.' + e for e in extensions)} file"
        return None

    def check_output(self, parameters, name, context, extensions, what):
        value = parameters.get(name)
        if is_empty(value):
            return None
        sink = getattr(value, "sink", None)
        text = sink.staticValue() if sink is not None else value
        if str(text).startswith(("ogr:", "postgis:", "spatialite:", "memory:")):  # a layer in a database, not a file
            return (f"{what}: geodet writes a file of its own (one layer, named after it): choose 'Save to File...' "
                    f"with a name ending {' or '.join('.' + e for e in extensions)}, not a table in a database")
        ext = extension(str(text))
        if ext and ext not in extensions:
            return (f"{what}: geodet writes {', '.join('.' + e for e in extensions)} here, not .{ext}")
        return None

    @staticmethod
    def check_bands(text):
        if text and not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", text):
            return f"bands must be numbers separated by commas, such as 1,2,3 (got '{text}')"
        return None

    # -- inputs as arguments -----------------------------------------------------------------
    def raster_path(self, parameters, name, context, feedback):
        layer = self.parameterAsRasterLayer(parameters, name, context)
        if layer is None:
            raise QgsProcessingException(f"{name}: no raster layer")
        return raster_file(layer, name, feedback)

    def raster_paths(self, parameters, name, context, feedback):
        """The files of a list of raster layers (see raster_file)."""
        return [raster_file(layer, name, feedback) for layer in self.parameterAsLayerList(parameters, name, context)]

    def vector_path(self, parameters, name, context, feedback):
        """A file geodet reads: the layer's own file (``path|layername=NAME`` for one layer of a
        GeoPackage), or a GeoPackage QGIS writes for memory layers, selections and other sources,
        and for a layer whose CRS was set in QGIS (QGIS writes it with the layer's CRS)."""
        if is_empty(parameters.get(name)):
            return None
        formats = VECTOR_FORMATS
        value = parameters.get(name)
        if isinstance(value, QgsProcessingFeatureSourceDefinition):  # selected features only, a feature limit
            source = QgsProcessingUtils.mapLayerFromString(value.source.staticValue(), context)
        else:
            source = self.parameterAsVectorLayer(parameters, name, context)
        if source is not None and set_crs(source) is not None:
            formats = []  # no file is compatible: QGIS writes one
            say_crs(source, name, feedback)
        path, layer = self.parameterAsCompatibleSourceLayerPathAndLayerName(
            parameters, name, context, formats, "gpkg", feedback)
        if not path:
            return None
        return f"{path}|layername={layer}" if layer else path

    def optional_number(self, parameters, name, context, integer=False):
        """The number, or None where it was left empty (never 0 for an empty field)."""
        if is_empty(parameters.get(name)):
            return None
        return (self.parameterAsInt if integer else self.parameterAsDouble)(parameters, name, context)

    def optional_text(self, parameters, name, context):
        return None if is_empty(parameters.get(name)) else self.parameterAsString(parameters, name, context).strip()

    @staticmethod
    def flag(args, option, value):
        """``option value`` appended where the value was given."""
        if value is not None and value != "":
            args += [option, value]
        return args

    # -- the run -------------------------------------------------------------------------------
    def run_command(self, args, feedback, outputs=(), on_cancel=None):
        """Run geodet; after Cancel, ``on_cancel(killed)`` (default: what became of ``outputs``)
        is the sentence that says what is left."""
        since = time.time()
        report = on_cancel or (lambda killed: describe_outputs(outputs, since, killed))
        return run_geodet(args, feedback, grace=self.GRACE, on_cancel=report)
