"""The toolbox's Detect group: detect objects, export a model to ONNX, import a pretrained detector."""

import os
import re

from qgis.core import (
    QgsProcessing,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
)

from .base import DEVICES, GeodetAlgorithm, is_empty
from .formats import detection_extensions
from .styling import load_styled


class DetectAlgorithm(GeodetAlgorithm):
    COMMAND = "detect"
    TITLE = "Detect objects"
    GROUP = "Detect"
    HELP = ("Detect objects over a raster with a geodet model (model.pt from Train a detector or Import a pretrained "
            "detector, an .onnx from Export to ONNX). The scene is read in overlapping tiles at the model's ground "
            "resolution and the tiles' detections are stitched without duplicates at the seams. The output "
            "(GeoPackage by default) loads styled: outlines by class, boxes at or above the model's operating point, "
            "the score as a label when zoomed in.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Scene"))
        self.addParameter(QgsProcessingParameterFile("MODEL", "Model file (.pt or .onnx)", QgsProcessingParameterFile.File))
        self.addParameter(QgsProcessingParameterNumber("SCORE_THRESHOLD", "Score threshold (empty: the model's)",
                                                       QgsProcessingParameterNumber.Double, None, True, 0.0, 1.0))
        self.addParameter(QgsProcessingParameterString("BANDS", "Scene bands for the model, e.g. 1,2,3 (empty: the "
                                                                "model's)", None, False, True))
        self.addParameter(QgsProcessingParameterEnum("DEVICE", "Device", DEVICES, False, 0))
        self.addParameter(QgsProcessingParameterBoolean(
            "TTA", "Test-time augmentation (each tile also flipped and turned; about 8x slower; .pt models)", False))
        self.addParameter(QgsProcessingParameterBoolean(
            "ADAPT", "Adapt to this scene first (batch-norm statistics re-estimated on it: a model trained on another "
                     "site or sensor; .pt models)", False))
        out = QgsProcessingParameterVectorDestination("OUTPUT", "Detections", QgsProcessing.TypeVectorPolygon)
        out.setSupportsNonFileBasedOutput(False)  # geodet writes files
        self.addParameter(out)

    def check(self, parameters, context):
        if self.parameterAsBoolean(parameters, "TTA", context) and \
                self.parameterAsFile(parameters, "MODEL", context).lower().endswith(".onnx"):
            return "Test-time augmentation runs a .pt model: give the model.pt the .onnx was exported from, or untick it"
        if self.parameterAsBoolean(parameters, "ADAPT", context) and \
                self.parameterAsFile(parameters, "MODEL", context).lower().endswith(".onnx"):
            return "Adapting to the scene needs a .pt model: give the model.pt the .onnx was exported from, or untick it"
        return (self.check_file(parameters, "MODEL", context, ["pt", "onnx"], "Model file")
                or self.check_bands(self.optional_text(parameters, "BANDS", context))
                or self.check_output(parameters, "OUTPUT", context, detection_extensions(), "Detections"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        out = self.parameterAsOutputLayer(parameters, "OUTPUT", context)
        args = ["detect", self.raster_path(parameters, "INPUT", context, feedback), "-m",
                self.parameterAsFile(parameters, "MODEL", context), "-o", out,
                "--device", DEVICES[self.parameterAsEnum(parameters, "DEVICE", context)]]
        self.flag(args, "--score-threshold", self.optional_number(parameters, "SCORE_THRESHOLD", context))
        self.flag(args, "--bands", self.optional_text(parameters, "BANDS", context))
        if self.parameterAsBoolean(parameters, "TTA", context):
            args.append("--tta")
        if self.parameterAsBoolean(parameters, "ADAPT", context):
            args.append("--adapt")
        self.run_command(args, feedback, outputs=[out])
        load_styled(context, out)
        return {"OUTPUT": out}


class ExportAlgorithm(GeodetAlgorithm):
    COMMAND = "export"
    TITLE = "Export to ONNX"
    GROUP = "Detect"
    HELP = ("Export a geodet model to a self-describing ONNX file (fp32, or int8 calibrated and checked on tiles of "
            "the calibration scenes: about 3x faster on a CPU). No file is written when the check fails.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterFile("MODEL", "Model file (model.pt)", QgsProcessingParameterFile.File, "pt"))
        self.addParameter(QgsProcessingParameterBoolean("INT8", "int8 (calibrated on the scenes below)", False))
        self.addParameter(QgsProcessingParameterMultipleLayers("CALIBRATE", "Calibration scenes",
                                                               QgsProcessing.TypeRaster, None, True))
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT", "ONNX file", "ONNX files (*.onnx)"))

    def check(self, parameters, context):
        if self.parameterAsBoolean(parameters, "INT8", context) and not self.parameterAsLayerList(
                parameters, "CALIBRATE", context):
            return "int8 needs calibration scenes: add one or more rasters of the kind the model will see"
        return (self.check_file(parameters, "MODEL", context, ["pt"], "Model file")
                or self.check_output(parameters, "OUTPUT", context, ["onnx"], "ONNX file"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        out = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        args = ["export", "-m", self.parameterAsFile(parameters, "MODEL", context), "-o", out]
        if self.parameterAsBoolean(parameters, "INT8", context):
            args.append("--int8")
        scenes = self.raster_paths(parameters, "CALIBRATE", context, feedback)
        if scenes:
            args += ["--calibrate", *scenes]
        self.run_command(args, feedback, outputs=[out])
        return {"OUTPUT": out}


class ImportAlgorithm(GeodetAlgorithm):
    COMMAND = "import"
    TITLE = "Import a pretrained detector"
    GROUP = "Detect"
    HELP = ("Turn a torchvision RetinaNet into a geodet model file for Detect objects (or to fine-tune with Train a "
            "detector): DeepForest's tree, bird and livestock models as published on Hugging Face (hf://ORG/NAME, "
            "fetched where the network allows, else read from the Hugging Face cache), a downloaded Hugging Face "
            "folder, or a state_dict file (.pt, .pth, .safetensors). Give the ground resolution the model was made "
            "for (DeepForest: 0.1 m) so that scenes are resampled to it.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterString("SOURCE", "Source: hf://ORG/NAME, a Hugging Face folder or a "
                                                                 "state_dict file", "hf://weecology/deepforest-tree"))
        self.addParameter(QgsProcessingParameterNumber("GSD", "Ground resolution it was made for, in metres (empty: "
                                                              "scenes run at their own)",
                                                       QgsProcessingParameterNumber.Double, None, True, 0.0))
        self.addParameter(QgsProcessingParameterNumber("TILE_SIZE", "Window size it ran on at home, in pixels "
                                                                    "(DeepForest: 400; empty: the config's)",
                                                       QgsProcessingParameterNumber.Integer, None, True, 16))
        self.addParameter(QgsProcessingParameterString("CLASSES", "Class names, comma-separated (empty: the "
                                                                  "source's)", None, False, True))
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT", "geodet model file",
                                                                "geodet model files (*.pt)"))

    def check(self, parameters, context):
        source = self.parameterAsString(parameters, "SOURCE", context).strip()
        if not source:
            return "give the source: hf://ORG/NAME, a Hugging Face folder or a state_dict file"
        if source.startswith("hf://"):
            if not re.fullmatch(r"hf://[\w.-]+/[\w.-]+", source):
                return f"a Hugging Face source reads hf://ORG/NAME, got {source}"
        elif not os.path.exists(source):
            return f"source {source} does not exist (a folder, a .pt/.pth/.safetensors file, or hf://ORG/NAME)"
        gsd = self.optional_number(parameters, "GSD", context)
        if gsd is not None and gsd <= 0:
            return "the ground resolution must be a positive number of metres (or empty)"
        return self.check_output(parameters, "OUTPUT", context, ["pt"], "geodet model file")

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        out = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        args = ["import", self.parameterAsString(parameters, "SOURCE", context).strip(), "-o", out]
        self.flag(args, "--gsd", self.optional_number(parameters, "GSD", context))
        self.flag(args, "--tile-size", self.optional_number(parameters, "TILE_SIZE", context, integer=True))
        if not is_empty(parameters.get("CLASSES")):
            self.flag(args, "--classes", self.optional_text(parameters, "CLASSES", context))
        self.run_command(args, feedback, outputs=[out])
        return {"OUTPUT": out}
