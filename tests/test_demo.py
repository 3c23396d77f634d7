import json

import geopandas as gpd


def test_demo_tiny_budget_writes_everything(tmp_path):
    from geodet.demo import run_demo

    m = run_demo(tmp_path, minutes=0.1, size=320, progress=False, max_steps=4)
    for name in ("detections.geojson", "detections.gpkg", "quicklook.png", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["n_labels"] > 20 and "AP50" in saved and saved["AP50"] == m["AP50"]
    assert 1 <= saved["train_steps"] <= 4 and 0 < saved["train_cpu_share"] <= 1.5
    assert gpd.read_file(tmp_path / "detections.gpkg").crs.to_epsg() == 32633
