import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from geodet.errors import GeodetError
from geodet.model import load_model


def test_short_run_lowers_loss_and_writes_loadable_model(tiny_model):
    model = load_model(tiny_model)
    assert model.card.classes == ["car", "truck"]
    assert model.card.trained_on and "AP50" in model.card.metrics
    rows = list(csv.DictReader(open(tiny_model.parent / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    assert len(losses) == 96
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert any(r["val_AP50"] for r in rows)


def test_resume_continues_from_same_step(tmp_path, synth):
    from geodet.training.trainer import train

    cfg = tiny_config(synth.image, synth.labels, epochs=1, val_fraction=0.0)
    train(cfg, tmp_path, progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["step"] == 6
    # a run killed after logging steps it never saved (7, 8): they run again, and are in the log once
    with open(tmp_path / "metrics.csv") as f:
        head = next(csv.reader(f))
    with open(tmp_path / "metrics.csv", "a", newline="") as f:
        for step in (7, 8):
            csv.writer(f).writerow([{"step": step, "epoch": 2, "loss": 9.9}.get(k, "") for k in head])
    cfg2 = tiny_config(synth.image, synth.labels, epochs=2, val_fraction=0.0)
    train(cfg2, tmp_path, resume=True, progress=False)
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r["loss"]]
    assert [int(r["step"]) for r in rows] == list(range(1, 13))  # 1..6, then 7..12 after resuming
    assert all(float(r["loss"]) != 9.9 for r in rows)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 12
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o666 & ~_umask()  # as the user's other files


def _umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_folder_holding_a_run_is_continued_or_replaced_never_silently(tmp_path, synth, caplog, monkeypatch):
    """A second run into a run's folder is refused unless --resume or --overwrite says what to do
    with it; --overwrite replaces it only once the new inputs are read; --resume with other scenes
    is refused (a new run starts from the model with --init); a run without validation says so."""
    import shutil

    from geodet.training.trainer import train

    run = tmp_path / "run"
    caplog.set_level("INFO", logger="geodet")
    train(tiny_config(synth.image, synth.labels, epochs=1, val_fraction=0.0), run, progress=False)
    assert "no validation" in caplog.text and "val AP50" not in caplog.text
    before = {n: (run / n).read_bytes() for n in ("model.pt", "last.pt", "metrics.csv")}
    with pytest.raises(GeodetError, match=r"holds a run \(model.pt, last.pt, metrics.csv\): continue it with "
                                          r"--resume, replace it with --overwrite"):
        train(tiny_config(synth.image, synth.labels, epochs=1, val_fraction=0.0), run, progress=False)
    with pytest.raises(GeodetError, match="give one of them"):
        train(tiny_config(synth.image, synth.labels), run, resume=True, overwrite=True, progress=False)
    with pytest.raises(GeodetError, match="labels not found|cannot|no such|not found"):
        train(tiny_config(synth.image, tmp_path / "missing.gpkg", epochs=1, val_fraction=0.0), run, overwrite=True,
              progress=False)
    assert {n: (run / n).read_bytes() for n in before} == before  # a refused replacement keeps the run
    # a run stopped before its first model (last.pt, metrics.csv): refused, and left for --resume
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    for n in ("last.pt", "metrics.csv"):
        shutil.copy(run / n, stopped / n)
    with pytest.raises(GeodetError, match=r"holds a run \(last.pt, metrics.csv\): continue it with --resume"):
        train(tiny_config(synth.image, synth.labels, epochs=1, val_fraction=0.0), stopped, progress=False)
    with pytest.raises(GeodetError, match="labels not found|cannot|no such|not found"):
        train(tiny_config(synth.image, tmp_path / "missing.gpkg", epochs=1, val_fraction=0.0), stopped, overwrite=True,
              progress=False)
    assert sorted(p.name for p in stopped.iterdir()) == ["last.pt", "metrics.csv"]
    (stopped / "last.pt").unlink()  # killed before its first checkpoint: --resume cannot continue it
    with pytest.raises(GeodetError, match=r"holds a run \(metrics.csv\): replace it with --overwrite"):
        train(tiny_config(synth.image, synth.labels, epochs=1, val_fraction=0.0), stopped, progress=False)
    other = tmp_path / "other.tif"
    shutil.copy(synth.image, other)
    with pytest.raises(GeodetError, match=r"--resume: .*last.pt was trained on s.tif \(s.gpkg\), this run names "
                                          r"other.tif \(s.gpkg\).*--init"):
        train(tiny_config(other, synth.labels, epochs=2, val_fraction=0.0), run, resume=True, progress=False)
    # a replacement refused once it trains (a time limit too short for the warm-up): the old run as it was
    short = tiny_config(synth.image, synth.labels, epochs=100, val_fraction=0.0, warmup_steps=50, time_limit_min=0.002)
    with pytest.raises(GeodetError, match="is too short"):
        train(short, run, overwrite=True, progress=False)
    assert sorted(p.name for p in run.iterdir()) == sorted(before)
    assert {n: (run / n).read_bytes() for n in before} == before
    # Ctrl+C before its first checkpoint: the same; after it (and its first model.pt), the new run's files
    import geodet.training.trainer as trainer_module

    real_step, calls = trainer_module.train_step, []

    def stop_at(n):
        def step(*a, **k):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real_step(*a, **k)
        return step

    for n in (3, 9):
        calls.clear()
        monkeypatch.setattr(trainer_module, "train_step", stop_at(n))
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(synth.image, synth.labels, epochs=2, val_fraction=0.0, seed=7), run, overwrite=True,
                  progress=False)
        assert sorted(p.name for p in run.iterdir()) == sorted(before)  # nothing set aside is left behind
        if n == 3:
            assert {n: (run / n).read_bytes() for n in before} == before
        else:
            assert (run / "model.pt").read_bytes() != before["model.pt"]
    monkeypatch.setattr(trainer_module, "train_step", real_step)
    train(tiny_config(synth.image, synth.labels, epochs=1, val_fraction=0.0, seed=5), run, overwrite=True,
          progress=False)
    assert sorted(p.name for p in run.iterdir()) == sorted(before)  # nothing set aside is left
    steps = [int(r["step"]) for r in csv.DictReader(open(run / "metrics.csv")) if r["loss"]]
    assert steps == list(range(1, 7))  # a new run, not appended to the old one's rows
    assert (run / "model.pt").read_bytes() != before["model.pt"]


def test_resume_keeps_the_runs_settings_and_needs_steps_left(tmp_path, synth, caplog):
    """--resume continues the run as it was: a config's other tile size gives way to the run's
    (said), the same from the command line is refused, and a cap at or below the steps done is
    refused rather than training one more step."""
    from geodet.config import apply_overrides
    from geodet.training.trainer import train

    train(tiny_config(synth.image, synth.labels, epochs=1, val_fraction=0.0), tmp_path, progress=False)
    flagged = apply_overrides(tiny_config(synth.image, synth.labels, epochs=2, val_fraction=0.0),
                              {"tiling.tile_size": 192})
    with pytest.raises(GeodetError, match=r"--resume: .* trained with tiling.tile_size 128 \(this command: 192\): "
                                          "leave those flags out"):
        train(flagged, tmp_path, resume=True, progress=False)
    # another class column would give the head's classes to other objects (names swapped: silently remapped)
    column = apply_overrides(tiny_config(synth.image, synth.labels, epochs=2, val_fraction=0.0),
                             {"train.class_column": "kind"})
    with pytest.raises(GeodetError, match=r"trained with train.class_column label \(this command: kind\)"):
        train(column, tmp_path, resume=True, progress=False)
    with pytest.raises(GeodetError, match=r"--resume: .* is at step 6, and this command's cap ends it at step 5"):
        train(tiny_config(synth.image, synth.labels, max_steps=5, val_fraction=0.0), tmp_path, resume=True,
              progress=False)
    other = tiny_config(synth.image, synth.labels, epochs=2, val_fraction=0.0)
    other.tiling.tile_size, other.tiling.overlap = 256, 32  # as a preset's would be
    caplog.set_level("INFO", logger="geodet")
    train(other, tmp_path, resume=True, progress=False)
    assert "the run's own settings kept: tiling.tile_size 128, tiling.overlap 24" in caplog.text
    card = load_model(tmp_path / "model.pt").card
    assert (card.tile_size, card.overlap, card.trained_steps) == (128, 24, 12)


def test_validation_scenes_that_cannot_tell_are_said_and_init_takes_a_run_folder(tmp_path, synth, tiny_model, caplog):
    """A --val-scene that is a training scene, or all nodata, is said before training; --init
    takes a run's folder as -m does (its model.pt)."""
    import rasterio

    from geodet.config import SceneLabels
    from geodet.training.trainer import Trainer

    with rasterio.open(synth.image) as src:
        profile = dict(src.profile, nodata=0)
    blank = tmp_path / "blank.tif"
    with rasterio.open(blank, "w", **profile) as dst:
        dst.write(np.zeros((profile["count"], profile["height"], profile["width"]), profile["dtype"]))
    for scene, said in [(synth.image, "is also a training scene"), (blank, "holds no valid pixel")]:
        cfg = tiny_config(synth.image, synth.labels)
        cfg.train.val_scenes = [SceneLabels(str(scene), str(synth.labels))]
        caplog.clear()
        with caplog.at_level("WARNING"):
            Trainer(cfg, tmp_path / "run", progress=False).prepare()
        assert said in caplog.text
    cfg = tiny_config(synth.image, synth.labels, init=str(tiny_model.parent))
    t = Trainer(cfg, tmp_path / "run", progress=False)
    t.prepare()
    assert cfg.train.init == str(tiny_model) and t.init[1].classes == ["car", "truck"]
    caplog.clear()  # --pretrained beside --init: said to be unused (the start model gives every weight)
    cfg = tiny_config(synth.image, synth.labels, init=str(tiny_model))
    cfg.model.pretrained = "imagenet"
    with caplog.at_level("WARNING"):
        Trainer(cfg, tmp_path / "run", progress=False).prepare()
    assert "--pretrained imagenet is not used: the start model (--init" in caplog.text


def test_a_resumed_runs_data_is_matched_by_name_and_its_best_by_the_same_strip(caplog):
    """--resume names its scenes in any order and by a checkpoint's Windows paths too; the best
    AP50 so far is forgotten (said) where the validation strip moved."""
    from types import SimpleNamespace

    from geodet.training.records import check_same_data, resumed_best

    state = {"card": {"trained_on": [{"scene": r"C:\\data\\a.tif", "labels": r"C:\\data\\a.gpkg", "labels_used": 5},
                                     {"scene": "/d/b.tif", "labels": "/d/b.gpkg", "labels_used": 7}]},
             "best_ap50": 0.4, "val_areas": [[0, 0, 10, 10]]}

    def scene(name, labels, n):
        return SimpleNamespace(scene=SimpleNamespace(path=f"/x/{name}"), labels_path=f"/x/{labels}", labels=[0] * n)

    with caplog.at_level("WARNING"):
        check_same_data(state, [scene("b.tif", "b.gpkg", 7), scene("a.tif", "a.gpkg", 6)], Path("run"))
    assert "a.gpkg now has 6 usable labels (5 when the run began)" in caplog.text and "b.gpkg" not in caplog.text
    with pytest.raises(GeodetError, match="was trained on a.tif"):
        check_same_data(state, [scene("c.tif", "a.gpkg", 5), scene("b.tif", "b.gpkg", 7)], Path("run"))
    # the same number of classes, other names (truck renamed bus: the head's outputs would swap)
    state["card"]["classes"] = ["car", "truck"]
    two = [scene("a.tif", "a.gpkg", 5), scene("b.tif", "b.gpkg", 7)]
    check_same_data(state, two, Path("run"), ["car", "truck"])
    with pytest.raises(GeodetError, match=r"trained on the classes \['car', 'truck'\], these labels name \['bus', 'car'\]"):
        check_same_data(state, two, Path("run"), ["bus", "car"])
    state["card"]["classes"] = ["1.0", "2.0"]  # an older geodet's names of integer classes
    check_same_data(state, two, Path("run"), ["1", "2"])
    assert resumed_best(state, [[0, 0, 10, 10]]) == 0.4
    with caplog.at_level("WARNING"):
        assert resumed_best(state, [[0, 0, 12, 10]]) == -1.0
    assert "validation area moved" in caplog.text
    assert resumed_best({"best_ap50": 0.3}, [[0, 0, 12, 10]]) == 0.3  # a checkpoint from before: as it was


def test_deterministic_on_cpu(tmp_path, synth):
    from geodet.training.trainer import train

    for d in ("a", "b"):
        train(tiny_config(synth.image, synth.labels, epochs=1, val_fraction=0.0), tmp_path / d, progress=False)
    la = [r["loss"] for r in csv.DictReader(open(tmp_path / "a" / "metrics.csv"))]
    lb = [r["loss"] for r in csv.DictReader(open(tmp_path / "b" / "metrics.csv"))]
    assert la == lb


def test_ddp_two_cpu_processes(tmp_path, synth):
    from geodet.config import save_config

    cfg = tiny_config(synth.image, synth.labels, epochs=1, steps_per_epoch=3, val_fraction=0.0)
    save_config(cfg, tmp_path / "c.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GEODET_NO_PROGRESS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "-m",
         "geodet.cli", "train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "model.pt").exists()
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 3


def test_training_precision_follows_the_cpu(monkeypatch):
    import torch

    from geodet.errors import GeodetError
    from geodet.pipeline import backends
    from geodet.training.trainer import training_precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(backends, "cpu_features", lambda: {"bf16": False, "vnni": False, "isa": "AVX2"})
    assert training_precision("auto", cpu) is None
    with pytest.raises(GeodetError, match="no native bf16"):
        training_precision("bf16", cpu)
    monkeypatch.setattr(backends, "cpu_features", lambda: {"bf16": True, "vnni": True, "isa": "AVX512"})
    assert training_precision("auto", cpu) is torch.bfloat16
    assert training_precision("fp32", cpu) is None


def test_losses_stay_float32_under_bf16_autocast():
    import torch

    from geodet.config import load_config
    from geodet.model import build_model

    cfg = load_config("cpu").model
    cfg.channels, cfg.head_depth = 16, 1
    model = build_model(cfg, tile_size=64).train()
    images = torch.rand(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 20.0, 22.0]]), "labels": torch.tensor([0])}] * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_resume_with_another_network_is_one_line_and_leaves_the_run(tmp_path, synth):
    """A config whose network differs from the run's checkpoint is refused with what to do (not a
    state-dict traceback), and values no run can start with are refused before any work."""
    from geodet.config import check_run_values
    from geodet.training.trainer import train

    train(tiny_config(synth.image, synth.labels, epochs=1, val_fraction=0.0), tmp_path, progress=False)
    before = (tmp_path / "last.pt").read_bytes()
    import geopandas as gpd

    edited = tmp_path / "edited" / synth.labels.name  # the labels file edited since: one class left
    edited.parent.mkdir()
    gpd.read_file(synth.labels).assign(label="car").to_file(edited)
    other = tiny_config(synth.image, edited, epochs=2, val_fraction=0.0)
    with pytest.raises(GeodetError, match=r"--resume: .*last.pt was trained on the classes \['car', 'truck'\], "
                                          r"these labels name \['car'\]: resume with the run's class names"):
        train(other, tmp_path, resume=True, progress=False)
    from geodet.config import apply_overrides

    wider = apply_overrides(tiny_config(synth.image, synth.labels, epochs=2, val_fraction=0.0), {"model.channels": 16})
    with pytest.raises(GeodetError, match=r"--resume: .* trained with model.channels 32 \(this command: 16\)"):
        train(wider, tmp_path, resume=True, progress=False)
    assert (tmp_path / "last.pt").read_bytes() == before
    for key, value, match in [("batch_size", 0, "train.batch_size must be at least 1"),
                              ("steps_per_epoch", 0, "train.steps_per_epoch must be at least 1"),
                              ("lr", -1e-3, "train.lr must be a positive number"),
                              ("val_fraction", 1.0, "train.val_fraction must be from 0")]:
        cfg = tiny_config(synth.image, synth.labels)
        setattr(cfg.train, key, value)
        with pytest.raises(GeodetError, match=match):
            check_run_values(cfg)
    cfg = tiny_config(synth.image, synth.labels)
    cfg.tiling.overlap = cfg.tiling.tile_size
    with pytest.raises(GeodetError, match="tiling.overlap must be zero or more and smaller than the tile size"):
        train(cfg, tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()


def test_frozen_stages_keep_their_statistics_and_a_resume_keeps_the_optimiser(tmp_path, synth, tiny_model, caplog):
    """--freeze-stages keeps the frozen stages exactly as the start model had them, batch-norm
    statistics included; --resume restores the frozen stages and the optimiser (kind, learning
    rate) with the run, and refuses another learning rate from the command line."""
    from geodet.config import apply_overrides
    from geodet.training.trainer import train

    cfg = tiny_config(synth.image, synth.labels, epochs=1, val_fraction=0.0, init=str(tiny_model),
                      freeze_backbone_stages=2)
    train(cfg, tmp_path, progress=False)
    before, after = (torch.load(p, weights_only=True)["state_dict"] for p in (tiny_model, tmp_path / "model.pt"))
    frozen = [k for k in before if k.startswith(("backbone.body.conv1", "backbone.body.bn1", "backbone.body.layer1"))]
    assert any("running_mean" in k for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in frozen), [k for k in frozen if not torch.equal(before[k], after[k])]
    assert not torch.equal(before["backbone.body.layer2.0.bn1.running_mean"], after["backbone.body.layer2.0.bn1.running_mean"])
    caplog.set_level("INFO", logger="geodet")
    again = tiny_config(synth.image, synth.labels, epochs=2, val_fraction=0.0, optimizer="sgd")
    train(again, tmp_path, resume=True, progress=False)  # the run's own freezing and optimiser, said
    assert "train.optimizer adamw" in caplog.text and "train.freeze_backbone_stages 2" in caplog.text
    resumed = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], resumed[k]) for k in frozen)
    flagged = apply_overrides(tiny_config(synth.image, synth.labels, epochs=3, val_fraction=0.0), {"train.lr": 0.05})
    with pytest.raises(GeodetError, match=r"trained with train.lr .* \(this command: 0.05\): leave those flags out"):
        train(flagged, tmp_path, resume=True, progress=False)


