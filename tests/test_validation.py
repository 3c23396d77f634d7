"""Validation over held-out areas scores what a user would: a perfect detector gets AP 1."""

import numpy as np
from helpers import PerfectDetector, packed_boxes, write_id_scene

from geodet.io.labels import LabelBoxes
from geodet.io.scene import Scene
from geodet.training.sampler import TrainScene
from geodet.training.validation import validate


def test_perfect_detector_scores_one_on_held_out_areas(tmp_path):
    ints = packed_boxes(600, 500, 6, 24, seed=4)
    p = write_id_scene(tmp_path / "id.tif", ints, 600, 500)
    boxes = ints.astype(float)
    sc = Scene(p)
    ts = TrainScene(sc, LabelBoxes(boxes, np.zeros(len(boxes), np.int64), ["0"]), (0, 0, 400, 500), str(p))
    # two areas of one scene: each is its own image, so boxes of one never match the other's
    m = validate(PerfectDetector(), [(ts, (400, 0, 600, 500)), (ts, (0, 300, 400, 500))], ["0"], overlap=24,
                 device="cpu", batch_size=4, min_visibility=0.0)
    assert m["n_labels"] > 100 and m["AP50"] == 1.0 and m["AP"] == 1.0
    # and a detector that is off by a few pixels scores less
    class Shifted(PerfectDetector):
        def __call__(self, batch):
            out = super().__call__(batch)
            for o in out:
                o["boxes"] = o["boxes"] + 3
            return out

    m2 = validate(Shifted(), [(ts, (400, 0, 600, 500))], ["0"], overlap=24, device="cpu", batch_size=4, min_visibility=0.0)
    assert m2["AP"] < 0.9
