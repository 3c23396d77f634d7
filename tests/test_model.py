import pickle

import numpy as np
import pytest
import torch

from geodet import GeodetError
from geodet.config import ModelConfig, load_config
from geodet.model import build_model, load_model, save_model
from geodet.model.anchors import anchor_coverage, fit_anchors

TINY = dict(classes=["car", "truck"], channels=32, head_depth=1, levels=[2, 4], anchor_sizes=[8.0, 16.0, 32.0],
            scales_per_octave=2)


def test_forward_shapes_and_coordinate_range():
    m = build_model(ModelConfig(**TINY, score_threshold=0.0, detections_per_tile=50), tile_size=128).eval()
    with torch.inference_mode():
        out = m(torch.rand(2, 3, 128, 128))
    assert len(out) == 2
    for o in out:
        assert o["boxes"].shape[1] == 4 and len(o["boxes"]) == len(o["scores"]) == len(o["labels"]) <= 50
        assert len(o["boxes"]) > 0
        assert o["boxes"].min() >= 0 and o["boxes"].max() <= 128
        assert set(o["labels"].tolist()) <= {0, 1}


def test_no_hidden_resize_and_n_bands():
    m = build_model(ModelConfig(**TINY), bands=[1, 2, 3, 4], tile_size=96).eval()
    imgs, _ = m.net.transform([torch.rand(4, 96, 96)])
    assert imgs.tensors.shape[-2:] == (96, 96)


def test_anchors_at_configured_sizes_and_levels():
    from geodet.model.anchors import _anchors

    cfg = ModelConfig(levels=[2, 6], anchor_sizes=[8, 16, 32, 64, 128], scales_per_octave=1, aspect_ratios=[1.0])
    a = _anchors(cfg, 256)
    sizes = (a[:, 2] - a[:, 0]).round()
    assert sorted(set(sizes.tolist())) == [8, 16, 32, 64, 128]
    assert (sizes == 8).sum() == (256 // 4) ** 2  # P2: stride 4
    assert (sizes == 128).sum() == (256 // 64) ** 2  # P6: stride 64


def test_paper_levels_p3_p7_build():
    m = build_model(ModelConfig(levels=[3, 7], anchor_sizes=[32, 64, 128, 256, 512], channels=32, head_depth=1))
    feats = m.net.backbone(torch.rand(1, 3, 256, 256))
    assert [f.shape[-1] for f in feats.values()] == [32, 16, 8, 4, 2]
    bias = m.net.head.classification_head.cls_logits.bias
    assert torch.allclose(bias, torch.full_like(bias, -np.log(99)))  # prior 0.01


def test_anchor_coverage_small_preset_beats_stock():
    rng = np.random.default_rng(0)
    s = rng.uniform(8, 16, (400, 1))
    sizes = np.hstack([s, s * rng.uniform(0.8, 1.25, (400, 1))])
    small = load_config("small_objects").model
    stock = ModelConfig(levels=[3, 7], anchor_sizes=[32, 64, 128, 256, 512], scales_per_octave=3)
    assert anchor_coverage(sizes, small) >= 0.95
    assert anchor_coverage(sizes, stock) < 0.5
    fit = fit_anchors(sizes, [2, 4])
    assert fit.coverage >= 0.95 and len(fit.anchor_sizes) == 3


def test_fitted_anchors_of_thin_boxes_and_of_a_config_with_an_anchor_list():
    """300 x 1 px boxes (a fence): ratios stay positive (two decimals made 1/300 a 0, refused);
    a config's anchor_size_list does not stand in for the sizes being fitted."""
    fit = fit_anchors(np.array([[300.0, 1.0]] * 5), [2, 5])
    assert all(r > 0 for r in fit.aspect_ratios) and min(fit.aspect_ratios) == pytest.approx(1 / 300, rel=0.05)
    sizes = np.array([[12.0, 12.0], [20.0, 18.0], [40.0, 44.0]] * 10)
    listed = ModelConfig(levels=[2, 5], anchor_sizes=[12.0, 24.0, 48.0, 96.0], scales_per_octave=1,
                         anchor_size_list=[100.0, 200.0, 400.0, 800.0])
    assert anchor_coverage(sizes, listed) == 0  # the list's anchors meet none of these boxes
    assert fit_anchors(sizes, [2, 5], 1, base_cfg=listed).coverage >= 0.9


def _tile_with_objects(seed=0, n=12, size=128):
    rng = np.random.default_rng(seed)
    img = np.full((3, size, size), 0.35, np.float32) + rng.normal(0, 0.02, (3, size, size)).astype(np.float32)
    boxes, labels = [], []
    while len(boxes) < n:
        w, h = rng.integers(8, 16, 2)
        x, y = rng.integers(2, size - 18, 2)
        b = (x, y, x + w, y + h)
        if any(not (b[2] + 2 < o[0] or o[2] + 2 < b[0] or b[3] + 2 < o[1] or o[3] + 2 < b[1]) for o in boxes):
            continue
        k = int(rng.integers(2))
        img[:, y : y + h, x : x + w] = np.array([0.9, 0.9, 0.9] if k == 0 else [0.8, 0.2, 0.1])[:, None, None]
        boxes.append(b)
        labels.append(k)
    return torch.from_numpy(img), torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels)


def test_overfit_one_tile_loss_falls_and_objects_found():
    """Training on one tile drives the loss below 0.3x its start and finds at least 90% of the
    objects. It trains until both hold, checked every 10 steps, with a cap of 4x the steps this
    usually takes, so the outcome does not hang on one CPU's rounding."""
    from torchvision.ops import box_iou

    torch.manual_seed(0)
    img, boxes, labels = _tile_with_objects()
    m = build_model(ModelConfig(**{**TINY, "channels": 48, "head_depth": 2}), tile_size=128)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses, recall, falling = [], 0.0, False
    for step in range(1, 301):
        m.train()
        out = m(img[None], [{"boxes": boxes, "labels": labels}])
        loss = out["classification"] + out["bbox_regression"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step >= 30 and step % 10 == 0:
            falling = np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5])
            if falling:
                m.eval()
                with torch.inference_mode():
                    det = m.predict(img[None], score_threshold=0.3)[0]
                iou = box_iou(boxes, det["boxes"])
                recall = (iou.max(dim=1).values >= 0.5).float().mean().item() if len(det["boxes"]) else 0.0
                if recall >= 0.9:
                    break
    assert falling, f"loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f} after {step} steps"
    assert recall >= 0.9, f"recall {recall:.2f} after {step} steps"


