"""The ring reader: worker processes that write batches into shared buffers give the in-process
reader's batches, report damaged tiles as it does, and never hang or leave a process behind."""

import multiprocessing
import os
import signal

import numpy as np
import pytest
from helpers import half_nodata_scene, write_id_scene, write_raster

from geodet.errors import GeodetError, ReadError
from geodet.io.scene import Scene, gdal_env
from geodet.pipeline.grid import TileGrid
from geodet.pipeline.reader import read_batches
from geodet.pipeline.ring import ring_available, ring_batches

pytestmark = pytest.mark.skipif(not ring_available(), reason="the ring reader runs on Linux")


def _batches(it):
    return [(None if im is None else im.clone(), t, s, f) for im, t, s, f in it]


def _assert_same(got, ref, *, raw=False):
    import torch

    from geodet.pipeline.batches import model_input

    assert len(got) == len(ref)
    for (ia, ta, sa, fa), (ib, tb, sb, fb) in zip(got, ref):
        assert ta == tb and sa == sb and [f[:2] for f in fa] == [f[:2] for f in fb]
        assert (ia is None) == (ib is None)
        if ia is not None:
            if raw:
                assert ia.dtype == torch.uint8
                ia = model_input(ia, torch.device("cpu"))
            assert torch.equal(ia, ib)


@pytest.mark.parametrize("dtype,shape,tile,min_valid", [("uint8", (3, 300, 260), 128, 0.0), ("uint16", (4, 300, 300), 128, 0.3),
                                                         ("float32", (3, 90, 70), 128, 0.0)])
def test_ring_batches_equal_the_in_process_batches(tmp_path, dtype, shape, tile, min_valid):
    """Same batches in the same order, same pixels (nodata zeroed, padding past the edge of a
    scene smaller than a tile), same tiles skipped for too little data; a chosen subset of tiles;
    uint8 tiles read raw equal the float tiles once scaled; more workers than batches."""
    sc = half_nodata_scene(tmp_path / "s.tif", dtype, shape)
    g = TileGrid(sc.width, sc.height, tile, 16)
    with gdal_env():
        ref = _batches(read_batches(sc, g, 3, min_valid))
    assert sum(len(s) for _, _, s, _ in ref) > 0 or len(g) == 1
    for workers in (1, 2, 5):
        _assert_same(_batches(ring_batches(sc, g, 3, workers, min_valid)), ref)
    if dtype == "uint8":
        _assert_same(_batches(ring_batches(sc, g, 3, 2, min_valid, raw=True)), ref, raw=True)
    pick = list(range(len(g)))[::2]
    with gdal_env():
        ref_pick = _batches(read_batches(sc, g, 2, min_valid, indices=pick))
    _assert_same(_batches(ring_batches(sc, g, 2, 2, min_valid, indices=pick)), ref_pick)
    assert list(ring_batches(sc, g, 2, 2, indices=[])) == []


def test_a_small_ring_reuses_its_slots_without_overwriting_a_batch_in_use(tmp_path, monkeypatch):
    """With room for only a few batches (a large tile, a small cap), every batch still arrives
    intact while the caller holds the one before it, as the detection loop does."""
    import geodet.pipeline.ring as ring

    monkeypatch.setattr(ring, "RING_MAX_BYTES", 1)  # the fewest slots: workers + 2
    rng = np.random.default_rng(3)
    data = rng.integers(1, 256, (3, 700, 700)).astype(np.uint8)
    sc = Scene(write_raster(tmp_path / "s.tif", data), bands=[1, 2, 3])
    g = TileGrid(sc.width, sc.height, 128, 8)
    with gdal_env():
        ref = _batches(read_batches(sc, g, 2))
    prev, got = None, []
    for images, tiles, skipped, failed in ring_batches(sc, g, 2, 2, prefetch=4):
        if prev is not None:  # the previous batch is still readable, unchanged
            assert prev[0].equal(got[-1][0])
        got.append((images.clone(), tiles, skipped, failed))
        prev = (images,)
    _assert_same(got, ref)


def test_ring_reports_a_damaged_tile_as_the_in_process_reader_does(tmp_path):
    """A tile GDAL cannot read: with ``skip`` it is listed in its batch's failures (window and
    GDAL's message) and the others are read; with ``fail`` it raises ``ReadError``."""
    from test_damaged import _cog, _corrupt_block

    from helpers import packed_boxes

    size = 1024
    tif = write_id_scene(tmp_path / "plain.tif", packed_boxes(size, size, 6, 24, seed=5), size, size)
    bad = _corrupt_block(_cog(tif, tmp_path / "intact.tif"), tmp_path / "bad.tif", row=1, col=2)
    sc = Scene(bad)
    g = TileGrid(sc.width, sc.height, 256, 32)
    with gdal_env():
        ref = _batches(read_batches(sc, g, 4, on_read_error="skip"))
    assert sum(len(f) for *_, f in ref) > 0
    _assert_same(_batches(ring_batches(sc, g, 4, 2, on_read_error="skip")), ref)
    with pytest.raises(ReadError, match="bad.tif"):
        list(ring_batches(sc, g, 4, 2, on_read_error="fail"))
    assert multiprocessing.active_children() == []


