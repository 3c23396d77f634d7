"""geodet in a real QGIS (Debian's 3.22 here; ``.ci/run`` installs it): every output opens styled,
in its CRS and without a warning in QGIS's log; the Processing provider, installed by
``geodet qgis-plugin`` (which records the geodet to run), loads its outputs styled and named the
way Processing loads them (``processing.runAndLoadResults``), runs every algorithm headless
through qgis_process, checks parameters before the run, moves one progress bar once, reports
geodet's one-line errors, and after Cancel leaves no process and no temporary file and says what
is left. QGIS's own Python runs ``qgis_helper.py``; skipped where QGIS is not installed."""

import configparser
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from geodet.pipeline.job import detect_to_file

HELPER = Path(__file__).with_name("qgis_helper.py")
QGIS_PYTHON = "/usr/bin/python3"
ROOT = Path(__file__).resolve().parents[1]
# one process runs them all (one QGIS profile with the plugin enabled), first: see test_ray.py
pytestmark = pytest.mark.xdist_group("qgis")


def _qgis_env(tmp_path):
    # no GEODET_EXECUTABLE and no venv on PATH, as for a QGIS started from a desktop launcher: the
    # provider runs the geodet that `geodet qgis-plugin` recorded
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_RUNTIME_DIR": str(tmp_path / "xdg"),
           "QGIS_CUSTOM_CONFIG_PATH": str(tmp_path / "qgis_profile"), "GEODET_NO_PROGRESS": ""}
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "GEODET_EXECUTABLE"):  # QGIS's Python is Debian's
        env.pop(k, None)
    # QGIS's embedded Python finds its home from PATH's python3: keep the system's first
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    (tmp_path / "xdg").mkdir(mode=0o700, exist_ok=True)
    return env


@pytest.fixture(scope="module")
def qgis(tmp_path_factory):
    ok = Path(QGIS_PYTHON).exists() and subprocess.run([QGIS_PYTHON, "-c", "import qgis.core"],
                                                      capture_output=True).returncode == 0
    if not ok:
        pytest.skip("QGIS is not installed (apt-get install qgis python3-qgis; .ci/run does it)")
    return tmp_path_factory.mktemp("qgis")


def helper(tmp_path, *args, timeout=300):
    r = subprocess.run([QGIS_PYTHON, str(HELPER), *map(str, args)], capture_output=True, text=True,
                       env=_qgis_env(tmp_path), timeout=timeout)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("JSON:")), None)
    assert line, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(line[5:])


def two_classes(batch):
    b = torch.tensor([[10.0, 20.0, 30.0, 40.0], [50.0, 20.0, 70.0, 40.0]])
    return [{"boxes": b, "scores": torch.tensor([0.123456, 0.9]), "labels": torch.tensor([0, 1])} for _ in batch]


def test_every_output_opens_in_qgis_styled_in_its_crs_without_warnings(qgis, tmp_path):
    p = tmp_path / "s.tif"
    with rasterio.open(p, "w", driver="GTiff", width=200, height=100, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(431234.5, 5123456.25, 0.5, 0.5)) as dst:
        dst.write(np.full((3, 100, 200), 90, np.uint8))
    outs = {ext: tmp_path / f"d_{ext}.{ext}" for ext in ("gpkg", "geojson", "fgb", "shp", "csv")}
    for out in outs.values():
        detect_to_file([p], two_classes, out, tile_size=256, overlap=16, progress=False)
    seen = helper(tmp_path, "inspect", *outs.values())
    for ext, out in outs.items():
        entry = seen[str(out)]
        assert entry["messages"] == [], (ext, entry["messages"])  # no "Non-conformant", no rejected .csvt
        views = [entry["ogr"]] + ([entry["delimitedtext"]] if ext == "csv" else [])
        for v in views:
            assert v["valid"] and v["features"] == 2, (ext, v)
            assert v["crs"] == ("EPSG:4326" if ext == "geojson" else "EPSG:32633"), (ext, v)
            # geodet's style applied on load: outlines by class, the score as a label from 1:2500 inward
            assert v["renderer"] == "categorizedSymbol" and v["categories"] == 2 and v["attr"] == "label", (ext, v)
            assert v["labels"] and v["label_scale_visibility"], (ext, v)
            assert v["label_min_scale"] == 2500 and v["label_max_scale"] == 0, (ext, v)
    # both of QGIS's CSV readers see the types the .csvt gives
    dt = seen[str(outs["csv"])]["delimitedtext"]["fields"]
    assert dt["score"] == "double" and dt["tile_row"] == "integer" and dt["label"] == "text"
    ogr = seen[str(outs["csv"])]["ogr"]["fields"]
    assert ogr["score"] == "Real" and ogr["tile_row"] == "Integer"