def test_save_load_round_trip_identical(tmp_path):
    m = build_model(ModelConfig(**TINY, score_threshold=0.0), tile_size=128, gsd_m=0.3).eval()
    save_model(m, tmp_path / "m.pt")
    m2 = load_model(tmp_path / "m.pt")
    x = torch.rand(1, 3, 128, 128)
    with torch.inference_mode():
        a, b = m(x)[0], m2(x)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    assert m2.card.gsd_m == 0.3 and m2.card.classes == ["car", "truck"]
    assert m2.card.model.levels == [2, 4]


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch EVIL_RAN",))


def test_malicious_pickle_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.pt"
    torch.save({"format": "geodet-model", "version": 1, "card": {}, "state_dict": {}, "x": _Evil()}, p)
    with pytest.raises(GeodetError, match="refuses|not a readable"):
        load_model(p)
    assert not (tmp_path / "EVIL_RAN").exists()
    p2 = tmp_path / "evil.pkl"
    p2.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(GeodetError):
        load_model(p2)
    assert not (tmp_path / "EVIL_RAN").exists()


def test_bad_model_files(tmp_path):
    m = build_model(ModelConfig(**TINY), tile_size=64)
    good = save_model(m, tmp_path / "m.pt")
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:2000])
    (tmp_path / "rand.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    torch.save({"format": "geodet-model", "version": 99, "card": {}, "state_dict": {}}, tmp_path / "v99.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    torch.save({"format": "geodet-checkpoint", "version": 1, "model": {}}, tmp_path / "last.pt")  # as train writes it
    for name, msg in [("trunc.pt", "not a readable"), ("rand.pt", "not a model file \\(not a PyTorch file"), ("v99.pt", "version 99"),
                      ("other.pt", "not a geodet model"), ("missing.pt", "not found"),
                      ("last.pt", "is a training checkpoint .what train --resume reads.*model.pt")]:
        with pytest.raises(GeodetError, match=msg):
            load_model(tmp_path / name)


def test_chunked_matching_equals_torchvision_matcher():
    from torchvision.models.detection._utils import Matcher
    from torchvision.ops import box_iou

    from geodet.model import match_anchors

    g = torch.Generator().manual_seed(0)
    b = torch.rand(40, 2, generator=g) * 200
    b = torch.cat([b, b + torch.rand(40, 2, generator=g) * 20 + 3], 1)
    a = torch.rand(6000, 2, generator=g) * 200
    a = torch.cat([a, a + torch.rand(6000, 2, generator=g) * 30 + 2], 1)
    ref = Matcher(0.5, 0.4, allow_low_quality_matches=True)(box_iou(b, a))
    assert torch.equal(match_anchors(b, a, 0.5, 0.4, chunk_elements=777), ref)


@pytest.mark.parametrize("levels,sizes,scales,size", [([2, 4], [8.0, 16.0, 32.0], 2, 256), ([3, 6], [16.0, 32.0, 64.0, 128.0], 1, 200)])
def test_grid_matching_equals_torchvision_matcher(levels, sizes, scales, size):
    """Matching from the anchor grid gives exactly torchvision's Matcher over the full IoU matrix:
    boxes of all sizes, at the tile's edges, duplicated (ties), and equal to anchors."""
    from torchvision.models.detection._utils import Matcher
    from torchvision.models.detection.image_list import ImageList
    from torchvision.ops import box_iou

    from geodet.model import anchor_generator, match_anchors_on_grid

    cfg = ModelConfig(**{**TINY, "levels": levels, "anchor_sizes": sizes, "scales_per_octave": scales})
    gen = anchor_generator(cfg)
    feats = [torch.zeros(1, 8, -(-size // 2**lv), -(-size // 2**lv)) for lv in range(levels[0], levels[1] + 1)]
    anchors = gen(ImageList(torch.zeros(1, 3, size, size), [(size, size)]), feats)[0]
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(300, 2, generator=g) * (size + 40) - 20
    wh = torch.exp(torch.rand(300, 2, generator=g) * 4) + 1  # 2 .. 56 px
    boxes = torch.cat([xy, xy + wh], 1).clamp(0, size)  # clipped to the chip, as training boxes are
    boxes = boxes[(boxes[:, 2] - boxes[:, 0] > 0.5) & (boxes[:, 3] - boxes[:, 1] > 0.5)]
    boxes = torch.cat([boxes, boxes[:20], anchors[::997][:10]])  # exact duplicates and anchor-shaped boxes
    for fg, bg in ((0.5, 0.4), (0.6, 0.3)):
        ref = Matcher(fg, bg, allow_low_quality_matches=True)(box_iou(boxes, anchors))
        got = match_anchors_on_grid(boxes, anchors, gen.layout, fg, bg)
        assert (ref >= 0).sum() > 100
        assert torch.equal(got, ref)


def test_training_matches_on_the_grid_not_the_dense_fallback(monkeypatch):
    """The model's training loss uses grid matching (the dense chunked path is only a fallback)."""
    import geodet.model as gm

    def dense(*a, **k):
        raise AssertionError("dense matching used")

    monkeypatch.setattr(gm, "match_anchors", dense)
    m = build_model(ModelConfig(**TINY), tile_size=128).train()
    boxes = torch.tensor([[10.0, 12.0, 22.0, 20.0], [60.0, 60.0, 75.0, 70.0]])
    losses = m(torch.rand(2, 3, 128, 128), [{"boxes": boxes, "labels": torch.tensor([0, 1])}] * 2)
    assert set(losses) == {"classification", "bbox_regression"} and all(torch.isfinite(v) for v in losses.values())


def _cache(monkeypatch, tmp_path, name):
    import geodet.model.network as net

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    # port 9 (discard) refuses at once: a machine without internet, as in these tests
    monkeypatch.setattr(net, "imagenet_url", lambda backbone: f"http://127.0.0.1:9/{name}")
    return tmp_path / "checkpoints" / name


def test_imagenet_weights_offline_say_where_to_put_the_file(monkeypatch, tmp_path):
    target = _cache(monkeypatch, tmp_path, "resnet18-f37072fd.pth")
    with pytest.raises(GeodetError, match=f"cannot download the resnet18 weights.*put it at {target}"):
        build_model(ModelConfig(**{**TINY, "pretrained": "imagenet"}))
    assert not target.exists()  # no partial download left behind


def test_imagenet_weights_from_a_filled_cache_are_hash_checked_and_loaded(monkeypatch, tmp_path):
    import hashlib

    from torchvision.models import resnet18

    ref = resnet18(weights=None).state_dict()
    blob = tmp_path / "w.pth"
    torch.save(ref, blob)
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()[:8]
    target = _cache(monkeypatch, tmp_path, f"resnet18-{digest}.pth")
    target.parent.mkdir(parents=True)
    blob.rename(target)
    m = build_model(ModelConfig(**{**TINY, "pretrained": "imagenet"}))
    assert torch.equal(m.net.backbone.body.conv1.weight, ref["conv1.weight"])
    assert m.card.mean[:3] == pytest.approx([0.485, 0.456, 0.406])  # ImageNet's normalisation
    # a damaged (or different) file with that name is refused, not loaded
    torch.save({k: v + 1 for k, v in ref.items()}, target)
    with pytest.raises(GeodetError, match="damaged or not the file its name says"):
        build_model(ModelConfig(**{**TINY, "pretrained": "imagenet"}))


def test_imagenet_weights_refuse_other_band_counts():
    with pytest.raises(GeodetError, match="3-band RGB.*4 band"):
        build_model(ModelConfig(**{**TINY, "pretrained": "imagenet"}), bands=[1, 2, 3, 4])


def test_anchor_coverage_without_making_the_anchors_is_exact():
    """The best IoU of each box is that of every anchor torchvision makes on the tile (the nearest
    grid positions decide it), for random levels, scales, ratios and box sizes; so a label as large
    as the scene costs no more to measure than a small one."""
    import numpy as np
    from torchvision.ops import box_iou

    from geodet.config import ModelConfig
    from geodet.model.anchors import _anchors, _best_iou, anchor_coverage

    rng = np.random.default_rng(3)
    for _ in range(12):
        cfg = ModelConfig()
        lo = int(rng.integers(1, 4))
        cfg.levels = [lo, lo + int(rng.integers(0, 3))]
        cfg.scales_per_octave = int(rng.integers(1, 4))
        cfg.aspect_ratios = [float(r) for r in np.round(rng.uniform(0.3, 3, size=int(rng.integers(1, 4))), 2)]
        cfg.anchor_sizes = [float(rng.uniform(5, 12) * 2**i) for i in range(cfg.levels[1] - lo + 1)]
        tile = int(2 ** rng.integers(7, 9))
        sizes = np.exp(rng.uniform(np.log(2), np.log(tile / 3), size=(200, 2)))
        c = rng.uniform(tile / 2 - 2 ** cfg.levels[1], tile / 2 + 2 ** cfg.levels[1], size=(200, 2))
        boxes = torch.tensor(np.concatenate([c - sizes / 2, c + sizes / 2], 1), dtype=torch.float32)
        assert torch.equal(_best_iou(boxes, cfg, tile), box_iou(boxes, _anchors(cfg, tile)).max(1).values)
    # a label the size of a scene: its tile (16384 px) would hold 150 million anchors
    assert anchor_coverage(np.array([[20.0, 24.0]] * 50 + [[6000.0, 6000.0]]), ModelConfig()) < 1
