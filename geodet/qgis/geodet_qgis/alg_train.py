"""The toolbox's Train group: train a detector (with Resume and validation scenes), train again on the
labelled cells (a round of the labelling loop), pretrain a backbone."""

import os
import shutil
import tempfile
import time
from pathlib import Path

from qgis.core import (
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingOutputFile,
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
    QgsProcessingUtils,
)

from .base import DEVICES, PRESETS, GeodetAlgorithm, extension, is_empty


def preset_parameters(alg):
    alg.addParameter(QgsProcessingParameterEnum("PRESET", "Preset", PRESETS, False, 0))
    # a file filter, not an extension: QGIS accepts only the one extension it is given
    alg.addParameter(QgsProcessingParameterFile("CONFIG", "Config file (YAML; overrides the preset)",
                                                QgsProcessingParameterFile.File, "", None, True,
                                                "YAML files (*.yaml *.yml)"))


def config_argument(alg, parameters, context):
    config = alg.parameterAsFile(parameters, "CONFIG", context) if not is_empty(parameters.get("CONFIG")) else ""
    return config or PRESETS[alg.parameterAsEnum(parameters, "PRESET", context)]


def checkpoint_report(folder: str, since: float) -> str:
    """What a cancelled training run left, and how to go on from it."""
    last = os.path.join(folder, "last.pt")
    if os.path.isfile(last) and os.path.getmtime(last) >= since - 1:
        saved = time.strftime("%H:%M:%S", time.localtime(os.path.getmtime(last)))
        return (f"the checkpoint {last} (saved at {saved}) is kept: run Train a detector again with the same inputs "
                "and run folder and 'Resume from the run folder's last.pt' checked to continue")
    if os.path.isfile(last):
        return f"no new checkpoint was saved; {last} from an earlier run is unchanged (Resume continues from it)"
    return "no checkpoint was saved yet, so there is nothing to resume: run it again from the start"