class _KilledAt(Scene):
    """A scene whose reading process dies (as the kernel's OOM killer would kill it) at a tile."""

    kill_at = (1, 1)

    def read_tile(self, tile, out=None, raw=False):
        if (tile.row, tile.col) == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().read_tile(tile, out=out, raw=raw)


class _FailsAt(Scene):
    def read_tile(self, tile, out=None, raw=False):
        if (tile.row, tile.col) == (1, 0):
            raise GeodetError("this scene's tile (1, 0) cannot be scaled: check its bands")
        return super().read_tile(tile, out=out, raw=raw)


def test_a_dead_worker_or_an_error_in_one_ends_the_loop_with_one_line_and_no_process_left(tmp_path):
    data = np.full((3, 600, 600), 7, np.uint8)
    path = write_raster(tmp_path / "s.tif", data)
    g = TileGrid(600, 600, 128, 8)
    with pytest.raises(GeodetError, match=r"tile-reading process stopped \(killed by signal 9.*--workers 0"):
        list(ring_batches(_KilledAt(path), g, 2, 2))
    assert multiprocessing.active_children() == []
    with pytest.raises(GeodetError, match=r"tile \(1, 0\) cannot be scaled"):
        list(ring_batches(_FailsAt(path), g, 2, 2))
    assert multiprocessing.active_children() == []
    # leaving early (a break, an exception in the caller) stops the workers too
    it = ring_batches(Scene(path), g, 2, 2)
    next(it)
    it.close()
    assert multiprocessing.active_children() == []


class _Slow(Scene):
    """A scene whose tiles take a while to read (a remote scene over a slow link)."""

    def read_tile(self, tile, out=None, raw=False):
        import time

        time.sleep(0.15)
        return super().read_tile(tile, out=out, raw=raw)


def test_leaving_early_stops_busy_readers_at_once_even_with_the_clis_sigterm_handler(tmp_path):
    """With batches still queued and every reader busy, leaving the loop ends them within about
    a second, not after the batches they were given; the CLI's SIGTERM handler (which raises
    KeyboardInterrupt) is not theirs."""
    import time

    path = write_raster(tmp_path / "s.tif", np.full((3, 1024, 1024), 7, np.uint8))
    g = TileGrid(1024, 1024, 64, 0)  # 256 tiles of 0.15 s; 9 batches of 8 queued: 5 s for each worker
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        it = ring_batches(_Slow(path), g, 8, 2, prefetch=4)
        next(it)
        t0 = time.monotonic()
        it.close()
        took = time.monotonic() - t0
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert multiprocessing.active_children() == []
    assert took < 3.0, took  # (the batches given would take 5 s; other tests may run beside this one)


def test_readers_die_with_the_process_that_started_them(tmp_path):
    """The main process killed outright (the OOM killer, a firm kill from QGIS): its readers do
    not wait for tasks for ever, holding the ring and the scene."""
    import subprocess
    import sys
    import textwrap
    import time

    path = write_raster(tmp_path / "s.tif", np.full((3, 512, 512), 7, np.uint8))
    code = textwrap.dedent(f"""
        import multiprocessing, os, signal, sys
        from geodet.io.scene import Scene
        from geodet.pipeline.grid import TileGrid
        from geodet.pipeline.ring import ring_batches
        it = ring_batches(Scene({str(path)!r}), TileGrid(512, 512, 64, 0), 2, 2)
        next(it)
        print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # not read to the end: readers left alive would hold the pipe open
    proc.wait(60)
    proc.stdout.close()
    pids = [int(p) for p in line.split()]
    assert len(pids) == 2 and proc.returncode == -signal.SIGKILL, (line, proc.returncode)

    def alive(pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                return f.read().split("State:")[1].split()[0] != "Z"  # a zombie is dead, not yet reaped
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False

    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)


def test_pinned_batches_are_copies_the_ring_may_overwrite_at_once(tmp_path, monkeypatch):
    """On CUDA each batch is copied into page-locked memory and its slot reused at once: every
    batch the caller kept stays intact while the ring goes round many times (on a CPU the copy
    into pinned memory is stood in for by a plain copy)."""
    import torch

    import geodet.pipeline.ring as ring

    monkeypatch.setattr(ring, "RING_MAX_BYTES", 1)  # the fewest slots: workers + 2
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self.clone())
    rng = np.random.default_rng(4)
    sc = Scene(write_raster(tmp_path / "s.tif", rng.integers(1, 256, (3, 600, 600)).astype(np.uint8)), bands=[1, 2, 3])
    g = TileGrid(600, 600, 64, 0)
    with gdal_env():
        ref = _batches(read_batches(sc, g, 2))
    kept = [(im, t, s, f) for im, t, s, f in ring_batches(sc, g, 2, 2, raw=True, pin=True)]  # no clone here
    assert len(kept) == len(ref) > 4 * 4
    _assert_same(kept, ref, raw=True)
