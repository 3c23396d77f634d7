"""Damaged and flaky inputs: a bad block costs its tiles, not the scene."""

import json
import logging
import os
import random
import shutil

import numpy as np
import pytest
from helpers import PerfectDetector, packed_boxes, range_server, write_id_scene

from geodet.errors import ReadError
from geodet.pipeline.scenes import detect_scene
from geodet.pipeline.grid import TileGrid

SIZE, TILE, OVERLAP = 1024, 256, 32


def _cog(src, dst):
    """A COG copy of ``src`` (header and offsets first, as served over HTTP)."""
    import rasterio.shutil

    rasterio.shutil.copy(src, dst, driver="COG", BLOCKSIZE=256, COMPRESS="DEFLATE", OVERVIEWS="NONE")
    return dst


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    d = tmp_path_factory.mktemp("damaged")
    boxes = packed_boxes(SIZE, SIZE, 6, 24, seed=5)
    tif = write_id_scene(d / "plain.tif", boxes, SIZE, SIZE)
    return _cog(tif, d / "intact.tif")


def _detect(path, **kw):
    return detect_scene(str(path), PerfectDetector(), tile_size=TILE, overlap=OVERLAP, progress=False,
                        score_threshold=0.5, **kw)


def _block_range(path, row, col):
    import rasterio

    with rasterio.open(path) as src:
        off = int(src.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=1))
        size = int(src.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=1))
    return off, size


def _corrupt_block(intact, dst, row=1, col=2):
    shutil.copy(intact, dst)
    off, size = _block_range(dst, row, col)
    with open(dst, "r+b") as f:
        f.seek(off)
        f.write(bytes(random.Random(0).getrandbits(8) for _ in range(size)))
    return dst


def _boxes_away_from(frame, windows, margin=0):
    """Rows whose box does not touch any of ``windows`` (x0, y0, x1, y1), as a sorted array."""
    b = frame[["px_x0", "px_y0", "px_x1", "px_y1"]].to_numpy()
    keep = np.ones(len(b), bool)
    for x0, y0, x1, y1 in windows:
        keep &= ~((b[:, 0] < x1 + margin) & (b[:, 2] > x0 - margin) & (b[:, 1] < y1 + margin) & (b[:, 3] > y0 - margin))
    k = b[keep]
    return k[np.lexsort(k.T[::-1])]


def _tiles_touching(x0, y0, x1, y1):
    g = TileGrid(SIZE, SIZE, TILE, OVERLAP)
    return {(t.row, t.col) for t in g if t.col_off < x1 and t.col_off + t.width > x0 and t.row_off < y1
            and t.row_off + t.height > y0}


def test_corrupt_block_fails_with_the_window_or_skips_its_tiles(tmp_path, intact, caplog):
    bad = _corrupt_block(intact, tmp_path / "bad.tif", row=1, col=2)  # pixels x 512-767, y 256-511
    with pytest.raises(ReadError) as err:
        _detect(bad)
    msg = str(err.value)
    assert "\n" not in msg and "bad.tif" in msg and "damaged or incomplete" in msg
    assert "rows" in msg and "columns" in msg and "map x" in msg and "--on-read-error skip" in msg

    ref = _detect(intact)
    got = _detect(bad, on_read_error="skip")
    skipped = [r.getMessage() for r in caplog.records if "skipping an unreadable tile" in r.getMessage()]
    assert skipped and not any("--on-read-error skip" in m for m in skipped)  # it is on: not suggested again
    rep = got.attrs["report"]
    listed = {(u["tile_row"], u["tile_col"]) for u in rep["unreadable_tiles"]}
    assert listed == _tiles_touching(512, 256, 768, 512)
    assert rep["tiles_unreadable"] == len(listed)
    for u in rep["unreadable_tiles"]:
        w = u["window"]
        assert (w["width"], w["height"]) == (TILE, TILE) and u["error"] and len(u["bounds"]) == 4
    windows = [(u["window"]["col_off"], u["window"]["row_off"], u["window"]["col_off"] + TILE,
                u["window"]["row_off"] + TILE) for u in rep["unreadable_tiles"]]
    away_ref, away_got = _boxes_away_from(ref, windows), _boxes_away_from(got, windows)
    assert len(away_ref) > 100
    np.testing.assert_array_equal(away_got, away_ref)
    assert len(got) < len(ref)


