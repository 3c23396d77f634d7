"""geodet in a real QGIS (Debian's 3.22 here; ``.ci/run`` installs it): every output opens styled,
in its CRS and without a warning in QGIS's log; the Processing provider runs headless through
qgis_process with the CLI's rows, reports geodet's one-line errors, and leaves nothing on Cancel.
QGIS's own Python runs ``qgis_helper.py``; skipped where QGIS is not installed."""

import json
import os
import shutil
import subprocess
import sys
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


def _qgis_env(tmp_path):
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_RUNTIME_DIR": str(tmp_path / "xdg"),
           "QGIS_CUSTOM_CONFIG_PATH": str(tmp_path / "qgis_profile"),
           "GEODET_EXECUTABLE": str(Path(sys.executable).with_name("geodet")), "GEODET_NO_PROGRESS": ""}
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):  # QGIS's Python is Debian's, not this venv's
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


def helper(tmp_path, *args):
    r = subprocess.run([QGIS_PYTHON, str(HELPER), *map(str, args)], capture_output=True, text=True,
                       env=_qgis_env(tmp_path), timeout=300)
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


@pytest.fixture(scope="module")
def provider(qgis, tmp_path_factory):
    """geodet's plugin installed (``geodet qgis-plugin``) and enabled in a QGIS profile of the test's."""
    from geodet.qgis import install_plugin

    base = tmp_path_factory.mktemp("prov")
    install_plugin(base / "qgis_profile" / "profiles" / "default" / "python" / "plugins")
    exe = shutil.which("qgis_process.bin") or shutil.which("qgis_process")
    if exe is None:
        pytest.skip("qgis_process not found")
    r = subprocess.run([exe, "plugins", "enable", "geodet_qgis"], capture_output=True, text=True, env=_qgis_env(base),
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return base, exe


def qgis_process(provider, *args):
    base, exe = provider
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=_qgis_env(base), timeout=600)


def test_provider_detects_headless_with_the_cli_rows_styled(provider, tiny_model, synth, tmp_path):
    import geopandas as gpd

    out = tmp_path / "q.gpkg"
    r = qgis_process(provider, "run", "geodet:detect", "--", f"INPUT={synth.image}", f"MODEL={tiny_model}", f"OUTPUT={out}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
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
    # the picture of the README's "Use it from QGIS" section comes from this render
    png = Path(os.environ.get("GEODET_QGIS_SCREENSHOT", tmp_path / "qgis.png"))
    rendered = helper(tmp_path, "render", synth.image, out, png)
    assert rendered["saved"] and rendered["renderer"] == "RuleRenderer" and png.stat().st_size > 10_000


def test_provider_reports_geodets_one_line_error(provider, synth, tmp_path):
    r = qgis_process(provider, "run", "geodet:detect", "--", f"INPUT={synth.image}", f"MODEL={tmp_path / 'none.pt'}",
                     f"OUTPUT={tmp_path / 'x.gpkg'}")
    assert r.returncode != 0
    assert "geodet: error: model file not found" in r.stdout + r.stderr
    assert not (tmp_path / "x.gpkg").exists()


def test_provider_cancel_stops_geodet_and_leaves_nothing(provider, tiny_model, tmp_path):
    from geodet.synthetic import make_scene

    big = make_scene(tmp_path / "big.tif", tmp_path / "big.gpkg", size=1536, seed=9)
    base, _ = provider
    plugins = base / "qgis_profile" / "profiles" / "default" / "python" / "plugins"
    outdir = tmp_path / "out"
    outdir.mkdir()
    res = helper(base, "cancel", plugins, big.image, tiny_model, outdir / "c.gpkg")
    assert res["canceled"] and not res["exists"] and res["left"] == []
    assert any("cancelled" in m for m in res["messages"]) or "cancelled" in (res["error"] or "")


def test_provider_suggests_tiles_headless(provider, tiny_model, synth, tmp_path):
    import geopandas as gpd

    out = tmp_path / "next.gpkg"
    r = qgis_process(provider, "run", "geodet:suggest", "--", f"INPUT={synth.image}", f"MODEL={tiny_model}", "N=3",
                     "CELL_SIZE=128", f"OUTPUT={out}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    got = gpd.read_file(out, layer="next")
    assert list(got["rank"]) == [1, 2, 3] and got["reason"].str.contains("operating point").all()
