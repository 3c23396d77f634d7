"""geodet's algorithms in the Processing toolbox, one per geodet command: each gathers its
parameters (layers already open in QGIS included), runs the command (``runner.run_geodet``) and
returns what it wrote. The outputs carry geodet's QGIS style, so they load styled."""

import json
import os

from qgis.core import (
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingOutputFile,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
)

from .runner import run_geodet

DEVICES = ["auto", "cpu", "cuda"]
PRESETS = ["default", "cpu", "small_objects", "trees"]
VECTOR_FORMATS = ["gpkg", "shp", "geojson", "fgb"]


class GeodetAlgorithm(QgsProcessingAlgorithm):
    """What every geodet algorithm shares: group, help, and turning QGIS inputs into paths that
    the geodet command reads."""

    COMMAND = ""
    TITLE = ""
    HELP = ""

    def name(self):
        return self.COMMAND

    def displayName(self):  # noqa: N802
        return self.TITLE

    def group(self):
        return "geodet"

    def groupId(self):  # noqa: N802
        return "geodet"

    def shortHelpString(self):  # noqa: N802
        return self.HELP

    def createInstance(self):  # noqa: N802
        return type(self)()

    # -- inputs as paths -------------------------------------------------------------------
    def raster_path(self, parameters, name, context):
        layer = self.parameterAsRasterLayer(parameters, name, context)
        if layer is None:
            raise QgsProcessingException(f"{name}: no raster layer")
        return layer.source()

    def vector_path(self, parameters, name, context, feedback):
        """A file geodet reads: the layer's own file (``path|layername=NAME`` for one layer of a
        GeoPackage), or a GeoPackage QGIS writes for memory layers, selections and other sources."""
        if parameters.get(name) is None:
            return None
        path, layer = self.parameterAsCompatibleSourceLayerPathAndLayerName(
            parameters, name, context, VECTOR_FORMATS, "gpkg", feedback)
        if not path:
            return None
        return f"{path}|layername={layer}" if layer else path


class DetectAlgorithm(GeodetAlgorithm):
    COMMAND = "detect"
    TITLE = "Detect objects"
    HELP = ("Detect objects over a raster with a geodet model (model.pt from Train a detector or geodet train, an "
            ".onnx from Export to ONNX). The scene is read in overlapping tiles at the model's ground resolution and "
            "the tiles' detections are stitched without duplicates at the seams. The output (GeoPackage by default) "
            "is styled: outlines by class, the score as a label when zoomed in. Runs 'geodet detect'.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Scene"))
        self.addParameter(QgsProcessingParameterFile("MODEL", "Model file (.pt or .onnx)", QgsProcessingParameterFile.File))
        self.addParameter(QgsProcessingParameterNumber("SCORE_THRESHOLD", "Score threshold (empty: the model's)",
                                                       QgsProcessingParameterNumber.Double, None, True, 0.0, 1.0))
        self.addParameter(QgsProcessingParameterString("BANDS", "Scene bands for the model, e.g. 1,2,3 (empty: the "
                                                                "model's)", None, False, True))
        self.addParameter(QgsProcessingParameterEnum("DEVICE", "Device", DEVICES, False, 0))
        out = QgsProcessingParameterVectorDestination("OUTPUT", "Detections", QgsProcessing.TypeVectorPolygon)
        out.setSupportsNonFileBasedOutput(False)  # geodet writes files
        self.addParameter(out)

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        scene = self.raster_path(parameters, "INPUT", context)
        model = self.parameterAsFile(parameters, "MODEL", context)
        out = self.parameterAsOutputLayer(parameters, "OUTPUT", context)
        args = ["detect", scene, "--model", model, "--out", out]
        if parameters.get("SCORE_THRESHOLD") is not None:
            args += ["--score-threshold", self.parameterAsDouble(parameters, "SCORE_THRESHOLD", context)]
        bands = self.parameterAsString(parameters, "BANDS", context)
        if bands:
            args += ["--bands", bands]
        args += ["--device", DEVICES[self.parameterAsEnum(parameters, "DEVICE", context)]]
        run_geodet(args, feedback)
        return {"OUTPUT": out}


