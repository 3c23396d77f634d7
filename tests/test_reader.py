import numpy as np
import pytest
from helpers import half_nodata_scene, write_raster

from geodet.io.scene import Scene
from geodet.pipeline.grid import TileGrid


@pytest.mark.parametrize("dtype,shape,tile", [("uint8", (3, 300, 260), 128), ("uint16", (4, 300, 300), 128), ("float32", (3, 90, 70), 128)])
def test_in_process_batches_equal_dataloader_batches(tmp_path, dtype, shape, tile):
    """The reused-buffer reader gives the DataLoader's batches: same tiles, same pixels, same
    skipped nodata tiles, padding past the edge of a scene smaller than a tile."""
    import torch

    from geodet.pipeline.reader import TileDataset, make_collate, read_batches

    sc = half_nodata_scene(tmp_path / "s.tif", dtype, shape)
    g = TileGrid(sc.width, sc.height, tile, 16)
    ref = list(torch.utils.data.DataLoader(TileDataset(sc, g), batch_size=3, collate_fn=make_collate(0.0)))
    got = [(None if im is None else im.clone(), t, s, f) for im, t, s, f in read_batches(sc, g, 3, 0.0)]
    assert len(got) == len(ref)
    assert sum(len(s) for _, _, s, _ in got) > 0 or len(g) == 1
    for (ia, ta, sa, fa), (ib, tb, sb, fb) in zip(got, ref):
        assert ta == tb and sa == sb and fa == fb == []
        assert (ia is None) == (ib is None)
        if ia is not None:
            assert torch.equal(ia, ib)


@pytest.mark.parametrize("shape,tile", [((3, 300, 260), 128), ((3, 90, 70), 128)])
def test_raw_uint8_tiles_scaled_on_the_device_equal_the_hosts_float_tiles(tmp_path, shape, tile):
    """CUDA's reader moves uint8 tiles (a quarter of the bytes) and scales them on the card: the
    result is the host's float32 tile bit for bit, nodata and padding past the edge included.
    Also through DataLoader workers (batches stacked into shared memory)."""
    import torch

    from geodet.errors import GeodetError
    from geodet.pipeline.batches import model_input
    from geodet.pipeline.reader import TileDataset, make_collate

    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, shape).astype(np.uint8)
    data[:, :, : shape[2] // 3] = 0  # nodata
    sc = Scene(write_raster(tmp_path / "s.tif", data, nodata=0), bands=[1, 2, 3])
    g = TileGrid(sc.width, sc.height, tile, 16)
    for workers in (0, 1):
        kw = dict(batch_size=2, collate_fn=make_collate(0.0), num_workers=workers)
        ref = list(torch.utils.data.DataLoader(TileDataset(sc, g), **kw))
        raw = list(torch.utils.data.DataLoader(TileDataset(sc, g, raw=True), **kw))
        assert [r[1:] for r in ref] == [r[1:] for r in raw]
        for (a, *_), (b, *_) in zip(ref, raw):
            assert (a is None) == (b is None)
            if a is not None:
                assert b.dtype == torch.uint8
                assert torch.equal(model_input(b, torch.device("cpu")), a)
    f32 = Scene(write_raster(tmp_path / "f.tif", data.astype(np.float32), nodata=0), bands=[1, 2, 3])
    with pytest.raises(GeodetError, match="uint8"):
        f32.read_tile(g.tile(0), raw=True)


def test_a_scene_with_more_bands_than_the_model_says_which_it_reads_once(tmp_path, tiny_model, caplog):
    from geodet.model import load_model
    from geodet.pipeline.reader import open_scene
    from geodet.pipeline.settings import resolve_detect_settings

    card = load_model(tiny_model).card
    p = write_raster(tmp_path / "four.tif", np.random.default_rng(0).integers(0, 255, (4, 64, 64)).astype(np.uint8))
    for _ in range(3):  # a plan, its blocks and checks open the scene again: one warning
        open_scene(p, resolve_detect_settings(card), card).close()
    said = [r for r in caplog.records if "the model reads bands 1,2,3" in r.getMessage()]
    assert len(said) == 1 and "four.tif has 4 bands" in said[0].getMessage()
    caplog.clear()
    open_scene(p, resolve_detect_settings(card, bands=(4, 3, 2)), card).close()  # chosen: nothing to say
    assert "the model reads" not in caplog.text
