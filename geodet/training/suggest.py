"""Which tiles to label next: the cells of a scene where the model is least sure, spread over the
scene, as polygons a GIS analyst opens, labels and trains on again (``geodet train --init``).

The model runs over each scene with the real pipeline. A detection's uncertainty is how close its
score is to the model's operating point (the best-F1 score at validation), on the logit scale:
``exp(-|logit(score) - logit(operating point)|)``, 1 at the operating point and falling off either
side. A cell's uncertainty is the sum over the detections centred in it: about how many decisions
the model could get either way there. Cells are picked greedily by uncertainty, each pick damping
its neighbours (``SPREAD``) so that the suggestions cover the scene instead of one busy corner.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import sqlite3
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import GeodetError

log = logging.getLogger(__name__)
SPREAD = 1.0  # cells: a pick multiplies a cell's uncertainty at distance d by 1 - exp(-d^2 / (2 SPREAD^2))
NEAR = 1.0  # logits: a detection this close to the operating point counts as "uncertain" in the reason


def logit(p):
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def detection_uncertainty(scores, operating_point: float) -> np.ndarray:
    """Per detection, 1 at the operating point, falling off with the logit distance from it."""
    return np.exp(-np.abs(logit(scores) - logit(operating_point)))


def cell_scores(boxes: np.ndarray, scores: np.ndarray, width: int, height: int, cell: int, op: float) -> dict:
    """Per cell of a ``cell`` px grid over a ``width`` x ``height`` scene: summed uncertainty, and
    the counts of uncertain and confident detections centred in it."""
    rows, cols = math.ceil(height / cell), math.ceil(width / cell)
    u = np.zeros((rows, cols))
    near = np.zeros((rows, cols), np.int64)
    sure = np.zeros((rows, cols), np.int64)
    if len(scores):
        cx = np.clip(((boxes[:, 0] + boxes[:, 2]) / 2 // cell).astype(int), 0, cols - 1)
        cy = np.clip(((boxes[:, 1] + boxes[:, 3]) / 2 // cell).astype(int), 0, rows - 1)
        np.add.at(u, (cy, cx), detection_uncertainty(scores, op))
        np.add.at(near, (cy, cx), (np.abs(logit(scores) - logit(op)) < NEAR).astype(np.int64))
        np.add.at(sure, (cy, cx), (scores >= op).astype(np.int64))
    return {"uncertainty": u, "uncertain": near, "confident": sure}


def pick(uncertainty: np.ndarray, n: int, allowed: np.ndarray) -> list[tuple[int, int]]:
    """``n`` cells (row, col) chosen greedily by uncertainty, each choice damping its neighbours."""
    score = np.where(allowed, uncertainty, -np.inf).astype(np.float64)
    rr, cc = np.mgrid[0 : score.shape[0], 0 : score.shape[1]]
    out = []
    for _ in range(min(n, int(allowed.sum()))):
        r, c = np.unravel_index(int(np.argmax(score)), score.shape)
        if not np.isfinite(score[r, c]):
            break
        out.append((int(r), int(c)))
        d2 = (rr - r) ** 2 + (cc - c) ** 2
        score = np.where(np.isfinite(score), score * (1 - np.exp(-d2 / (2 * SPREAD**2))), score)
        score[r, c] = -np.inf
    return out


STRATEGIES = ("uncertainty", "per-object", "coreset", "hybrid")


@dataclass
class SceneCells:
    """One scene cut into cells: their pixel rectangles and map polygons, which may be suggested,
    the per-cell detection statistics (``cell_scores``) and, for the feature-space strategies,
    a pooled feature vector per cell."""

    name: str
    crs: object
    rows: int
    cols: int
    rect: np.ndarray  # [rows * cols, 4] pixel rectangles
    polys: np.ndarray
    allowed: np.ndarray  # [rows * cols] bool: not labelled yet, mostly valid pixels
    labelled: np.ndarray  # [rows * cols] bool: mostly inside the labelled area
    stats: dict
    features: Optional[np.ndarray] = None


def scene_cells(model, path, s, cell: int, op: float, labelled_area, progress: bool, features: bool,
                settings: dict) -> SceneCells:
    """Detect over one scene with the real pipeline and cut it into ``cell`` px cells."""
    import shapely

    from ..io.writers import boxes_to_polygons
    from ..pipeline.reader import open_scene
    from ..pipeline.scenes import detect_scene

    sc = open_scene(path, s, model.card)
    try:
        frame = detect_scene(sc, model, progress=progress, **settings)
        boxes = frame[["px_x0", "px_y0", "px_x1", "px_y1"]].to_numpy(np.float64)
        stats = cell_scores(boxes, frame["score"].to_numpy(np.float64), sc.width, sc.height, cell, op)
        rows, cols = stats["uncertainty"].shape
        rect = np.array([[c * cell, r * cell, min((c + 1) * cell, sc.width), min((r + 1) * cell, sc.height)]
                         for r in range(rows) for c in range(cols)], np.float64)
        labelled = np.zeros(rows * cols, bool)
        done = _labelled_in(labelled_area, sc)
        if done is not None:
            cells = shapely.box(rect[:, 0], rect[:, 1], rect[:, 2], rect[:, 3])
            labelled = shapely.area(shapely.intersection(cells, done)) / shapely.area(cells) >= 0.5
        allowed = ~labelled & (_valid_share(sc, rows, cols, cell).reshape(-1) > 0.5)
        feats = cell_features(model, sc, rect, settings.get("device")) if features else None
        return SceneCells(Path(str(path)).name, sc.crs, rows, cols, rect, boxes_to_polygons(rect, sc.transform),
                          allowed, labelled, stats, feats)
    finally:
        sc.close()


def _labelled_in(labelled_area, sc):
    if labelled_area is None:
        return None
    from .area import read_labelled_area

    try:
        return read_labelled_area(labelled_area, sc)
    except GeodetError:  # the labelled area does not reach this scene
        return None


@torch.no_grad()
def cell_features(model, sc, rect: np.ndarray, device=None, batch: int = 8) -> np.ndarray:
    """Per cell, the mean of the network's coarsest FPN level over the cell's pixels, L2-normalised:
    what the cell looks like to the model."""
    from ..pipeline.detect import resolve_device
    from .sampler import chip_tile

    dev = resolve_device(device or "auto")
    net = copy.deepcopy(model.net).eval().to(dev)
    out = []
    for i in range(0, len(rect), batch):
        imgs = []
        for x0, y0, x1, y1 in rect[i : i + batch].astype(int):
            side = max(x1 - x0, y1 - y0)
            img, _ = sc.read_tile(chip_tile(int(x0), int(y0), side, (0, 0, sc.width, sc.height)))
            imgs.append(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)))
        x = net.transform([im.to(dev) for im in imgs])[0].tensors
        top = list(net.backbone(x).values())[-1]
        out.append(torch.nn.functional.normalize(top.mean(dim=(2, 3)), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1))


def cell_priority(cells: SceneCells, strategy: str) -> np.ndarray:
    """The per-cell score a strategy ranks by (before spreading): ``uncertainty``, the summed doubt
    of the detections around the operating point; ``per-object``, that doubt per object the cell
    is expected to hold (labelling it costs the objects in it: a cell of confident false alarms
    teaches much for no label at all)."""
    u = cells.stats["uncertainty"].reshape(-1)
    if strategy == "per-object":
        return u / (1.0 + cells.stats["confident"].reshape(-1))
    return u


def kcenter(features: np.ndarray, taken: np.ndarray, allowed: np.ndarray, n: int,
            weight: np.ndarray | None = None) -> list[int]:
    """Greedy k-center (core-set): each pick the allowed cell farthest in feature space from every
    taken or picked cell (times ``weight`` when given: a doubt-weighted core-set)."""
    if taken.any():
        d = np.min(1 - features @ features[taken].T, axis=1)
    else:
        d = np.full(len(features), 2.0)
    w = np.ones(len(features)) if weight is None else weight
    score = np.where(allowed, d * w, -np.inf)
    out = []
    for _ in range(min(n, int(allowed.sum()))):
        i = int(np.argmax(score))
        if not np.isfinite(score[i]):
            break
        out.append(i)
        d = np.minimum(d, 1 - features @ features[i])
        score = np.where(allowed, d * w, -np.inf)
        score[out] = -np.inf
    return out


def rank_scene(cells: SceneCells, n: int, strategy: str) -> list[int]:
    """The ``n`` cells (flat indices) of one scene a strategy suggests, best first."""
    if strategy in ("uncertainty", "per-object"):
        rc = pick(cell_priority(cells, strategy).reshape(cells.rows, cells.cols), n,
                  cells.allowed.reshape(cells.rows, cells.cols))
        return [r * cells.cols + c for r, c in rc]
    p = cell_priority(cells, "per-object")
    weight = None if strategy == "coreset" else p / max(float(p.max()), 1e-12) + 1e-3
    return kcenter(cells.features, cells.labelled, cells.allowed, n, weight)


def suggest_tiles(model, scenes: Sequence, n: int = 20, cell: int | None = None, labelled_area=None,
                  progress: bool = True, strategy: str = "uncertainty", **settings):
    """The ``n`` cells of ``scenes`` most worth labelling next, as a GeoDataFrame with ``rank``,
    ``scene``, ``cell_row``, ``cell_col``, ``uncertainty``, ``uncertain``, ``confident`` and
    ``reason``. ``cell``: the cell side in pixels (default: the model's tile size).
    ``labelled_area``: polygons already labelled; cells mostly inside them are not suggested.
    ``strategy``: how cells are ranked (``STRATEGIES``; see ``cell_priority`` and ``kcenter``)."""
    from ..pipeline.settings import resolve_detect_settings

    card = getattr(model, "card", None)
    if card is not None and card.operating_point is None and "AP50" in card.metrics:  # validation ran
        raise GeodetError("the model has no operating point: its validation found no object (AP50 "
                          f"{float(card.metrics.get('AP50') or 0):.3f}), so its uncertainty cannot be told: train it "
                          "longer or on more labels, then suggest")
    if card is None or card.operating_point is None:
        raise GeodetError("the model has no operating point (the best-F1 score that validation sets), so its "
                          "uncertainty cannot be told: use a model trained with validation (geodet train keeps a "
                          "held-out strip unless train.val_fraction is 0)")
    if n < 1:
        raise GeodetError(f"--count must be at least 1, got {n}")
    if strategy not in STRATEGIES:
        raise GeodetError(f"--strategy must be one of {', '.join(STRATEGIES)}, got '{strategy}'")
    op = float(card.operating_point)
    s = resolve_detect_settings(card, **{k: v for k, v in settings.items() if k != "config"})
    cell = int(cell or s.tile_size)
    from ..io.scene import grid_crs, open_raster

    from ..pipeline.job import check_each_scene_once
    from ..pipeline.scenes import scene_names

    check_each_scene_once(scenes, "a scene named twice would have its cells suggested twice")
    area = None
    if labelled_area is not None:  # missing or unreadable: one line before any detection
        from ..io.labels import read_labels

        from .area import area_polygons

        area = read_labels(labelled_area, None, what="labelled area", allow_empty=True)
        area_polygons(area, labelled_area, allow_empty=True)  # lines or points: refused as training refuses them
        if not len(area):
            log.warning("%s holds no polygon yet: nothing counts as labelled", labelled_area)
            area = None
    reached = []
    for path in scenes:  # before any detection: cells are polygons on a map
        with open_raster(path) as src:
            if grid_crs(src) is None:
                raise GeodetError(f"{path}: the scene has no CRS or georeferencing, so the cells to label cannot be "
                                  "placed on a map: assign them (gdal_edit.py -a_srs EPSG:xxxx -a_ullr ...)")
            if area is not None:
                reached.append(_area_reaches(area, src))
    if area is not None and not any(reached):  # a project's area, labelled on other scenes so far
        log.warning("%s reaches none of these scenes: no cell of them counts as labelled (if you labelled here, "
                    "check the area's CRS)", labelled_area)
    scenes_cells = [scene_cells(model, path, s, cell, op, labelled_area, progress,
                                strategy in ("coreset", "hybrid"), settings) for path in scenes]
    for c, name in zip(scenes_cells, scene_names(scenes)):  # named as detect names them: apart where names repeat
        c.name = name
    # one ranking over every scene: a scene with more doubt gets more of the n suggestions
    flat = sorted(((float(cell_priority(c, strategy)[i]), k) for k, c in enumerate(scenes_cells)
                   for i in np.flatnonzero(c.allowed)), key=lambda t: -t[0])
    per_scene = [sum(1 for _, k in flat[:n] if k == j) for j in range(len(scenes_cells))]
    rows_out = [_suggestion(c, i, op, strategy) for c, m in zip(scenes_cells, per_scene)
                for i in rank_scene(c, m, strategy)]
    if not rows_out:
        raise GeodetError("no cell to suggest: every cell is already labelled or holds no valid pixels")
    if strategy in ("uncertainty", "per-object"):  # ranked by the strategy's own priority, across scenes
        rows_out.sort(key=lambda d: -d["_priority"])
    return _suggestions_frame(rows_out, op, cell, strategy)


def _area_reaches(area, src) -> bool:
    """Whether the labelled-area polygons (a GeoDataFrame) reach the raster ``src``'s extent."""
    from shapely.geometry import box

    if area.crs is not None and src.crs is not None and area.crs != src.crs:
        area = area.to_crs(src.crs)
    return bool(area.geometry.intersects(box(*src.bounds)).any())


def _suggestion(cells: SceneCells, i: int, op: float, strategy: str = "uncertainty") -> dict:
    r, c = divmod(int(i), cells.cols)
    st = cells.stats
    u, near, sure = float(st["uncertainty"][r, c]), int(st["uncertain"][r, c]), int(st["confident"][r, c])
    if near:
        reason = (f"{near} detection(s) scored near the operating point {op:.2f} (the model is unsure there), "
                  f"{sure} at or above it")
    else:
        reason = f"no detection scored near the operating point {op:.2f}, {sure} at or above it"
    if strategy in ("coreset", "hybrid"):
        reason = f"unlike the labelled cells to the network; {reason}"
    return {"scene": cells.name, "cell_row": r, "cell_col": c, "uncertainty": round(u, 3), "uncertain": near,
            "confident": sure, "reason": reason, "geometry": cells.polys[i], "_crs": cells.crs,
            "_priority": float(cell_priority(cells, strategy)[i])}


def _suggestions_frame(rows_out: list[dict], op: float, cell: int, strategy: str):
    import geopandas as gpd
    import pandas as pd

    for i, d in enumerate(rows_out):
        d["rank"] = i + 1
    crss = {str(d["_crs"]) for d in rows_out}
    crs = rows_out[0]["_crs"] if len(crss) == 1 else "EPSG:4326"
    parts = [gpd.GeoDataFrame([{k: v for k, v in d.items() if not k.startswith("_")}], geometry=[d["geometry"]],
                              crs=d["_crs"])
             .to_crs(crs) for d in rows_out]
    out = pd.concat(parts, ignore_index=True)
    out["done"] = 0  # the user sets it to 1 on the cells labelled (geodet suggest --done adds those)
    out = gpd.GeoDataFrame(out[["rank", "scene", "cell_row", "cell_col", "uncertainty", "uncertain", "confident",
                                "reason", "done", "geometry"]], geometry="geometry", crs=crs)
    out.attrs.update(operating_point=op, cell_px=cell, strategy=strategy)
    return out


def _valid_share(sc, rows: int, cols: int, cell: int) -> np.ndarray:
    """Share of valid (not nodata) pixels per cell, from one decimated read of the mask."""
    if sc.all_valid and not sc.is_float:
        return np.ones((rows, cols))
    _, valid, scale = sc.overview(max(rows, cols) * 16)
    h, w = valid.shape
    out = np.zeros((rows, cols))
    for r in range(rows):
        for c in range(cols):
            y0, y1 = int(r * cell / scale), max(int(r * cell / scale) + 1, int(min((r + 1) * cell, sc.height) / scale))
            x0, x1 = int(c * cell / scale), max(int(c * cell / scale) + 1, int(min((c + 1) * cell, sc.width) / scale))
            block = valid[min(y0, h - 1) : min(y1, h), min(x0, w - 1) : min(x1, w)]
            out[r, c] = float(block.mean()) if block.size else 0.0
    return out


def write_suggestions(frame, path) -> Path:
    """The suggestions as a GeoPackage (or any vector format geodet writes) with a QGIS style:
    thick outlines and the rank as a label."""
    import pyogrio

    from ..io.style import suggestion_qml
    from ..io.writers import GPKG_VERSION, atomic_path, output_format

    path = Path(path)
    fmt = output_format(path)
    if fmt not in ("gpkg", "geojson", "fgb", "shp"):
        raise GeodetError(f"suggestions are written as .gpkg, .geojson, .fgb or .shp, not {fmt}")
    with atomic_path(path) as tmp:
        out = frame.to_crs("EPSG:4326") if fmt == "geojson" else frame
        drivers = {"gpkg": "GPKG", "geojson": "GeoJSON", "fgb": "FlatGeobuf", "shp": "ESRI Shapefile"}
        with warnings.catch_warnings():  # a shapefile's 10-character field names ('uncertaint'), as in QGIS
            warnings.filterwarnings("ignore", message="Normalized/laundered field name")
            pyogrio.write_dataframe(out, tmp, driver=drivers[fmt], layer=path.stem,
                                    dataset_options={"VERSION": GPKG_VERSION} if fmt == "gpkg" else None)
        if fmt == "gpkg":
            from ..io.style import add_gpkg_style_qml

            add_gpkg_style_qml(tmp, path.stem, suggestion_qml(), "geodet: cells to label next, by rank")
        else:
            tmp.with_suffix(".qml").write_text(suggestion_qml(), encoding="utf-8")
    return path


def add_done_cells(suggestions, labelled_area) -> tuple[int, int]:
    """Add the suggested cells the user labelled to the labelled-area file (made when missing): the
    cells whose ``done`` field the user set (1, true, yes, x), or every cell of the file when none
    is set (a file without that field is refused: it is not suggestions). The area's layer is rewritten
    atomically, in its own CRS (or the cells' when new); a GeoPackage's other layers stay as they were. Returns (cells added, polygons in the labelled area now)."""
    import geopandas as gpd
    import pandas as pd
    import pyogrio
    import shapely

    from ..io.labels import layer_source, read_labels
    from ..io.writers import GPKG_VERSION, atomic_path, output_format, same_file_key

    layers_named = {layer_source(suggestions)[1], layer_source(labelled_area)[1]} - {None}  # none: the file's one
    if same_file_key(suggestions) == same_file_key(labelled_area) and len(layers_named) < 2:
        raise GeodetError(f"{labelled_area} is the suggestions file (--done): the labelled area is another file, which "
                          "the done cells are added to")
    cells = read_labels(suggestions, None, what="suggestions file")
    done = _done_rows(cells)
    if done is None:  # not suggestions: a labels file's objects would become labelled cells
        raise GeodetError(f"{suggestions} has no 'done' field, so it is not a file geodet suggest wrote: give the "
                          "suggestions file (its cells with 'done' ticked), or draw the area in the labelled-area "
                          "file itself")
    if done is not None and done.any():
        cells = cells[done]
    else:  # e.g. a selection of the cells labelled, passed alone from QGIS
        log.warning("%s: no cell is marked done (its 'done' field), so all %d are added as labelled: an object left "
                    "unlabelled in one will be taught as background", suggestions, len(cells))
    file, named = layer_source(labelled_area)
    path = Path(file)
    fmt = output_format(path)
    if fmt not in ("gpkg", "geojson", "fgb", "shp"):
        raise GeodetError(f"the labelled area is written as .gpkg, .geojson, .fgb or .shp, not {fmt}")
    new = gpd.GeoDataFrame({"source": [Path(str(suggestions)).name] * len(cells)}, geometry=cells.geometry.values,
                           crs=cells.crs)
    added = len(new)
    layer = named or path.stem
    if path.exists():
        old = read_labels(labelled_area, None, what="labelled area", allow_empty=True)
        if fmt == "gpkg" and not named:  # the layer read (the file's one): the file's other layers stay as they are
            layer = next(name for name, geom in pyogrio.list_layers(path) if geom)
        new = new.to_crs(old.crs) if old.crs is not None and new.crs is not None else new
        if len(old):  # a cell added before (--done run twice) is not added again
            have = shapely.union_all(np.array(old.geometry.values, dtype=object))
            cell_geoms = np.array(new.geometry.values, dtype=object)
            inside = shapely.area(shapely.intersection(cell_geoms, have)) >= 0.99 * shapely.area(cell_geoms)
            if inside.any():
                log.info("%d cell(s) of %s are in %s already", int(inside.sum()), suggestions, labelled_area)
            new = new[~inside]
        added = len(new)
        keep = [c for c in old.columns if c != old.geometry.name]
        old = gpd.GeoDataFrame(old[keep], geometry=old.geometry.values, crs=old.crs)
        for c in keep:  # the cells have no value there: whole numbers stay whole, with nulls (not floats)
            if pd.api.types.is_integer_dtype(old[c].dtype) and c not in new.columns:
                old[c] = old[c].astype("Int64")
        new = gpd.GeoDataFrame(pd.concat([old, new], ignore_index=True), geometry="geometry",
                               crs=old.crs if old.crs is not None else new.crs)
    drivers = {"gpkg": "GPKG", "geojson": "GeoJSON", "fgb": "FlatGeobuf", "shp": "ESRI Shapefile"}
    with atomic_path(path) as tmp:
        if fmt == "gpkg" and path.exists():
            # a copy (through SQLite, so edits QGIS still holds in its write-ahead log come along), the
            # layer replaced in it, then renamed into place
            with contextlib.closing(sqlite3.connect(path)) as src, contextlib.closing(sqlite3.connect(tmp)) as dst:
                src.backup(dst)
        out = new.to_crs("EPSG:4326") if fmt == "geojson" and new.crs is not None else new
        pyogrio.write_dataframe(out, tmp, driver=drivers[fmt], layer=layer,
                                dataset_options={"VERSION": GPKG_VERSION} if fmt == "gpkg" and not path.exists() else None)
    return added, len(new)


def _done_rows(frame):
    """Which rows the user marked done, or None when the file has no ``done`` field."""
    col = next((c for c in frame.columns if str(c).lower() == "done"), None)
    if col is None:
        return None
    v = frame[col]
    if v.dtype == bool:
        return v.fillna(False).to_numpy()
    if v.dtype.kind in "iuf":  # a number (a float column where a cell is empty): 1 is done, 0 or empty is not
        return (v.fillna(0) != 0).to_numpy()
    return v.astype(str).str.strip().str.lower().isin(("1", "1.0", "true", "yes", "y", "x", "done")).to_numpy()
