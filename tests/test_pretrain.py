"""Self-supervised pretraining: the two views' ground points really are the same ground, the
pretrained backbone is what --init starts from, and it is never taken for a detector."""

from pathlib import Path

import numpy as np
import pytest
import torch

from geodet.errors import GeodetError


def test_view_points_land_on_the_same_ground(monkeypatch, tmp_path):
    import rasterio
    from rasterio.transform import from_origin

    from geodet.io.scene import Scene
    from geodet.training import augment as aug
    from geodet.training import pretrain

    monkeypatch.setattr(aug, "radiometric", lambda img, rng: img)
    monkeypatch.setattr(aug, "photometric", lambda img, rng, s: img)
    yy, xx = np.mgrid[0:300, 0:300].astype(np.float64)
    data = np.stack([xx / 300 * 250, yy / 300 * 250, (xx + yy) / 600 * 250]).astype(np.uint8)  # smooth ramps
    p = tmp_path / "ramp.tif"
    with rasterio.open(p, "w", driver="GTiff", width=300, height=300, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(0, 300, 1, 1)) as dst:
        dst.write(data)
    ds = pretrain.ViewPairs([Scene(p)], 96, 8, seed=0)
    for i in range(8):
        a, b, ga, gb = ds[i]
        va = torch.nn.functional.grid_sample(a[None], ga[None, :, None, :], align_corners=False)[0, :, :, 0]
        vb = torch.nn.functional.grid_sample(b[None], gb[None, :, None, :], align_corners=False)[0, :, :, 0]
        assert torch.allclose(va, vb, atol=0.03), (i, (va - vb).abs().max())
    # and a wrong turn would not: the test can fail
    a, b, ga, gb = ds[0]
    vb_wrong = torch.nn.functional.grid_sample(b.flip(-1)[None], gb[None, :, None, :], align_corners=False)[0, :, :, 0]
    va = torch.nn.functional.grid_sample(a[None], ga[None, :, None, :], align_corners=False)[0, :, :, 0]
    assert not torch.allclose(va, vb_wrong, atol=0.03)


def test_pretrain_writes_a_backbone_that_train_starts_from_and_detect_refuses(tmp_path, synth):
    from geodet.cli import main
    from geodet.model.file import read_model_file

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("tiling: {tile_size: 128, overlap: 16}\nmodel: {channels: 16, head_depth: 1, levels: [2, 4], "
                   "anchor_sizes: [8.0, 16.0, 32.0]}\ntrain: {batch_size: 2, warmup_steps: 2}\n")
    out = tmp_path / "new" / "bb.pt"  # a folder made for it when it is written
    assert main(["pretrain", str(synth.image), "--config", str(cfg), "-o", str(out), "--max-steps", "5", "-q"]) == 0
    payload = read_model_file(out)
    info = payload["card"]["pretrained"]  # a step budget, not a time limit: a busy machine takes the same steps
    assert info["steps"] == 5 and np.isfinite(info["loss_last"]) and payload["card"]["pretrain_only"]
    run = tmp_path / "run"
    assert main(["train", str(synth.image), "--init", str(out), "--labels", str(synth.labels), "--out",
                 str(run), "--max-steps", "2", "--class-column", "", "-q"]) == 0
    trained = read_model_file(run / "model.pt")
    assert not trained["card"].get("pretrain_only") and trained["card"]["tile_size"] == 128
    # the stem the run started from is the pretrained one (two steps move it only a little)
    w0, w1 = payload["state_dict"]["backbone.body.conv1.weight"], trained["state_dict"]["backbone.body.conv1.weight"]
    assert (w1 - w0).abs().mean() < 0.1 * w0.abs().mean()
    from geodet.pipeline.export import export_model
    from geodet.pipeline.job import load_detector_file

    with pytest.raises(GeodetError, match="pretrained backbone"):
        load_detector_file(out)
    with pytest.raises(GeodetError, match="pretrained backbone"):  # nor exported to run as one
        export_model(out, tmp_path / "bb.onnx")
    assert not (tmp_path / "bb.onnx").exists()
    # a backbone is never written over a trained detector, a run's model.pt or a scene of the run
    import shutil

    from geodet.config import load_config
    from geodet.training.pretrain import pretrain

    detector = shutil.copy(run / "model.pt", tmp_path / "detector.pt")
    scene = shutil.copy(synth.image, tmp_path / "scene.pt")
    before = {p: p.read_bytes() for p in map(Path, (run / "model.pt", run / "last.pt", detector, scene))}
    for target, said in ((run / "model.pt", "is the model of the training run in"),
                         (run / "last.pt", "exists and is not a backbone of an earlier geodet pretrain"),
                         (detector, "is a trained detector: a backbone written there would replace it"),
                         (scene, "is a scene of this run: writing the output there would replace it")):
        with pytest.raises(GeodetError, match=said):
            pretrain([str(synth.image), str(scene)], target, load_config(str(cfg)), None, progress=False, max_steps=1)
    assert {p: p.read_bytes() for p in before} == before
    assert main(["pretrain", str(synth.image), "--config", str(cfg), "-o", str(out), "--max-steps", "1", "-q"]) == 0
    assert read_model_file(out)["card"]["pretrained"]["steps"] == 1  # an earlier backbone is replaced


def test_every_fpn_level_learns_and_the_vicreg_batch_is_the_points(tmp_path, synth):
    """Each FPN level's output conv gets a gradient from the objective (with only the finest level
    and a pooled coarsest one, the middle levels' output convs learnt nothing), and VICReg's
    variance and covariance see one vector per sampled point, not one per chip."""
    from geodet.config import load_config
    from geodet.io.scene import Scene
    from geodet.model import build_model
    from geodet.training import pretrain

    cfg = load_config(None, {"model.channels": 16, "model.head_depth": 1, "model.levels": [2, 5],
                             "model.anchor_sizes": [8.0, 16.0, 32.0, 64.0]})
    sc = Scene(synth.image)
    model = build_model(cfg.model, bands=sc.bands, tile_size=128)
    seen = []

    def loss_fn(za, zb):
        seen.append(za.shape[0])
        return ((za - zb) ** 2).mean() + za.var(0).mean()

    objective = pretrain.DenseVICReg(model.net.backbone, model.net.transform, 4, 16, loss_fn)
    ds = pretrain.ViewPairs([sc], 96, 4, seed=0)
    a, b, ga, gb = (torch.stack(t) for t in zip(*[ds[i] for i in range(2)]))
    objective(a, b, ga, gb, None).backward()
    fpn = model.net.backbone.fpn
    for i, conv in enumerate(fpn.layer_blocks):
        grad = conv[0].weight.grad if isinstance(conv, torch.nn.Sequential) else conv.weight.grad
        assert grad is not None and grad.abs().sum() > 0, f"FPN output conv {i} got no gradient"
    assert seen == [2 * pretrain.POINTS] * 4
