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
    # a second demo into its own folder replaces its own files
    run_demo(tmp_path, minutes=0.1, size=320, progress=False, max_steps=2)
    assert json.loads((tmp_path / "metrics.json").read_text())["train_steps"] <= 2


def test_demo_refuses_what_it_cannot_do_or_would_replace_before_any_work(tmp_path):
    """A folder holding the user's files of the demo's names (scenes under data/, a training run in
    run/, a metrics.json of theirs) is refused, as are a budget of 0 and a scene too small for any
    vehicle; nothing is written."""
    import pytest

    from geodet.demo import run_demo
    from geodet.errors import GeodetError

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.tif").write_text("precious")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_text("their model")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(GeodetError, match=r"holds data/train.tif, run, which no geodet demo wrote.*give another --out"):
        run_demo(tmp_path, minutes=0.1, size=320, progress=False, max_steps=2)
    for minutes, size, said in ((0, 320, "--time-limit must be a positive number of minutes"),
                                (-1, 320, "positive number"), (0.1, 10, "--size 10 is too small.*at least 64 px")):
        with pytest.raises(GeodetError, match=said):
            run_demo(tmp_path / "new", minutes=minutes, size=size, progress=False, max_steps=2)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "data" / "train.tif").read_text() == "precious"


def test_a_demo_stopped_while_training_runs_again_in_its_folder(tmp_path, monkeypatch):
    """Ctrl-C while the demo trains keeps the run's checkpoint in run/: the folder is still the
    demo's, so the same command runs again rather than being refused."""
    import pytest

    from geodet.demo import MARK, _check_demo_folder, run_demo
    from geodet.training import trainer

    def stopped(self):
        (tmp_path / "run").mkdir(exist_ok=True)
        (tmp_path / "run" / "last.pt").write_bytes(b"a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.Trainer, "run", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path, minutes=0.1, size=320, progress=False, max_steps=2)
    assert (tmp_path / MARK).is_file() and not (tmp_path / "data" / "train.tif").exists()
    _check_demo_folder(tmp_path, 0.1, 320)  # not refused