def test_truncated_file_on_the_command_line(tmp_path, intact, capsys):
    from geodet.cli import main

    cut = tmp_path / "cut.tif"
    data = intact.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    model = tmp_path / "m.pt"
    _save_tiny_model(model)
    out = tmp_path / "o.gpkg"
    assert main(["-q", "detect", str(cut), "-m", str(model), "-o", str(out), "--tile-size", str(TILE)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cut.tif: cannot read rows" in err[0] and "damaged or incomplete" in err[0]
    assert not out.exists() and not list(tmp_path.glob("*.report.json"))

    assert main(["-q", "detect", str(cut), "-m", str(model), "-o", str(out), "--tile-size", str(TILE),
                 "--on-read-error", "skip"]) == 3
    captured = capsys.readouterr()
    assert "partial result" in captured.err and "unreadable tile(s) skipped" in captured.err
    report = json.loads((tmp_path / "o.gpkg.report.json").read_text())
    assert report["partial"] and report["tiles_unreadable"] > 0
    assert report["tiles_unreadable"] == len(report["scenes"][0]["unreadable_tiles"])
    assert out.exists()


def test_a_damaged_16_bit_scene_fails_in_one_line_and_says_its_statistics_when_skipping(tmp_path, intact, capsys,
                                                                                         caplog):
    """A 16-bit scene is scaled by percentiles from a decimated read, which meets the damaged
    block first: failing, the tile's error is the one line; skipping, the statistics' source is
    said as well."""
    import rasterio

    from geodet.cli import main

    with rasterio.open(intact) as src:
        prof, data = src.profile, src.read().astype(np.uint16) * 200
    prof.update(driver="GTiff", dtype="uint16", tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    plain16 = tmp_path / "plain16.tif"
    with rasterio.open(plain16, "w", **prof) as dst:
        dst.write(data)
    bad = _corrupt_block(plain16, tmp_path / "bad16.tif")
    model, out = tmp_path / "m.pt", tmp_path / "o.gpkg"
    _save_tiny_model(model)
    args = ["-q", "detect", str(bad), "-m", str(model), "-o", str(out), "--tile-size", str(TILE)]
    caplog.set_level(logging.INFO)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad16.tif: cannot read rows" in err[0], err
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text  # the error alone
    caplog.clear()
    assert main(args + ["--on-read-error", "skip"]) == 3
    assert "unreadable tile(s) skipped" in capsys.readouterr().err
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("bad16.tif: part of the scene cannot be read" in m and "scaling statistics came from the readable "
               "parts" in m for m in said), said


def _save_tiny_model(path):
    from geodet.config import load_config
    from geodet.model import build_model, save_model

    cfg = load_config("cpu").model
    cfg.channels, cfg.head_depth = 16, 1
    save_model(build_model(cfg, tile_size=TILE), path)


@pytest.fixture
def served(intact):
    """A loopback server (127.0.0.1 only) for ``intact``; it stops by itself after 120 s."""
    with range_server(intact) as srv:
        yield srv


def _url(srv, name):
    return f"/vsicurl/http://127.0.0.1:{srv.server_address[1]}/{name}"


def test_flaky_remote_cog_gives_the_local_detections(monkeypatch, served, intact):
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.05")
    served.fail_share = 0.3
    got = _detect(_url(served, "flaky.tif"))
    ref = _detect(intact)
    assert served.failed > 0  # the retries were needed
    cols = ["px_x0", "px_y0", "px_x1", "px_y1", "score"]
    np.testing.assert_array_equal(got[cols].to_numpy(), ref[cols].to_numpy())


def _server_down(monkeypatch, tmp_path, served, retries):
    """The server fails every request, GDAL retries quickly; a model file and an output path."""
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.05")
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", str(retries))
    served.fail_all = True
    model = tmp_path / "m.pt"
    _save_tiny_model(model)
    return model, tmp_path / "o.gpkg"


def test_unreachable_remote_scene_fails_clearly_and_writes_nothing(monkeypatch, tmp_path, served, capsys):
    from geodet.cli import main

    model, out = _server_down(monkeypatch, tmp_path, served, 2)
    assert main(["-q", "detect", _url(served, "down.tif"), "-m", str(model), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot open the remote scene" in err[0] and "down.tif" in err[0]
    assert os.listdir(tmp_path) == ["m.pt"]


def test_a_scene_that_cannot_be_read_fails_alone(monkeypatch, tmp_path, served, intact, capsys):
    from geodet.cli import main

    model, out = _server_down(monkeypatch, tmp_path, served, 1)
    local = tmp_path / "local.tif"
    shutil.copy(intact, local)
    assert main(["-q", "detect", _url(served, "gone.tif"), str(local), "-m", str(model), "-o", str(out),
                 "--tile-size", str(TILE)]) == 3
    assert "1 scene(s) failed" in capsys.readouterr().err
    report = json.loads((tmp_path / "o.gpkg.report.json").read_text())
    assert [f["scene"] for f in report["failed_scenes"]] == [_url(served, "gone.tif")]
    assert [s["scene"] for s in report["scenes"]] == [str(local)]


def test_tile_command_names_the_damaged_window(tmp_path, intact, capsys):
    from geodet.cli import main

    bad = _corrupt_block(intact, tmp_path / "bad.tif", row=0, col=1)
    assert main(["-q", "tile", str(bad), "-o", str(tmp_path / "chips"), "--tile-size", str(TILE), "--overlap", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.tif: cannot read rows 0-255, columns 256-511" in err[0]


@pytest.mark.parametrize("url", ["s3://bucket/scene.tif", "gs://bucket/scene.tif", "az://container/scene.tif"])
def test_an_object_store_url_that_cannot_be_opened_is_named_remote(monkeypatch, url):
    """rasterio opens s3://, gs:// and az:// URLs through GDAL's /vsis3/, /vsigs/ and /vsiaz/: one that
    fails is a remote scene that could not be reached (address, connection, credentials), not "not a raster"."""
    import rasterio

    from geodet.errors import ReadError
    from geodet.io.raster import open_raster

    def fails(path, *a, **k):
        raise rasterio.errors.RasterioIOError(f"{path}: HTTP response code: 403")

    monkeypatch.setattr(rasterio, "open", fails)
    with pytest.raises(ReadError, match="cannot open the remote scene.*credentials"):
        open_raster(url)
