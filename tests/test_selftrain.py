"""Self-training: thresholds from validation, the teacher's boxes split into labels and ignored
doubts, rounds logged, and unlabelled scenes that do not fit refused in one line."""

import csv

import numpy as np
import pytest
import torch
from conftest import tiny_config
from helpers import PerfectDetector, packed_boxes, write_id_scene

from geodet.errors import GeodetError
from geodet.io.labels import LabelBoxes
from geodet.io.scene import Scene
from geodet.training.sampler import TrainScene


class Scored(PerfectDetector):
    """Each object's box with score 0.8, and a false box per tile at 0.6 (so the best F1 is at 0.8)."""

    def __call__(self, batch):
        out = []
        for o in super().__call__(batch):
            fake = torch.tensor([[1.0, 1.0, 9.0, 9.0]])
            out.append({"boxes": torch.cat([o["boxes"], fake]), "scores": torch.cat([torch.full((len(o["scores"]),), 0.8),
                                                                                       torch.tensor([0.6])]),
                        "labels": torch.zeros(len(o["scores"]) + 1, dtype=torch.int64)})
        return out


def _id_scene(tmp_path):
    ints = packed_boxes(400, 300, 8, 30, seed=2)
    p = write_id_scene(tmp_path / "id.tif", ints, 400, 300)
    boxes = ints.astype(float)
    return Scene(p), LabelBoxes(boxes, np.zeros(len(boxes), np.int64), ["obj"])


def test_thresholds_are_the_teachers_best_f1_on_validation(tmp_path):
    from geodet.training.selftrain import thresholds_from_validation

    sc, lb = _id_scene(tmp_path)
    ts = TrainScene(sc, lb, (0, 0, 200, 300), "l")
    thr = thresholds_from_validation(Scored(), [(ts, (200, 0, 400, 300))], ["0"], 16, "cpu", 4, 0.0, fallback=0.3)
    small, large = thr.by_class[0]
    assert small == pytest.approx(0.8) and large == pytest.approx(0.8)
    assert 8 < thr.split < 30  # the labels' median side


def test_pseudo_boxes_are_labels_and_doubts_are_ignored(tmp_path):
    from shapely.geometry import box

    from geodet.training.selftrain import Thresholds, pseudo_scenes

    sc, _ = _id_scene(tmp_path)

    def teacher(batch):
        b = torch.tensor([[10.0, 10.0, 30.0, 30.0], [50.0, 10.0, 70.0, 30.0], [90.0, 10.0, 110.0, 30.0]])
        return [{"boxes": b, "scores": torch.tensor([0.9, 0.7, 0.3]), "labels": torch.zeros(3, dtype=torch.int64)}
                for _ in batch]

    thr = Thresholds({0: (0.8, 0.8)}, split=20.0)
    rest = box(0, 0, 400, 300).difference(box(0, 0, 40, 300))  # the left 40 px are labelled by the user
    scenes, n_sure, n_doubt = pseudo_scenes(teacher, [(sc, (0, 0, 400, 300), rest)], thr, ["0"], 0, 512, "cpu", 4,
                                            np.random.default_rng(0))
    (ps,) = scenes
    assert ps.kind == "pseudo" and n_sure == 0 and n_doubt == 1  # the 0.9 box lies in the user's part
    assert len(ps.labels) == 0
    assert not ps.labelled.contains(box(52, 12, 68, 28))  # under the doubtful box: ignored, not background
    assert ps.labelled.contains(box(150, 100, 160, 110))  # elsewhere: taught as background
    scenes, n_sure, _ = pseudo_scenes(teacher, [(sc, (0, 0, 400, 300), None)], thr, ["0"], 0, 512, "cpu", 4,
                                      np.random.default_rng(0))
    assert n_sure == 1 and scenes[0].labels.boxes.tolist() == [[10.0, 10.0, 30.0, 30.0]]


def test_self_training_runs_its_rounds_and_logs_them(tmp_path, synth):
    import geopandas as gpd
    import rasterio
    from shapely.geometry import box

    from geodet.config import SceneLabels
    from geodet.training.trainer import train

    with rasterio.open(synth.image) as src:
        b = src.bounds
    gpd.GeoDataFrame(geometry=[box(b.left, b.bottom, (b.left + b.right) / 2, b.top)], crs=synth.crs).to_file(tmp_path / "a.gpkg")
    cfg = tiny_config(synth.image, synth.labels, epochs=None, max_steps=12, steps_per_epoch=3, self_training=True,
                      burn_in=0.3, pseudo_rounds=2)
    cfg.train.scenes = [SceneLabels(str(synth.image), str(synth.labels), str(tmp_path / "a.gpkg"))]
    train(cfg, tmp_path / "run", progress=False)
    notes = [r["note"] for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv")) if r["note"]]
    rounds = [n for n in notes if n.startswith("pseudo-labels round")]
    assert len(rounds) == 2 and "thresholds" in rounds[0]


def test_unlabelled_scenes_that_do_not_fit_are_refused(tmp_path, synth):
    import rasterio
    from rasterio.transform import from_origin

    from geodet.training.trainer import Trainer

    one = tmp_path / "one_band.tif"
    with rasterio.open(one, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000, 4600000, 0.3, 0.3)) as dst:
        dst.write(np.zeros((1, 64, 64), np.uint8))
    cfg = tiny_config(synth.image, synth.labels, unlabelled=[str(one)])
    with pytest.raises(GeodetError, match="band"):
        Trainer(cfg, tmp_path / "run", progress=False).prepare()
    cfg = tiny_config(synth.image, synth.labels, unlabelled=[str(synth.image)], val_fraction=0.0)
    with pytest.raises(GeodetError, match="validation"):
        Trainer(cfg, tmp_path / "run", progress=False).prepare()