class TrainAlgorithm(GeodetAlgorithm):
    COMMAND = "train"
    TITLE = "Train a detector"
    HELP = ("Train a RetinaNet on a raster and the boxes (or points) drawn over it, for the minutes given: the "
            "learning-rate schedule spans them. Give the labelled area (polygons of where every object is labelled) "
            "when only part of the scene is labelled: what lies outside is never taught as background. Writes "
            "model.pt, last.pt and metrics.csv to the run folder. Runs 'geodet train'.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer("SCENE", "Scene"))
        self.addParameter(QgsProcessingParameterFeatureSource("LABELS", "Labels (boxes or points)",
                                                              [QgsProcessing.TypeVectorAnyGeometry]))
        self.addParameter(QgsProcessingParameterField("CLASS_COLUMN", "Class column (empty: one class)", None,
                                                      "LABELS", QgsProcessingParameterField.Any, False, True))
        self.addParameter(QgsProcessingParameterFeatureSource("LABELLED_AREA", "Labelled area (polygons; empty: the "
                                                              "whole scene)", [QgsProcessing.TypeVectorPolygon],
                                                              None, True))
        self.addParameter(QgsProcessingParameterEnum("PRESET", "Preset", PRESETS, False, 0))
        self.addParameter(QgsProcessingParameterFile("CONFIG", "Config file (YAML; overrides the preset)",
                                                     QgsProcessingParameterFile.File, "yaml", None, True))
        self.addParameter(QgsProcessingParameterNumber("TIME_LIMIT", "Training time (minutes)",
                                                       QgsProcessingParameterNumber.Double, 20.0, False, 0.1))
        self.addParameter(QgsProcessingParameterFile("INIT", "Start from this model (optional)",
                                                     QgsProcessingParameterFile.File, "", None, True))
        self.addParameter(QgsProcessingParameterFolderDestination("OUTPUT_FOLDER", "Run folder"))
        self.addOutput(QgsProcessingOutputFile("MODEL", "Model file"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        scene = self.raster_path(parameters, "SCENE", context)
        labels = self.vector_path(parameters, "LABELS", context, feedback)
        area = self.vector_path(parameters, "LABELLED_AREA", context, feedback)
        folder = self.parameterAsString(parameters, "OUTPUT_FOLDER", context)
        config = self.parameterAsFile(parameters, "CONFIG", context) or PRESETS[self.parameterAsEnum(parameters, "PRESET", context)]
        column = self.parameterAsString(parameters, "CLASS_COLUMN", context)
        args = ["train", "--config", config, "--scene", scene, "--labels", labels, "--out", folder,
                "--time-limit", self.parameterAsDouble(parameters, "TIME_LIMIT", context), "--class-column", column or ""]
        if area:
            args += ["--labelled-area", area]
        init = self.parameterAsFile(parameters, "INIT", context)
        if init:
            args += ["--init", init]
        run_geodet(args, feedback)
        return {"OUTPUT_FOLDER": folder, "MODEL": os.path.join(folder, "model.pt")}


class EvaluateAlgorithm(GeodetAlgorithm):
    COMMAND = "evaluate"
    TITLE = "Evaluate detections"
    HELP = ("COCO AP, AP50 and precision/recall/F1 of detections against labels, in the scene's pixel grid when a "
            "scene is given. Runs 'geodet evaluate'.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterFeatureSource("DETECTIONS", "Detections", [QgsProcessing.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterFeatureSource("LABELS", "Labels", [QgsProcessing.TypeVectorAnyGeometry]))
        self.addParameter(QgsProcessingParameterRasterLayer("SCENE", "Scene (optional)", None, True))
        self.addParameter(QgsProcessingParameterNumber("IOU", "IoU for precision and recall",
                                                       QgsProcessingParameterNumber.Double, 0.5, False, 0.01, 0.99))
        self.addParameter(QgsProcessingParameterString("CLASS_COLUMN", "Class column of the labels (empty: ignore "
                                                                       "classes)", "label", False, True))
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT", "Metrics (JSON)", "JSON files (*.json)"))
        for key in ("AP", "AP50", "AP75", "PRECISION", "RECALL", "F1"):
            self.addOutput(QgsProcessingOutputNumber(key, key))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        out = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        args = ["evaluate", self.vector_path(parameters, "DETECTIONS", context, feedback),
                self.vector_path(parameters, "LABELS", context, feedback), "--json", out,
                "--iou", self.parameterAsDouble(parameters, "IOU", context),
                "--class-column", self.parameterAsString(parameters, "CLASS_COLUMN", context) or ""]
        if parameters.get("SCENE"):
            args += ["--scene", self.raster_path(parameters, "SCENE", context)]
        run_geodet(args, feedback)
        with open(out, encoding="utf-8") as f:
            m = json.load(f)
        result = {"OUTPUT": out}
        for key, name in (("AP", "AP"), ("AP50", "AP50"), ("AP75", "AP75"), ("PRECISION", "precision"),
                          ("RECALL", "recall"), ("F1", "f1")):
            result[key] = m.get(name)
        return result


class ExportAlgorithm(GeodetAlgorithm):
    COMMAND = "export"
    TITLE = "Export to ONNX"
    HELP = ("Export a geodet model to a self-describing ONNX file (fp32, or int8 calibrated and checked on tiles of "
            "the calibration scenes: about 3x faster on a CPU). No file is written when the check fails. Runs "
            "'geodet export'.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterFile("MODEL", "Model file (model.pt)", QgsProcessingParameterFile.File, "pt"))
        self.addParameter(QgsProcessingParameterBoolean("INT8", "int8 (calibrated on the scenes below)", False))
        self.addParameter(QgsProcessingParameterMultipleLayers("CALIBRATE", "Calibration scenes",
                                                               QgsProcessing.TypeRaster, None, True))
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT", "ONNX file", "ONNX files (*.onnx)"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        out = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        args = ["export", self.parameterAsFile(parameters, "MODEL", context), "--out", out]
        if self.parameterAsBoolean(parameters, "INT8", context):
            args.append("--int8")
        scenes = [layer.source() for layer in self.parameterAsLayerList(parameters, "CALIBRATE", context)]
        if scenes:
            args += ["--calibrate", *scenes]
        run_geodet(args, feedback)
        return {"OUTPUT": out}


class SuggestAlgorithm(GeodetAlgorithm):
    COMMAND = "suggest"
    TITLE = "Suggest tiles to label"
    HELP = ("The cells of a scene most worth labelling next: where the model scores the most detections near its "
            "operating point (the decisions it could get either way), spread over the scene, ranked, with the reason "
            "in a column. Label the objects inside them, then train again from the model (Train a detector, 'Start "
            "from this model'). Runs 'geodet suggest'.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Scene"))
        self.addParameter(QgsProcessingParameterFile("MODEL", "Model file (model.pt)", QgsProcessingParameterFile.File))
        self.addParameter(QgsProcessingParameterNumber("N", "Cells to suggest", QgsProcessingParameterNumber.Integer,
                                                       20, False, 1))
        self.addParameter(QgsProcessingParameterNumber("CELL_SIZE", "Cell size in pixels (empty: the model's tile "
                                                                    "size)", QgsProcessingParameterNumber.Integer,
                                                       None, True, 16))
        self.addParameter(QgsProcessingParameterFeatureSource("LABELLED_AREA", "Already labelled (polygons; optional)",
                                                              [QgsProcessing.TypeVectorPolygon], None, True))
        out = QgsProcessingParameterVectorDestination("OUTPUT", "Cells to label", QgsProcessing.TypeVectorPolygon)
        out.setSupportsNonFileBasedOutput(False)
        self.addParameter(out)

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        out = self.parameterAsOutputLayer(parameters, "OUTPUT", context)
        args = ["suggest", self.raster_path(parameters, "INPUT", context), "--model",
                self.parameterAsFile(parameters, "MODEL", context), "--out", out,
                "--n", self.parameterAsInt(parameters, "N", context)]
        if parameters.get("CELL_SIZE") is not None:
            args += ["--cell-size", self.parameterAsInt(parameters, "CELL_SIZE", context)]
        area = self.vector_path(parameters, "LABELLED_AREA", context, feedback)
        if area:
            args += ["--labelled-area", area]
        run_geodet(args, feedback)
        return {"OUTPUT": out}


ALGORITHMS = [DetectAlgorithm, TrainAlgorithm, EvaluateAlgorithm, ExportAlgorithm, SuggestAlgorithm]
