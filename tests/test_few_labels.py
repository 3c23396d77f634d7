"""Training from few labels: the time budget is the schedule, the labelled area is respected (what
nobody labelled is never taught as background), and the augmentations keep boxes on their objects."""

import csv

import numpy as np
import pytest
import torch
from conftest import tiny_config

from geodet import GeodetError
from geodet.config import ModelConfig
from geodet.model import build_model
from geodet.training import augment as aug


def _aoi(path, scene_path, frac_x):
    """A polygon over the left ``frac_x`` of the scene, written to ``path``."""
    import geopandas as gpd
    import rasterio
    from shapely.geometry import box

    with rasterio.open(scene_path) as src:
        b, crs = src.bounds, src.crs
    x1 = b.left + (b.right - b.left) * frac_x
    gpd.GeoDataFrame(geometry=[box(b.left, b.bottom, x1, b.top)], crs=crs).to_file(path)
    return path


def _rows(run):
    return list(csv.DictReader(open(run / "metrics.csv")))


# -- the budget ----------------------------------------------------------------------------
def test_time_limit_is_used_and_spans_the_schedule(tmp_path, synth):
    from geodet.training.trainer import train

    cfg = tiny_config(synth.image, synth.labels, epochs=None, time_limit_min=0.3, warmup_steps=2)
    train(cfg, tmp_path / "run", progress=False)
    rows = _rows(tmp_path / "run")
    steps = [r for r in rows if r["loss"]]
    end = rows[-1]
    assert end["note"].startswith("stopped: time limit")
    # the whole budget, final validation included, and no more than a step or two past it (on a
    # loaded machine a step, and so the overrun, takes longer)
    times = [float(r["seconds"]) for r in steps]
    step_s = max(b - a for a, b in zip(times, times[1:]))
    assert 0.9 * 18 <= float(end["seconds"]) <= 18 + 2 * step_s + 2
    assert len(steps) > 12  # more than the 2 epochs x 6 steps an epoch cap would have given
    lrs = [float(r["lr"]) for r in steps]
    peak = max(lrs)
    assert lrs[len(lrs) // 3] == pytest.approx(peak)  # the peak holds through the first part of the budget...
    assert lrs[-1] < 0.05 * peak  # ...and the cosine has decayed to (nearly) zero by the end
    assert any(r["note"].startswith("validation") for r in rows)


def test_an_epoch_cap_still_caps_a_timed_run(tmp_path, synth):
    from geodet.training.trainer import train

    train(tiny_config(synth.image, synth.labels, epochs=1, time_limit_min=5), tmp_path / "run", progress=False)
    rows = _rows(tmp_path / "run")
    assert max(int(r["step"]) for r in rows if r["loss"]) == 6
    assert rows[-1]["note"].startswith("stopped: step cap")


def test_a_budget_too_short_for_the_warmup_is_refused_and_leaves_nothing(tmp_path, synth):
    from geodet.training.trainer import train

    cfg = tiny_config(synth.image, synth.labels, epochs=None, time_limit_min=0.02, warmup_steps=500)
    with pytest.raises(GeodetError, match="too short.*warm-up"):
        train(cfg, tmp_path / "new" / "run", progress=False)
    assert not (tmp_path / "new").exists()


# -- the labelled area ---------------------------------------------------------------------
def test_the_loss_never_teaches_unlabelled_pixels_as_background():
    cfg = ModelConfig(classes=["a"], channels=16, head_depth=1, levels=[2, 4], anchor_sizes=[8.0, 16.0, 32.0])
    model = build_model(cfg, tile_size=64).train()
    images = torch.rand(1, 3, 64, 64)
    unlabelled = torch.zeros(64, 64, dtype=torch.bool)
    unlabelled[:, 32:] = True  # the right half was never labelled
    target = {"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]), "labels": torch.tensor([0]), "unlabelled": unlabelled}
    logits = {}

    def keep(_module, _inp, out):
        out.retain_grad()
        logits["cls"] = out

    # the classification logits of every anchor, as the loss sees them
    net = model.net
    orig = net.head.classification_head.forward

    def fwd(x):
        out = orig(x)
        keep(None, None, out)
        return out

    net.head.classification_head.forward = fwd
    losses = model(images, [target])
    losses["classification"].backward()
    grad = logits["cls"].grad[0, :, 0]
    anchors = net.anchor_generator(net.transform(list(images))[0], list(net.backbone(images).values()))[0]
    cx = (anchors[:, 0] + anchors[:, 2]) / 2
    right = cx >= 32
    assert torch.all(grad[right] == 0)  # no push towards background where nobody looked
    assert torch.count_nonzero(grad[~right]) > 0.9 * int((~right).sum())  # background elsewhere, as before


def test_chips_stay_in_the_labelled_area_and_mark_the_rest(tmp_path, synth):
    from geodet.config import SceneLabels
    from geodet.training.sampler import ChipDataset
    from geodet.training.trainer import Trainer

    cfg = tiny_config(synth.image, synth.labels, negative_fraction=0.5, augment=False)
    cfg.train.scenes = [SceneLabels(str(synth.image), str(synth.labels), str(_aoi(tmp_path / "aoi.gpkg", synth.image, 0.5)))]
    t = Trainer(cfg, tmp_path / "run", progress=False)
    t.prepare()
    ts = t.train_scenes[0]
    W, H = ts.scene.width, ts.scene.height
    # the labelled area is the left half; its validation strip is cut across its longer side
    assert ts.area == (0, 0, W // 2, round(H * 0.8)) and t.val_sets[0][1] == (0, round(H * 0.8), W // 2, H)
    ds = ChipDataset(t.train_scenes, 128, cfg.train, 40, 0)
    for i in range(40):
        k, tile = ds.windows.draw(np.random.default_rng([0, 0, 0, i]))
        assert tile.col_off + 128 <= W // 2
    # a chip straddling the area's edge: every pixel right of it is marked, none left of it
    from geodet.training.area import unlabelled_mask

    m = unlabelled_mask(ts.labelled, W // 2 - 64, 0, 128, 128)
    assert m[:, 64:].all() and not m[:, :64].any()
    assert unlabelled_mask(ts.labelled, 0, 0, 128, 128) is None  # wholly inside: no mask at all


def test_labelled_area_bad_input_is_one_line_and_writes_nothing(tmp_path, synth, capsys):
    import geopandas as gpd
    from shapely.geometry import box

    from geodet.cli import main

    far = tmp_path / "far.gpkg"
    gpd.GeoDataFrame(geometry=[box(0, 0, 10, 10)], crs=synth.crs).to_file(far)
    pts = tmp_path / "pts.gpkg"
    gpd.GeoDataFrame(geometry=gpd.points_from_xy([1], [1]), crs=synth.crs).to_file(pts)
    base = ["train", "--config", "cpu", "--scene", synth.image, "--labels", synth.labels, "--tile-size", "128",
            "--max-steps", "2", "-q"]
    for area, message in ((far, "does not overlap scene"), (pts, "must be polygons")):
        out = tmp_path / f"run_{area.stem}"
        assert main([*map(str, base), "--out", str(out), "--labelled-area", str(area)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not out.exists()


def test_labels_outside_the_labelled_area_are_counted(tmp_path, synth, caplog):
    from geodet.config import SceneLabels
    from geodet.training.trainer import Trainer

    cfg = tiny_config(synth.image, synth.labels)
    cfg.train.scenes = [SceneLabels(str(synth.image), str(synth.labels), str(_aoi(tmp_path / "aoi.gpkg", synth.image, 0.5)))]
    t = Trainer(cfg, tmp_path / "run", progress=False)
    with caplog.at_level("WARNING"):
        t.prepare()
    lb = t.train_scenes[0].labels
    cx = (lb.boxes[:, 0] + lb.boxes[:, 2]) / 2
    assert lb.counts["outside_labelled_area"] == int((cx > t.train_scenes[0].scene.width / 2).sum()) > 0
    assert f"{lb.counts['outside_labelled_area']} of {len(lb)} labels lie outside the labelled area" in caplog.text


# -- augmentations -------------------------------------------------------------------------
def _id_image(boxes, h, w):
    img = np.zeros((3, h, w), np.float32)
    for i, b in enumerate(boxes.astype(int)):
        img[:, b[1] : b[3], b[0] : b[2]] = 0.2 + 0.1 * i
    return img


def test_rescale_keeps_boxes_on_their_objects():
    boxes = np.array([[8, 8, 40, 24], [60, 70, 92, 120]], float)
    img = _id_image(boxes, 160, 160)
    for size in (120, 200):
        out, ob, _ = aug.rescale(img, boxes, size)
        f = size / 160
        assert np.allclose(ob, boxes * f)
        for i, b in enumerate(ob):
            inner = out[0, int(b[1]) + 2 : int(b[3]) - 2, int(b[0]) + 2 : int(b[2]) - 2]
            assert np.allclose(inner, 0.2 + 0.1 * i, atol=1e-4)


def test_geometric_moves_the_mask_with_the_pixels():
    rng = np.random.default_rng(1)
    img = np.zeros((3, 40, 30), np.float32)
    img[:, :, :10] = 1.0
    mask = img[0] > 0.5
    for _ in range(12):
        out, _, m = aug.geometric(img, np.zeros((0, 4)), rng, mask)
        assert np.array_equal(m, out[0] > 0.5)


def test_copy_paste_puts_whole_objects_only_on_free_labelled_pixels():
    rng = np.random.default_rng(0)
    crop = np.full((3, 16, 20), 0.9, np.float32)  # a 10 x 14 object with a 3 px margin
    bank = aug.InstanceBank([crop], [1], margin=3)
    for _ in range(20):
        img = np.zeros((3, 128, 128), np.float32) + 0.1
        existing = np.array([[10.0, 10.0, 40.0, 40.0]])
        unlabelled = np.zeros((128, 128), bool)
        unlabelled[:, 96:] = True
        boxes, labels = bank.paste(img, existing.copy(), np.array([0]), existing, rng, 6, unlabelled, img.any(axis=0))
        new = boxes[1:]
        assert len(new) >= 1 and (labels[1:] == 1).all()
        for b in new:
            x0, y0, x1, y1 = b.astype(int)
            assert x1 - x0 in (10, 14) and y1 - y0 in (10, 14)
            assert np.allclose(img[:, y0:y1, x0:x1], 0.9)  # the object itself, unblended
            assert x1 + 3 <= 96  # clear of the unlabelled part, margin included
        # no pasted box touches a box already there (or another pasted one)
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, c = boxes[i], boxes[j]
                assert min(a[2], c[2]) <= max(a[0], c[0]) or min(a[3], c[3]) <= max(a[1], c[1])


def test_photometric_keeps_nodata_and_works_for_any_band_count():
    rng = np.random.default_rng(0)
    for bands in (3, 4, 1):
        img = np.random.default_rng(1).uniform(0.1, 0.9, (bands, 32, 32)).astype(np.float32)
        img[:, :4] = 0.0
        out = aug.photometric(img, rng, 1.0)
        assert out.shape == img.shape and out.dtype == np.float32
        assert (out[:, :4] == 0).all() and 0 <= out.min() and out.max() <= 1
        assert not np.allclose(out, img)


def test_a_labelled_area_without_labels_and_an_unreferenced_image_are_refused(tmp_path, synth, capsys):
    import geopandas as gpd
    import rasterio
    from shapely.geometry import box

    from geodet.cli import main

    with rasterio.open(synth.image) as src:
        b = src.bounds
    corner = box(b.left, b.bottom, b.left + 3, b.bottom + 3)  # a 10 px corner without a vehicle in it
    gpd.GeoDataFrame(geometry=[corner], crs=synth.crs).to_file(tmp_path / "empty.gpkg")
    g = gpd.read_file(synth.labels)
    g = g[~g.intersects(corner)]
    g.to_file(tmp_path / "l.gpkg")
    out = tmp_path / "run"
    assert main(["train", "--scene", str(synth.image), "--labels", str(tmp_path / "l.gpkg"), "--labelled-area",
                 str(tmp_path / "empty.gpkg"), "--out", str(out), "-q"]) == 2
    assert "no label of" in capsys.readouterr().err and not out.exists()
    png = tmp_path / "photo.png"
    with rasterio.open(png, "w", driver="PNG", width=64, height=64, count=3, dtype="uint8") as dst:
        dst.write(np.zeros((3, 64, 64), np.uint8))
    assert main(["train", "--config", "trees", "--scene", str(png), "--labels", str(synth.labels), "--out", str(out),
                 "-q"]) == 2
    err = capsys.readouterr().err
    assert "no georeferencing" in err and "projected CRS" not in err and not out.exists()


def test_a_validation_strip_without_labels_keeps_the_last_model(tmp_path, synth, caplog):
    import geopandas as gpd

    from geodet.model import load_model
    from geodet.training.trainer import train

    g = gpd.read_file(synth.labels)
    b = g.total_bounds
    left = g[g.geometry.centroid.x < (b[0] + b[2]) / 2]  # labelled on the left; the strip is on the right
    left.to_file(tmp_path / "left.gpkg")
    cfg = tiny_config(synth.image, tmp_path / "left.gpkg", epochs=None, max_steps=12, steps_per_epoch=3)
    with caplog.at_level("WARNING"):
        path = train(cfg, tmp_path / "run", progress=False)
    assert "validation area holds no labels" in caplog.text
    assert load_model(path).card.trained_steps == 12  # not the first model that scored 0 on an empty strip