def test_init_from_a_model_of_more_bands_than_the_scene_says_what_can_be_done(tmp_path, synth, caplog):
    """A 4-band start model on 3-band scenes cannot be fixed with --bands: said so, before any
    work; one trained on bands 4,3,2 of a 4-band scene can take a 3-band scene's 1,2,3."""
    from geodet.config import ModelConfig
    from geodet.model import build_model, save_model
    from geodet.training.start import apply_init

    cfg_model = ModelConfig(backbone="resnet18", channels=16, head_depth=1, pretrained="none")
    for bands, says in (([1, 2, 3, 4], r"has 3: start from a model of 3-band scenes, or train from scratch"),
                        ([4, 3, 2], r"has 3: pass --bands with 3 numbers from 1 to 3")):
        path = save_model(build_model(cfg_model, bands=bands, tile_size=128, overlap=16), tmp_path / "m.pt")
        cfg = tiny_config(synth.image, synth.labels, init=str(path))
        with pytest.raises(GeodetError, match=says):
            apply_init(cfg)
    # a start model of one band read three times (pretrained on grey scenes) on an RGB scene: it reads
    # band 1 of it, as it was trained; said, since bands 2 and 3 then go unused
    path = save_model(build_model(cfg_model, bands=[1, 1, 1], tile_size=128, overlap=16), tmp_path / "grey.pt")
    cfg = tiny_config(synth.image, synth.labels, init=str(path))
    apply_init(cfg)
    assert cfg.scene.bands == [1, 1, 1]
    assert "reads band(s) 1,1,1 of each scene, as it was trained: s.tif has 3, and band(s) 2,3 go unused; pass " \
           "--bands" in caplog.text