GEODET = Path(sys.executable).with_name("geodet")


@pytest.fixture(scope="module")
def provider(qgis, tmp_path_factory):
    """geodet's plugin installed by ``geodet qgis-plugin`` and enabled in a QGIS profile of the test's."""
    base = tmp_path_factory.mktemp("prov")
    plugins = base / "qgis_profile" / "profiles" / "default" / "python" / "plugins"
    r = subprocess.run([str(GEODET), "qgis-plugin", "--plugins-dir", str(plugins)], capture_output=True, text=True)
    assert r.returncode == 0 and str(GEODET) in r.stdout, r.stdout + r.stderr
    exe = shutil.which("qgis_process.bin") or shutil.which("qgis_process")
    if exe is None:
        pytest.skip("qgis_process not found")
    r = subprocess.run([exe, "plugins", "enable", "geodet_qgis"], capture_output=True, text=True, env=_qgis_env(base),
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return base, exe


def plugins_dir(provider):
    return provider[0] / "qgis_profile" / "profiles" / "default" / "python" / "plugins"


def qgis_process(provider, *args):
    base, exe = provider
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=_qgis_env(base), timeout=600)


def processing(provider, *runs, timeout=300):
    """Algorithms run in QGIS's Python the way Processing runs them (see qgis_helper.run)."""
    return helper(provider[0], "run", plugins_dir(provider), json.dumps({"runs": list(runs)}), timeout=timeout)["runs"]


def test_metadata_is_complete_for_the_plugin_repository():
    import geodet

    meta = configparser.ConfigParser()
    meta.read(ROOT / "geodet" / "qgis" / "geodet_qgis" / "metadata.txt", encoding="utf-8")
    g = meta["general"]
    for key in ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email", "repository",
                "tracker", "homepage", "icon", "changelog"):
        assert g.get(key, "").strip(), key
    assert g["version"] == geodet.__version__ and g["category"] == "Raster" and g["hasProcessingProvider"] == "yes"
    assert g["tracker"].startswith("https://") and g["repository"].startswith("https://")
    assert len(g["changelog"].strip().splitlines()) >= 3
    # QGIS 4 (Qt6) removed the enum names this plugin uses (QgsProcessingParameterNumber.Double, ...)
    assert g.get("supportsQt6", "False").lower() in ("false", "no")


def test_a_reinstall_replaces_the_plugin_whole(tmp_path):
    """`geodet qgis-plugin` over an earlier install leaves none of its files (a module the new
    version dropped would still be imported by QGIS), its record included, and no staging folder."""
    from geodet.qgis import PLUGIN, RECORD, install_plugin, plugin_files

    folder = install_plugin(tmp_path, executable="/opt/old/geodet")
    assert (folder / RECORD).is_file()
    (folder / "alg_dropped.py").write_text("raise ImportError('an old module')\n")
    install_plugin(tmp_path)  # no executable: no record
    expected = {name for name, _ in plugin_files(None)}
    assert {p.name for p in folder.iterdir()} == expected and RECORD not in expected
    assert [p.name for p in tmp_path.iterdir()] == [PLUGIN]
    if os.name == "posix":
        assert oct(folder.stat().st_mode & 0o777) == oct(0o755)


