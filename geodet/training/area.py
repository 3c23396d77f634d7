"""Where the user labelled: the labelled area of a scene as one geometry in the scene's pixel grid
(pixel-edge coordinates, as label boxes), and what training asks of it: is a chip wholly inside,
which of a chip's pixels were never labelled (the loss ignores anchors there), random points
inside it, which labels lie inside, and a validation strip cut from it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import GeodetError

log = logging.getLogger(__name__)


def area_polygons(gdf, path, allow_empty: bool = False) -> tuple:
    """(geometries, which of them are polygonal) of a labelled area's frame; refused in one line
    where none is (lines or points drawn as the area; an empty area where not ``allow_empty``)."""
    import shapely

    geoms = np.array(gdf.geometry.values, dtype=object)
    polygonal = np.isin(shapely.get_type_id(geoms), [3, 6, 7])  # Polygon, MultiPolygon, GeometryCollection
    if (len(geoms) or not allow_empty) and not polygonal.any():
        kinds = ", ".join(sorted({g.geom_type for g in geoms if g is not None})) or "no geometry"
        raise GeodetError(f"{path}: the labelled area must be polygons (it holds {kinds}): draw the area you "
                          "labelled as one or more polygons")
    return geoms, polygonal


def read_labelled_area(path: str | Path, scene):
    """The polygons of ``path`` (any OGR format, any CRS) reprojected to ``scene``, repaired, merged
    and mapped to its pixel grid, clipped to the scene. Raises GeodetError when the file holds no
    polygon or the area does not overlap the scene."""
    import shapely
    from shapely.geometry import box

    from ..io.labels import read_labels, repair_geometries

    gdf = read_labels(path, None, what="labelled area")
    if gdf.crs is not None and scene.crs is not None and gdf.crs != scene.crs:
        gdf = gdf.to_crs(scene.crs)
    gdf, counts = repair_geometries(gdf)
    geoms, polygonal = area_polygons(gdf, path)
    if counts["repaired"]:
        log.info("%s: %d invalid polygon(s) of the labelled area repaired", path, counts["repaired"])
    merged = shapely.union_all(geoms[polygonal])
    merged = shapely.get_parts(merged)
    merged = shapely.union_all([g for g in merged if shapely.get_type_id(g) in (3, 6)]) if len(merged) else merged
    inv = ~scene.transform

    def to_pixels(xy):
        x, y = xy[:, 0], xy[:, 1]
        return np.stack([inv.a * x + inv.b * y + inv.c, inv.d * x + inv.e * y + inv.f], 1)

    pixel = shapely.transform(merged, to_pixels)
    inside = shapely.intersection(pixel, box(0, 0, scene.width, scene.height))
    if inside.is_empty or inside.area < 1.0:
        b = gdf.total_bounds
        sb = scene.bounds()
        raise GeodetError(
            f"{path}: the labelled area does not overlap scene {Path(scene.path).name}: area extent ({b[0]:.2f}, "
            f"{b[1]:.2f}, {b[2]:.2f}, {b[3]:.2f}) vs scene extent ({sb[0]:.2f}, {sb[1]:.2f}, {sb[2]:.2f}, {sb[3]:.2f}) "
            f"in {scene.crs.to_string() if scene.crs else 'the scene grid'}: give the polygons of the part of this "
            "scene you labelled")
    shapely.prepare(inside)
    return inside


def covers_window(geom, window) -> bool:
    """Whether the geometry holds the whole window (x0, y0, x1, y1); None means everywhere."""
    if geom is None:
        return True
    from shapely.geometry import box

    return bool(geom.contains(box(*window)))


def unlabelled_mask(geom, x0: int, y0: int, width: int, height: int) -> np.ndarray | None:
    """Boolean ``[height, width]`` mask of the window's pixels whose centre lies outside the labelled
    area (True: never labelled); None when the whole window is labelled."""
    if geom is None or covers_window(geom, (x0, y0, x0 + width, y0 + height)):
        return None
    from rasterio.features import rasterize
    from rasterio.transform import Affine

    labelled = rasterize([(geom, 1)], out_shape=(height, width), transform=Affine.translation(x0, y0), fill=0,
                         dtype="uint8")
    return labelled == 0


def centres_inside(geom, boxes: np.ndarray) -> np.ndarray:
    """Which boxes [N, 4] have their centre inside the geometry (all of them for None)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if geom is None:
        return np.ones(len(boxes), bool)
    import shapely

    return shapely.contains_xy(geom, (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2)


def within(boxes: np.ndarray, rect) -> np.ndarray:
    """Which boxes [N, 4] lie wholly inside ``rect`` (x0, y0, x1, y1)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return (b[:, 0] >= rect[0]) & (b[:, 1] >= rect[1]) & (b[:, 2] <= rect[2]) & (b[:, 3] <= rect[3])


def random_point(geom, rect, rng, tries: int = 64) -> tuple[float, float]:
    """A uniform random point of ``rect`` (x0, y0, x1, y1) inside the geometry (rejection
    sampling; the geometry's representative point when the part inside ``rect`` is tiny)."""
    import shapely

    x0, y0, x1, y1 = rect
    for _ in range(tries):
        x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
        if geom is None or shapely.contains_xy(geom, x, y):
            return x, y
    if geom is None:
        return (x0 + x1) / 2, (y0 + y1) / 2
    from shapely.geometry import box

    part = geom.intersection(box(*rect))
    p = (part if not part.is_empty else geom).representative_point()
    return p.x, p.y


def validation_split(rect, fraction: float, min_side: int = 16):
    """Split ``rect`` (x0, y0, x1, y1) into a training part and a validation strip holding
    ``fraction`` of it, cut across its longer side (the right-hand or the bottom strip); None when
    either part would be narrower than ``min_side`` px."""
    return next(validation_splits(rect, fraction, None, min_side), None)


def validation_splits(rect, fraction: float, geom=None, min_side: int = 16):
    """Candidate (rest, strip) splits of ``rect`` (x0, y0, x1, y1), best first: across its longer
    side, then its shorter; the right-hand (bottom) strip, then the left-hand (top) one. Each strip
    holds ``fraction`` of the labelled area ``geom`` inside ``rect`` (of ``rect`` for None: a
    labelled area of separate pieces, as the labelling loop makes it, gets a strip that reaches
    into them, not one over the gap between). Splits with a part narrower than ``min_side`` px are
    left out."""
    from shapely.geometry import box

    x0, y0, x1, y1 = (int(round(v)) for v in rect)
    total = None if geom is None else geom.intersection(box(x0, y0, x1, y1)).area
    whole = total is None or total >= (x1 - x0) * (y1 - y0) - 1e-6
    axes = ("x", "y") if x1 - x0 >= y1 - y0 else ("y", "x")
    for axis in axes:
        lo, hi = (x0, x1) if axis == "x" else (y0, y1)
        for high in (True, False):
            if whole:
                at = hi - (hi - lo) * fraction if high else lo + (hi - lo) * fraction
            else:
                at = _split_holding(geom, (x0, y0, x1, y1), axis, high, fraction * total)
            split = int(round(at))
            if split - lo < min_side or hi - split < min_side:
                continue
            first, second = ((x0, y0, split, y1), (split, y0, x1, y1)) if axis == "x" else \
                ((x0, y0, x1, split), (x0, split, x1, y1))
            yield (first, second) if high else (second, first)


def _split_holding(geom, rect, axis: str, high: bool, want: float) -> float:
    """Where to cut ``rect`` across ``axis`` so that the strip at its high (or low) end holds
    ``want`` of ``geom``'s area (bisection: the strip's share grows monotonically as it widens)."""
    from shapely.geometry import box

    x0, y0, x1, y1 = rect
    lo, hi = (x0, x1) if axis == "x" else (y0, y1)

    def strip_area(at):
        r = ((at, y0, x1, y1) if high else (x0, y0, at, y1)) if axis == "x" else \
            ((x0, at, x1, y1) if high else (x0, y0, x1, at))
        return geom.intersection(box(*r)).area

    a, b = float(lo), float(hi)
    for _ in range(40):
        mid = (a + b) / 2
        if (strip_area(mid) >= want) == high:  # a high strip from mid holds enough: cut further up
            a = mid
        else:
            b = mid
    return (a + b) / 2
