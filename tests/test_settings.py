"""The settings resolver: argument > config file > model card > defaults, for every setting."""

import pytest

from geodet.config import Config, ModelConfig, load_config
from geodet.errors import GeodetError
from geodet.model import build_model
from geodet.pipeline.settings import SETTINGS, resolve_detect_settings


@pytest.fixture(scope="module")
def card():
    m = build_model(ModelConfig(classes=["a"], levels=[2, 4], anchor_sizes=[8.0, 16.0, 32.0], channels=16, head_depth=1,
                                score_threshold=0.2, nms_iou=0.4, detections_per_tile=77),
                    bands=[3, 2, 1], tile_size=320, overlap=40, gsd_m=0.5, percentiles=[1.0, 99.0])
    return m.card


def test_defaults_without_card_or_config():
    s = resolve_detect_settings()
    d = Config()
    assert (s.tile_size, s.overlap, list(s.bands), list(s.percentiles)) == (
        d.tiling.tile_size, d.tiling.overlap, d.scene.bands, d.scene.percentiles)
    assert s.score_threshold == d.model.score_threshold and s.batch_size == d.detect.batch_size
    assert set(s.sources.values()) == {"default"}


def test_card_beats_defaults(card):
    s = resolve_detect_settings(card)
    assert (s.tile_size, s.overlap, s.bands, s.gsd_m, s.percentiles) == (320, 40, (3, 2, 1), 0.5, (1.0, 99.0))
    assert (s.score_threshold, s.nms_iou, s.detections_per_tile) == (0.2, 0.4, 77)
    assert s.sources["tile_size"] == "card" and s.sources["batch_size"] == "default"


def test_config_file_beats_card_but_only_for_keys_it_sets(card, tmp_path):
    (tmp_path / "c.yaml").write_text("tiling:\n  tile_size: 256\ndetect:\n  score_threshold: 0.5\n  batch_size: 3\n")
    cfg = load_config(tmp_path / "c.yaml")
    s = resolve_detect_settings(card, cfg)
    assert (s.tile_size, s.score_threshold, s.batch_size) == (256, 0.5, 3)
    assert s.overlap == 40 and s.bands == (3, 2, 1)  # defaults in the config object do not hide the card
    assert s.sources["tile_size"] == "config" and s.sources["overlap"] == "card"


def test_argument_beats_everything(card, tmp_path):
    cfg = load_config(overrides={"tiling.tile_size": 256})
    s = resolve_detect_settings(card, cfg, tile_size=128, overlap=16, bands=[1, 2, 3])
    assert (s.tile_size, s.overlap, s.bands) == (128, 16, (1, 2, 3))
    assert s.sources["tile_size"] == "argument"


def test_overlap_in_metres_only_when_asked_at_least_as_directly(card):
    assert resolve_detect_settings(card, overlap_m=6.0).overlap_m == 6.0
    cfg = load_config(overrides={"tiling.overlap_m": 6.0})
    assert resolve_detect_settings(card, cfg).overlap_m == 6.0  # config beats the card's pixels
    assert resolve_detect_settings(card, cfg, overlap=10).overlap_m is None  # an explicit overlap wins


def test_every_setting_has_a_default_in_config():
    d = Config()
    for name, (keys, _) in SETTINGS.items():
        for key in (keys,) if isinstance(keys, str) else keys:
            obj = d
            for part in key.split("."):
                obj = getattr(obj, part)  # raises if the resolver names a key config.py lacks


@pytest.mark.parametrize("kw,msg", [({"tile_size": 64, "overlap": 64}, "must be smaller"), ({"batch_size": 0}, "at least 1"),
                                    ({"score_threshold": 1.5}, "between 0 and 1"), ({"percentiles": [98, 2]}, "percentiles")])
def test_bad_settings_refused(kw, msg):
    with pytest.raises(GeodetError, match=msg):
        resolve_detect_settings(**kw)


def test_a_command_line_flag_is_reported_as_an_argument_not_the_config(card, tmp_path):
    """geodet detect folds its flags into the config object; the report still says a flag set
    them (not a YAML file the user never gave), and a value from the file stays 'config'."""
    (tmp_path / "c.yaml").write_text("detect:\n  batch_size: 3\n")
    cfg = load_config(tmp_path / "c.yaml", {"model.detections_per_tile": 5, "tiling.tile_size": None})
    s = resolve_detect_settings(card, cfg)
    assert s.detections_per_tile == 5 and s.sources["detections_per_tile"] == "argument"
    assert s.sources["batch_size"] == "config" and s.sources["tile_size"] == "card"


def test_a_config_writes_the_networks_threshold_as_it_writes_its_siblings(card, tmp_path, caplog):
    # model.score_threshold was ignored (the card's 0.2 ran) while model.nms_iou beside it was honoured
    from geodet.pipeline import settings

    (tmp_path / "m.yaml").write_text("model:\n  score_threshold: 0.5\n  nms_iou: 0.3\n")
    s = resolve_detect_settings(card, load_config(tmp_path / "m.yaml"))
    assert (s.score_threshold, s.nms_iou) == (0.5, 0.3) and s.sources["score_threshold"] == "config"
    # detect.score_threshold, the detection key, wins where both are written; a flag beats both
    (tmp_path / "both.yaml").write_text("model:\n  score_threshold: 0.5\ndetect:\n  score_threshold: 0.7\n")
    assert resolve_detect_settings(card, load_config(tmp_path / "both.yaml")).score_threshold == 0.7
    cfg = load_config(tmp_path / "m.yaml", {"detect.score_threshold": 0.1})
    s = resolve_detect_settings(card, cfg)
    assert s.score_threshold == 0.1 and s.sources["score_threshold"] == "argument"
    # architecture keys cannot change a trained network: said once, not silently dropped
    caplog.set_level("WARNING")
    (tmp_path / "arch.yaml").write_text("model:\n  levels: [3, 5]\n  anchor_sizes: [100.0, 200.0, 300.0]\n")
    settings._IGNORED_SAID.clear()
    for _ in range(3):  # once per scene
        s = resolve_detect_settings(card, load_config(tmp_path / "arch.yaml"))
    assert caplog.text.count("model.anchor_sizes, model.levels are ignored for detection") == 1
    assert "model.nms_iou" not in caplog.text and s.tile_size == 320