def test_a_run_set_aside_is_all_or_nothing_and_found_again_after_a_kill(tmp_path, monkeypatch):
    """--overwrite moves the old run aside whole or not at all (a file held open elsewhere); a run
    an --overwrite killed by SIGKILL left aside comes back when the folder is next used."""
    from geodet.training import records

    out = tmp_path / "run"
    out.mkdir()
    for n in records.RUN_FILES:
        (out / n).write_text(n)
    files = [out / n for n in records.RUN_FILES]
    real = os.replace

    def busy(src, dst):
        if str(src).endswith("metrics.csv"):
            raise PermissionError(13, "in use")
        return real(src, dst)

    monkeypatch.setattr(records.os, "replace", busy)
    with pytest.raises(GeodetError, match="metrics.csv cannot be moved aside .*close the program"):
        records.set_aside(files, out)
    monkeypatch.setattr(records.os, "replace", real)
    assert sorted(p.name for p in out.iterdir()) == sorted(records.RUN_FILES)
    aside = records.set_aside(files, out)
    assert aside.name.startswith(".replaced.geodet-") and sorted(p.name for p in out.iterdir()) == [aside.name]
    (out / "metrics.csv").write_text("the killed run's")  # killed before its model: no model.pt of its own
    with pytest.raises(GeodetError, match="holds a run"):
        records.check_run_folder(out, resume=False, overwrite=False)
    assert {p.name: p.read_text() for p in out.iterdir()} == {n: n for n in records.RUN_FILES}


