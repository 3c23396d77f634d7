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

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np

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


def suggest_tiles(model, scenes: Sequence, n: int = 20, cell: int | None = None, labelled_area=None,
                  progress: bool = True, **settings):
    """The ``n`` cells of ``scenes`` most worth labelling next, as a GeoDataFrame (one per scene
    CRS group is the caller's concern) with ``rank``, ``scene``, ``cell_row``, ``cell_col``,
    ``uncertainty``, ``uncertain``, ``confident`` and ``reason``. ``cell``: the cell side in
    pixels (default: the model's tile size). ``labelled_area``: polygons already labelled; cells
    mostly inside them are not suggested."""
    import geopandas as gpd
    import shapely

    from ..io.writers import boxes_to_polygons
    from ..pipeline.reader import open_scene
    from ..pipeline.scenes import detect_scene
    from ..pipeline.settings import resolve_detect_settings

    card = getattr(model, "card", None)
    if card is None or card.operating_point is None:
        raise GeodetError("the model has no operating point (the best-F1 score that validation sets), so its "
                          "uncertainty cannot be told: use a model trained with validation (geodet train keeps a "
                          "held-out strip unless train.val_fraction is 0)")
    if n < 1:
        raise GeodetError(f"--n must be at least 1, got {n}")
    op = float(card.operating_point)
    s = resolve_detect_settings(card, **{k: v for k, v in settings.items() if k != "config"})
    cell = int(cell or s.tile_size)
    candidates = []  # (uncertainty, scene index, row, col, uncertain, confident, polygon)
    frames = []
    for k, path in enumerate(scenes):
        sc = open_scene(path, s, card)
        try:
            frame = detect_scene(sc, model, progress=progress, **settings)
            boxes = frame[["px_x0", "px_y0", "px_x1", "px_y1"]].to_numpy(np.float64)
            cs = cell_scores(boxes, frame["score"].to_numpy(np.float64), sc.width, sc.height, cell, op)
            rows, cols = cs["uncertainty"].shape
            rect = np.array([[c * cell, r * cell, min((c + 1) * cell, sc.width), min((r + 1) * cell, sc.height)]
                             for r in range(rows) for c in range(cols)], np.float64)
            polys = boxes_to_polygons(rect, sc.transform)
            allowed = np.ones(rows * cols, bool)
            if labelled_area is not None:
                from ..training.area import read_labelled_area

                try:
                    done = read_labelled_area(labelled_area, sc)
                except GeodetError:  # the labelled area does not reach this scene
                    done = None
                if done is not None:
                    cells = shapely.box(rect[:, 0], rect[:, 1], rect[:, 2], rect[:, 3])
                    inside = shapely.area(shapely.intersection(cells, done)) / shapely.area(cells)
                    allowed &= inside < 0.5
            valid = _valid_share(sc, rows, cols, cell)
            allowed &= valid.reshape(-1) > 0.5
            frames.append((Path(str(path)).name, sc.crs, rows, cols, cs, polys, allowed))
        finally:
            sc.close()
    # one ranking over every scene: a scene with more doubt gets more of the n suggestions
    rows_out = []
    flat = [(float(f[4]["uncertainty"].reshape(-1)[i]), k, i) for k, f in enumerate(frames)
            for i in np.flatnonzero(f[6])]
    flat.sort(key=lambda t: -t[0])
    per_scene = {k: 0 for k in range(len(frames))}
    for _, k, _i in flat[: n]:
        per_scene[k] += 1
    for k, (name, crs, rows, cols, cs, polys, allowed) in enumerate(frames):
        for r, c in pick(cs["uncertainty"], per_scene[k], allowed.reshape(rows, cols)):
            i = r * cols + c
            u, near, sure = float(cs["uncertainty"][r, c]), int(cs["uncertain"][r, c]), int(cs["confident"][r, c])
            reason = (f"{near} detection(s) scored near the operating point {op:.2f} (the model is unsure there), "
                      f"{sure} at or above it")
            rows_out.append({"scene": name, "cell_row": r, "cell_col": c, "uncertainty": round(u, 3), "uncertain": near,
                             "confident": sure, "reason": reason, "geometry": polys[i], "_crs": crs})
    rows_out.sort(key=lambda d: -d["uncertainty"])
    if not rows_out:
        raise GeodetError("no cell to suggest: every cell is already labelled or holds no valid pixels")
    for i, d in enumerate(rows_out):
        d["rank"] = i + 1
    crss = {str(d["_crs"]) for d in rows_out}
    crs = rows_out[0]["_crs"] if len(crss) == 1 else "EPSG:4326"
    parts = [gpd.GeoDataFrame([{k: v for k, v in d.items() if k != "_crs"}], geometry=[d["geometry"]], crs=d["_crs"])
             .to_crs(crs) for d in rows_out]
    import pandas as pd

    out = pd.concat(parts, ignore_index=True)
    out = gpd.GeoDataFrame(out[["rank", "scene", "cell_row", "cell_col", "uncertainty", "uncertain", "confident",
                                "reason", "geometry"]], geometry="geometry", crs=crs)
    out.attrs["operating_point"] = op
    out.attrs["cell_px"] = cell
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
        pyogrio.write_dataframe(out, tmp, driver=drivers[fmt], layer=path.stem,
                                dataset_options={"VERSION": GPKG_VERSION} if fmt == "gpkg" else None)
        if fmt == "gpkg":
            from ..io.style import add_gpkg_style_qml

            add_gpkg_style_qml(tmp, path.stem, suggestion_qml(), "geodet: cells to label next, by rank")
        else:
            tmp.with_suffix(".qml").write_text(suggestion_qml(), encoding="utf-8")
    return path
