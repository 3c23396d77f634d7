"""``geodet tile``: write a scene's tiles as GeoTIFF chips, their footprints and COCO annotations."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from ..errors import GeodetError
from ..progress import progress_bar
from ..io.scene import READ_ERRORS, Scene, gdal_env
from .grid import TileGrid

log = logging.getLogger(__name__)


def write_chips(scene_path, out_dir, tile_size: int, overlap: int, overlap_m=None, bands=None, gsd_m=None, labels=None,
                class_column="label", min_visibility=0.5, min_valid_fraction=0.0, progress=True) -> str:
    """Write ``out_dir/chips/r{row}_c{col}.tif`` (the scene's transform and CRS for each window,
    original dtype and bands), ``out_dir/chips.gpkg`` and, with ``labels``, ``annotations.json``."""
    from ..io.labels import load_scene_labels

    sc = Scene(scene_path, bands=bands, gsd_m=gsd_m)  # chips keep raw values: no scaling statistics needed
    sc.skip_hint = False
    if overlap_m is not None:
        overlap = sc.overlap_px(overlap_m, tile_size)
    grid = TileGrid(sc.width, sc.height, tile_size, overlap)
    times = (tile_size / max(1, tile_size - overlap)) ** 2
    if times >= 4 and len(grid) > 1000:  # each pixel in many chips: a disk's worth for a mistyped overlap
        log.warning("an overlap of %d px on %d px tiles steps %d px: each pixel is in about %d chips, %d chips in all "
                    "(Ctrl-C stops it; a smaller --overlap writes fewer)", overlap, tile_size, tile_size - overlap,
                    round(times), len(grid))
    from ..io.writers import check_output_folder, missing_folders, remove_partial, sweep_leftovers

    out = check_output_folder(out_dir)
    _check_only_chips_replaced(out, [(scene_path, "the scene"), (labels, "the labels")])
    lb = None
    if labels:
        lb = load_scene_labels(sc, labels, class_column or None, unknown="keep")
    made = missing_folders(out)  # removed again if the run fails
    out.mkdir(parents=True, exist_ok=True)
    # the run is written beside the folder's contents and swapped in whole at the end: a previous
    # run's chips and annotations never mix with these, and a failed or interrupted run leaves them as they were
    sweep_leftovers(out, r"\.geodet-(tile|old-chips)-.*")  # of a killed run (SIGKILL): gigabytes of chips
    stage = Path(tempfile.mkdtemp(prefix=".geodet-tile-", dir=out))
    swapped = False
    try:
        (stage / "chips").mkdir()
        msg = _write(sc, grid, lb, stage, out, scene_path, tile_size, min_visibility, min_valid_fraction, progress)
        _swap_in(stage, out)
        swapped = True
        return msg
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not swapped:  # a damaged scene, an interrupt: nothing of a failed run is left behind
            remove_partial([], made)


CHIP = re.compile(r"r\d+_c\d+\.tif(\.aux\.xml)?")  # a chip (and the statistics GDAL or QGIS may write beside it)
# what file browsers and GIS leave beside files (.DS_Store, AppleDouble ._x, overviews, masks): not the user's work
SIDE = re.compile(r"\..*|r\d+_c\d+\.tif\.(ovr|msk)")


REPLACED = ("chips", "chips.gpkg", "annotations.json")  # what a run puts in OUT, replacing the last run's
FOOTPRINT_FIELDS = {"row", "col", "path", "valid_fraction"}


def _check_only_chips_replaced(out: Path, inputs=()) -> None:
    """A run replaces ``OUT/chips/`` whole, ``OUT/chips.gpkg`` and ``OUT/annotations.json``: refuse,
    before any work, where they hold what geodet did not write (a scene, labels, notes kept in
    chips/; a chips.gpkg or COCO file of the user's in a folder geodet never tiled into), where one
    is the scene or labels of this run (``inputs``: (path, what it is)), or where one is of a kind
    it cannot replace (a file named chips, a folder named chips.gpkg)."""
    from ..io.outputs import same_file_key

    chips = out / "chips"
    files, folder = {Path(same_file_key(out / n)) for n in REPLACED[1:]}, Path(same_file_key(chips))
    for source, what in inputs:
        if not source:
            continue
        key = Path(same_file_key(source))
        if key in files or folder in key.parents:
            raise GeodetError(f"{source} is {what} of this run, and the run replaces {chips}/, {out / 'chips.gpkg'} and "
                              f"{out / 'annotations.json'}: move it out of there, or give another --out")
    for name in REPLACED:
        p = out / name
        if p.exists() and p.is_dir() != (name == "chips"):
            raise GeodetError(f"{p} is {'a folder' if p.is_dir() else 'not a folder'}, where a run writes its {name}: "
                              "move it, or give another --out")
    if chips.is_dir():
        others = sorted(p.name for p in chips.iterdir() if not CHIP.fullmatch(p.name) and not SIDE.fullmatch(p.name))
        if others:
            listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise GeodetError(f"{chips} holds files that are not chips ({listed}), and a run replaces that folder "
                              "whole: move them out, or give another --out")
    if (out / "chips.gpkg").is_file() and not _is_footprints(out / "chips.gpkg"):
        raise GeodetError(f"{out / 'chips.gpkg'} is not the chip footprints of a geodet tile run, and a run replaces "
                          "it: move it, or give another --out")
    if (out / "annotations.json").exists() and not (out / "chips.gpkg").exists():
        raise GeodetError(f"{out / 'annotations.json'} is not from a geodet tile run (no chips.gpkg beside it), and a "
                          "run replaces it: move it, or give another --out")


def _is_footprints(path: Path) -> bool:
    """Whether ``path`` holds what a run writes there: one layer, ``chips``, of footprint fields
    (QGIS may add its ``layer_styles`` table)."""
    try:
        import pyogrio

        layers = [str(n) for n in pyogrio.list_layers(path)[:, 0] if n != "layer_styles"]
        return layers == ["chips"] and FOOTPRINT_FIELDS <= set(pyogrio.read_info(path, layer="chips")["fields"])
    except Exception:  # not a GeoPackage geodet can read: not one it wrote
        return False


def _say_no_crs(scene_path) -> None:
    from ..io.raster import georeference_advice, open_raster

    with open_raster(scene_path) as src:  # ground control points only: warp it, rather than assign corners
        advice = georeference_advice(src)
    log.warning("%s has no georeferencing (no CRS, or no geotransform), so chips.gpkg has no CRS either: %s, to "
                "place the chips on a map", Path(str(scene_path)).name, advice)


def _swap_in(stage: Path, out: Path) -> None:
    """The staged run's ``chips/``, ``chips.gpkg`` and ``annotations.json`` (or none) in place of
    the folder's, every rename done before an interrupt is acted on; where a rename fails, the
    folder's own are put back, so a run's chips never sit beside another run's annotations."""
    from ..io.writers import WRITTEN, interrupts_held

    old = out / f".geodet-old-chips-{stage.name}"
    with interrupts_held():
        old.mkdir()
        moved, placed = [], []
        try:
            for name in REPLACED:
                if (out / name).exists() or (out / name).is_symlink():
                    os.replace(out / name, old / name)
                    moved.append(name)
            for name in REPLACED:  # a run without labels has no annotations: the last run's named other chips
                if (stage / name).exists():
                    os.replace(stage / name, out / name)
                    placed.append(name)
        except BaseException:
            for name in placed:
                _put(out / name, stage / name)
            for name in moved:
                _put(old / name, out / name)
            if not any(old.iterdir()):  # all back: nothing of this run stays
                old.rmdir()
            raise
        WRITTEN.append(out / "chips.gpkg")
    shutil.rmtree(old, ignore_errors=True)


def _put(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError as exc:  # the undo of a failed swap: what cannot go back stays where it was, said
        log.warning("could not move %s back to %s (%s)", src, dst, exc)


def _write(sc, grid, lb, out: Path, final: Path, scene_path, tile_size: int, min_visibility, min_valid_fraction,
           progress) -> str:
    import geopandas as gpd
    import rasterio
    from rasterio.windows import transform as window_transform

    from ..io.labels import clip_boxes
    from ..io.writers import boxes_to_polygons

    rows = []
    images, anns = [], []
    profile = dict(driver="GTiff", count=sc.count, dtype=sc.dtype.name, crs=sc.crs, nodata=sc.nodata,
                   tiled=True, blockxsize=min(256, tile_size // 16 * 16 or 16), blockysize=min(256, tile_size // 16 * 16 or 16),
                   compress="deflate")
    written = skipped = 0
    bar = progress_bar(total=len(grid), desc=f"tile {Path(scene_path).name}", unit="chip", enabled=progress)
    with gdal_env():  # GDAL's block cache capped while the scene streams through
        for tile in grid:
            win = tile.window()
            try:
                valid = sc.read_valid(win)
                data = None
                if sc.is_float:  # NaN (or inf) pixels are no data either, declared or not, as detection holds
                    data = sc.read_raw(win)
                    valid = sc.valid_pixels(data, valid)
                frac = float(valid.mean()) if valid.size else 0.0
                if data is None and frac > min_valid_fraction:
                    data = sc.read_raw(win)
            except READ_ERRORS() as exc:  # a damaged file: the same one-line message as detect
                raise sc.read_error(win, exc) from None
            bar.update(1)
            if frac <= min_valid_fraction:
                skipped += 1
                continue
            name = f"r{tile.row}_c{tile.col}.tif"
            path = out / "chips" / name
            with warnings.catch_warnings():  # (the run is staged: each chip is written in place)
                # a scene without georeferencing (said once, below): its first chip's grid is the identity
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                with rasterio.open(path, "w", width=int(win.width), height=int(win.height),
                                   transform=window_transform(win, sc.transform), **profile) as dst:
                    dst.write(data)
                    if not sc.all_valid or not valid.all():
                        dst.write_mask(valid.astype(np.uint8) * 255)
            written += 1
            rows.append({"row": tile.row, "col": tile.col, "path": f"chips/{name}", "valid_fraction": frac,
                         "box": tile.valid})
            if lb is not None:
                image_id = len(images) + 1
                images.append({"id": image_id, "file_name": f"chips/{name}", "width": int(win.width), "height": int(win.height),
                               "row": tile.row, "col": tile.col})
                boxes, keep = clip_boxes(lb.boxes, tile.valid, min_visibility)
                for b, lab in zip(boxes, lb.labels[keep]):
                    w, h = float(b[2] - b[0]), float(b[3] - b[1])
                    anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(lab) + 1,
                                 "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h, "iscrowd": 0})
    bar.close()
    sc.close()
    columns = {k: [r[k] for r in rows] for k in ("row", "col", "path", "valid_fraction")}
    columns["row"] = np.asarray(columns["row"], np.int32)  # the same integer width as detections' tile_row
    columns["col"] = np.asarray(columns["col"], np.int32)
    footprints = gpd.GeoDataFrame(
        columns,
        geometry=boxes_to_polygons(np.array([r["box"] for r in rows], float).reshape(-1, 4), sc.transform), crs=sc.crs,
    )
    if sc.crs is None:  # said once here, in geodet's words, rather than by pyogrio's warning
        _say_no_crs(scene_path)
    with warnings.catch_warnings():  # written into the staged run, renamed into place with the chips
        warnings.filterwarnings("ignore", message=".*'crs' was not provided", category=UserWarning)
        footprints.to_file(out / "chips.gpkg", driver="GPKG", layer="chips", engine="pyogrio", VERSION="1.2")
    msg = f"{written} chips ({skipped} empty skipped) of {len(grid)} tiles in {grid.n_rows} rows x {grid.n_cols} cols -> {final}"
    if lb is not None:
        coco = {"images": images, "annotations": anns,
                "categories": [{"id": i + 1, "name": n} for i, n in enumerate(lb.classes)]}
        (out / "annotations.json").write_text(json.dumps(coco, indent=2), encoding="utf-8")
        msg += f"; {len(anns)} boxes in annotations.json"
    return msg