class TrainAlgorithm(GeodetAlgorithm):
    COMMAND = "train"
    TITLE = "Train a detector"
    GROUP = "Train"
    GRACE = 30.0  # a step and the checkpoint's save: a few seconds each on a CPU
    HELP = ("Train a RetinaNet on a raster and the boxes (or points) drawn over it, for the minutes given: the "
            "learning-rate schedule spans them. Give the labelled area (polygons of where every object is labelled) "
            "when only part of the scene is labelled: what lies outside is never taught as background. Validation "
            "uses a strip held out of the labelled area, or the validation scene and its labels. Writes model.pt, "
            "last.pt and metrics.csv to the run folder; Cancel keeps last.pt, and Resume continues from it.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer("SCENE", "Scene"))
        self.addParameter(QgsProcessingParameterFeatureSource("LABELS", "Labels (boxes or points)",
                                                              [QgsProcessing.TypeVectorAnyGeometry]))
        self.addParameter(QgsProcessingParameterField("CLASS_COLUMN", "Class column (empty: one class)", None,
                                                      "LABELS", QgsProcessingParameterField.Any, False, True))
        self.addParameter(QgsProcessingParameterFeatureSource("LABELLED_AREA", "Labelled area (polygons; empty: the "
                                                              "whole scene)", [QgsProcessing.TypeVectorPolygon],
                                                              None, True))
        self.addParameter(QgsProcessingParameterRasterLayer("VAL_SCENE", "Validation scene (optional)", None, True))
        self.addParameter(QgsProcessingParameterFeatureSource("VAL_LABELS", "Labels of the validation scene",
                                                              [QgsProcessing.TypeVectorAnyGeometry], None, True))
        preset_parameters(self)
        self.addParameter(QgsProcessingParameterString("BANDS", "Scene bands to train on, e.g. 1,2,3 (empty: the "
                                                                "config's, else all)", None, False, True))
        self.addParameter(QgsProcessingParameterNumber("TIME_LIMIT", "Training time (minutes)",
                                                       QgsProcessingParameterNumber.Double, 20.0, False, 0.1))
        self.addParameter(QgsProcessingParameterFile("INIT", "Start from this model (optional)",
                                                     QgsProcessingParameterFile.File, "", None, True))
        self.addParameter(QgsProcessingParameterBoolean("RESUME", "Resume from the run folder's last.pt", False))
        self.addParameter(QgsProcessingParameterEnum("DEVICE", "Device", DEVICES, False, 0))
        self.addParameter(QgsProcessingParameterFolderDestination("OUTPUT_FOLDER", "Run folder"))
        self.addOutput(QgsProcessingOutputFile("MODEL", "Model file"))
        self.addOutput(QgsProcessingOutputFile("CHECKPOINT", "Last checkpoint (for Resume)"))

    def check(self, parameters, context):
        if is_empty(parameters.get("VAL_SCENE")) != is_empty(parameters.get("VAL_LABELS")):
            return "give the validation scene and its labels together (or neither: a strip of the scene is held out)"
        if self.parameterAsBoolean(parameters, "RESUME", context):
            folder = self.parameterAsString(parameters, "OUTPUT_FOLDER", context)
            if not os.path.isfile(os.path.join(folder, "last.pt")):
                return (f"Resume continues a run from its folder's last.pt, and {folder or 'the run folder'} has none: "
                        "choose the folder of the run to continue, or uncheck Resume")
        return (self.check_file(parameters, "INIT", context, ["pt"], "Start model")
                or self.check_file(parameters, "CONFIG", context, ["yaml", "yml"], "Config file")
                or self.check_bands(self.optional_text(parameters, "BANDS", context)))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        folder = self.parameterAsString(parameters, "OUTPUT_FOLDER", context)
        column = self.parameterAsString(parameters, "CLASS_COLUMN", context) or ""
        args = ["train", self.raster_path(parameters, "SCENE", context, feedback),
                "--labels", self.vector_path(parameters, "LABELS", context, feedback),
                "--config", config_argument(self, parameters, context), "-o", folder,
                "--time-limit", self.parameterAsDouble(parameters, "TIME_LIMIT", context),
                "--class-column", column, "--device", DEVICES[self.parameterAsEnum(parameters, "DEVICE", context)]]
        self.flag(args, "--labelled-area", self.vector_path(parameters, "LABELLED_AREA", context, feedback))
        self.flag(args, "--bands", self.optional_text(parameters, "BANDS", context))
        if not is_empty(parameters.get("VAL_SCENE")):
            args += ["--val-scene", self.raster_path(parameters, "VAL_SCENE", context, feedback),
                     "--val-labels", self.vector_path(parameters, "VAL_LABELS", context, feedback)]
        if not is_empty(parameters.get("INIT")):
            self.flag(args, "--init", self.parameterAsFile(parameters, "INIT", context))
        # a Processing output is replaced by a rerun, as QGIS's own are: a run in the folder too
        args.append("--resume" if self.parameterAsBoolean(parameters, "RESUME", context) else "--overwrite")
        since = time.time()
        self.run_command(args, feedback, on_cancel=lambda killed: checkpoint_report(folder, since))
        return {"OUTPUT_FOLDER": folder, "MODEL": os.path.join(folder, "model.pt"),
                "CHECKPOINT": os.path.join(folder, "last.pt")}


class PretrainAlgorithm(GeodetAlgorithm):
    COMMAND = "pretrain"
    TITLE = "Pretrain a backbone (no labels)"
    GROUP = "Train"
    HELP = ("Self-supervised pretraining of the detector's backbone on your own unlabelled rasters (any band count, "
            "8- or 16-bit), at the model's ground resolution. It writes a model file to start Train a detector from "
            "('Start from this model'); it does not detect by itself.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterMultipleLayers("INPUT", "Unlabelled scenes", QgsProcessing.TypeRaster))
        preset_parameters(self)
        self.addParameter(QgsProcessingParameterNumber("TIME_LIMIT", "Pretraining time (minutes)",
                                                       QgsProcessingParameterNumber.Double, 10.0, False, 0.1))
        self.addParameter(QgsProcessingParameterNumber("MAX_STEPS", "At most this many steps (empty: no cap)",
                                                       QgsProcessingParameterNumber.Integer, None, True, 1))
        self.addParameter(QgsProcessingParameterString("BANDS", "Scene bands, e.g. 1,2,3 (empty: the config's)",
                                                       None, False, True))
        self.addParameter(QgsProcessingParameterEnum("DEVICE", "Device", DEVICES, False, 0))
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT", "Pretrained model file",
                                                                "geodet model files (*.pt)"))

    def check(self, parameters, context):
        if not self.parameterAsLayerList(parameters, "INPUT", context):
            return "give one or more unlabelled scenes (rasters)"
        return (self.check_file(parameters, "CONFIG", context, ["yaml", "yml"], "Config file")
                or self.check_bands(self.optional_text(parameters, "BANDS", context))
                or self.check_output(parameters, "OUTPUT", context, ["pt"], "Pretrained model file"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        out = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        scenes = self.raster_paths(parameters, "INPUT", context, feedback)
        args = ["pretrain", *scenes, "--config", config_argument(self, parameters, context), "-o", out,
                "--time-limit", self.parameterAsDouble(parameters, "TIME_LIMIT", context),
                "--device", DEVICES[self.parameterAsEnum(parameters, "DEVICE", context)]]
        self.flag(args, "--max-steps", self.optional_number(parameters, "MAX_STEPS", context, integer=True))
        self.flag(args, "--bands", self.optional_text(parameters, "BANDS", context))
        self.run_command(args, feedback, outputs=[out])
        return {"OUTPUT": out}


AREA_EXTENSIONS = ["gpkg", "geojson", "fgb", "shp"]  # what geodet suggest --done writes
AREA_FILTER = f"Vector files ({' '.join('*.' + e for e in AREA_EXTENSIONS)})"
SIDECARS = (".shp", ".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx", ".qmd", ".shp.xml")


def area_files(area: str) -> list:
    """The files of the labelled-area file as they are now: a shapefile's with its sidecars."""
    path = Path(area.split("|")[0])
    if extension(area) == "gpkg":  # with SQLite's journal where QGIS holds it open (edits not yet in the file)
        return [p for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))
                if p.is_file()]
    if extension(area) != "shp":
        return [path] if path.is_file() else []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    stem = path.stem
    return [path.parent / n for n in names if n[:len(stem)] == stem and n[len(stem):].lower() in SIDECARS]