def test_provider_says_which_geodet_it_runs_and_records_it_in_its_setting(provider, tmp_path):
    import geodet

    seen = helper(provider[0], "loaded", plugins_dir(provider))
    assert seen["setting"] == str(GEODET)  # seeded from `geodet qgis-plugin`'s record
    infos = [m for tag, level, m in seen["log"] if level == 0]
    assert any(str(GEODET) in m and f"geodet {geodet.__version__}" in m for m in infos), seen["log"]
    assert {g for g, _ in seen["groups"]} == {"Detect", "Train", "Evaluate", "Prepare"}
    assert sorted(alg for _, alg in seen["groups"]) == sorted(
        f"geodet:{c}"
        for c in ("detect", "export", "import", "evaluate", "anchors", "suggest", "tile", "train", "train-again", "pretrain")
    )
    # a plugin without a record, and no geodet anywhere: a warning that says how to set one
    from geodet.qgis import install_plugin

    bare = tmp_path / "bare"
    install_plugin(bare)
    seen = helper(tmp_path, "loaded", bare)
    assert seen["setting"] in (None, "") and seen["log"][0][1] == 1, seen["log"]  # Qgis.Warning
    assert "geodet command was not found" in seen["log"][0][2] and "geodet qgis-plugin" in seen["log"][0][2]


def test_a_reinstall_from_another_environment_moves_the_setting_and_a_chosen_path_stays(qgis, tmp_path):
    """The setting follows `geodet qgis-plugin` from environment A to B (the setting A was put there
    by the provider); a path the user chose in the options survives the next reinstall."""
    from geodet.qgis import install_plugin

    exes = {}
    for name in ("a", "b", "c", "d"):
        exe = exes[name] = tmp_path / name / "geodet"
        exe.parent.mkdir()
        exe.write_text("#!/bin/sh\necho geodet 0.0.1\n")
        exe.chmod(0o755)
    plugins = tmp_path / "plugins"
    install_plugin(plugins, executable=str(exes["a"]))
    assert helper(tmp_path, "loaded", plugins)["setting"] == str(exes["a"])
    install_plugin(plugins, executable=str(exes["b"]))
    seen = helper(tmp_path, "loaded", plugins, exes["c"])  # then the user chooses C in the options
    assert seen["at_load"] == str(exes["b"]) and seen["setting"] == str(exes["c"]), seen
    install_plugin(plugins, executable=str(exes["d"]))
    assert helper(tmp_path, "loaded", plugins)["setting"] == str(exes["c"])


