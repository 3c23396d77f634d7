"""The package as a user's process sees it: importing changes nothing, presets ship inside it."""

import json
import subprocess
import sys


def test_import_changes_nothing_in_the_process():
    code = """
import json, os, sys, warnings
# the libraries geodet builds on first: what their own imports do is not geodet's doing
import matplotlib, numpy, torch, torchvision, rasterio, geopandas, shapely, pyogrio, yaml, tqdm
env = dict(os.environ)
backend = matplotlib.get_backend()
filters = list(warnings.filters)
threshold = None
import geodet, geodet.io.quicklook, geodet.evaluation, geodet.io.scene
import rasterio
from rasterio._env import get_gdal_config
print(json.dumps({"env_same": dict(os.environ) == env, "new_env": sorted(set(os.environ) - set(env)),
                  "backend_same": matplotlib.get_backend() == backend,
                  "filters_same": list(warnings.filters) == filters,
                  "gdal_cachemax": get_gdal_config("GDAL_CACHEMAX")}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert out["env_same"], out["new_env"]
    assert out["backend_same"] and out["filters_same"]
    assert out["gdal_cachemax"] is None or int(out["gdal_cachemax"]) > 128 * 1024 * 1024  # GDAL's own default


def test_scene_reads_cap_gdal_cache_and_restore_it(tmp_path):
    """geodet's reads run with GDAL's block cache capped; afterwards GDAL is as it was."""
    import numpy as np
    import rasterio
    from rasterio._env import get_gdal_config
    from rasterio.transform import from_origin

    from geodet.io.scene import Scene
    from geodet.pipeline.grid import TileGrid

    p = tmp_path / "s.tif"
    with rasterio.open(p, "w", driver="GTiff", width=300, height=200, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(0, 0, 1, 1)) as dst:
        dst.write(np.full((3, 200, 300), 7, np.uint8))
    before = get_gdal_config("GDAL_CACHEMAX")
    sc = Scene(p)
    data, _ = sc.read_tile(TileGrid(300, 200, 128, 16).tile(0))
    assert np.allclose(data, 7 / 255)
    assert get_gdal_config("GDAL_CACHEMAX") == before


def test_plots_leave_pyplot_backend_alone(tmp_path):
    code = f"""
import matplotlib
matplotlib.use("pdf")
from geodet.evaluation import plot_pr
plot_pr({{"iou": 0.5, "AP50": 0.5, "pr_curve": {{"recall": [0, 1], "precision": [1, 0]}}}}, {str(tmp_path / 'pr.png')!r})
print(matplotlib.get_backend())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "pdf"
    assert (tmp_path / "pr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_presets_come_from_the_package():
    from geodet.config import config_dir, load_config, preset_names

    assert {"cpu", "small_objects", "trees", "default", "stock"} <= set(preset_names())
    assert (config_dir() / "cpu.yaml").is_file()
    assert load_config("cpu").tiling.tile_size == 256


def test_api_names_stay_functions_after_submodule_imports():
    import importlib

    import geodet

    importlib.import_module("geodet.training")
    importlib.import_module("geodet.evaluation")
    assert callable(geodet.train) and callable(geodet.evaluate) and callable(geodet.detect_scene)
    assert geodet.evaluate.__module__ == "geodet.evaluation" and geodet.train.__module__.startswith("geodet.training")
    for name in geodet.__all__:
        assert getattr(geodet, name) is not None, name


def test_command_line_help_does_not_load_torch():
    """`geodet --version` and `geodet detect --help` answer without importing torch (3.5 s)."""
    code = """
import sys
from geodet.cli import main
try:
    main(["detect", "--help"])
except SystemExit:
    pass
print("torch" in sys.modules, "rasterio" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-2:] == ["False", "False"]