class AreaCopy:
    """A copy of the labelled-area file taken before 'geodet suggest --done' extends it, to put it
    back (or remove it where there was none) when the training after it fails."""

    def __init__(self, area: str):
        self.area, self.folder, self.names = area, None, []
        files = area_files(area)
        if not files:
            return
        try:
            self.folder = Path(tempfile.mkdtemp(prefix="geodet-area-", dir=QgsProcessingUtils.tempFolder()))
            for f in files:
                shutil.copy2(f, self.folder / f.name)
                self.names.append(f.name)
        except OSError as exc:
            self.remove()
            raise QgsProcessingException(f"cannot copy the labelled area {area} before extending it "
                                         f"({exc.strerror or exc}): check that it can be read and that the "
                                         "temporary folder has room") from None

    def put_back(self) -> str:
        """Put the file back as it was (remove the one made where there was none); returns what became
        of it, a clause that starts '; ' to end the error's sentence."""
        parent = Path(self.area.split("|")[0]).parent
        try:
            for f in area_files(self.area):
                if f.name not in self.names:  # made by suggest --done
                    f.unlink()
            for name in self.names:  # each renamed into place whole, as geodet writes
                tmp = parent / f".{name}.geodet-restore"
                try:
                    shutil.copy2(self.folder / name, tmp)
                    os.replace(tmp, parent / name)
                finally:
                    if tmp.exists():
                        tmp.unlink()
        except OSError as exc:
            kept, self.folder = self.folder, None  # left for the user
            return (f"; the labelled area could not be put back as it was ({exc.strerror or exc}): copy it back from "
                    f"{kept}" if kept else f"; the labelled area it made could not be removed ({exc.strerror or exc})")
        name = os.path.basename(self.area.split("|")[0])
        return f"; {name} is as it was before the run" if self.names else f"; {name}, made by the run, was removed"

    def remove(self):
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class _NoProgress:
    """The feedback, but a quick step before the main command leaves QGIS's bar alone (the bar
    goes from 0 to 100 once, with the main command)."""

    def __init__(self, feedback):
        self._feedback = feedback

    def setProgress(self, value):  # noqa: N802
        pass

    def __getattr__(self, name):
        return getattr(self._feedback, name)


