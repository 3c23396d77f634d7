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


def test_pseudo_boxes_are_labels_and_every_box_below_its_threshold_is_ignored(tmp_path):
    from shapely.geometry import box

    from geodet.training.selftrain import PseudoArea, Thresholds, pseudo_scenes

    sc, _ = _id_scene(tmp_path)

    def teacher(batch):
        b = torch.tensor([[10.0, 10.0, 30.0, 30.0], [50.0, 10.0, 70.0, 30.0], [90.0, 10.0, 110.0, 30.0]])
        return [{"boxes": b, "scores": torch.tensor([0.9, 0.7, 0.1]), "labels": torch.zeros(3, dtype=torch.int64)}
                for _ in batch]

    thr = Thresholds({0: (0.8, 0.8)}, split=20.0)
    rest = box(0, 0, 400, 300).difference(box(0, 0, 40, 300))  # the left 40 px are labelled by the user
    scenes, n_sure, n_doubt = pseudo_scenes(teacher, [PseudoArea(sc, (0, 0, 400, 300), rest)], thr, ["0"], 0, 512,
                                            "cpu", 4, np.random.default_rng(0), doubt=0.1)
    (ps,) = scenes
    assert ps.kind == "pseudo" and n_sure == 0 and n_doubt == 2  # the 0.9 box lies in the user's part
    assert len(ps.labels) == 0
    assert not ps.labelled.contains(box(52, 12, 68, 28))  # under a box below its threshold: ignored
    # a box far below the threshold (0.1, a crown the teacher half saw) is ignored too, not background
    assert not ps.labelled.contains(box(92, 12, 108, 28))
    assert ps.labelled.contains(box(150, 100, 160, 110))  # where the teacher saw nothing: background
    scenes, n_sure, _ = pseudo_scenes(teacher, [PseudoArea(sc, (0, 0, 400, 300))], thr, ["0"], 0, 512, "cpu", 4,
                                      np.random.default_rng(0))
    assert n_sure == 1 and scenes[0].labels.boxes.tolist() == [[10.0, 10.0, 30.0, 30.0]]


def test_the_users_labels_outside_the_area_stay_labels_in_the_teachers_chips(tmp_path):
    from shapely.geometry import box

    from geodet.training.selftrain import PseudoArea, Thresholds, pseudo_scenes

    sc, _ = _id_scene(tmp_path)

    def teacher(batch):  # finds one of the user's two objects (a near-copy of its box), misses the other
        b = torch.tensor([[101.0, 10.0, 121.0, 30.0]])
        return [{"boxes": b, "scores": torch.tensor([0.95]), "labels": torch.zeros(1, dtype=torch.int64)} for _ in batch]

    thr = Thresholds({0: (0.5, 0.5)}, split=20.0)
    user = np.array([[100.0, 10.0, 120.0, 30.0], [200.0, 100.0, 230.0, 130.0]])
    area = PseudoArea(sc, (0, 0, 400, 300), box(40, 0, 400, 300), user, np.zeros(2, np.int64))
    (ps,), n_sure, _ = pseudo_scenes(teacher, [area], thr, ["0"], 0, 512, "cpu", 4, np.random.default_rng(0))
    # both of the user's objects are labels (the one the teacher missed too), and the teacher's copy
    # of the first is not a second object
    assert sorted(ps.labels.boxes.tolist()) == sorted(user.tolist()) and n_sure == 0


def test_joined_validation_areas_are_ranked_as_one():
    """Two validation areas whose scores interleave: the bins must be sorted again once joined,
    or the best-F1 threshold comes from a misordered list."""
    from geodet.training.selftrain import _threshold, ranked

    g = np.array([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]])
    # area A: its objects at 0.5 and a false box at 0.45; area B: its objects at 0.9, false boxes at 0.85 and 0.2
    fa = np.array([[50.0, 50.0, 60.0, 60.0]])
    da = (np.concatenate([g, fa]), np.array([0.5, 0.5, 0.45]), np.zeros(3, np.int64))
    db = (np.concatenate([g, fa, fa + 20]), np.array([0.9, 0.9, 0.85, 0.2]), np.zeros(4, np.int64))
    gts = [(g, np.zeros(2, np.int64)), (g, np.zeros(2, np.int64))]
    s, t, n = ranked([da, db], gts, 0, True, 1e9)
    assert np.all(np.diff(s) <= 0) and n == 4
    assert t.tolist() == [True, True, False, True, True, False, False]
    # F1 over the ranking: best at 0.5 (all four objects, two false boxes above)
    assert _threshold(s, t, n, 0.3) == pytest.approx(0.5)


def _left_half_labelled(tmp_path, synth, **train):
    """A self-training config whose labelled area is the scene's left half (3 steps an epoch)."""
    import geopandas as gpd
    import rasterio
    from shapely.geometry import box

    from geodet.config import SceneLabels

    with rasterio.open(synth.image) as src:
        b = src.bounds
    gpd.GeoDataFrame(geometry=[box(b.left, b.bottom, (b.left + b.right) / 2, b.top)], crs=synth.crs).to_file(tmp_path / "a.gpkg")
    cfg = tiny_config(synth.image, synth.labels, epochs=None, steps_per_epoch=3, self_training=True, burn_in=0.3, **train)
    cfg.train.scenes = [SceneLabels(str(synth.image), str(synth.labels), str(tmp_path / "a.gpkg"))]
    return cfg