def test_a_scene_too_small_for_a_validation_strip_is_said_so(tmp_path, caplog):
    """val_fraction 0.2 of a 72 px scene is narrower than a strip can be: the log says that, not
    that val_fraction is 0."""
    from conftest import tiny_config

    from geodet.synthetic import make_scene
    from geodet.training.trainer import train

    s = make_scene(tmp_path / "t.tif", tmp_path / "t.gpkg", size=72, seed=1)
    cfg = tiny_config(s.image, s.labels, epochs=None, max_steps=1, val_fraction=0.2)
    cfg.tiling.tile_size = 64
    with caplog.at_level("INFO"):
        train(cfg, tmp_path / "run", progress=False)
    assert "no validation (the labelled scenes are too small to hold out a strip" in caplog.text, caplog.text[-800:]


def test_the_card_names_what_it_was_validated_on(tmp_path, synth, tiny_model):
    from conftest import tiny_config

    from geodet.config import SceneLabels
    from geodet.model import load_model
    from geodet.synthetic import make_scene
    from geodet.training.trainer import train

    assert load_model(tiny_model).card.metrics["validation"] == "held-out area"
    v = make_scene(tmp_path / "v.tif", tmp_path / "v.gpkg", size=160, seed=5)
    cfg = tiny_config(synth.image, synth.labels, epochs=None, max_steps=2)
    cfg.train.val_scenes = [SceneLabels(str(v.image), str(v.labels))]
    path = train(cfg, tmp_path / "run", progress=False)
    assert load_model(path).card.metrics["validation"] == "validation scene(s): v.tif"
