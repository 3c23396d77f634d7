"""Opening a scene with a job's settings, its tile grid, and reading its tiles into batches:
in-process into one reused buffer, or a torch dataset for DataLoader workers (each opens its own
file handle).

A tile that GDAL cannot read (a damaged block, a failed remote read) raises ``ReadError`` with
``on_read_error="fail"``; with ``"skip"`` it is reported in the batch's ``failed`` list as
``(tile, message, info)`` and the other tiles go on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .grid import TileGrid

log = logging.getLogger(__name__)

ON_READ_ERROR = ("fail", "skip")
_BANDS_SAID: set = set()  # (scene, its band count, the bands read) already warned about


def open_scene(scene, settings, card=None, warn: bool = True):
    """Open ``scene`` (a path or a ``Scene``) with the bands, GSD and scaling of ``settings``
    (``DetectSettings``; ``warn``: say when the card's GSD cannot apply, or damage met by the
    statistics' read; off for a second opening of one scene). A ``Scene`` is returned as it is."""
    from ..errors import GeodetError
    from ..io.scene import Scene, grid_crs, metres_per_unit, open_raster

    if isinstance(scene, Scene):
        return scene
    if isinstance(scene, (list, tuple)):
        raise GeodetError("a list of scenes was given where one scene goes: give one path, or use detect_scenes for "
                          "several")
    if not isinstance(scene, (str, os.PathLike)):  # an array, None: geodet reads scenes from files
        raise GeodetError(f"a scene is a raster file's path (str or pathlib.Path), not {type(scene).__name__}: write "
                          "an array to a GeoTIFF first (rasterio), with its transform and CRS")
    path = str(scene)
    with open_raster(path) as src:
        crs = grid_crs(src)  # none without a geotransform either: its GSD is unknown
        count, projected = src.count, crs is not None and crs.is_projected
        unit = metres_per_unit(crs)
        any_crs = src.crs is not None
    bands = list(settings.bands)
    if card is not None and len(bands) == card.n_bands and max(bands) > count and settings.sources.get("bands") != "card":
        raise GeodetError(f"band {max(bands)} requested but scene {Path(path).name} has {count} band(s): pass --bands "
                          f"with {card.n_bands} number(s) from 1 to {count}")
    if card is not None and (len(bands) != card.n_bands or max(bands) > count):
        listed = ",".join(str(b) for b in card.bands)
        raise GeodetError(
            f"model expects {card.n_bands} band(s) ({listed}); scene {Path(path).name} has {count}: "
            + (f"pass --bands with {card.n_bands} band number(s) from 1 to {count}" if count >= card.n_bands else
               f"repeat a band with --bands (e.g. {','.join(['1'] * card.n_bands)}) or use a model trained on "
               f"{count}-band scenes")
        )
    said = (path, count, tuple(bands))
    if card is not None and count != len(bands) and settings.sources.get("bands") == "card" and warn \
            and said not in _BANDS_SAID:
        _BANDS_SAID.add(said)  # once per scene in a process (a plan, its blocks and checks open it again)
        listed = ",".join(str(b) for b in bands)
        log.warning("scene %s has %d bands; the model reads bands %s, as it was trained: pass --bands to pick "
                    "others", Path(path).name, count, listed)
    gsd_m = settings.gsd_m
    if gsd_m is not None and settings.sources.get("gsd_m") == "card" and not projected:
        # The card's GSD is in metres; a scene without a projected CRS cannot be resampled to
        # it, so it runs at its own resolution (an explicit --gsd still fails clearly).
        if warn:
            log.warning("%s has no projected CRS%s: running at its native resolution, not the model's %.3g m", path,
                        "" if crs is not None or not any_crs else " placed by a geotransform", gsd_m)
        gsd_m = None
    if gsd_m is not None and settings.sources.get("gsd_m") == "card" and unit not in (None, 1.0) \
            and card is not None and card.extra.get("gsd_unit") != "m":
        # a card written before GSDs were metres in every CRS holds the training scene's units
        gsd_m *= unit
    try:
        sc = Scene(path, bands=bands, gsd_m=gsd_m, percentiles=settings.percentiles)
    except GeodetError as exc:
        if getattr(exc, "upsample", None) and settings.sources.get("gsd_m") == "card":
            raise GeodetError(
                f"{path}: the model works at {gsd_m:.3g} m per pixel (its card), {exc.upsample:.3g} times finer than "
                "this scene: use a model trained near the scene's resolution, or give --gsd to run it at another"
            ) from None
        raise
    _say_other_dtype(sc, card, warn)
    sc.skip_hint = settings.on_read_error != "skip"  # a read error's message suggests the skip only where it is not on
    sc.defer_partial_warning = not warn  # a second opening: the first (or detect_scene) says the damage
    return sc


def _say_other_dtype(sc, card, warn: bool) -> None:
    """Say (once per scene) that a model trained on 8-bit scenes runs on a 16-bit or float one,
    or the other way round: the pixels reach it scaled another way (0-255 against the scene's
    percentiles), so its detections may differ from what it learned."""
    trained = (card.extra.get("scene_dtypes") or []) if card is not None else []
    now = str(sc.dtype)
    if not warn or not trained or (now == "uint8") in {t == "uint8" for t in trained}:  # scaled as it learned
        return
    key = ("dtype", sc.path, now)
    if key in _BANDS_SAID:
        return
    _BANDS_SAID.add(key)
    how = "0-255" if now == "uint8" else f"its {sc.percentiles[0]:g}-{sc.percentiles[1]:g} percentiles"
    log.warning("%s is %s and the model was trained on %s scenes: its pixels are scaled by %s, not as the model "
                "learned, so detections may be fewer or wrong: fine-tune on scenes like it (train --init), or convert it",
                Path(sc.path).name, now, "/".join(trained), how)


def scene_grid(scene, settings) -> TileGrid:
    """The tile grid of an opened ``scene`` (or an area of one) with the tile size and overlap of
    ``settings``; an overlap in metres (``overlap_m``) becomes pixels at the scene's GSD."""
    if settings.overlap_m is not None:
        overlap = scene.overlap_px(settings.overlap_m, settings.tile_size)
    else:
        overlap = settings.overlap
    return TileGrid(scene.width, scene.height, settings.tile_size, overlap)


def _check_policy(on_read_error: str) -> str:
    if on_read_error not in ON_READ_ERROR:
        from ..errors import GeodetError

        raise GeodetError(f"on_read_error must be 'fail' or 'skip', got '{on_read_error}'")
    return on_read_error


class TileDataset:
    """A torch map-style dataset of a scene's tiles: ``(image [C, T, T] or None, tile,
    valid_fraction, failure or None)``; a failure is ``(message, info)`` of an unreadable tile.
    ``raw`` (uint8 scenes): images stay uint8 (``Scene.read_tile(raw=True)``), a quarter of the
    bytes to move between processes and to the GPU, scaled there (``batches.model_input``).

    The scene object is pickled without its file handle, so each DataLoader worker opens its own.
    """

    def __init__(self, scene, grid: TileGrid, indices=None, on_read_error: str = "fail", raw: bool = False):
        scene.stats  # computed once here, not in every worker
        self.scene = scene
        self.grid = grid
        self.indices = list(range(len(grid))) if indices is None else list(indices)
        self.on_read_error = _check_policy(on_read_error)
        self.raw = raw

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        import torch

        from ..errors import ReadError

        tile = self.grid.tile(self.indices[i])
        try:
            data, frac = self.scene.read_tile(tile, raw=self.raw)
        except ReadError as exc:  # returned, not raised: a worker's exception loses its type
            return None, tile, 0.0, (str(exc), exc.info)
        return torch.from_numpy(data), tile, frac, None


def read_batches(scene, grid: TileGrid, batch_size: int, min_valid_fraction: float = 0.0, indices=None,
                 on_read_error: str = "fail"):
    """Batches read in this process into one reused buffer: ``(images [n, C, T, T] or None,
    tiles, skipped, failed)``, the batches a DataLoader over ``TileDataset`` with ``make_collate``
    gives, without a per-tile array, a stacking copy or a new batch allocation each time.
    ``indices`` (default: every tile) picks the tiles, e.g. one block of the grid.

    Each batch's ``images`` are overwritten by the next batch: use them before asking for it.
    """
    import torch

    from ..errors import ReadError

    _check_policy(on_read_error)
    indices = list(range(len(grid))) if indices is None else list(indices)
    # never a buffer for more tiles than run: --batch-size 100000 on a scene of 9 tiles takes 9
    batch_size = max(1, min(int(batch_size), len(indices)))
    buf = torch.empty((batch_size, scene.count, grid.tile_size, grid.tile_size))
    arr = buf.numpy()
    for start in range(0, len(indices), batch_size):
        tiles, skipped, failed = [], [], []
        for i in indices[start : start + batch_size]:
            tile = grid.tile(i)
            try:
                _, frac = scene.read_tile(tile, out=arr[len(tiles)])
            except ReadError as exc:
                if on_read_error == "fail":
                    raise
                failed.append((tile, str(exc), exc.info))
                continue
            (tiles if frac > min_valid_fraction else skipped).append(tile)
        yield (buf[: len(tiles)] if tiles else None), tiles, skipped, failed


def worker_init(_worker_id: int) -> None:
    """DataLoader workers use one thread each: oversubscribed threads slow the model badly."""
    import torch

    torch.set_num_threads(1)


def make_collate(min_valid_fraction: float):
    """A collate function that drops tiles at or below ``min_valid_fraction`` valid pixels and
    lists unreadable ones apart."""

    def collate(samples):
        import torch

        failed = [(s[1], *s[3]) for s in samples if s[3] is not None]
        readable = [s for s in samples if s[3] is None]
        keep = [s for s in readable if s[2] > min_valid_fraction]
        skipped = [s[1] for s in readable if s[2] <= min_valid_fraction]
        # torch's collate stacks into shared memory in a worker: no further copy to the main process
        images = torch.utils.data.default_collate([s[0] for s in keep]) if keep else None
        return images, [s[1] for s in keep], skipped, failed

    return collate
