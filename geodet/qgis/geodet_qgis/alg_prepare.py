"""The toolbox's Prepare and Evaluate groups: tile a scene into chips, fit anchors to labels,
suggest tiles to label next, and evaluate detections against labels."""

import json
import os
import re

from qgis.core import (
    QgsProcessing,
    QgsProcessingOutputFile,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
)

from .alg_train import config_argument, preset_parameters
from .base import GeodetAlgorithm, is_empty
from .formats import CELL_EXTENSIONS
from .styling import load_styled


class TileAlgorithm(GeodetAlgorithm):
    COMMAND = "tile"
    TITLE = "Tile a scene into chips"
    GROUP = "Prepare"
    HELP = ("Cut a raster into overlapping GeoTIFF chips (exact georeferencing, original data type and bands) with "
            "chips.gpkg, their footprints, and with labels a COCO annotations.json, for training elsewhere.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Scene"))
        self.addParameter(QgsProcessingParameterNumber("TILE_SIZE", "Chip side in pixels (empty: the preset's)",
                                                       QgsProcessingParameterNumber.Integer, None, True, 16))
        self.addParameter(QgsProcessingParameterNumber("OVERLAP", "Overlap in pixels (empty: the preset's)",
                                                       QgsProcessingParameterNumber.Integer, None, True, 0))
        self.addParameter(QgsProcessingParameterFeatureSource("LABELS", "Labels for annotations.json (optional)",
                                                              [QgsProcessing.TypeVectorAnyGeometry], None, True))
        self.addParameter(QgsProcessingParameterField("CLASS_COLUMN", "Class column (empty: one class)", None,
                                                      "LABELS", QgsProcessingParameterField.Any, False, True))
        self.addParameter(QgsProcessingParameterString("BANDS", "Bands to keep, e.g. 1,2,3 (empty: all)", None,
                                                       False, True))
        self.addParameter(QgsProcessingParameterNumber("GSD", "Resample to this ground resolution in metres (empty: "
                                                              "the scene's)", QgsProcessingParameterNumber.Double,
                                                       None, True, 0.0))
        preset_parameters(self)
        self.addParameter(QgsProcessingParameterFolderDestination("OUTPUT_FOLDER", "Chips folder"))
        self.addOutput(QgsProcessingOutputFile("CHIPS", "Chip footprints (chips.gpkg)"))
        self.addOutput(QgsProcessingOutputFile("ANNOTATIONS", "COCO annotations (annotations.json)"))

    def check(self, parameters, context):
        size = self.optional_number(parameters, "TILE_SIZE", context, integer=True)
        overlap = self.optional_number(parameters, "OVERLAP", context, integer=True)
        if size is not None and overlap is not None and overlap >= size:
            return f"the overlap ({overlap} px) must be smaller than the chip side ({size} px)"
        return (self.check_bands(self.optional_text(parameters, "BANDS", context))
                or self.check_file(parameters, "CONFIG", context, ["yaml", "yml"], "Config file"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        folder = self.parameterAsString(parameters, "OUTPUT_FOLDER", context)
        args = ["tile", self.raster_path(parameters, "INPUT", context, feedback), "-o", folder,
                "--config", config_argument(self, parameters, context)]
        self.flag(args, "--tile-size", self.optional_number(parameters, "TILE_SIZE", context, integer=True))
        self.flag(args, "--overlap", self.optional_number(parameters, "OVERLAP", context, integer=True))
        labels = self.vector_path(parameters, "LABELS", context, feedback)
        if labels:
            args += ["--labels", labels, "--class-column", self.parameterAsString(parameters, "CLASS_COLUMN", context)
                     or ""]
        self.flag(args, "--bands", self.optional_text(parameters, "BANDS", context))
        self.flag(args, "--gsd", self.optional_number(parameters, "GSD", context))
        self.run_command(args, feedback, outputs=[os.path.join(folder, "chips.gpkg")])
        annotations = os.path.join(folder, "annotations.json")
        return {"OUTPUT_FOLDER": folder, "CHIPS": os.path.join(folder, "chips.gpkg"),
                "ANNOTATIONS": annotations if os.path.exists(annotations) else None}


class AnchorsAlgorithm(GeodetAlgorithm):
    COMMAND = "anchors"
    TITLE = "Fit anchors to labels"
    GROUP = "Prepare"
    HELP = ("The label boxes' sizes at the model's ground resolution, the anchor coverage of the preset (the share "
            "of boxes an anchor matches with IoU of at least 0.5), and anchors fitted to the boxes; optionally a "
            "config file with the fitted anchors, for Train a detector.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer("SCENE", "Scene"))
        self.addParameter(QgsProcessingParameterFeatureSource("LABELS", "Labels (boxes or points)",
                                                              [QgsProcessing.TypeVectorAnyGeometry]))
        self.addParameter(QgsProcessingParameterField("CLASS_COLUMN", "Class column (empty: one class)", None,
                                                      "LABELS", QgsProcessingParameterField.Any, False, True))
        preset_parameters(self)
        out = QgsProcessingParameterFileDestination("OUTPUT", "Config with the fitted anchors (optional)",
                                                    "YAML files (*.yaml)", None, True, False)
        self.addParameter(out)
        self.addOutput(QgsProcessingOutputString("REPORT", "Sizes and coverage"))
        self.addOutput(QgsProcessingOutputNumber("CONFIG_COVERAGE", "Anchor coverage of the preset"))
        self.addOutput(QgsProcessingOutputNumber("FITTED_COVERAGE", "Anchor coverage of the fitted anchors"))

    def check(self, parameters, context):
        return (self.check_file(parameters, "CONFIG", context, ["yaml", "yml"], "Config file")
                or self.check_output(parameters, "OUTPUT", context, ["yaml", "yml"], "Config"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        out = self.parameterAsFileOutput(parameters, "OUTPUT", context) if not is_empty(parameters.get("OUTPUT")) else ""
        args = ["anchors", self.raster_path(parameters, "SCENE", context, feedback),
                "--labels", self.vector_path(parameters, "LABELS", context, feedback),
                "--config", config_argument(self, parameters, context),
                "--class-column", self.parameterAsString(parameters, "CLASS_COLUMN", context) or ""]
        self.flag(args, "-o", out or None)
        text = self.run_command(args, feedback, outputs=[out] if out else [])
        cover = [float(x) for x in re.findall(r"coverage (\d+(?:\.\d+)?)", text)]
        return {"OUTPUT": out or None, "REPORT": text, "CONFIG_COVERAGE": cover[0] if cover else None,
                "FITTED_COVERAGE": cover[1] if len(cover) > 1 else None}


STRATEGIES = ["uncertainty", "per-object", "coreset", "hybrid"]  # geodet suggest --strategy


class SuggestAlgorithm(GeodetAlgorithm):
    COMMAND = "suggest"
    TITLE = "Suggest tiles to label"
    GROUP = "Prepare"
    HELP = ("The cells of a scene most worth labelling next: where the model scores the most detections near its "
            "operating point (the decisions it could get either way), spread over the scene, ranked, with the reason "
            "in a column. Label the objects inside them, set their 'done' field to 1, then run Train again on the "
            "labelled cells.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Scene"))
        self.addParameter(QgsProcessingParameterFile("MODEL", "Model file (model.pt)", QgsProcessingParameterFile.File))
        self.addParameter(QgsProcessingParameterNumber("COUNT", "Cells to suggest", QgsProcessingParameterNumber.Integer,
                                                       20, False, 1))
        self.addParameter(QgsProcessingParameterNumber("CELL_SIZE", "Cell size in pixels (empty: the model's tile "
                                                                    "size)", QgsProcessingParameterNumber.Integer,
                                                       None, True, 16))
        self.addParameter(QgsProcessingParameterFeatureSource("LABELLED_AREA", "Already labelled (polygons; optional)",
                                                              [QgsProcessing.TypeVectorPolygon], None, True))
        self.addParameter(QgsProcessingParameterEnum("STRATEGY", "Ranking", STRATEGIES, False, 0))
        self.addParameter(QgsProcessingParameterString("BANDS", "Scene bands for the model, e.g. 1,2,3 (empty: the "
                                                                "model's)", None, False, True))
        out = QgsProcessingParameterVectorDestination("OUTPUT", "Cells to label (GeoPackage, GeoJSON, FlatGeobuf or "
                                                                "Shapefile)", QgsProcessing.TypeVectorPolygon)
        out.setSupportsNonFileBasedOutput(False)
        self.addParameter(out)

    def check(self, parameters, context):
        return (self.check_file(parameters, "MODEL", context, ["pt"], "Model file")
                or self.check_bands(self.optional_text(parameters, "BANDS", context))
                or self.check_output(parameters, "OUTPUT", context, CELL_EXTENSIONS, "Cells to label"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        out = self.parameterAsOutputLayer(parameters, "OUTPUT", context)
        args = ["suggest", self.raster_path(parameters, "INPUT", context, feedback), "-m",
                self.parameterAsFile(parameters, "MODEL", context), "-o", out,
                "--count", self.parameterAsInt(parameters, "COUNT", context),
                "--strategy", STRATEGIES[self.parameterAsEnum(parameters, "STRATEGY", context)]]
        self.flag(args, "--cell-size", self.optional_number(parameters, "CELL_SIZE", context, integer=True))
        self.flag(args, "--labelled-area", self.vector_path(parameters, "LABELLED_AREA", context, feedback))
        self.flag(args, "--bands", self.optional_text(parameters, "BANDS", context))
        self.run_command(args, feedback, outputs=[out])
        load_styled(context, out)
        return {"OUTPUT": out}


class EvaluateAlgorithm(GeodetAlgorithm):
    COMMAND = "evaluate"
    TITLE = "Evaluate detections"
    GROUP = "Evaluate"
    HELP = ("COCO AP, AP50 and precision/recall/F1 of detections against labels, in the scene's pixel grid when a "
            "scene is given.")
    METRICS = (("AP", "AP"), ("AP50", "AP50"), ("AP75", "AP75"), ("PRECISION", "precision"), ("RECALL", "recall"),
               ("F1", "f1"))

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterFeatureSource("DETECTIONS", "Detections", [QgsProcessing.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterFeatureSource("LABELS", "Labels", [QgsProcessing.TypeVectorAnyGeometry]))
        self.addParameter(QgsProcessingParameterRasterLayer("SCENE", "Scene (optional)", None, True))
        self.addParameter(QgsProcessingParameterNumber("IOU", "IoU for precision and recall",
                                                       QgsProcessingParameterNumber.Double, 0.5, False, 0.01, 0.99))
        self.addParameter(QgsProcessingParameterString("CLASS_COLUMN", "Class column of the labels (empty: ignore "
                                                                       "classes)", "label", False, True))
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT", "Metrics (JSON)", "JSON files (*.json)"))
        for key, _ in self.METRICS:
            self.addOutput(QgsProcessingOutputNumber(key, key))

    def check(self, parameters, context):
        return self.check_output(parameters, "OUTPUT", context, ["json"], "Metrics")

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        out = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        args = ["evaluate", self.vector_path(parameters, "DETECTIONS", context, feedback),
                self.vector_path(parameters, "LABELS", context, feedback), "-o", out,
                "--iou", self.parameterAsDouble(parameters, "IOU", context),
                "--class-column", self.parameterAsString(parameters, "CLASS_COLUMN", context) or ""]
        if not is_empty(parameters.get("SCENE")):
            args += ["--scene", self.raster_path(parameters, "SCENE", context, feedback)]
        self.run_command(args, feedback, outputs=[out])
        with open(out, encoding="utf-8") as f:
            m = json.load(f)
        result = {"OUTPUT": out}
        for key, name in self.METRICS:
            result[key] = m.get(name)
        return result

