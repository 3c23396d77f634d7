
import numpy as np

from geodet.training.sampler import augment


def test_augmentations_keep_boxes_on_their_objects():
    rng = np.random.default_rng(0)
    img = np.zeros((3, 64, 48), np.float32)
    boxes = np.array([[5, 7, 15, 12], [30, 40, 44, 60]], float)
    for b in boxes.astype(int):
        img[:, b[1] : b[3], b[0] : b[2]] = 1.0
    for _ in range(20):
        out, ob = augment(img, boxes, rng)
        mask = out[0] > 0.8
        for b in ob.astype(int):
            assert b.min() >= 0
            region = mask[b[1] : b[3], b[0] : b[2]]
            assert region.all() and region.sum() == (b[2] - b[0]) * (b[3] - b[1])
        assert mask.sum() == sum((b[2] - b[0]) * (b[3] - b[1]) for b in ob)


def test_chip_windows_stay_inside_their_area():
    from geodet.training.sampler import ChipWindows

    rng = np.random.default_rng(0)
    boxes = np.array([[10, 10, 20, 20], [250, 5, 260, 15], [500, 500, 510, 510]], float)
    w = ChipWindows([(0, 0, 300, 200)], [boxes], 128, negative_fraction=0.3)
    for _ in range(500):
        k, t = w.draw(rng)
        assert k == 0 and 0 <= t.col_off and t.col_off + 128 <= 300 and 0 <= t.row_off and t.row_off + 128 <= 200
    assert len(w.inside[0]) == 2  # the box outside the area is never a chip centre
