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
    # the time limit, not an epoch count, ended it: the note above, and steps taken until the final
    # validation's reserve (a step count would depend on how busy the machine is: 7 in 18 s on a
    # loaded one)
    assert times[-1] >= 0.6 * 18, times
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


def test_epochs_and_max_steps_both_cap_a_run():
    """--epochs 1 --steps-per-epoch 2 --max-steps 6 stops at step 2: both are caps (the help says
    so), the max_steps alone did not win."""
    from types import SimpleNamespace

    from geodet.training.schedule import step_cap

    tc = SimpleNamespace(max_steps=6, epochs=1, steps_per_epoch=2, time_limit_min=None)
    assert step_cap(tc) == 2
    assert step_cap(SimpleNamespace(max_steps=6, epochs=None, steps_per_epoch=2, time_limit_min=None)) == 6
    assert step_cap(SimpleNamespace(max_steps=6, epochs=9, steps_per_epoch=2, time_limit_min=None)) == 6
    assert step_cap(SimpleNamespace(max_steps=None, epochs=3, steps_per_epoch=2, time_limit_min=None)) == 6


def test_a_timed_runs_bar_follows_a_step_cap_that_ends_it_first():
    """With --time-limit and --max-steps, the bar counted the clock alone: a cap reached first left
    it at 30-50% before it jumped to the end (train and pretrain)."""
    from geodet.training.schedule import Budget

    b = Budget(total=10, seconds=600.0)
    assert b.clock(5) == pytest.approx(300.0, abs=1.0) and b.clock(10) >= 600.0
    assert Budget(total=None, seconds=600.0).clock(5) < 5.0  # no cap: the clock
    resumed = Budget(total=20, seconds=600.0, start_step=10)  # a resumed run's bar starts at its own 0
    assert resumed.clock(15) == pytest.approx(300.0, abs=1.0)


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
    # the share of each anchor on the unlabelled half (outside the image nothing lies)
    w = (anchors[:, 2].clamp(max=64) - anchors[:, 0].clamp(min=32)).clamp(min=0)
    h = (anchors[:, 3].clamp(max=64) - anchors[:, 1].clamp(min=0)).clamp(min=0)
    share = w * h / ((anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1]))
    # no push towards background where an object nobody labelled could make the anchor more than
    # background (its IoU with it could reach the background threshold, 0.4)
    assert torch.all(grad[share >= 0.42] == 0)
    assert int((share >= 0.42).sum()) > 0.3 * len(share)
    # background elsewhere, as before: no object hidden there could reach that IoU with these
    assert torch.count_nonzero(grad[share < 0.38]) > 0.9 * int((share < 0.38).sum())


def test_an_anchor_straddling_the_unlabelled_edge_is_ignored_not_background():
    """The anchor's centre is on labelled pixels, but most of it covers an unlabelled region where
    an object may lie: testing the centre alone taught it as background."""
    from geodet.model.ignore import ignore_unlabelled, unlabelled_share

    unlabelled = torch.zeros(64, 64, dtype=torch.bool)
    unlabelled[:, 32:] = True
    anchors = torch.tensor([[8.0, 8.0, 40.0, 40.0],  # centre x 24 (labelled), a quarter on the right half
                            [12.0, 8.0, 44.0, 40.0],  # centre x 28, 37.5% on the right half
                            [20.0, 8.0, 44.0, 32.0],  # centre x 32, half on the right half
                            [14.0, 8.0, 34.0, 28.0]])  # 10% on the right half: background whatever lies there
    share = unlabelled_share(anchors, unlabelled)
    assert share.tolist() == pytest.approx([0.25, 0.375, 0.5, 0.1])
    anchors[1] = torch.tensor([4.0, 8.0, 40.0, 40.0])  # centre x 22, 2/9 on the right half
    anchors[0] = torch.tensor([10.0, 8.0, 40.0, 40.0])  # centre x 25, 8/30 = 27%
    wide = torch.tensor([[4.0, 8.0, 44.0, 40.0]])  # centre x 24 (labelled): 12/40 = 30%
    tall = torch.tensor([[16.0, 0.0, 40.0, 64.0]])  # centre x 28 (labelled): 8/24 = 33%
    half = torch.tensor([[15.0, 0.0, 40.0, 64.0]])  # centre x 27.5 (labelled): 8/25 = 32%
    m = ignore_unlabelled(torch.full((1,), -1), torch.tensor([[17.0, 0.0, 42.0, 64.0]]), unlabelled, 0.4)
    assert m.tolist() == [-2]  # centre x 29.5, labelled; 10/25 = 40% unlabelled: ignored
    for a in (wide, tall, half):
        assert ignore_unlabelled(torch.full((1,), -1), a, unlabelled, 0.4).tolist() == [-1]
    # foreground stays foreground
    assert ignore_unlabelled(torch.tensor([0]), torch.tensor([[30.0, 0.0, 60.0, 30.0]]), unlabelled, 0.4).tolist() == [0]


