"""Run from outside the source tree with geodet installed from its wheel (not editable): the
presets load, `geodet demo --help` works, and a tiny `geodet detect` writes a georeferenced file."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import geodet
from geodet.config import load_config, preset_names
from geodet.model import build_model, save_model
from geodet.synthetic import make_scene

src_root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else None
here = Path(geodet.__file__).resolve()
assert src_root is None or src_root not in here.parents, f"geodet imported from the source tree: {here}"
assert {"cpu", "small_objects", "trees", "default"} <= set(preset_names()), preset_names()
cfg = load_config("cpu")
subprocess.run(["geodet", "demo", "--help"], check=True, stdout=subprocess.DEVNULL)
with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    s = make_scene(d / "s.tif", d / "s.gpkg", size=256, seed=1)
    cfg.model.classes = ["car", "truck"]
    model = build_model(cfg.model, tile_size=128, overlap=16)
    save_model(model, d / "m.pt")
    subprocess.run(["geodet", "detect", "-q", str(s.image), "--model", str(d / "m.pt"), "-o", str(d / "out.gpkg"),
                    "--score-threshold", "0.0"], check=True)
    import pyogrio

    info = pyogrio.read_info(d / "out.gpkg", layer="out")
    assert info["crs"] and info["features"] >= 0, info
    # what the wheel carries besides code: the sample scenes and the QGIS plugin
    subprocess.run(["geodet", "data", "trees", "-o", str(d / "sample")], check=True, stdout=subprocess.DEVNULL)
    assert (d / "sample" / "osbs_029.tif").stat().st_size > 100_000 and (d / "sample" / "soap_061.geojson").exists()
    subprocess.run(["geodet", "qgis-plugin", "-o", str(d / "plugin.zip")], check=True, stdout=subprocess.DEVNULL)
    import zipfile

    names = zipfile.ZipFile(d / "plugin.zip").namelist()
    assert {"geodet_qgis/metadata.txt", "geodet_qgis/provider.py", "geodet_qgis/icon.svg"} <= set(names), names
    print(f"wheel check: geodet {geodet.__version__} from {here.parent}; presets {preset_names()}; "
          f"detect wrote {info['features']} features in {info['crs']}")
os._exit(0)
