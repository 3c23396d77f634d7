"""Importing torchvision RetinaNets (Hugging Face folders as DeepForest publishes them, plain
state_dicts) and fine-tuning them."""

import json

import numpy as np
import pytest
import torch

from geodet.errors import GeodetError
from geodet.model.imports import import_retinanet


def _tv_retinanet(num_classes=2, depth=50, seed=0):
    """A torchvision RetinaNet with random weights (no download)."""
    from torchvision.models import resnet18, resnet50
    from torchvision.models.detection import RetinaNet, retinanet_resnet50_fpn
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    torch.manual_seed(seed)
    if depth == 50:
        return retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes).eval()
    body = {18: resnet18, 50: resnet50}[depth]()
    backbone = _resnet_fpn_extractor(body, 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return RetinaNet(backbone, num_classes).eval()


def _hf_folder(path, tv, config, prefix="", fmt="safetensors"):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    sd = {prefix + k: v.contiguous() for k, v in tv.state_dict().items()}
    if fmt == "safetensors":
        save_file(sd, str(path / "model.safetensors"))
    else:
        torch.save(sd, path / "pytorch_model.bin")
    (path / "config.json").write_text(json.dumps(config))
    return path


DEEPFOREST_LIKE = {"num_classes": 2, "label_dict": {"Tree": 0, "Snag": 1}, "score_thresh": 0.1, "nms_thresh": 0.15}


@pytest.fixture(scope="module")
def tv50():
    return _tv_retinanet(2, 50)


@pytest.mark.parametrize("prefix,fmt", [("", "safetensors"), ("model.", "safetensors"), ("model.", "bin")])
def test_imported_network_equals_torchvision_on_an_800px_input(tmp_path, tv50, prefix, fmt):
    folder = _hf_folder(tmp_path / "hf", tv50, DEEPFOREST_LIKE, prefix, fmt)
    model = import_retinanet(str(folder), gsd_m=0.1, tile_size=400)
    c = model.card
    assert c.classes == ["Tree", "Snag"] and c.model.backbone == "resnet50"
    assert (c.model.score_threshold, c.model.nms_iou) == (0.1, 0.15)
    assert (c.model.detections_per_tile, c.model.topk_candidates) == (300, 1000)
    # torchvision resizes 400 px windows to 800: geodet runs 800 px tiles at half the GSD
    assert c.gsd_m == pytest.approx(0.05) and c.tile_size == 800
    # the networks compared on an 800 px input once; the other files' weights on a smaller one
    side = 800 if (prefix, fmt) == ("", "safetensors") else 320
    x = torch.rand(1, 3, side, side)
    with torch.no_grad():
        xn = tv50.transform.normalize(x[0])[None]
        feats = list(tv50.backbone(xn).values())
        ref = tv50.head(feats)
        cls_logits, bbox_regression = model.net.core(xn)
    assert (cls_logits - ref["cls_logits"]).abs().max() < 1e-5
    assert (bbox_regression - ref["bbox_regression"]).abs().max() < 1e-5
    from torchvision.models.detection.image_list import ImageList

    anchors = tv50.anchor_generator(ImageList(xn, [(side, side)]), feats)[0]
    shapes = [tuple(f.shape[-2:]) for f in feats]
    assert torch.equal(model.net.decoder.anchors(side, side, shapes, "cpu"), anchors)


def test_without_a_gsd_scenes_run_at_native_resolution(tmp_path, tv50):
    sd_path = tmp_path / "retinanet.pth"
    torch.save(tv50.state_dict(), sd_path)
    model = import_retinanet(str(sd_path), classes=["a", "b"])
    assert model.card.gsd_m is None and model.card.tile_size == 800 and model.card.classes == ["a", "b"]


def test_imported_model_detects_on_resampled_tiles_in_the_right_place(tmp_path):
    """A 0.1 m scene with a model at home on 400 px windows: geodet runs 800 px tiles at 0.05 m
    (2x resampled) and the boxes land where the objects are on the map."""
    from helpers import write_raster

    from geodet.pipeline.scenes import detect_scene

    tv = _tv_retinanet(1, 18)
    folder = _hf_folder(tmp_path / "hf", tv, {"num_classes": 1, "label_dict": {"Tree": 0}})
    model = import_retinanet(str(folder), gsd_m=0.1, tile_size=400)
    seen = []

    def bright_box(batch):  # stands in for the network: the box of the bright pixels of each tile
        seen.append(tuple(batch.shape[-2:]))
        out = []
        for img in batch:
            ys, xs = torch.nonzero(img[0] > 0.5, as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32) if len(xs) else torch.zeros((0, 4))
            out.append({"boxes": box, "scores": torch.ones(len(box)), "labels": torch.zeros(len(box), dtype=torch.int64)})
        return out

    bright_box.card = model.card
    data = np.zeros((3, 300, 300), np.uint8)
    data[:, 100:120, 200:230] = 255  # 3 m x 2 m object at x 20-23 m, y 10-12 m from the corner
    from rasterio.transform import from_origin

    scene = write_raster(tmp_path / "s.tif", data, transform=from_origin(500000, 4600000, 0.1, 0.1))
    frame = detect_scene(str(scene), bright_box, progress=False)
    rep = frame.attrs["report"]
    assert rep["resampled_to_gsd_m"] == pytest.approx(0.05) and rep["grid_size_px"] == [600, 600]
    assert seen and all(s == (800, 800) for s in seen)
    assert len(frame) == 1
    x0, y0, x1, y1 = frame.geometry.iloc[0].bounds
    assert (x0, x1) == (pytest.approx(500020.0, abs=0.06), pytest.approx(500023.0, abs=0.06))
    assert (y0, y1) == (pytest.approx(4599988.0, abs=0.06), pytest.approx(4599990.0, abs=0.06))
    # the real network runs too, on the same 800 px tiles
    assert "backend" in detect_scene(str(scene), model, progress=False).attrs["report"]


def test_refused_checkpoints(tmp_path, tv50):
    # not a RetinaNet: a bare ResNet state_dict
    from torchvision.models import resnet18

    plain = tmp_path / "resnet.pth"
    torch.save(resnet18().state_dict(), plain)
    with pytest.raises(GeodetError, match="no RetinaNet head"):
        import_retinanet(str(plain))
    # a config that disagrees with the head
    folder = _hf_folder(tmp_path / "wrong", tv50, {"num_classes": 5})
    with pytest.raises(GeodetError, match="says 5 classes but the classification head has 2"):
        import_retinanet(str(folder))
    # a pickle payload is never unpickled
    evil = tmp_path / "evil.pt"

    class Boom:
        def __reduce__(self):
            return (print, ("ran",))

    import pickle

    evil.write_bytes(pickle.dumps({"state_dict": Boom()}))
    with pytest.raises(GeodetError) as err:
        import_retinanet(str(evil))
    assert "\n" not in str(err.value)
    # another backbone (no ResNet body): refused, saying what is supported
    sd = {k.replace("backbone.body.", "backbone.vit."): v for k, v in tv50.state_dict().items()}
    other = tmp_path / "dino.pth"
    torch.save(sd, other)
    with pytest.raises(GeodetError, match="ResNet-18/34/50/101"):
        import_retinanet(str(other))
    # config.json as users get it wrong: one line naming the key, before a model is written
    for config, match in [({"label_dict": ["Tree"]}, "label_dict is a list, not a mapping"),
                          ({"label_dict": {"Tree": 0, "Snag": 0}}, "gives two classes one index"),
                          ({"label_dict": {"Tree": "x"}}, "has a class without an index"),
                          ({"num_classes": "two"}, "num_classes is 'two', not an integer"),
                          ({"score_thresh": "high"}, "score_thresh is 'high', not a number from 0 to 1"),
                          ({"patch_overlap": 1.5}, "patch_overlap is 1.5, not a number from 0 to 1"),
                          ({"gsd": -0.1}, "gsd is -0.1, not a number above 0")]:
        folder = _hf_folder(tmp_path / f"c{len(match)}", tv50, config)
        with pytest.raises(GeodetError, match=match):
            import_retinanet(str(folder))
    # files that need no import: one line saying how to use them
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07\x12\x07pytorch onnx graph")
    with pytest.raises(GeodetError, match="is an ONNX model: geodet runs its own exports as they are"):
        import_retinanet(str(tmp_path / "m.onnx"))
    torch.save({"format": "geodet-model", "version": 1, "card": {}, "state_dict": {"w": torch.zeros(1)}},
               tmp_path / "geodet.pt")
    with pytest.raises(GeodetError, match="is a geodet model already: detect with it as it is"):
        import_retinanet(str(tmp_path / "geodet.pt"))
    # {index: name}, the other way round, reads as DeepForest's {name: index}
    folder = _hf_folder(tmp_path / "by_index", tv50, {"label_dict": {"0": "Tree", "1": "Snag"}})
    assert import_retinanet(str(folder)).card.classes == ["Tree", "Snag"]


def test_offline_hub_id_gives_a_clear_message(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # as on a machine without network
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(GeodetError, match="not in the Hugging Face cache"):
        import_retinanet("hf://weecology/deepforest-tree")


@pytest.mark.slow
def test_fine_tuning_an_imported_model_on_the_tree_crowns(tmp_path, trees_dir):
    from conftest import tiny_config

    from geodet.cli import main
    from geodet.model import load_model
    from geodet.training.trainer import Trainer

    tv = _tv_retinanet(1, 18)
    # the imported model names its class "Crown"; the crowns are labelled "Tree": a new class head
    folder = _hf_folder(tmp_path / "hf", tv, {"num_classes": 1, "label_dict": {"Crown": 0}})
    start = tmp_path / "imported.pt"
    assert main(["-q", "import", str(folder), "-o", str(start), "--tile-size", "128", "--min-size", "128"]) == 0
    cfg = tiny_config(trees_dir / "yell_541000.tif", trees_dir / "yell_541000.gpkg", max_steps=6, steps_per_epoch=6,
                      epochs=1, lr=0.0005)
    cfg.train.init = str(start)
    cfg.train.freeze_backbone_stages = 2
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    before = load_model(start)
    path = trainer.run()
    after = load_model(path)
    assert after.card.model.backbone == "resnet18" and after.card.tile_size == 128
    assert before.card.classes == ["Crown"] and after.card.classes == ["Tree"]  # a new head layer
    b, a = before.net.state_dict(), after.net.state_dict()
    for k in ("backbone.body.conv1.weight", "backbone.body.layer1.0.conv1.weight"):
        assert torch.equal(a[k], b[k])  # frozen stages do not change
    assert not torch.equal(a["backbone.body.layer3.0.conv1.weight"], b["backbone.body.layer3.0.conv1.weight"])
    assert a["head.classification_head.cls_logits.weight"].shape[0] == 9 * len(after.card.classes)
    rows = [r.split(",") for r in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:] if r.split(",")[2]]
    losses = [float(r[2]) for r in rows]
    assert len(losses) == 6 and np.isfinite(losses).all()
    assert min(losses[-3:]) < losses[0]  # learning: the loss falls from where it started


def test_pretrained_backbone_from_a_local_file_is_hash_checked(tmp_path):
    import hashlib

    from torchvision.models import resnet18

    from geodet.config import ModelConfig
    from geodet.model import build_model

    sd = resnet18().state_dict()
    tmp = tmp_path / "w.pth"
    torch.save(sd, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    good = tmp_path / f"resnet18-{digest[:8]}.pth"
    tmp.rename(good)
    model = build_model(ModelConfig(pretrained=str(good), channels=32, head_depth=1), tile_size=64)
    assert torch.equal(model.net.backbone.body.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])
    bad = tmp_path / "resnet18-deadbeef.pth"
    bad.write_bytes(good.read_bytes())
    with pytest.raises(GeodetError, match="damaged or not the file its name says"):
        build_model(ModelConfig(pretrained=str(bad), channels=32, head_depth=1), tile_size=64)


def test_detect_imports_a_folder_on_the_fly_and_caches_it(monkeypatch, tmp_path):
    from helpers import write_raster

    from geodet.cli import main

    monkeypatch.setenv("GEODET_CACHE", str(tmp_path / "cache"))
    folder = _hf_folder(tmp_path / "hf", _tv_retinanet(1, 18), {"num_classes": 1, "label_dict": {"Tree": 0}})
    scene = write_raster(tmp_path / "s.tif", np.random.default_rng(0).integers(0, 255, (3, 200, 200), dtype=np.uint8))
    for out in ("a.gpkg", "b.gpkg"):
        assert main(["-q", "detect", str(scene), "-m", str(folder), "-o", str(tmp_path / out), "--tile-size", "128"]) == 0
    cached = list((tmp_path / "cache" / "imported").glob("*.pt"))
    assert len(cached) == 1
    report = json.loads((tmp_path / "a.gpkg.report.json").read_text())
    assert report["model"]["path"] == str(cached[0]) and report["model"]["classes"] == ["Tree"]


def test_class_names_that_do_not_fit_the_head_are_refused(tmp_path, tv50):
    # a label_dict naming more classes than the head, or an index past it, was cut or renamed class_N
    for config in ({"label_dict": {"Tree": 0, "Snag": 1, "Bush": 2}}, {"label_dict": {"Tree": 5, "Snag": 0}},
                   {"label_dict": {"Tree": 1}}):
        folder = _hf_folder(tmp_path / f"l{len(str(config))}", tv50, config)
        with pytest.raises(GeodetError, match=r"but the classification head has 2 class\(es\), indices 0 to 1"):
            import_retinanet(str(folder))
    folder = _hf_folder(tmp_path / "dup", tv50, {})
    with pytest.raises(GeodetError, match="class name\\(s\\) a given twice"):
        import_retinanet(str(folder), classes=["a", "a"])


def test_import_checks_its_output_before_any_work(tmp_path, tv50, capsys):
    from geodet.cli import main

    sd = tmp_path / "weights.pt"
    torch.save(tv50.state_dict(), sd)
    before = sd.read_bytes()
    (tmp_path / "adir").mkdir()
    for out, said in [(tmp_path / "x.onnx", "x.onnx: this output is a PT file: name it so (e.g. x.pt)"),
                      (tmp_path / "x.gpkg", "this output is a PT file"),
                      (sd, "is the weights to import: writing the output there would replace it"),
                      (tmp_path / "adir", "give a file name such as " + str(tmp_path / "adir" / "model.pt"))]:
        assert main(["import", str(sd), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1
    assert sd.read_bytes() == before and not (tmp_path / "x.onnx").exists() and not (tmp_path / "x.gpkg").exists()
    assert main(["import", str(sd), "-o", str(tmp_path / "m.pt"), "--classes", "a,a"]) == 2
    assert "given twice" in capsys.readouterr().err and not (tmp_path / "m.pt").exists()


def test_import_replaces_only_an_earlier_import(tmp_path, tv50, tiny_model, capsys):
    """A training run's model.pt or last.pt, a trained detector or any other file: refused before
    any work, byte for byte as it was; an earlier import is replaced (import again with new flags)."""
    import shutil

    from geodet.cli import main

    sd = tmp_path / "weights.pt"
    torch.save(tv50.state_dict(), sd)
    run = tmp_path / "run"
    shutil.copytree(tiny_model.parent, run)
    trained = tmp_path / "trained.pt"
    shutil.copy(tiny_model, trained)
    (tmp_path / "notes.pt").write_text("my notes")
    for out, said in [(run / "model.pt", "belongs to the training run in"), (run / "last.pt", "belongs to the training run"),
                      (trained, "is a model trained with geodet"), (tmp_path / "notes.pt", "is not a model of an earlier")]:
        before = out.read_bytes()
        assert main(["import", str(sd), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
        assert out.read_bytes() == before
    assert main(["import", str(sd), "-o", str(tmp_path / "m.pt")]) == 0
    assert main(["import", str(sd), "-o", str(tmp_path / "m.pt"), "--gsd", "0.1"]) == 0


def test_files_that_are_not_what_import_or_detect_take_say_what_to_do(tmp_path):
    """A raster or text file is not called a pickle payload; a training checkpoint is not sent to
    detect (which refuses it); a torchvision state_dict given to detect is pointed to import."""
    from geodet.model.file import read_model_file
    from geodet.model.imports import read_state_dict

    text = tmp_path / "notes.pt"
    text.write_text("garbage\n")
    with pytest.raises(GeodetError, match="not a PyTorch weights file"):
        read_state_dict(text, str(text))
    ckpt = tmp_path / "last.pt"
    torch.save({"format": "geodet-checkpoint", "step": 3}, ckpt)
    with pytest.raises(GeodetError, match="training checkpoint: train --resume continues its run, and the run's "
                                          "model.pt is its model"):
        read_state_dict(ckpt, str(ckpt))
    tv = tmp_path / "tv.pt"
    torch.save({"head.weight": torch.zeros(2)}, tv)
    with pytest.raises(GeodetError, match="geodet import tv.pt -o MODEL.pt"):
        read_model_file(tv)
    cut = tmp_path / "cut.pt"
    torch.save({"format": "geodet-model", "w": torch.zeros(1000)}, cut)
    cut.write_bytes(cut.read_bytes()[:2000])
    with pytest.raises(GeodetError, match=r"\(it looks damaged or incomplete\)$"):
        read_model_file(cut)