def test_self_training_runs_its_rounds_and_logs_them(tmp_path, synth):
    from geodet.training.trainer import train

    cfg = _left_half_labelled(tmp_path, synth, max_steps=12, pseudo_rounds=2)
    train(cfg, tmp_path / "run", progress=False)
    notes = [r["note"] for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv")) if r["note"]]
    rounds = [n for n in notes if n.startswith("pseudo-labels round")]
    assert len(rounds) == 2 and "thresholds" in rounds[0]
    # --resume: the checkpoint holds the rounds' count, not their boxes: the last round's are made again
    cfg.train.max_steps = 15
    train(cfg, tmp_path / "run", resume=True, progress=False)
    notes = [r["note"] for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv")) if r["note"]]
    assert any(n.startswith("pseudo-labels round 2 made again after --resume") for n in notes), notes


def test_a_run_too_short_for_its_rounds_says_how_many_ran(tmp_path, synth, caplog):
    from geodet.training.trainer import train

    cfg = _left_half_labelled(tmp_path, synth, max_steps=6, pseudo_rounds=3)
    train(cfg, tmp_path / "run", progress=False)
    said = "self-training ran 1 of its 3 pseudo-label round(s) in 2 epoch(s)"
    assert said in caplog.text
    notes = [r["note"] for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv")) if r["note"]]
    assert any(n.startswith(said) for n in notes), notes


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


def test_a_labelled_or_validation_scene_given_as_unlabelled_is_refused(tmp_path, synth):
    """Pseudo-labelled whole, a labelled scene would have its labels and validation strip taught
    from the teacher's boxes, and a validation scene would be trained on."""
    from geodet.config import SceneLabels
    from geodet.synthetic import make_scene
    from geodet.training.trainer import Trainer

    cfg = tiny_config(synth.image, synth.labels, unlabelled=[str(synth.image)])
    with pytest.raises(GeodetError, match="is a labelled training scene: .*--labelled-area and --self-training"):
        Trainer(cfg, tmp_path / "run", progress=False).prepare()
    v = make_scene(tmp_path / "v.tif", tmp_path / "v.gpkg", size=160, seed=5)
    cfg = tiny_config(synth.image, synth.labels, unlabelled=[str(v.image)])
    cfg.train.val_scenes = [SceneLabels(str(v.image), str(v.labels))]
    with pytest.raises(GeodetError, match="is a validation scene"):
        Trainer(cfg, tmp_path / "run", progress=False).prepare()


def test_scenes_of_another_ground_resolution_are_read_at_the_first_ones(tmp_path, synth, caplog):
    """The model learns one pixel size (the first scene's, which its card and detect use): a
    second training scene and a validation scene at 0.6 m are read at 0.3 m, and said."""
    from geodet.config import SceneLabels
    from geodet.synthetic import make_scene
    from geodet.training.trainer import Trainer

    coarse = make_scene(tmp_path / "c.tif", tmp_path / "c.gpkg", size=256, gsd_m=0.6, seed=6)
    val = make_scene(tmp_path / "v.tif", tmp_path / "v.gpkg", size=256, gsd_m=0.6, seed=7)
    cfg = tiny_config(synth.image, synth.labels)
    cfg.train.scenes.append(SceneLabels(str(coarse.image), str(coarse.labels)))
    cfg.train.val_scenes = [SceneLabels(str(val.image), str(val.labels))]
    with caplog.at_level("INFO"):
        t = Trainer(cfg, tmp_path / "run", progress=False)
        t.prepare()
    first = t.train_scenes[0].scene.pixel_gsd
    assert first == pytest.approx(0.3)
    assert [ts.scene.pixel_gsd for ts in t.train_scenes[1:]] == [pytest.approx(first)]
    assert [ts.scene.pixel_gsd for ts, _ in t.val_sets] == [pytest.approx(first)]
    assert t.train_scenes[1].scene.width == 512  # 256 px at 0.6 m
    assert "resampled from 0.6 m to the first training scene's 0.3 m" in caplog.text


def test_scenes_without_a_projected_crs_keep_their_own_resolution(tmp_path, synth, caplog):
    """A geographic first scene gives the card no ground resolution (detect runs each scene at its
    own): nothing to match; a geographic other scene cannot be resampled: said, as detect says it."""
    import rasterio
    from rasterio.transform import from_origin

    from geodet.io.scene import Scene
    from geodet.training.inputs import at_gsd_of

    def geo(name, res):
        with rasterio.open(tmp_path / name, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8",
                           crs="EPSG:4326", transform=from_origin(10.0, 45.0, res, res)) as dst:
            dst.write(np.full((3, 64, 64), 90, np.uint8))
        return Scene(tmp_path / name)

    cfg = tiny_config(synth.image, synth.labels)
    a, b = geo("a.tif", 3e-6), geo("b.tif", 4e-6)
    assert at_gsd_of(b, cfg, a, "b.tif") is b and not caplog.text
    assert at_gsd_of(b, cfg, Scene(synth.image), "b.tif") is b
    assert "cannot be resampled (no projected CRS): trained at its own resolution" in caplog.text