def test_a_box_cut_away_by_the_visibility_rule_leaves_its_visible_part_ignored(tmp_path, synth):
    """A chip edge cuts an object so that less than min_visibility of it shows: it is no label,
    and its visible part must not be taught as background either."""
    from geodet.io.labels import LabelBoxes
    from geodet.io.scene import Scene
    from geodet.training.sampler import ChipDataset, TrainScene, chip_tile

    cfg = tiny_config(synth.image, synth.labels, augment=False).train
    sc = Scene(synth.image)
    lb = LabelBoxes(np.array([[90.0, 40.0, 130.0, 60.0], [20.0, 20.0, 40.0, 40.0]]), np.zeros(2, np.int64), ["a"])
    ds = ChipDataset([TrainScene(sc, lb, (0, 0, sc.width, sc.height), "l")], 100, cfg, 4, 0)
    boxes, labels, mask = ds._labels_and_mask(0, chip_tile(0, 0, 100, (0, 0, sc.width, sc.height)), 100)
    assert boxes.tolist() == [[20.0, 20.0, 40.0, 40.0]]  # the first object shows 25%: no label
    assert mask[40:60, 90:100].all() and mask.sum() == 20 * 10  # its visible part: ignored, nothing else


def test_the_mask_follows_a_resize(tmp_path):
    """With torchvision's resizing transform (the stock preset), the boxes are scaled; the mask
    must be too, or it marks the wrong anchors."""
    cfg = ModelConfig(classes=["a"], channels=16, head_depth=1, levels=[3, 5], anchor_sizes=[16.0, 32.0, 64.0],
                      resize_min_size=128)
    model = build_model(cfg, tile_size=64).train()
    unlabelled = torch.zeros(64, 64, dtype=torch.bool)
    unlabelled[:, 32:] = True
    target = {"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]]), "labels": torch.tensor([0]), "unlabelled": unlabelled}
    images, targets = model.net.transform([torch.rand(3, 64, 64)], [dict(target)])
    assert images.image_sizes[0] == (128, 128) and targets[0]["unlabelled"].shape == (128, 128)
    assert targets[0]["unlabelled"][:, 64:].all() and not targets[0]["unlabelled"][:, :64].any()
    assert targets[0]["boxes"].tolist() == [[8.0, 8.0, 40.0, 40.0]]


def test_an_l_shaped_labelled_area_end_to_end(tmp_path):
    """A labelled area shaped like an L, chips read around it (context on), augmented, batched and
    into the loss: the mask travels with the pixels, no label outside the L is lost, and no anchor
    mostly outside the L is taught as background."""
    import geopandas as gpd
    import rasterio
    from rasterio.transform import from_origin
    from shapely.geometry import Polygon

    from geodet.config import SceneLabels
    from geodet.model.ignore import unlabelled_share
    from geodet.training.sampler import ChipDataset, collate_chips
    from geodet.training.trainer import Trainer

    size = 256
    ell = Polygon([(0, 0), (96, 0), (96, 160), (256, 160), (256, 256), (0, 256)])  # pixel coordinates
    from rasterio.features import rasterize

    inside = rasterize([(ell, 1)], out_shape=(size, size), fill=0, dtype="uint8").astype(bool)
    img = np.zeros((3, size, size), np.uint8)
    img[0] = np.where(inside, 40, 220)  # band 1 tells inside (dark) from outside (bright)
    img[1] = 128
    rng = np.random.default_rng(0)
    boxes = []
    for _ in range(40):
        x, y = rng.integers(4, size - 20, 2)
        boxes.append([x, y, x + 14, y + 14])
        img[2, y : y + 14, x : x + 14] = 255
    tr = from_origin(500000, 4000000, 0.3, 0.3)
    scene = tmp_path / "l.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=tr) as dst:
        dst.write(img)
    to_map = lambda b: [tr * (b[0], b[1]), tr * (b[2], b[3])]  # noqa: E731
    from shapely.geometry import box

    gpd.GeoDataFrame({"label": ["car"] * len(boxes)},
                     geometry=[box(*to_map(b)[0], *to_map(b)[1]) for b in boxes], crs="EPSG:32633").to_file(
        tmp_path / "l.gpkg")
    from shapely import affinity

    ell_map = affinity.affine_transform(ell, [tr.a, tr.b, tr.d, tr.e, tr.c, tr.f])
    gpd.GeoDataFrame(geometry=[ell_map], crs="EPSG:32633").to_file(tmp_path / "ell.gpkg")
    cfg = tiny_config(scene, tmp_path / "l.gpkg", val_fraction=0.0, chip_context=True, negative_fraction=0.3,
                      photometric=0.0)
    cfg.train.scenes = [SceneLabels(str(scene), str(tmp_path / "l.gpkg"), str(tmp_path / "ell.gpkg"))]
    t = Trainer(cfg, tmp_path / "run", progress=False)
    t.prepare()
    ds = ChipDataset(t.train_scenes, 128, cfg.train, 24, 0)
    import geodet.training.augment as aug_mod

    saw_mask = 0
    for start in range(0, 24, 4):
        items = [ds[i] for i in range(start, start + 4)]
        images, targets = collate_chips(items)
        for im, tg in zip(images, targets):
            outside = im[0] > 0.5  # bright band 1: outside the L (radiometric jitter is mild)
            m = tg.get("unlabelled")
            if m is None:
                assert not outside.any()
                continue
            saw_mask += 1
            # the mask is outside the L, wherever the flips and turns took the chip (the cut-away
            # boxes' visible parts may add to it inside)
            assert bool(m[outside].all())
    assert saw_mask > 0
    model = build_model(cfg.model, tile_size=128).train()
    images, targets = collate_chips([ds[i] for i in range(4)])
    logits = {}
    orig = model.net.head.classification_head.forward

    def fwd(x):
        out = orig(x)
        out.retain_grad()
        logits["cls"] = out
        return out

    model.net.head.classification_head.forward = fwd
    model(images, targets)["classification"].backward()
    anchors = model.net.anchor_generator(model.net.transform(list(images))[0], list(model.net.backbone(images).values()))
    for k, tg in enumerate(targets):
        if tg.get("unlabelled") is None:
            continue
        share = unlabelled_share(anchors[k], tg["unlabelled"])
        far = share >= 0.4
        from torchvision.ops import box_iou

        near_obj = box_iou(anchors[k], tg["boxes"]).amax(1) >= 0.4 if len(tg["boxes"]) else torch.zeros_like(far)
        g = logits["cls"].grad[k, :, 0]
        assert torch.all(g[far & ~near_obj] == 0)


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
    base = ["train", synth.image, "--config", "cpu", "--labels", synth.labels, "--tile-size", "128",
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
    assert main(["train", str(synth.image), "--labels", str(tmp_path / "l.gpkg"), "--labelled-area",
                 str(tmp_path / "empty.gpkg"), "--out", str(out), "-q"]) == 2
    assert "no label of" in capsys.readouterr().err and not out.exists()
    png = tmp_path / "photo.png"
    with rasterio.open(png, "w", driver="PNG", width=64, height=64, count=3, dtype="uint8") as dst:
        dst.write(np.zeros((3, 64, 64), np.uint8))
    assert main(["train", str(png), "--config", "trees", "--labels", str(synth.labels), "--out", str(out),
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


def test_a_labelled_area_in_pieces_gets_a_strip_that_holds_labels(tmp_path, synth, caplog):
    """The labelling loop's area: the first block plus a confirmed cell far from it with no object.
    The strip holds train.val_fraction of the labelled area, not of its extent (which would put it
    over the empty cell and the gap), and a strip with no labels is not chosen where one with
    labels exists; without a labelled area the far strip stays as it was."""
    import geopandas as gpd
    import rasterio
    from shapely.affinity import affine_transform
    from shapely.geometry import box

    from geodet.training import inputs
    from geodet.training.area import validation_split, validation_splits
    from geodet.training.trainer import Trainer

    with rasterio.open(synth.image) as src:
        t, crs, w, h = src.transform, src.crs, src.width, src.height
    m = [t.a, t.b, t.d, t.e, t.c, t.f]
    pieces = [box(0, 0, 180, h), box(w - 44, 0, w, 60)]  # pixels: a block, and a cell with no object
    gpd.GeoDataFrame(geometry=[affine_transform(p, m) for p in pieces], crs=crs).to_file(tmp_path / "area.gpkg")
    g = gpd.read_file(synth.labels)
    g[g.geometry.centroid.x < t.c + 170 * t.a].to_file(tmp_path / "block.gpkg")
    cfg = tiny_config(synth.image, tmp_path / "block.gpkg")
    cfg.train.scenes[0].labelled_area = str(tmp_path / "area.gpkg")
    with caplog.at_level("WARNING"):
        tr = Trainer(cfg, tmp_path / "run", progress=False)
        tr.prepare()
    ts, strip = tr.val_sets[0]
    assert inputs.labels_inside(ts, strip) > 0 and inputs.labels_inside(ts, ts.area) > 0
    assert "validation area holds no labels" not in caplog.text
    share = ts.labelled.intersection(box(*strip)).area / ts.labelled.area
    assert abs(share - cfg.train.val_fraction) < 0.01, share
    # the old split of the extent: a strip over the gap and the empty cell
    old_rest, old_strip = validation_split(ts.full_area, cfg.train.val_fraction)
    assert inputs.labels_inside(ts, old_strip) == 0
    # no labelled area: the far strip across the longer side, as before
    for rect, split in [((0, 0, 384, 384), ((0, 0, 307, 384), (307, 0, 384, 384))),
                        ((10, 5, 300, 97), ((10, 5, 242, 97), (242, 5, 300, 97))),
                        ((0, 0, 51, 400), ((0, 0, 51, 320), (0, 320, 51, 400)))]:
        assert next(validation_splits(rect, 0.2)) == validation_split(rect, 0.2) == split


def test_the_validation_strip_is_given_back_once_it_set_the_operating_point(tmp_path, synth, monkeypatch):
    """train.val_give_back: the strip validates until then (the operating point and the card's
    metrics come from that last validation), then its labels train; it is never validated again."""
    from geodet.model.file import read_model_file
    from geodet.training.trainer import Trainer, train

    cfg = tiny_config(synth.image, synth.labels, epochs=4, val_give_back=0.5)
    t = Trainer(cfg, tmp_path / "probe", progress=False)
    t.prepare()
    ts, strip = t.val_sets[0]
    held = ts.training_boxes()
    assert (~held).sum() > 0  # labels centred in the strip are held out of the chips
    from geodet.training import inputs

    assert inputs.give_back(t.val_sets) == inputs.labels_inside(ts, strip) > 0
    assert ts.area == ts.full_area and ts.held_out is None and ts.training_boxes().all()

    import geodet.training.trainer as trainer_mod

    real, thresholds = trainer_mod.validate, []

    def numbered(*a, **kw):  # each validation's operating point told apart (a tiny model's may find nothing)
        m = real(*a, **kw)
        if m:
            m["score_threshold"] = 0.3 + 0.01 * len(thresholds)
            thresholds.append(m["score_threshold"])
        return m

    monkeypatch.setattr(trainer_mod, "validate", numbered)
    path = train(cfg, tmp_path / "run", progress=False)
    notes = [r["note"] for r in _rows(tmp_path / "run") if r["note"]]
    back = [i for i, n in enumerate(notes) if "given back" in n]
    assert len(back) == 1
    assert not any(n.startswith("validation") for n in notes[back[0] + 1:])  # never validated on it again
    card = read_model_file(path)["card"]
    assert card["metrics"]["validated_at_step"] < card["trained_steps"] == 24
    # the operating point is that of the last validation, the one before the strip was given back
    assert card["operating_point"] == pytest.approx(thresholds[-1]) and "given back" in card["metrics"]["validation_note"]


def test_give_back_refuses_keep_best(tmp_path, synth):
    from geodet.training.trainer import train

    with pytest.raises(GeodetError, match="val_give_back"):
        train(tiny_config(synth.image, synth.labels, val_give_back=0.5, keep="best"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_held_out_object_reaching_out_of_the_strip_is_ignored_not_background(tmp_path, synth):
    """A label centred in the validation strip is no training label, and its part outside the
    strip is ignored: an anchor on it must not be taught as background."""
    from geodet.io.labels import LabelBoxes
    from geodet.io.scene import Scene
    from geodet.training.sampler import ChipDataset, TrainScene, chip_tile

    cfg = tiny_config(synth.image, synth.labels, augment=False, chip_context=True).train
    sc = Scene(synth.image)
    lb = LabelBoxes(np.array([[290.0, 40.0, 320.0, 70.0], [20.0, 20.0, 40.0, 40.0]]), np.zeros(2, np.int64), ["a"])
    ts = TrainScene(sc, lb, (0, 0, 300, sc.height), "l", held_out=(300, 0, sc.width, sc.height))
    ds = ChipDataset([ts], 128, cfg, 4, 0)
    boxes, _, mask = ds._labels_and_mask(0, chip_tile(200, 0, 128, (0, 0, sc.width, sc.height)), 128)
    assert boxes.tolist() == []  # the held-out object is no label
    assert mask[40:70, 90:100].all()  # its part left of the strip (x 290-300): ignored
    assert mask[:, 100:].all() and not mask[:, :90].any()  # the strip itself: ignored; the rest taught
