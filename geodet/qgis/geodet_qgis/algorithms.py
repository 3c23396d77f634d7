"""geodet's algorithms in the Processing toolbox, one per geodet command, in groups by task:
Detect, Train, Evaluate and Prepare. Each gathers its parameters (layers already open in QGIS
included), checks them before the run, runs the command (``runner.run_geodet``) and returns what
it wrote; vector outputs load with geodet's style (``styling``)."""

from .alg_detect import DetectAlgorithm, ExportAlgorithm, ImportAlgorithm
from .alg_prepare import AnchorsAlgorithm, EvaluateAlgorithm, SuggestAlgorithm, TileAlgorithm
from .alg_train import PretrainAlgorithm, TrainAgainAlgorithm, TrainAlgorithm

ALGORITHMS = [DetectAlgorithm, ExportAlgorithm, ImportAlgorithm, TrainAlgorithm, TrainAgainAlgorithm, PretrainAlgorithm,
              EvaluateAlgorithm, TileAlgorithm, AnchorsAlgorithm, SuggestAlgorithm]
