"""What makes boxes fit: anchors in float32 under bf16 autocast, ATSS assignment, the GIoU loss,
test-time augmentation that maps every view's boxes back exactly, and AdaBN."""

import numpy as np
import pytest
import torch

from geodet.config import ModelConfig
from geodet.errors import GeodetError
from geodet.model import build_model


def _tiny(**kw):
    cfg = ModelConfig(classes=["a"], channels=16, head_depth=1, levels=[3, 6], anchor_sizes=[16.0, 32.0, 64.0, 128.0],
                      **kw)
    return build_model(cfg, tile_size=400)


def test_training_anchors_stay_float32_under_bf16_autocast():
    """torchvision makes anchors in the feature maps' type; under bf16 autocast their coordinates
    round to 2 px steps above 256 px, and the box targets would be encoded against other anchors
    than detection decodes with."""
    net = _tiny().train().net
    images, _ = net.transform(list(torch.rand(1, 3, 400, 400)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = list(net.backbone(images.tensors).values())
        anchors = net.anchor_generator(images, feats)[0]
    exact = net.anchor_generator(images, [f.float() for f in feats])[0]
    assert feats[0].dtype == torch.bfloat16 and anchors.dtype == torch.float32
    assert torch.equal(anchors, exact)
    assert (anchors.to(torch.bfloat16).float() != exact).any()  # bf16 would have moved some of them


def test_atss_gives_a_small_object_positives_the_iou_matcher_would_not():
    from geodet.model.atss import atss_match, level_sizes
    from geodet.model.matching import match_anchors

    net = _tiny().train().net
    images, _ = net.transform(list(torch.rand(1, 3, 400, 400)))
    anchors = net.anchor_generator(images, list(net.backbone(images.tensors).values()))[0]
    layout = net.anchor_generator.layout
    small = torch.tensor([[100.0, 100.0, 110.0, 110.0]])  # 10 px: no anchor reaches IoU 0.5
    fixed = match_anchors(small, anchors, 0.5, 0.4)
    assert int((fixed >= 0).sum()) <= 2  # only torchvision's low-quality match
    m = atss_match(small, anchors, level_sizes(layout), layout[0][5].shape[0])
    pos = anchors[m == 0]
    assert len(pos) >= 1
    c = (pos[:, :2] + pos[:, 2:]) / 2
    assert ((c > small[0, :2]) & (c < small[0, 2:])).all()  # centres inside the object
    # two objects never share an anchor, and a large object takes anchors of a coarse level
    big = torch.tensor([[100.0, 100.0, 110.0, 110.0], [200.0, 200.0, 330.0, 320.0]])
    m2 = atss_match(big, anchors, level_sizes(layout), layout[0][5].shape[0])
    sides = (anchors[m2 == 1, 2] - anchors[m2 == 1, 0])
    assert len(sides) and sides.max() >= 64


def test_matcher_and_box_loss_are_checked_and_train():
    with pytest.raises(GeodetError, match="model.matcher"):
        _tiny(matcher="nearest")
    with pytest.raises(GeodetError, match="model.box_loss"):
        _tiny(box_loss="l2")
    model = _tiny(matcher="atss", box_loss="giou").train()
    images = torch.rand(2, 3, 400, 400)
    targets = [{"boxes": torch.tensor([[40.0, 40.0, 80.0, 90.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model(images, targets)
    assert torch.isfinite(losses["bbox_regression"]) and losses["bbox_regression"] > 0
    (losses["classification"] + losses["bbox_regression"]).backward()


@pytest.mark.parametrize("h,w", [(40, 40), (30, 50)])
def test_tta_maps_every_view_back_to_the_tile(h, w):
    from geodet.model.tta import VIEWS_SQUARE, unview_boxes, view

    img = torch.zeros(1, 1, h, w)
    img[0, 0, 5:12, 7:20] = 1
    for flip, k in VIEWS_SQUARE:
        ys, xs = torch.nonzero(view(img, flip, k)[0, 0], as_tuple=True)
        found = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
        assert unview_boxes(found, flip, k, h, w).tolist() == [[7.0, 5.0, 20.0, 12.0]], (flip, k)


def test_tta_fuses_the_views_of_one_object_and_damps_a_box_one_view_saw():
    from geodet.model.tta import fuse

    boxes = torch.tensor([[10.0, 10.0, 20.0, 20.0], [11.0, 10.0, 21.0, 20.0], [10.0, 11.0, 20.0, 21.0],
                          [9.0, 10.0, 19.0, 20.0], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.8, 0.8, 0.8, 0.8, 0.9])
    out = fuse(boxes, scores, torch.zeros(5, dtype=torch.int64), 4, 0.55, 100)
    assert len(out["boxes"]) == 2
    seen_by_all = out["boxes"][out["scores"].argmax()]
    assert torch.allclose(seen_by_all, torch.tensor([10.0, 10.25, 20.0, 20.25]))
    assert out["scores"].tolist() == pytest.approx([0.8, 0.225])
    # a view votes once per object: a second box of view 0 beside its first (a model NMS IoU above
    # fuse_iou keeps both) neither raises the object's score nor moves its box
    views = torch.tensor([0, 1, 2, 3, 0])
    twice = torch.cat([boxes[:4], torch.tensor([[10.0, 12.0, 20.0, 22.0]])])
    out = fuse(twice, torch.tensor([0.8, 0.8, 0.8, 0.8, 0.7]), torch.zeros(5, dtype=torch.int64), 4, 0.55, 100,
               views=views)
    assert len(out["boxes"]) == 1 and out["scores"].tolist() == pytest.approx([0.8])
    assert torch.allclose(out["boxes"][0], torch.tensor([10.0, 10.25, 20.0, 20.25]))


def test_tta_model_runs_in_the_pipeline(tiny_model, synth):
    from geodet.model import load_model
    from geodet.model.tta import TtaModel
    from geodet import detect_scene

    model = load_model(tiny_model)
    plain = detect_scene(synth.image, model, progress=False, device="cpu")
    tta = detect_scene(synth.image, TtaModel(model), progress=False, device="cpu")
    assert len(tta) > 0 and tta.crs == plain.crs
    # every object the plain model found with confidence is found by TTA too
    from geodet.evaluation import evaluate

    op = model.card.operating_point
    r_plain = evaluate(plain[plain.score >= op], synth.labels, scene=synth.image, class_column="")["recall"]
    r_tta = evaluate(tta, synth.labels, scene=synth.image, class_column="")["recall"]
    assert r_tta >= r_plain - 0.05


def test_adabn_reestimates_statistics_on_the_target_and_leaves_the_model(tiny_model, synth, tmp_path):
    import rasterio

    from geodet.model import load_model
    from geodet.training.adapt import adapt_batch_norm

    # the target: the same scene, darker (another sun angle)
    with rasterio.open(synth.image) as src:
        profile, data = src.profile, src.read()
    dark = tmp_path / "dark.tif"
    with rasterio.open(dark, "w", **profile) as dst:
        dst.write((data * 0.5).astype(data.dtype))
    model = load_model(tiny_model)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before, momentum = bn.running_mean.clone(), bn.momentum
    not_a_raster = tmp_path / "notes.tif"
    not_a_raster.write_text("not a raster")
    adapted = adapt_batch_norm(model, [not_a_raster, dark], tiles=8, batch_size=4)
    bn2 = next(m for m in adapted.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.equal(bn.running_mean, before)  # the caller's model is untouched
    assert not adapted.training and bn2.momentum == momentum and int(bn2.num_batches_tracked) == 2
    # the first layer's statistics are those of the dark scene's tiles: its input's channel means
    from geodet.training.adapt import _sample_tiles
    from geodet.pipeline.settings import resolve_detect_settings

    tiles, used = _sample_tiles([str(dark)], model.card, 8, 0, resolve_detect_settings(model.card))
    net = model.net
    with torch.no_grad():
        first = net.backbone.body.conv1(net.transform(tiles)[0].tensors)
    assert torch.allclose(bn2.running_mean, first.mean((0, 2, 3)), atol=1e-4)
    assert not torch.allclose(bn2.running_mean, before, atol=1e-3)
    assert np.isfinite(bn2.running_var.numpy()).all()
    # the scene that could not be read is left out of what the model was adapted to
    assert adapted.card.extra["adapted_to"]["scenes"] == [str(dark)] == used


def test_atss_never_leaves_a_tiny_or_thin_object_without_a_positive():
    """Objects smaller or thinner than the stride hold no candidate's centre: they keep their best
    candidate, as the IoU matcher's low-quality match does, rather than being taught as background."""
    from geodet.model.atss import atss_match, level_sizes

    cfg = ModelConfig(classes=["a"], channels=16, head_depth=1, levels=[2, 4], anchor_sizes=[8.0, 16.0, 32.0])
    net = build_model(cfg, tile_size=128).train().net
    images, _ = net.transform(list(torch.rand(1, 3, 128, 128)))
    anchors = net.anchor_generator(images, list(net.backbone(images.tensors).values()))[0]
    layout = net.anchor_generator.layout
    objects = torch.tensor([[50.5, 50.5, 53.5, 53.5], [20.0, 60.0, 21.0, 90.0], [100.0, 3.0, 112.0, 6.0]])
    m = atss_match(objects, anchors, level_sizes(layout), layout[0][5].shape[0])
    assert all(int((m == g).sum()) >= 1 for g in range(3)), [int((m == g).sum()) for g in range(3)]


def test_models_changed_in_memory_never_run_a_files_cached_onnx(tiny_model, synth):
    """An adapted (AdaBN) or test-time-augmented model is not the file's network: it runs in torch,
    and asking for ONNX or int8 is refused in one line instead of running the original's."""
    from geodet import detect_scene
    from geodet.model import load_model
    from geodet.model.tta import TtaModel
    from geodet.training.adapt import adapt_batch_norm

    model = load_model(tiny_model)
    adapted = adapt_batch_norm(model, [synth.image], tiles=4)
    assert model.source and adapted.source is None
    alone = adapt_batch_norm(model, synth.image, tiles=4)  # one scene's path alone: that scene, not its characters
    assert alone.card.extra["adapted_to"]["scenes"] == [str(synth.image)]
    for other in (str(tiny_model), TtaModel(model)):
        with pytest.raises(GeodetError, match="adapts a geodet torch model"):
            adapt_batch_norm(other, [synth.image], tiles=4)
    for m in (adapted, TtaModel(model)):
        with pytest.raises(GeodetError, match="not loaded from one"):
            detect_scene(synth.image, m, progress=False, device="cpu", backend="onnx")


def test_detect_tta_from_the_command_line_and_its_refusals(tiny_model, synth, tmp_path):
    """``geodet detect --tta`` writes fused detections and says so in its report; the paths TTA
    cannot take (an ONNX file, the onnx backend, int8, the ray engine) are refused in one line,
    before any work, with nothing written."""
    import json

    from test_cli import assert_clean_error, geodet

    out = tmp_path / "tta.gpkg"
    r = geodet("detect", synth.image, "-m", tiny_model, "-o", out, "--tta", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "tta.gpkg.report.json").read_text())
    assert report["model"]["tta"]["views"] == 8 and report["detections"] > 0
    assert report["model"]["sha256"]  # the file behind the wrappers
    assert report["scenes"][0]["backend"]["backend"] == "torch"
    for i, (extra, pattern) in enumerate(((["--backend", "onnx"], "drop --backend onnx"),
                                          (["--precision", "int8"], "int8"), (["--engine", "ray"], "local engine"))):
        bad = tmp_path / f"bad{i}.gpkg"
        r = geodet("detect", synth.image, "-m", tiny_model, "-o", bad, "--tta", *extra)
        assert_clean_error(r, pattern)
        assert not bad.exists()


def test_detect_adapt_from_the_command_line_and_its_refusals(tiny_model, synth, tmp_path):
    """``geodet detect --adapt`` re-estimates batch norm on the scenes it detects and says so in its
    report (with the model file it was made from); where it cannot run (an ONNX file, the onnx
    backend, int8, the ray engine, bands the model does not take) it is refused in one line before
    any work, with nothing written."""
    import json
    import shutil

    from test_cli import assert_clean_error, geodet

    out = tmp_path / "adapted.gpkg"
    r = geodet("detect", synth.image, "-m", tiny_model, "-o", out, "--adapt", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "adapted.gpkg.report.json").read_text())
    adapted = report["model"]["adapted_to"]
    assert adapted["method"] == "AdaBN" and adapted["tiles"] > 0 and adapted["scenes"] == [str(synth.image)]
    assert report["model"]["sha256"] and report["model"]["sha256"] == adapted["model"]["sha256"]
    assert report["scenes"][0]["backend"]["backend"] == "torch" and report["detections"] > 0
    onnx = tmp_path / "m.onnx"
    shutil.copy(tiny_model, onnx)
    for i, (model, extra, pattern) in enumerate((
            (onnx, [], "needs the torch model"), (tiny_model, ["--backend", "onnx"], "drop --backend onnx"),
            (tiny_model, ["--precision", "int8"], "int8"), (tiny_model, ["--engine", "ray"], "local engine"),
            (tiny_model, ["--bands", "1,2"], "model expects 3 band"),
            # the job's own checks come before the adaptation's minute of work
            (tiny_model, ["--quicklook", str(onnx / "q.png")], "is a file, not a folder"),
            *([(tiny_model, ["--device", "cuda"], "CUDA is not available")] if not torch.cuda.is_available() else []))):
        bad = tmp_path / f"bad{i}.gpkg"
        r = geodet("detect", synth.image, "-m", model, "-o", bad, "--adapt", *extra)
        assert_clean_error(r, pattern)
        assert not bad.exists() and "re-estimated" not in r.stderr  # refused before the adaptation


def test_tta_operating_point_is_measured_at_validation_and_detect_uses_it(synth, tmp_path):
    """With ``train.tta_operating_point`` the card holds TTA's own operating point (its fused scores
    run lower than the plain model's); ``--tta`` styles and reports with it, plain detection keeps
    the card's own."""
    from conftest import tiny_config

    from geodet.model import load_model
    from geodet.model.tta import TtaModel
    from geodet.pipeline.job import detect_to_file
    from geodet.training.trainer import train

    path = train(tiny_config(synth.image, synth.labels, epochs=8, tta_operating_point=True), tmp_path / "run",
                 progress=False)
    model = load_model(path)
    op, tta_op = model.card.operating_point, model.card.extra.get("tta_operating_point")
    assert op is not None and tta_op is not None and 0 < tta_op <= 1
    assert TtaModel(model).card.operating_point == tta_op and model.card.operating_point == op
    with_tta = detect_to_file([synth.image], path, tmp_path / "t.gpkg", progress=False, tta=True).attrs["report"]
    plain = detect_to_file([synth.image], path, tmp_path / "p.gpkg", progress=False).attrs["report"]
    assert with_tta["model"]["operating_point"] == pytest.approx(tta_op)
    assert "measured with TTA" in with_tta["model"]["tta"]["operating_point"]
    assert plain["model"]["operating_point"] == pytest.approx(op) and plain["model"]["tta"] is False
    # an explicit tta=False wins over a configuration that turns TTA on
    from geodet.config import load_config

    cfg = load_config("cpu")
    cfg.detect.tta = True
    off = detect_to_file([synth.image], path, tmp_path / "o.gpkg", config=cfg, progress=False, tta=False)
    cfg.detect.tta = False
    ref = detect_to_file([synth.image], path, tmp_path / "r.gpkg", config=cfg, progress=False)
    assert off.attrs["report"]["model"]["tta"] is False and len(off) == len(ref) > 0


def test_keep_best_gets_tta_operating_point_for_the_model_it_kept(synth, tmp_path, monkeypatch):
    """With ``keep: best`` an earlier validation's model.pt can be the one kept: TTA's operating
    point is then measured on that model, at the end, and written into its card (it was missing,
    and ``--tta`` blamed the config)."""
    from conftest import tiny_config

    import geodet.training.trainer as trainer_mod
    from geodet.model import load_model

    real, calls = trainer_mod.validate, []

    def first_is_best(*a, tta=False, **kw):  # the first validation scores best, every later one worse
        m = real(*a, tta=tta, **kw)
        if not tta and m:
            calls.append(1)
            m["AP50"] = 1.0 / len(calls)
        if tta and m:  # a known TTA operating point (a tiny model's may find nothing, which has none)
            m["score_threshold"] = 0.123
        return m

    import geodet.training.validation as validation_mod

    monkeypatch.setattr(trainer_mod, "validate", first_is_best)
    monkeypatch.setattr(validation_mod, "validate", first_is_best)  # TTA's validation (tta_operating_point)
    path = trainer_mod.train(tiny_config(synth.image, synth.labels, epochs=4, keep="best", tta_operating_point=True),
                         tmp_path / "run", progress=False)
    card = load_model(path).card
    assert len(calls) >= 2 and card.metrics["AP50"] == pytest.approx(1.0)  # an earlier model.pt was kept
    assert card.extra.get("tta_operating_point") == pytest.approx(0.123)
