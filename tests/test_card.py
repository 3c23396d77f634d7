"""The typed model card: round trips, files written by earlier releases, refusals."""

import copy

import pytest
import torch

from geodet.config import ModelConfig
from geodet.errors import GeodetError
from geodet.model import ModelCard, build_model, load_model, save_model

TINY = dict(classes=["car", "truck"], backbone="resnet18", levels=[2, 4], anchor_sizes=[8.0, 16.0, 32.0],
            channels=32, head_depth=1)


def test_card_dict_round_trip():
    m = build_model(ModelConfig(**TINY), bands=[3, 2, 1], tile_size=128, overlap=16, gsd_m=0.3)
    m.card.operating_point = 0.42
    m.card.metrics = {"AP50": 0.8}
    d = m.card.to_dict()
    back = ModelCard.from_dict(copy.deepcopy(d))
    assert back == m.card
    assert back.to_dict() == d
    assert d["normalisation"].keys() == {"mean", "std"}  # the version-1 file layout


def test_version_1_file_from_an_earlier_release_loads(tmp_path):
    """Files written before the card was typed hold a plain dict with ``band_stats`` and no
    operating point: they load, and behave exactly as a fresh save."""
    m = build_model(ModelConfig(**TINY, score_threshold=0.0), tile_size=128).eval()
    old_card = m.card.to_dict()
    del old_card["operating_point"], old_card["trained_steps"]
    old_card["band_stats"] = {"lo": [0, 0, 0], "hi": [255, 255, 255]}
    old_card["percentiles"] = [2.0, 98.0]
    torch.save({"format": "geodet-model", "version": 1, "card": old_card,
                "state_dict": {k: v for k, v in m.net.state_dict().items()}}, tmp_path / "old.pt")
    m2 = load_model(tmp_path / "old.pt")
    assert m2.card.operating_point is None and m2.card.classes == ["car", "truck"]
    x = torch.rand(1, 3, 128, 128)
    with torch.inference_mode():
        a, b = m(x)[0], m2(x)[0]
    assert torch.equal(a["boxes"], b["boxes"])
    assert m2.source["sha256"] and m2.source["path"].endswith("old.pt")


def test_card_keys_from_a_newer_writer_are_kept(tmp_path):
    m = build_model(ModelConfig(**TINY), tile_size=128)
    d = m.card.to_dict()
    d["calibration"] = {"tiles": 64}
    card = ModelCard.from_dict(d)
    assert card.extra == {"gsd_unit": "m", "calibration": {"tiles": 64}} and card.to_dict()["calibration"] == {"tiles": 64}


@pytest.mark.parametrize("version", [2, 0, "1"])
def test_unknown_or_newer_file_version_refused(tmp_path, version):
    m = build_model(ModelConfig(**TINY), tile_size=128)
    save_model(m, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["version"] = version
    torch.save(payload, tmp_path / "v.pt")
    with pytest.raises(GeodetError, match="version"):
        load_model(tmp_path / "v.pt")


def test_malformed_card_refused_in_one_line(tmp_path):
    m = build_model(ModelConfig(**TINY), tile_size=128)
    save_model(m, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    del payload["card"]["classes"]
    torch.save(payload, tmp_path / "edited.pt")  # its digest no longer matches: refused as damaged
    with pytest.raises(GeodetError, match="model's card .* is damaged or was changed outside geodet"):
        load_model(tmp_path / "edited.pt")
    del payload["card_sha256"]  # a file of a geodet before the card's digest: its card is checked field by field
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(GeodetError, match="lacks 'classes'"):
        load_model(tmp_path / "bad.pt")
    payload["card"]["classes"] = ["a", "b"]
    payload["card"]["normalisation"]["mean"] = [0.5]
    torch.save(payload, tmp_path / "bad2.pt")
    with pytest.raises(GeodetError, match="normalisation has 1 value"):
        load_model(tmp_path / "bad2.pt")