class TrainAgainAlgorithm(GeodetAlgorithm):
    COMMAND = "train-again"
    TITLE = "Train again on the labelled cells"
    GROUP = "Train"
    GRACE = 30.0
    HELP = ("One round of the labelling loop: the suggested cells you labelled (their 'done' field set to 1; all of "
            "them if none is set) join the labelled area, then training continues from the model on every label so "
            "far. Suggest tiles to label gives the cells; label the objects inside them in the labels layer first. "
            "The labelled-area file is extended in place (made when missing); when the training fails it is put "
            "back as it was, and after Cancel it keeps the labelled cells.")

    def shortHelpString(self):  # noqa: N802
        return self.HELP + " Runs 'geodet suggest --done', then 'geodet train --init'."

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer("SCENE", "Scene"))
        self.addParameter(QgsProcessingParameterFeatureSource("LABELS", "Labels (every label so far)",
                                                              [QgsProcessing.TypeVectorAnyGeometry]))
        self.addParameter(QgsProcessingParameterField("CLASS_COLUMN", "Class column (empty: the model's)", None,
                                                      "LABELS", QgsProcessingParameterField.Any, False, True))
        self.addParameter(QgsProcessingParameterFeatureSource("CELLS", "Suggested cells you labelled",
                                                              [QgsProcessing.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterFile("LABELLED_AREA", "Labelled area file (extended; made when "
                                                     "missing)", QgsProcessingParameterFile.File, "", None, False,
                                                     AREA_FILTER))
        self.addParameter(QgsProcessingParameterFile("INIT", "Model to continue from (model.pt)",
                                                     QgsProcessingParameterFile.File, "pt"))
        preset_parameters(self)  # the training settings (the model's card keeps its architecture)
        self.addParameter(QgsProcessingParameterNumber("TIME_LIMIT", "Training time (minutes)",
                                                       QgsProcessingParameterNumber.Double, 10.0, False, 0.1))
        self.addParameter(QgsProcessingParameterEnum("DEVICE", "Device", DEVICES, False, 0))
        self.addParameter(QgsProcessingParameterFolderDestination("OUTPUT_FOLDER", "Run folder"))
        self.addOutput(QgsProcessingOutputFile("MODEL", "Model file"))

    def checkParameterValues(self, parameters, context):  # noqa: N802
        # these sentences first (a wrong area file gets more than QGIS's "Incorrect parameter value"),
        # then QGIS's own checks (ranges, choices); neither asks the labelled area to exist: the first
        # round makes it
        problem = self.check(parameters, context)
        if problem:
            return False, problem
        return QgsProcessingAlgorithm.checkParameterValues(self, parameters, context)

    def check(self, parameters, context):
        area = self.parameterAsString(parameters, "LABELLED_AREA", context)
        if area and extension(area) not in AREA_EXTENSIONS:
            return f"Labelled area file: geodet writes .gpkg, .geojson, .fgb or .shp, not {os.path.basename(area)}"
        if not area:
            return "give the labelled-area file (it is made when missing)"
        problem = (self.check_file(parameters, "INIT", context, ["pt"], "Model to continue from")
                   or self.check_file(parameters, "CONFIG", context, ["yaml", "yml"], "Config file"))
        if problem or is_empty(parameters.get("INIT")):
            return problem or "give the model to continue from (model.pt)"
        if is_empty(parameters.get("SCENE")) or is_empty(parameters.get("LABELS")) or is_empty(parameters.get("CELLS")):
            return "give the scene, the labels and the labelled cells"
        return None

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        folder = self.parameterAsString(parameters, "OUTPUT_FOLDER", context)
        area = self.parameterAsString(parameters, "LABELLED_AREA", context)
        cells = self.vector_path(parameters, "CELLS", context, feedback)
        args = ["train", self.raster_path(parameters, "SCENE", context, feedback),
                "--labels", self.vector_path(parameters, "LABELS", context, feedback), "--labelled-area", area,
                "--init", self.parameterAsFile(parameters, "INIT", context), "-o", folder, "--overwrite",
                "--config", config_argument(self, parameters, context),
                "--time-limit", self.parameterAsDouble(parameters, "TIME_LIMIT", context),
                "--device", DEVICES[self.parameterAsEnum(parameters, "DEVICE", context)]]
        self.flag(args, "--class-column", self.optional_text(parameters, "CLASS_COLUMN", context))
        kept = AreaCopy(area)
        try:
            self.run_command(["suggest", "--done", cells, "--labelled-area", area], _NoProgress(feedback),
                             outputs=[area])
            if feedback.isCanceled():
                return {}
            since = time.time()
            self.run_command(args, feedback, on_cancel=lambda killed: checkpoint_report(folder, since)
                             + f"; {os.path.basename(area)} keeps the labelled cells")
        except QgsProcessingException as exc:
            if feedback.isCanceled():  # the cells were labelled: the area keeps them, as the sentence says
                raise
            raise QgsProcessingException(f"{exc}{kept.put_back()}") from None
        finally:
            kept.remove()
        return {"OUTPUT_FOLDER": folder, "MODEL": os.path.join(folder, "model.pt")}