def test_provider_detects_headless_with_the_cli_rows_styled(provider, tiny_model, synth, tmp_path):
    import geopandas as gpd

    out = tmp_path / "q.gpkg"
    r = qgis_process(provider, "run", "geodet:detect", "--", f"INPUT={synth.image}", f"MODEL={tiny_model}",
                     "SCORE_THRESHOLD=", f"OUTPUT={out}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    command = next(ln for ln in r.stdout.splitlines() if "--progress json detect" in ln)
    assert "--score-threshold" not in command  # an empty optional number is left out, not 0.0
    ref = detect_to_file([synth.image], str(tiny_model), tmp_path / "cli.gpkg", progress=False)
    got = gpd.read_file(out, layer="q")
    key = ["px_x0", "px_y0", "px_x1", "px_y1", "score", "label"]
    assert len(got) == len(ref) > 0
    assert np.allclose(got.sort_values(key)[key[:5]].to_numpy(), ref.sort_values(key)[key[:5]].to_numpy(), atol=1e-4)
    # styled as the quicklook draws: one rule per class, boxes at or above the model's operating point
    from geodet.model import load_model

    op = load_model(tiny_model).card.operating_point
    seen = helper(tmp_path, "inspect", out)[str(out)]
    assert seen["ogr"]["renderer"] == "RuleRenderer" and seen["messages"] == []
    assert len(seen["ogr"]["rules"]) == 2 and all(f'"score" >= {op:.4g}' in f for f in seen["ogr"]["rules"])
    assert seen["ogr"]["drawn"] == int((got["score"] >= float(f"{op:.4g}")).sum())
    # QGIS draws it as styled
    png = tmp_path / "qgis.png"
    rendered = helper(tmp_path, "render", synth.image, out, png)
    assert rendered["saved"] and rendered["renderer"] == "RuleRenderer" and png.stat().st_size > 10_000


def test_outputs_load_styled_and_named_the_way_processing_loads_them(provider, tiny_model, synth, tmp_path):
    """processing.runAndLoadResults opens outputs without their default style: the provider's
    post-processor applies geodet's and names each layer after its file, also where the algorithm
    runs inside a Graphical Modeler model; one bar, 0 to 100."""
    runs = processing(
        provider,
        {"alg": "geodet:detect", "params": {"INPUT": str(synth.image), "MODEL": str(tiny_model),
                                            "OUTPUT": str(tmp_path / "cars_a.gpkg")}, "load": True},
        {"alg": "geodet:detect", "params": {"INPUT": str(synth.image), "MODEL": str(tiny_model),
                                            "OUTPUT": str(tmp_path / "cars_b.geojson")}, "load": True},
        {"alg": "geodet:suggest", "params": {"INPUT": str(synth.image), "MODEL": str(tiny_model), "COUNT": 2,
                                             "CELL_SIZE": 128, "BANDS": "3,2,1", "OUTPUT": str(tmp_path / "next.gpkg")},
         "load": True},
        {"alg": "geodet:detect", "params": {"INPUT": str(synth.image), "MODEL": str(tiny_model),
                                            "OUTPUT": str(tmp_path / "in_a_model.gpkg")}, "load": True, "model": True},
        {"alg": "geodet:detect", "params": {"INPUT": str(synth.image), "MODEL": str(tiny_model),
                                            "OUTPUT": "TEMPORARY_OUTPUT"}, "load": True})
    # a temporary output is named as Processing names every algorithm's (the output's description)
    for run, name in zip(runs, ("cars_a", "cars_b", "next", "in_a_model", "Detections")):
        assert run["error"] is None, run
        (layer,) = run["layers"]
        assert layer["name"] == name and layer["valid"], layer
        assert layer["labels"], layer  # geodet's style: labels (score, or the rank)
        assert run["messages"] == [] and run["warnings"] == [], (run["messages"], run["warnings"])
        assert run["alive"] == []
        bar = run["progress"]
        assert bar == sorted(bar) and bar[-1] == 100.0, bar  # once from 0 to 100, never back
        assert len(run["texts"]) == len(set(run["texts"])), run["texts"]  # each stage named once
    for run in runs[:2] + runs[3:]:  # detections
        layer = run["layers"][0]
        assert layer["renderer"] == "RuleRenderer" and len(layer["rules"]) == 2 and layer["label_min_scale"] == 2500
    assert '"rank"' in runs[2]["layers"][0]["label_field"]  # suggestions: the rank as a label
    assert any("--bands 3,2,1" in c for c in runs[2]["commands"]), runs[2]["commands"]


def test_cancel_leaves_no_process_and_no_temporary_file(provider, tiny_model, tmp_path):
    from geodet.synthetic import make_scene

    big = make_scene(tmp_path / "big.tif", tmp_path / "big.gpkg", size=1536, seed=9)
    outdir = tmp_path / "out"
    outdir.mkdir()
    (run,) = processing(provider, {"alg": "geodet:detect", "cancel_at": 1, "load": True,
                                   "params": {"INPUT": str(big.image), "MODEL": str(tiny_model),
                                              "OUTPUT": str(outdir / "c.gpkg")}})
    assert run["canceled"] and run["pid"] and run["alive"] == [], run
    assert "cancelled" in run["error"] and "c.gpkg was not written" in run["error"], run["error"]
    assert sorted(os.listdir(outdir)) == [] and run["layers"] == []
    assert run["warnings"] == [], run["warnings"]


def test_train_cancel_keeps_its_checkpoint_and_resume_continues(provider, synth, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("tiling: {tile_size: 128, overlap: 16}\nmodel: {channels: 16, head_depth: 1, levels: [2, 4], "
                   "anchor_sizes: [8.0, 16.0, 32.0]}\ntrain: {batch_size: 2, warmup_steps: 2, steps_per_epoch: 4}\n")
    folder = tmp_path / "run"
    params = {"SCENE": str(synth.image), "LABELS": str(synth.labels), "CONFIG": str(cfg), "TIME_LIMIT": 0.2,
              "VAL_SCENE": str(synth.image), "VAL_LABELS": str(synth.labels), "BANDS": "1,2,3",
              "OUTPUT_FOLDER": str(folder)}
    stopped, resumed = processing(provider, {"alg": "geodet:train", "params": params, "cancel_at": 3},
                                  {"alg": "geodet:train", "params": {**params, "RESUME": True}})
    assert stopped["canceled"] and stopped["alive"] == [], stopped
    assert f"the checkpoint {folder / 'last.pt'}" in stopped["error"] and "Resume" in stopped["error"], stopped["error"]
    assert any("--val-scene" in c and "--val-labels" in c and "--bands 1,2,3" in c for c in stopped["commands"]), \
        stopped["commands"]
    assert resumed["error"] is None, resumed
    assert any("--resume" in c for c in resumed["commands"]) and any("resuming at step" in i for i in resumed["infos"])
    assert resumed["results"]["MODEL"] == str(folder / "model.pt") and (folder / "model.pt").exists()


def test_parameters_are_checked_before_the_run(provider, tiny_model, synth, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    empty = tmp_path / "empty"
    empty.mkdir()
    base = {"INPUT": str(synth.image), "MODEL": str(tiny_model)}
    again = {"SCENE": str(synth.image), "LABELS": str(synth.labels), "CELLS": str(synth.labels),
             "INIT": str(tiny_model), "LABELLED_AREA": str(tmp_path / "area.gpkg"), "OUTPUT_FOLDER": str(empty)}
    cases = [
        ("geodet:suggest", {**base, "OUTPUT": str(tmp_path / "n.csv")}, "geodet writes .gpkg, .geojson, .fgb, .shp"),
        ("geodet:detect", {**base, "MODEL": str(tmp_path / "notes.txt"), "OUTPUT": str(tmp_path / "d.gpkg")},
         "is not a .pt or .onnx file"),
        ("geodet:detect", {**base, "BANDS": "1;2", "OUTPUT": str(tmp_path / "d.gpkg")}, "bands must be numbers"),
        ("geodet:suggest", {**base, "BANDS": "red", "OUTPUT": str(tmp_path / "n.gpkg")}, "bands must be numbers"),
        ("geodet:train", {"SCENE": str(synth.image), "LABELS": str(synth.labels), "BANDS": "1 2",
                          "OUTPUT_FOLDER": str(empty)}, "bands must be numbers"),
        ("geodet:detect", {**base, "MODEL": str(tmp_path / "m.onnx"), "ADAPT": True, "OUTPUT": str(tmp_path / "d.gpkg")},
         "Adapting to the scene needs a .pt model"),
        ("geodet:train", {"SCENE": str(synth.image), "LABELS": str(synth.labels), "RESUME": True,
                          "OUTPUT_FOLDER": str(empty)}, "has none: choose the folder of the run to continue"),
        ("geodet:train", {"SCENE": str(synth.image), "LABELS": str(synth.labels), "VAL_SCENE": str(synth.image),
                          "OUTPUT_FOLDER": str(empty)}, "validation scene and its labels together"),
        ("geodet:export", {"MODEL": str(tiny_model), "INT8": True, "OUTPUT": str(tmp_path / "m.onnx")},
         "int8 needs calibration scenes"),
        ("geodet:import", {"SOURCE": "hf://only-a-name", "OUTPUT": str(tmp_path / "i.pt")}, "reads hf://ORG/NAME"),
        ("geodet:tile", {"INPUT": str(synth.image), "TILE_SIZE": 64, "OVERLAP": 64,
                         "OUTPUT_FOLDER": str(tmp_path / "chips")}, "must be smaller than the chip side"),
        # QGIS's own checks too, with a labelled area that the first round makes
        ("geodet:train-again", {**again, "TIME_LIMIT": -3}, "Incorrect parameter value for TIME_LIMIT"),
        ("geodet:train-again", {**again, "DEVICE": 7}, "Incorrect parameter value for DEVICE"),
        ("geodet:train-again", {**again, "LABELLED_AREA": str(tmp_path / "area.txt")}, "not area.txt"),
    ]
    runs = processing(provider, *[{"alg": a, "params": p} for a, p, _ in cases])
    for (alg, _, expected), run in zip(cases, runs):
        assert run["error"] and expected in run["error"], (alg, run["error"])
        assert run["pid"] is None and run["commands"] == [], alg  # geodet never started
    assert not (tmp_path / "n.csv").exists() and sorted(os.listdir(empty)) == []
    assert not (tmp_path / "area.gpkg").exists()


XYZ = "type=xyz&url=http://127.0.0.1:9/%7Bz%7D/%7Bx%7D/%7By%7D.png&zmax=19&zmin=0"  # made without the network


def test_layers_go_to_geodet_as_qgis_holds_them(provider, synth, tiny_model, tmp_path):
    """A CRS set on a layer in QGIS (a shapefile without .prj, a raster without one) reaches geodet
    in the file QGIS gives it; a layer that is no file (XYZ tiles) is refused before geodet starts,
    alone or in a list; a .yml config is taken as a .yaml one."""
    import geopandas as gpd

    labels = tmp_path / "noprj.shp"
    gpd.read_file(synth.labels).to_file(labels)
    labels.with_suffix(".prj").unlink()
    bare = tmp_path / "nocrs.tif"
    with rasterio.open(synth.image) as src, rasterio.open(bare, "w", **{**src.profile, "crs": None}) as dst:
        dst.write(src.read())
    cfg = tmp_path / "tiny.yml"
    cfg.write_text("tiling: {tile_size: 128, overlap: 16}\n")
    model = tmp_path / "m.pt"
    model.write_bytes(b"never read")
    xyz = {"xyz": {"uri": XYZ, "provider": "wms", "raster": True}}
    runs = processing(
        provider,
        {"alg": "geodet:anchors", "params": {"SCENE": str(synth.image), "LABELS": "@lab", "CONFIG": str(cfg)},
         "layers": {"lab": {"uri": str(labels), "crs": synth.crs}}},
        {"alg": "geodet:anchors", "params": {"SCENE": "@sc", "LABELS": str(synth.labels)},
         "layers": {"sc": {"uri": str(bare), "crs": synth.crs, "raster": True}}},
        {"alg": "geodet:detect", "params": {"INPUT": "@xyz", "MODEL": str(model), "OUTPUT": str(tmp_path / "d.gpkg")},
         "layers": xyz},
        {"alg": "geodet:pretrain", "params": {"INPUT": ["@xyz"], "OUTPUT": str(tmp_path / "bb.pt")}, "layers": xyz},
        # detections of the raster given its CRS in QGIS, loaded as Processing loads them: on the map where it is
        {"alg": "geodet:detect", "params": {"INPUT": "@sc", "MODEL": str(tiny_model), "OUTPUT": str(tmp_path / "v.gpkg")},
         "layers": {"sc": {"uri": str(bare), "crs": synth.crs, "raster": True}}, "load": True})
    n = len(gpd.read_file(synth.labels))
    shown = runs.pop()
    assert shown["error"] is None and len(shown["layers"]) == 1, shown
    layer = shown["layers"][0]
    assert layer["valid"] and layer["crs"] == synth.crs and layer["features"] > 0, layer
    with rasterio.open(synth.image) as src:
        b = src.bounds
    found = gpd.read_file(tmp_path / "v.gpkg")
    x0, y0, x1, y1 = found.total_bounds
    assert b.left <= x0 and b.bottom <= y0 and x1 <= b.right and y1 <= b.top  # the scene's place, not pixel numbers
    assert set(found["scene"]) == {"nocrs.tif"}  # named as the user's file, not the VRT that gave it the CRS
    for run, name in zip(runs[:2], ("lab", "sc")):
        assert run["error"] is None, run
        # the files have none: QGIS may have assigned it by its own setting, so it is a warning to check it
        assert any(f"the CRS set on {name} in QGIS ({synth.crs}) is used" in i and "if QGIS assigned it" in i
                   for i in run["infos"]), [i for i in run["infos"] if "CRS" in i]
        assert f"{n} boxes" in run["results"]["REPORT"], run["results"]
    assert str(bare) not in runs[1]["commands"][0] and "nocrs.tif" in runs[1]["commands"][0]  # a VRT of that name
    for run in runs[2:]:
        assert run["error"] and "geodet reads raster files: save it as a GeoTIFF first" in run["error"], run
        assert run["commands"] == [], run["commands"]


def _torchvision_state_dict(path):
    from torchvision.models import resnet18
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    torch.manual_seed(0)
    backbone = _resnet_fpn_extractor(resnet18(), 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    torch.save(RetinaNet(backbone, 2).state_dict(), path)
    return path


def test_every_algorithm_runs_headless(provider, tiny_model, synth, tmp_path):
    """Every algorithm not run by the tests above, as Processing runs it headless, in one QGIS
    process (qgis_process itself runs detect above and reports an error below)."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("tiling: {tile_size: 128, overlap: 16}\nmodel: {channels: 16, head_depth: 1, levels: [2, 4], "
                   "anchor_sizes: [8.0, 16.0, 32.0]}\ntrain: {batch_size: 2, warmup_steps: 2}\n")
    det = tmp_path / "d.gpkg"
    detect_to_file([synth.image], str(tiny_model), det, progress=False)
    runs = {
        "tile": {"INPUT": str(synth.image), "TILE_SIZE": 128, "OVERLAP": 16, "LABELS": str(synth.labels),
                 "CLASS_COLUMN": "", "OUTPUT_FOLDER": str(tmp_path / "chips")},
        "anchors": {"SCENE": str(synth.image), "LABELS": str(synth.labels), "CONFIG": str(cfg),
                    "OUTPUT": str(tmp_path / "a.yaml")},
        "evaluate": {"DETECTIONS": str(det), "LABELS": str(synth.labels), "SCENE": str(synth.image),
                     "OUTPUT": str(tmp_path / "m.json")},
        "export": {"MODEL": str(tiny_model), "OUTPUT": str(tmp_path / "m.onnx")},
        "import": {"SOURCE": str(_torchvision_state_dict(tmp_path / "tv.pt")), "GSD": 0.3, "TILE_SIZE": 256,
                   "CLASSES": "car,truck", "OUTPUT": str(tmp_path / "imported.pt")},
        "pretrain": {"INPUT": [str(synth.image)], "CONFIG": str(cfg), "TIME_LIMIT": 1, "MAX_STEPS": 2, "BANDS": "",
                     "OUTPUT": str(tmp_path / "bb.pt")},
        "detect": {"INPUT": str(synth.image), "MODEL": str(tiny_model), "ADAPT": True,
                   "OUTPUT": str(tmp_path / "adapted.gpkg")},
    }
    done = processing(provider, *[{"alg": f"geodet:{alg}", "params": p} for alg, p in runs.items()], timeout=900)
    for alg, run in zip(runs, done):
        assert run["error"] is None and run["errors"] == [], (alg, run["error"], run["errors"])
        assert run["commands"] and run["warnings"] == [], (alg, run["warnings"])
        assert not any("Traceback" in line for line in run["infos"] + run["debug"]), alg
    coco = json.loads((tmp_path / "chips" / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["object"]  # CLASS_COLUMN empty: one class
    assert "anchor_sizes" in (tmp_path / "a.yaml").read_text()
    assert json.loads((tmp_path / "m.json").read_text())["n_labels"] > 0
    for f in ("m.onnx", "imported.pt", "bb.pt"):
        assert (tmp_path / f).stat().st_size > 1000, f
    report = json.loads((tmp_path / "adapted.gpkg.report.json").read_text())
    assert report["model"]["adapted_to"]["method"] == "AdaBN" and report["detections"] > 0


def test_provider_reports_geodets_one_line_error(provider, synth, tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(os.urandom(3000))
    r = qgis_process(provider, "run", "geodet:detect", "--", f"INPUT={synth.image}", f"MODEL={bad}",
                     f"OUTPUT={tmp_path / 'x.gpkg'}")
    assert r.returncode != 0
    assert "geodet: error:" in r.stdout + r.stderr and "not a" in r.stdout + r.stderr
    assert not (tmp_path / "x.gpkg").exists()


def test_train_again_puts_the_labelled_area_back_when_training_fails(provider, synth, tmp_path):
    """`suggest --done` extends the labelled area, then the training fails (a broken model): the
    area is as it was before, byte for byte (a shapefile with its sidecars), or absent where it was."""
    import geopandas as gpd
    from shapely.geometry import box

    x0, y0, x1, y1 = gpd.read_file(synth.labels).total_bounds
    cells = tmp_path / "next.gpkg"
    gpd.GeoDataFrame({"done": [1]}, geometry=[box(x0, y0, (x0 + x1) / 2, (y0 + y1) / 2)], crs=synth.crs).to_file(cells)
    old = tmp_path / "old"
    old.mkdir()
    area = gpd.GeoDataFrame({"source": ["me"]}, geometry=[box(x1 - 5, y1 - 5, x1, y1)], crs=synth.crs)
    area.to_file(old / "area.shp")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    assert {"area.shp", "area.dbf", "area.prj"} <= set(before)
    bad = tmp_path / "broken.pt"
    bad.write_bytes(os.urandom(3000))
    cfg = tmp_path / "short.yml"
    cfg.write_text("train: {batch_size: 2}\n")
    params = {"SCENE": str(synth.image), "LABELS": str(synth.labels), "CELLS": str(cells), "INIT": str(bad),
              "CONFIG": str(cfg), "TIME_LIMIT": 0.2, "OUTPUT_FOLDER": str(tmp_path / "run")}
    first, later = processing(
        provider, {"alg": "geodet:train-again", "params": {**params, "LABELLED_AREA": str(tmp_path / "area.gpkg")}},
        {"alg": "geodet:train-again", "params": {**params, "LABELLED_AREA": str(old / "area.shp")}})
    for run in (first, later):
        assert run["error"] and run["error"].startswith("geodet: error:") and "\n" not in run["error"], run["error"]
        assert any("suggest --done" in c for c in run["commands"]), run["commands"]  # the area was extended first
        assert any(" train " in c for c in run["commands"]), run["commands"]
    assert "area.gpkg, made by the run, was removed" in first["error"] and not (tmp_path / "area.gpkg").exists()
    assert "area.shp is as it was before the run" in later["error"]
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before


def test_the_labelling_loop_runs_from_the_toolbox(provider, tiny_model, synth, tmp_path):
    """Suggest, label (the 'done' field ticked), train again on the labelled cells, detect: each a
    toolbox algorithm run as Processing runs it; the labelled-area file is made and extended."""
    import geopandas as gpd

    (suggest,) = processing(provider, {"alg": "geodet:suggest", "params": {
        "INPUT": str(synth.image), "MODEL": str(tiny_model), "COUNT": 2, "CELL_SIZE": 128, "STRATEGY": 1,
        "OUTPUT": str(tmp_path / "next.gpkg")}, "load": True})
    assert suggest["error"] is None, suggest
    cells = gpd.read_file(tmp_path / "next.gpkg", layer="next")
    assert list(cells["done"]) == [0, 0]
    cells.loc[0, "done"] = 1  # the user labelled the first cell (the labels file holds every object)
    cells.to_file(tmp_path / "next.gpkg", layer="next")
    area = tmp_path / "area.gpkg"
    cfg = tmp_path / "short.yaml"
    cfg.write_text("train: {batch_size: 2, warmup_steps: 2}\n")  # the card keeps the architecture
    again, detect = processing(
        provider,
        {"alg": "geodet:train-again", "params": {
            "SCENE": str(synth.image), "LABELS": str(synth.labels), "CELLS": str(tmp_path / "next.gpkg"),
            "LABELLED_AREA": str(area), "INIT": str(tiny_model), "CONFIG": str(cfg), "TIME_LIMIT": 0.2,
            "OUTPUT_FOLDER": str(tmp_path / "round1")}},
        {"alg": "geodet:detect", "params": {"INPUT": str(synth.image), "MODEL": str(tmp_path / "round1" / "model.pt"),
                                            "OUTPUT": str(tmp_path / "round1.gpkg")}, "load": True})
    assert again["error"] is None, again
    got = gpd.read_file(area)
    assert len(got) == 1 and got.geometry.iloc[0].equals_exact(cells.geometry.iloc[0], 1e-6)
    assert (tmp_path / "round1" / "model.pt").exists()
    bar = again["progress"]
    assert bar == sorted(bar) and bar[-1] == 100.0, bar  # one bar for both steps, never back
    assert detect["error"] is None and detect["layers"][0]["valid"], detect


def test_a_recorded_geodet_that_is_gone_is_named(qgis, tmp_path):
    """The geodet that installed the plugin was removed (its virtual environment deleted) and none
    is on PATH: the message names the path that is gone, not only "not found"."""
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT / 'geodet' / 'qgis')!r})
        from geodet_qgis import runner
        runner.RECORD = __import__("pathlib").Path({str(tmp_path / 'geodet.json')!r})
        runner.RECORD.write_text(json.dumps({{"executable": "/gone/venv/bin/geodet", "version": "0"}}))
        runner.configured_executable = lambda: None
        try:
            runner.find_executable()
        except Exception as exc:
            print("ERR:" + str(exc))
    """)
    env = {**_qgis_env(tmp_path), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    r = subprocess.run([QGIS_PYTHON, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    err = next((ln for ln in r.stdout.splitlines() if ln.startswith("ERR:")), "")
    assert "/gone/venv/bin/geodet, is no longer there" in err, r.stdout + r.stderr
