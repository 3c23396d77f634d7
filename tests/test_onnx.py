"""The ONNX backend: exported core, metadata, checks, int8, and the backend choice."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from geodet.errors import GeodetError
from geodet.model import load_model
from geodet.model.onnx import FP32_MAX_DIFF, ExportCore, export_core, load_onnx, write_metadata
from geodet.pipeline import choice
from geodet.pipeline.scenes import detect_scene
from geodet.pipeline.export import export_model


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory, tiny_model, synth):
    out = tmp_path_factory.mktemp("onnx") / "m.onnx"
    result = export_model(tiny_model, out, calibrate=[synth.image], calib_tiles=4)
    return out, result


def test_fp32_core_matches_torch_for_batches_of_1_and_3(fp32_onnx, tiny_model):
    path, result = fp32_onnx
    model = load_model(tiny_model)
    onnx_model = load_onnx(path)
    core = ExportCore(model).eval()
    rng = np.random.default_rng(0)
    for b in (1, 3):
        x = rng.random((b, model.card.n_bands, 128, 128), dtype=np.float32)
        with torch.inference_mode():
            t_cls, t_reg = (t.numpy() for t in core(torch.from_numpy(x)))
        o_cls, o_reg = onnx_model.core(x)
        assert o_cls.shape == t_cls.shape and o_cls.shape[0] == b
        assert (np.abs(o_cls - t_cls) / np.maximum(1, np.abs(t_cls))).max() <= FP32_MAX_DIFF
        assert np.abs(o_reg - t_reg).max() <= FP32_MAX_DIFF
    assert result["fp32"]["max_relative_logit_diff"] <= FP32_MAX_DIFF
    # on the fixture's random check tiles nothing reaches the operating point: the detection
    # agreement is then inconclusive, never a vacuous 1.0 (the logits above are the check)
    d = result["fp32"]["detections"]
    assert (d["f1"] is None and d["reference"] == d["candidate"] == 0) or d["f1"] == 1.0


def test_metadata_round_trip(fp32_onnx, tiny_model):
    path, result = fp32_onnx
    model = load_model(tiny_model)
    m = load_onnx(path)
    assert m.card.to_dict() == model.card.to_dict()
    assert m.precision == "fp32"
    assert m.props["source_sha256"] == model.source["sha256"]
    assert m.props["check"]["fp32"]["detections"] == json.loads(json.dumps(result["fp32"]["detections"]))
    assert m.source["sha256"] == result["sha256"]


def test_onnx_fp32_gives_the_torch_models_stitched_frame(fp32_onnx, tiny_model, synth):
    path, _ = fp32_onnx
    ref = detect_scene(synth.image, load_model(tiny_model), progress=False, backend="torch", precision="fp32",
                       score_threshold=0.3)
    got = detect_scene(synth.image, load_onnx(path), progress=False, score_threshold=0.3)
    assert got.attrs["report"]["backend"]["backend"] == "onnx"
    assert 0 < len(ref) < 6000 and len(got) == len(ref)
    from torchvision.ops import box_iou

    cols = ["px_x0", "px_y0", "px_x1", "px_y1"]
    iou = box_iou(torch.tensor(ref[cols].to_numpy()), torch.tensor(got[cols].to_numpy())).numpy()
    iou[ref["label"].to_numpy()[:, None] != got["label"].to_numpy()[None, :]] = 0  # one box may hold two classes
    key = iou - np.abs(ref["score"].to_numpy()[:, None] - got["score"].to_numpy()[None, :])
    best = key.argmax(1)  # each stitched box has its twin (row order may differ at tied scores)
    assert (iou[np.arange(len(ref)), best] > 0.999).all()
    assert len(set(best)) == len(ref)
    np.testing.assert_allclose(got["score"].to_numpy()[best], ref["score"].to_numpy(), atol=1e-4)
    assert (got["label"].to_numpy()[best] == ref["label"].to_numpy()).all()
    assert "model_core" in got.attrs["report"]["seconds"] and "model_decode" in got.attrs["report"]["seconds"]


def _refused(path):
    with pytest.raises(GeodetError) as err:
        load_onnx(path)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_foreign_or_altered_onnx_files_are_refused(tmp_path, tiny_model):
    model = load_model(tiny_model)
    plain = tmp_path / "plain.onnx"
    export_core(model, plain)
    assert "without geodet metadata" in _refused(plain)

    old = tmp_path / "old.onnx"
    export_core(model, old)
    write_metadata(old, model.card, {"precision": "fp32"})
    import onnx

    m = onnx.load(str(old))
    for p in m.metadata_props:
        if p.key == "geodet.version":
            p.value = "99"
    onnx.save(m, str(old))
    assert "version '99'" in _refused(old)

    bands = tmp_path / "bands.onnx"
    export_core(model, bands)
    card = load_model(tiny_model).card
    card.bands, card.mean, card.std = [1, 2, 3, 4], card.mean + [0.5], card.std + [0.25]
    write_metadata(bands, card, {"precision": "fp32"})
    assert "takes 3 band(s) but its card says 4" in _refused(bands)

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 100)
    assert "not a readable ONNX model" in _refused(junk)


def test_a_model_damaged_on_disk_is_refused_not_run(tmp_path, tiny_model, fp32_onnx):
    """Bytes of the weights changed in a copy (a bad disk, a cut transfer patched up): ONNX Runtime
    and torch.load read them without a word, so the digests written with the files are checked."""
    from geodet.model.file import read_model_file

    def damaged(src, name):
        data = bytearray(Path(src).read_bytes())
        mid = len(data) // 2
        data[mid:mid + 4096] = bytes(255 - b for b in data[mid:mid + 4096])
        out = tmp_path / name
        out.write_bytes(bytes(data))
        return out

    assert "the ONNX graph is damaged or was changed by another tool" in _refused(damaged(fp32_onnx[0], "d.onnx"))
    with pytest.raises(GeodetError, match="model's weights are damaged.*copy the file again"):
        read_model_file(damaged(tiny_model, "d.pt"))
    # one byte of the card (its resolution 0.3 m read as 0.9 m: every scene resampled 3x, exit 0)
    data = bytearray(Path(fp32_onnx[0]).read_bytes())
    at = data.index(b'\\"gsd_m\\": 0.') if b'\\"gsd_m\\": 0.' in data else data.index(b'"gsd_m": 0.')
    at = data.index(b"0.", at) + 2
    data[at] = ord("9") if data[at] != ord("9") else ord("8")
    (tmp_path / "card.onnx").write_bytes(bytes(data))
    assert "the model's card (its settings" in _refused(tmp_path / "card.onnx")
    import struct

    data = bytearray(Path(tiny_model).read_bytes())
    at = data.index(b"G", data.index(b"gsd_m"))  # the pickled float that follows the key
    data[at + 1:at + 9] = struct.pack(">d", 0.9)
    (tmp_path / "card.pt").write_bytes(bytes(data))
    with pytest.raises(GeodetError, match=r"model's card \(its settings.*is damaged"):
        read_model_file(tmp_path / "card.pt")
    assert load_onnx(fp32_onnx[0]).card.classes == load_model(tiny_model).card.classes  # the intact files load


def test_int8_export_check_runs_and_is_stored(tmp_path, tiny_model, synth):
    out = tmp_path / "q.onnx"
    with pytest.raises(GeodetError, match="is given twice.*both calibrated on and checked on"):  # "checked on
        export_model(tiny_model, out, int8=True, calibrate=[synth.image, Path(".") / synth.image])  # other tiles"
    assert not out.exists()
    result = export_model(tiny_model, out, int8=True, calibrate=[synth.image], calib_tiles=6, min_agreement=0.0)
    m = load_onnx(out)
    assert m.precision == "int8"
    stored = m.props["check"]["int8"]
    assert stored == json.loads(json.dumps(result["int8"]))
    assert 0.0 <= stored["detections"]["f1"] <= 1.0 and stored["calibration_tiles"] == 6
    assert stored["float_nodes"] and all("cls_logits" in n or "bbox_reg" in n for n in stored["float_nodes"])
    # nothing after the float output convs is quantized: logits and box deltas leave unrounded
    import onnx

    graph = onnx.load(str(out)).graph
    producer = {o: n for n in graph.node for o in n.output}
    for output in graph.output:
        todo, seen = [output.name], set()
        while todo:
            node = producer.get(todo.pop())
            if node is None or node.name in seen or node.name in stored["float_nodes"]:
                continue
            seen.add(node.name)
            assert node.op_type not in ("QuantizeLinear", "DequantizeLinear"), (output.name, node.name)
            todo += [i for i in node.input if i in producer and producer[i].op_type != "Constant"]
    assert m.props["calibration"]["scenes"] == [str(synth.image)]
    # a demand no int8 model meets: refused, and nothing is left behind
    strict = tmp_path / "strict.onnx"
    with pytest.raises(GeodetError, match="export check failed: int8 keeps only"):
        export_model(tiny_model, strict, int8=True, calibrate=[synth.image], calib_tiles=6, min_agreement=1.01)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]


def test_int8_needs_calibration_scenes(tmp_path, tiny_model):
    with pytest.raises(GeodetError, match="--calibrate"):
        export_model(tiny_model, tmp_path / "q.onnx", int8=True)


def test_auto_backend_on_a_large_job_makes_checks_and_caches(monkeypatch, tmp_path, tiny_model, synth):
    monkeypatch.setenv("GEODET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(choice, "AUTO_INT8_MIN_TILES", 1)
    monkeypatch.setattr(choice, "cpu_features", lambda: {"bf16": False, "vnni": False, "isa": "AVX2"})
    model = load_model(tiny_model)
    first = detect_scene(synth.image, model, progress=False).attrs["report"]["backend"]
    assert first["backend"] == "onnx"
    # the int8 check was made (passed: int8 runs; failed: recorded, and ONNX fp32 runs)
    assert "int8" in first["checks"] and first["checks"]["int8"] is not None
    assert first["precision"] == ("int8" if (first["checks"]["int8"].get("detections", {}).get("f1") or 0) >= 0.95 else "fp32")
    made = sorted(p.name for p in (tmp_path / "cache" / "models").iterdir())
    assert made
    again = detect_scene(synth.image, model, progress=False).attrs["report"]["backend"]
    assert again["precision"] == first["precision"]
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == made  # nothing made twice


def test_small_jobs_and_in_memory_models_run_torch_fp32(monkeypatch, tmp_path, tiny_model, synth):
    monkeypatch.setenv("GEODET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(choice, "cpu_features", lambda: {"bf16": False, "vnni": False, "isa": "AVX2"})
    model = load_model(tiny_model)
    r = detect_scene(synth.image, model, progress=False, tile_size=384, overlap=0).attrs["report"]["backend"]
    assert (r["backend"], r["precision"]) == ("torch", "fp32") and "small job" in r["reason"]
    # a small job never looks for int8 unasked (an int8 model cached by an earlier --precision int8
    # run would make the same command give other detections), --backend onnx included
    asked, real = [], choice._derived_onnx
    monkeypatch.setattr(choice, "_derived_onnx", lambda m, s, precision, *a, **k: asked.append(precision) or
                        real(m, s, precision, *a, **k))
    r = detect_scene(synth.image, model, progress=False, backend="onnx").attrs["report"]["backend"]
    assert (r["backend"], r["precision"]) == ("onnx", "fp32") and asked == ["fp32"]
    model.source = None
    r = detect_scene(synth.image, model, progress=False).attrs["report"]["backend"]
    assert (r["backend"], r["precision"]) == ("torch", "fp32") and "derived from model files" in r["reason"]


def test_bf16_only_where_the_cpu_has_it(monkeypatch, tiny_model, tmp_path):
    from geodet.synthetic import make_scene

    # 4 tiles of the tiny model (bf16 is emulated, slowly, on a CPU without it)
    synth = make_scene(tmp_path / "s.tif", tmp_path / "s.gpkg", size=200, seed=3)
    model = load_model(tiny_model)
    monkeypatch.setattr(choice, "cpu_features", lambda: {"bf16": False, "vnni": False, "isa": "AVX2"})
    with pytest.raises(GeodetError, match="no native bf16"):
        detect_scene(synth.image, model, progress=False, precision="bf16")
    with pytest.raises(GeodetError, match="fp16 is for CUDA"):
        detect_scene(synth.image, model, progress=False, precision="fp16")
    # a CPU with native bf16 (pretended here; torch emulates it on this one): the torch
    # backend, checked against fp32 on the scene's tiles
    monkeypatch.setattr(choice, "cpu_features", lambda: {"bf16": True, "vnni": False, "isa": "AVX512"})
    r = detect_scene(synth.image, model, progress=False, backend="torch").attrs["report"]["backend"]
    assert r["checks"]["bf16"]["tiles"] > 0
    assert r["precision"] == ("bf16" if r["checks"]["bf16"]["f1"] >= choice.BF16_MIN_AGREEMENT else "fp32")
    forced = detect_scene(synth.image, model, progress=False, precision="bf16").attrs["report"]["backend"]
    assert (forced["backend"], forced["precision"]) == ("torch", "bf16")


def test_cli_export_and_detect_with_the_onnx_file(tmp_path, tiny_model, synth, capsys):
    from geodet.cli import main

    out = tmp_path / "m.onnx"
    assert main(["-q", "export", str(tiny_model), "-o", str(out), "--calibrate", str(synth.image),
                 "--calib-tiles", "4"]) == 0
    assert "export check on 4 tiles" in capsys.readouterr().out
    det = tmp_path / "d.gpkg"
    assert main(["-q", "detect", str(synth.image), "-m", str(out), "-o", str(det)]) == 0
    report = json.loads((tmp_path / "d.gpkg.report.json").read_text())
    assert report["scenes"][0]["backend"]["backend"] == "onnx"
    assert main(["-q", "detect", str(synth.image), "-m", str(out), "-o", str(tmp_path / "e.gpkg"),
                 "--backend", "torch"]) == 2
    assert "runs on the onnx backend" in capsys.readouterr().err
    assert main(["-q", "export", "-m", str(tiny_model), "-o", str(tmp_path / "x.onnx"), "--check-scene",
                 str(synth.image)]) == 2  # a check scene without its labels would be ignored
    assert "--check-scene is the scene of --check-labels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "-m", str(tiny_model), "-o", str(tmp_path / "x.onnx"), "--int8", "--min-agreement", "1.5"])
    assert "--min-agreement" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()


def test_export_reads_a_one_band_scene_with_bands_and_says_how_without(tmp_path, tiny_model, synth, capsys):
    import rasterio

    from geodet.cli import main

    one = tmp_path / "one_band.tif"
    with rasterio.open(synth.image) as src:
        profile = dict(src.profile, count=1)
        with rasterio.open(one, "w", **profile) as dst:
            dst.write(src.read(1), 1)
    out = tmp_path / "m.onnx"
    assert main(["-q", "export", "-m", str(tiny_model), "-o", str(out), "--calibrate", str(one)]) == 2
    err = capsys.readouterr().err
    assert "repeat a band with --bands (e.g. 1,1,1)" in err and "Traceback" not in err
    assert not out.exists()
    # the labels check detects on the scene with both models: with the same bands
    assert main(["-q", "export", "-m", str(tiny_model), "-o", str(out), "--calibrate", str(one),
                 "--calib-tiles", "4", "--bands", "1,1,1", "--check-labels", str(synth.labels)]) == 0
    said = capsys.readouterr().out
    assert "export check on 4 tiles of one_band.tif" in said and "torch_fp32: AP50" in said and "export: AP50" in said
    assert load_onnx(out).card.bands == load_model(tiny_model).card.bands  # the model's own, unchanged
    # bands of a check scene are checked before any work; without any scene --bands has nothing to read
    bad = tmp_path / "bad.onnx"
    assert main(["-q", "export", "-m", str(tiny_model), "-o", str(bad), "--check-scene", str(one),
                 "--check-labels", str(synth.labels)]) == 2
    assert "repeat a band with --bands" in capsys.readouterr().err and not bad.exists()
    assert main(["-q", "export", "-m", str(tiny_model), "-o", str(bad), "--bands", "1,1,1"]) == 2
    assert "none is given" in capsys.readouterr().err and not bad.exists()


# ---------------------------------------------------------------------------------------------
# checks that say what they checked: never on noise, never on the tiles int8 calibrated on


@pytest.fixture(scope="module")
def one_tile_scene(tmp_path_factory, tiny_model):
    """A scene of exactly one tile of the tiny model (128 px at its GSD)."""
    from geodet.synthetic import make_scene

    card = load_model(tiny_model).card
    d = tmp_path_factory.mktemp("one_tile")
    return make_scene(d / "one.tif", d / "one.gpkg", size=card.tile_size, gsd_m=card.gsd_m, seed=5).image


def test_export_without_scenes_checks_on_a_synthetic_scene_and_says_so(tmp_path, tiny_model, capsys):
    from geodet.cli import main

    out = tmp_path / "m.onnx"
    result = export_model(tiny_model, out)
    assert "synthetic scene" in result["check_tiles_from"] and result["tiles"] == 4
    assert "synthetic scene" in load_onnx(out).props["check_tiles_from"]
    # -m takes a training run's folder (its model.pt), as detect's does
    assert main(["-q", "export", "-m", os.path.dirname(tiny_model), "-o", str(tmp_path / "c.onnx")]) == 0
    said = capsys.readouterr().out
    assert "export check on 4 tiles of a synthetic scene" in said and "noise" not in said


def test_int8_on_a_scene_of_one_tile_is_refused_in_one_line(tmp_path, tiny_model, one_tile_scene):
    from geodet.pipeline.convert import MIN_INT8_TILES

    with pytest.raises(GeodetError) as err:
        export_model(tiny_model, tmp_path / "q.onnx", int8=True, calibrate=[one_tile_scene], min_agreement=0.0)
    msg = str(err.value)
    assert f"needs at least {MIN_INT8_TILES} tiles" in msg and "gave 1" in msg and "\n" not in msg
    assert not (tmp_path / "q.onnx").exists()
    # fp32 calibrates nothing: its one tile checks it
    assert export_model(tiny_model, tmp_path / "f.onnx", calibrate=[one_tile_scene])["tiles"] == 1


def test_calibration_and_check_tiles_never_share_a_tile(tiny_model, synth):
    from geodet.pipeline.convert import calibration_tiles
    from geodet.pipeline.settings import resolve_detect_settings

    model = load_model(tiny_model)
    s = resolve_detect_settings(model.card, device="cpu")
    calib, check, ref, _ = calibration_tiles(model, [synth.image], 32, s)
    assert calib and check and len(ref) == len(check)
    assert not any(np.array_equal(a, b) for a in calib for b in check)


def test_cli_int8_states_both_tile_counts(tmp_path, tiny_model, synth, capsys):
    from geodet.cli import main

    out = tmp_path / "q.onnx"
    assert main(["-q", "export", "-m", str(tiny_model), "-o", str(out), "--int8", "--calibrate", str(synth.image),
                 "--min-agreement", "0"]) == 0
    said = capsys.readouterr().out
    q = load_onnx(out).props["check"]
    n, c = q["int8"]["calibration_tiles"], q["tiles"]
    assert n + c <= 16 and c == q["int8"]["check_tiles"]  # the scene has 16 tiles: the sets cannot overlap
    assert f"calibrated on {n} tile(s), checked on {c} other tile(s) (not 32 each: the calibration scenes gave " \
           f"{n + c} tiles with valid pixels)" in said
    assert "half of them" not in said


def test_on_the_spot_int8_never_checks_on_its_calibration_tiles(monkeypatch, tmp_path, tiny_model, one_tile_scene):
    monkeypatch.setenv("GEODET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(choice, "cpu_features", lambda: {"bf16": False, "vnni": False, "isa": "AVX2"})
    model = load_model(tiny_model)
    # asked for: refused, in one line, saying what it needs
    with pytest.raises(GeodetError, match="gave no usable calibration tiles") as err:
        detect_scene(one_tile_scene, model, progress=False, precision="int8")
    assert "\n" not in str(err.value) and "needs at least" in str(err.value)  # and why
    # chosen by default (a large job, pretended): not made, and not held against the model
    monkeypatch.setattr(choice, "AUTO_INT8_MIN_TILES", 1)
    r = detect_scene(one_tile_scene, model, progress=False).attrs["report"]["backend"]
    assert (r["backend"], r["precision"]) == ("torch", "fp32") and "int8" not in r["checks"]
    assert not list((tmp_path / "cache").rglob("*.failed.json"))


def test_int8_asked_for_calibrates_on_the_first_scene_with_data_and_an_empty_scene_just_runs(
        monkeypatch, tmp_path, tiny_model, synth):
    """A job's int8 model made on the spot calibrates on the first of its scenes that holds data;
    a scene without a valid pixel gives 0 detections, as fp32 does, instead of a refusal."""
    from rasterio.transform import from_origin

    from geodet.pipeline.job import detect_to_file
    from helpers import write_raster

    monkeypatch.setenv("GEODET_CACHE", str(tmp_path / "cache"))
    model = load_model(tiny_model)
    empty = write_raster(tmp_path / "empty.tif", np.zeros((3, 300, 300), np.uint8), nodata=0,
                         transform=from_origin(300000, 5000000, model.card.gsd_m, model.card.gsd_m))
    frame = detect_scene(empty, model, progress=False, precision="int8")
    r = frame.attrs["report"]["backend"]
    assert len(frame) == 0 and (r["backend"], r["precision"]) == ("torch", "fp32")
    assert "no scene of the job holds a valid pixel" in r["reason"]
    assert not list((tmp_path / "cache").rglob("*.onnx"))  # nothing was calibrated on nothing
    # more empty scenes than the tries of calibration come first: the scene with data is still found
    empties = [empty] + [shutil.copy(empty, tmp_path / f"empty{i}.tif") for i in range(choice.INT8_SCENE_TRIES)]
    frame = detect_to_file([*empties, synth.image], tiny_model, tmp_path / "d.gpkg", progress=False,
                           precision="int8")
    r = frame.attrs["report"]["scenes"][0]["backend"]
    assert (r["backend"], r["precision"]) == ("onnx", "int8"), r
    assert f"made and checked on tiles of {Path(synth.image).name}" in r["reason"]
    assert len(frame) > 0 and set(frame["scene"]) == {Path(synth.image).name}


def test_an_int8_check_that_cannot_compare_is_not_held_against_the_model(monkeypatch, tmp_path, tiny_model, synth):
    """A scene without objects gives the int8 check nothing to compare: refused when asked for,
    but not remembered as the model's failure, so a later job on scenes with objects gets int8;
    a job that then runs the cached int8 model says which scene it was calibrated on."""
    from rasterio.transform import from_origin

    from helpers import write_raster

    monkeypatch.setenv("GEODET_CACHE", str(tmp_path / "cache"))
    model = load_model(tiny_model)
    grey = write_raster(tmp_path / "grey.tif", np.full((3, 600, 600), 120, np.uint8),
                        transform=from_origin(300000, 5000000, model.card.gsd_m, model.card.gsd_m))
    with pytest.raises(GeodetError, match="export check inconclusive.*give more tiles"):
        detect_scene(grey, model, progress=False, precision="int8")
    assert not list((tmp_path / "cache").rglob("*.failed.json"))
    key = choice.cache_key(model.source["sha256"], "int8", model.card)  # an earlier geodet's record of it: ignored
    (tmp_path / "cache" / "models").mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache" / "models" / f"{key}.failed.json").write_text(json.dumps(
        {"passed": False, "reason": "export check inconclusive: neither fp32 nor int8 finds an object"}))
    r = detect_scene(synth.image, model, progress=False, precision="int8").attrs["report"]["backend"]
    assert (r["backend"], r["precision"]) == ("onnx", "int8"), r
    r = detect_scene(grey, model, progress=False, precision="int8").attrs["report"]["backend"]
    assert "(cached: " in r["reason"] and r["reason"].endswith(f"calibrated on {synth.image.name})"), r


def test_tta_refuses_an_onnx_model_and_runs_from_the_config(fp32_onnx, tiny_model, synth, tmp_path):
    """Test-time augmentation needs the .pt model: an .onnx is refused in one sentence; asked for
    by a config file (detect.tta) it runs through the API as through ``--tta``, and the report
    names the model file behind the wrappers."""
    from geodet.config import load_config
    from geodet.errors import GeodetError
    from geodet.pipeline.job import detect_to_file

    with pytest.raises(GeodetError, match="give the model.pt"):
        detect_scene(synth.image, load_onnx(fp32_onnx[0]), progress=False, tta=True)
    cfg = load_config(None, {"detect.tta": True})
    frame = detect_to_file([synth.image], tiny_model, tmp_path / "d.gpkg", config=cfg, progress=False)
    report = frame.attrs["report"]
    assert report["model"]["tta"]["views"] == 8 and report["model"]["path"] == str(tiny_model)
    assert report["scenes"][0]["backend"]["backend"] == "torch" and len(frame) > 0


def _fp32_on_the_spot(monkeypatch):
    """Auto picks ONNX fp32 made on the spot for any job (no int8, no bf16)."""
    monkeypatch.setattr(choice, "AUTO_ONNX_MIN_TILES", 1)
    monkeypatch.setattr(choice, "AUTO_INT8_MIN_TILES", 10**9)
    monkeypatch.setattr(choice, "cpu_features", lambda: {"bf16": False, "vnni": False, "isa": "AVX2"})
    monkeypatch.setattr(choice, "_TEMP_CACHE", None)


@pytest.mark.parametrize("text", ["{garbage", "", "[1, 2]"])
def test_a_damaged_record_of_a_failed_check_is_ignored_and_replaced(monkeypatch, tmp_path, tiny_model, synth, text,
                                                                     caplog):
    monkeypatch.setenv("GEODET_CACHE", str(tmp_path / "cache"))
    _fp32_on_the_spot(monkeypatch)
    model = load_model(tiny_model)
    folder = tmp_path / "cache" / "models"
    folder.mkdir(parents=True)
    failed = folder / f"{choice.cache_key(model.source['sha256'], 'fp32', model.card)}.failed.json"
    failed.write_text(text)
    r = detect_scene(synth.image, model, progress=False).attrs["report"]["backend"]
    assert (r["backend"], r["precision"]) == ("onnx", "fp32")  # checked again, and it passes
    assert "ignoring a damaged record" in caplog.text
    # a check that fails again replaces the damaged record, whole (written aside, then renamed)
    from geodet.pipeline import convert

    for p in folder.glob("*.onnx"):
        p.unlink()
    failed.write_text(text)
    monkeypatch.setattr(convert, "build_onnx", lambda *a, **k: (_ for _ in ()).throw(GeodetError("made to fail")))
    replaced, real = [], os.replace
    monkeypatch.setattr(choice.os, "replace", lambda a, b: replaced.append(Path(b)) or real(a, b))
    r = detect_scene(synth.image, model, progress=False).attrs["report"]["backend"]
    assert (r["backend"], r["precision"]) == ("torch", "fp32")
    assert json.loads(failed.read_text()) == {"passed": False, "reason": "made to fail"} and replaced == [failed]
    assert sorted(p.name for p in folder.iterdir()) == [failed.name]  # no temporary file left


@pytest.mark.parametrize("cache", ["a_file", "/proc/geodet-nope"])
def test_an_unwritable_cache_makes_the_onnx_model_in_a_temporary_folder(monkeypatch, tmp_path, tiny_model, synth,
                                                                         cache, caplog):
    if cache == "a_file":
        cache = tmp_path / "a_file"
        cache.write_text("not a folder")
    monkeypatch.setenv("GEODET_CACHE", str(cache))
    _fp32_on_the_spot(monkeypatch)
    model = load_model(tiny_model)
    r = detect_scene(synth.image, model, progress=False).attrs["report"]["backend"]
    assert (r["backend"], r["precision"]) == ("onnx", "fp32") and "geodet-models-" in r["reason"]
    assert caplog.text.count("cannot be written") == 1 and "GEODET_CACHE" in caplog.text
    # asked for, the same; the model made in this run is reused, and the warning is not repeated
    r = detect_scene(synth.image, model, progress=False, backend="onnx").attrs["report"]["backend"]
    assert (r["backend"], r["precision"]) == ("onnx", "fp32") and r["reason"].count("cached: ") == 1
    assert caplog.text.count("cannot be written") == 1


def test_a_full_cache_disk_runs_the_torch_model_unless_onnx_was_asked_for(monkeypatch, tmp_path, tiny_model, synth,
                                                                         caplog):
    """The ONNX model is a speed-up the user did not ask for: a full disk under the cache costs it,
    not the job (said, with what to do); asked for (--backend onnx), it is one line."""
    import errno

    from geodet.pipeline import convert

    monkeypatch.setenv("GEODET_CACHE", str(tmp_path / "cache"))
    _fp32_on_the_spot(monkeypatch)
    monkeypatch.setattr(convert, "build_onnx",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    model = load_model(tiny_model)
    r = detect_scene(synth.image, model, progress=False).attrs["report"]["backend"]
    assert (r["backend"], r["precision"]) == ("torch", "fp32")
    assert "could not be written" in caplog.text and "the torch model runs instead" in caplog.text
    with pytest.raises(GeodetError, match="No space left on device.*free some space there, or set GEODET_CACHE"):
        detect_scene(synth.image, model, progress=False, backend="onnx")
