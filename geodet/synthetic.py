"""Georeferenced synthetic scenes of dense small vehicles, with labels, for tests and the demo.

The layout (roads, parking lots, vehicles) is drawn first as vectors; the raster is then rendered
block by block, so any size is written without holding the scene in memory. Everything is
deterministic for a seed.

Vehicles are rotated rectangles 6-20 px long: ``car`` (6-12 px) and ``truck`` (13-20 px), some in
packed parking rows (touching neighbours), some along roads, some scattered, each with a shadow.
Labels are the vehicles' rotated-rectangle outlines in the scene CRS, column ``label``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import GeodetError

CLASSES = ("car", "truck")
BLOCK = 512
NODATA = 0


@dataclass
class Vehicle:
    cx: float  # centre, pixel-edge coordinates
    cy: float
    length: float
    width: float
    angle: float  # radians, direction of the long axis from the +x axis
    cls: int
    color: tuple[float, float, float]

    def corners(self) -> np.ndarray:
        c, s = math.cos(self.angle), math.sin(self.angle)
        hl, hw = self.length / 2, self.width / 2
        local = np.array([[-hl, -hw], [hl, -hw], [hl, hw], [-hl, hw]])
        rot = np.array([[c, -s], [s, c]])
        return local @ rot.T + [self.cx, self.cy]

    def bbox(self) -> tuple[float, float, float, float]:
        pts = self.corners()
        return (pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max())


@dataclass
class Lot:
    cx: float
    cy: float
    length: float
    width: float
    angle: float


@dataclass
class Road:
    x0: float
    y0: float
    angle: float
    width: float


@dataclass
class SyntheticScene:
    image: Path
    labels: Path
    width: int
    height: int
    gsd_m: float
    n_objects: int
    crs: str


def _car_color(rng) -> tuple[float, float, float]:
    palette = [(230, 230, 235), (25, 25, 30), (180, 30, 30), (40, 60, 160), (160, 160, 170), (200, 190, 60), (30, 110, 60)]
    base = np.array(palette[rng.integers(len(palette))], float) + rng.normal(0, 8, 3)
    return tuple(np.clip(base, 5, 250))


def _truck_color(rng) -> tuple[float, float, float]:
    palette = [(240, 240, 240), (210, 210, 200), (120, 130, 140), (200, 120, 40)]
    base = np.array(palette[rng.integers(len(palette))], float) + rng.normal(0, 6, 3)
    return tuple(np.clip(base, 5, 250))


def _new_vehicle(rng, cx, cy, angle, truck_share=0.2, max_len=None) -> Vehicle:
    if rng.random() < truck_share and (max_len is None or max_len >= 13):
        length = rng.uniform(13, min(20, max_len or 20))
        width = rng.uniform(5.5, 7.5)
        return Vehicle(cx, cy, length, width, angle, 1, _truck_color(rng))
    length = rng.uniform(7, min(12, max_len or 12))
    width = rng.uniform(4, 5.5)
    return Vehicle(cx, cy, length, width, angle, 0, _car_color(rng))


class _Occupancy:
    """Grid hash of placed rotated rectangles, for rejecting overlaps (touching is allowed)."""

    def __init__(self, cell: int = 64):
        self.cell = cell
        self.cells: dict[tuple[int, int], list] = {}

    def _keys(self, bbox):
        x0, y0, x1, y1 = bbox
        for i in range(int(x0 // self.cell), int(x1 // self.cell) + 1):
            for j in range(int(y0 // self.cell), int(y1 // self.cell) + 1):
                yield (i, j)

    def free(self, poly) -> bool:
        for key in self._keys(poly.bounds):
            for other in self.cells.get(key, ()):
                if poly.intersects(other) and poly.intersection(other).area > 0.5:
                    return False
        return True

    def add(self, poly) -> None:
        for key in self._keys(poly.bounds):
            self.cells.setdefault(key, []).append(poly)


def make_layout(width: int, height: int, seed: int, density: float = 1.0):
    """Roads, parking lots and vehicles for a scene, in pixel coordinates."""
    from shapely.geometry import Polygon

    rng = np.random.default_rng(seed)
    area = width * height
    roads: list[Road] = []
    for k in range(max(1, int(round(math.sqrt(area) / 700)))):
        horizontal = k % 2 == 0
        angle = (0.0 if horizontal else math.pi / 2) + rng.uniform(-0.25, 0.25)
        roads.append(Road(rng.uniform(0, width), rng.uniform(0, height), angle, rng.uniform(14, 20)))
    occ = _Occupancy()
    vehicles: list[Vehicle] = []

    def place(v: Vehicle, margin: float = 1.0) -> bool:
        x0, y0, x1, y1 = v.bbox()
        if x0 < margin or y0 < margin or x1 > width - margin or y1 > height - margin:
            return False
        poly = Polygon(v.corners())
        if not occ.free(poly):
            return False
        occ.add(poly)
        vehicles.append(v)
        return True

    # Parking lots with packed rows: neighbours 0-1.5 px apart, many touching.
    lots: list[Lot] = []
    n_lots = max(1, int(round(density * area / 450**2)))
    for _ in range(n_lots * 4):
        if len(lots) >= n_lots:
            break
        lot = Lot(rng.uniform(0, width), rng.uniform(0, height), rng.uniform(70, 170), rng.uniform(50, 120), rng.uniform(0, math.pi))
        lot_poly = Polygon(Vehicle(lot.cx, lot.cy, lot.length, lot.width, lot.angle, 0, (0, 0, 0)).corners())
        if not occ.free(lot_poly.buffer(4)):
            continue
        lots.append(lot)
        c, s = math.cos(lot.angle), math.sin(lot.angle)
        ux, uy = c, s  # along rows
        vx, vy = -s, c  # across rows
        row_pitch = 16.0
        v_pos = -lot.width / 2 + 8
        while v_pos + 8 <= lot.width / 2:
            u_pos = -lot.length / 2 + 3
            while True:
                proto = _new_vehicle(rng, 0, 0, lot.angle + math.pi / 2, truck_share=0.1, max_len=14)
                half = proto.width / 2
                if u_pos + 2 * half > lot.length / 2 - 2:
                    break
                u_c = u_pos + half
                proto.cx = lot.cx + ux * u_c + vx * v_pos
                proto.cy = lot.cy + uy * u_c + vy * v_pos
                if rng.random() < density * 0.85:
                    place(proto, margin=1.0)
                u_pos += 2 * half + rng.choice([0.0, 0.0, 0.5, 1.0, 1.5])
            v_pos += row_pitch
        occ.add(lot_poly)  # nothing else may land on the lot

    # Vehicles along roads, in lanes, with the road's heading.
    for road in roads:
        c, s = math.cos(road.angle), math.sin(road.angle)
        length = math.hypot(width, height)
        n = int(density * length / 60)
        for _ in range(n):
            t = rng.uniform(-length, length)
            lane = rng.choice([-1, 1]) * road.width / 4
            cx = road.x0 + c * t - s * lane
            cy = road.y0 + s * t + c * lane
            place(_new_vehicle(rng, cx, cy, road.angle + rng.normal(0, 0.03), truck_share=0.3))

    # Scattered vehicles anywhere, any heading.
    for _ in range(int(density * area / 120**2)):
        place(_new_vehicle(rng, rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0, math.pi)))
    return roads, lots, vehicles


def _hash01(a: np.ndarray, b: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic pseudo-random values in [0, 1) from integer grid coordinates."""
    h = (a.astype(np.int64) * 73856093) ^ (b.astype(np.int64) * 19349663) ^ (seed * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    h = h ^ (h >> 16)
    return (h & 0xFFFF).astype(np.float32) / 65536.0


def _value_noise(x: np.ndarray, y: np.ndarray, scale: float, seed: int) -> np.ndarray:
    gx, gy = x / scale, y / scale
    ix, iy = np.floor(gx), np.floor(gy)
    fx, fy = gx - ix, gy - iy
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    v00 = _hash01(ix, iy, seed)
    v10 = _hash01(ix + 1, iy, seed)
    v01 = _hash01(ix, iy + 1, seed)
    v11 = _hash01(ix + 1, iy + 1, seed)
    return (v00 * (1 - fx) + v10 * fx) * (1 - fy) + (v01 * (1 - fx) + v11 * fx) * fy


FIELD_COLORS = np.array(
    [(92, 120, 60), (120, 140, 70), (150, 130, 90), (110, 95, 70), (70, 100, 55), (170, 160, 110)], np.float32
)


def _in_rect(px, py, cx, cy, half_l, half_w, angle):
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = px - cx, py - cy
    u = dx * c + dy * s
    v = -dx * s + dy * c
    return (np.abs(u) <= half_l) & (np.abs(v) <= half_w), u


def render_block(x0, y0, w, h, roads, lots, vehicles, seed) -> np.ndarray:
    """RGB float32 [3, h, w] of the block whose top-left pixel is (x0, y0)."""
    px = np.arange(x0, x0 + w, dtype=np.float32)[None, :] + 0.5
    py = np.arange(y0, y0 + h, dtype=np.float32)[:, None] + 0.5
    px, py = np.broadcast_arrays(px, py)
    # Fields: rotated strips of crops, each with its own colour, modulated by noise.
    rot = 0.3
    u = px * math.cos(rot) + py * math.sin(rot)
    v = -px * math.sin(rot) + py * math.cos(rot)
    fid = (_hash01(np.floor(u / 260), np.floor(v / 180), seed) * len(FIELD_COLORS)).astype(int)
    img = FIELD_COLORS[fid].transpose(2, 0, 1).copy()
    tex = 0.75 + 0.5 * _value_noise(px, py, 40.0, seed + 1) + 0.15 * np.sin(u / 3.0) * (fid % 2)
    img *= tex[None]
    for road in roads:
        c, s = math.cos(road.angle), math.sin(road.angle)
        dist = np.abs(-(px - road.x0) * s + (py - road.y0) * c)
        on = dist <= road.width / 2
        img[:, on] = np.array([95, 95, 100], np.float32)[:, None]
        mark = (dist <= 0.6) & (np.mod((px - road.x0) * c + (py - road.y0) * s, 12) < 6)
        img[:, mark] = 215
    def paint(shape, cx, cy, half_l, half_w, angle, fn):
        """Apply ``fn(view_mask, u_local, sub_slices)`` to pixels inside a rotated rectangle."""
        r = half_l + half_w + 1
        xa, xb = max(int(cx - r), x0), min(int(cx + r) + 1, x0 + w)
        ya, yb = max(int(cy - r), y0), min(int(cy + r) + 1, y0 + h)
        if xa >= xb or ya >= yb:
            return
        sl = (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
        mask, u_loc = _in_rect(px[sl], py[sl], cx, cy, half_l, half_w, angle)
        if mask.any():
            fn(mask, u_loc, sl)

    def fill(color):
        def _fn(mask, _u, sl):
            img[:, sl[0], sl[1]][:, mask] = color[:, None]
        return _fn

    def darken(mask, _u, sl):
        img[:, sl[0], sl[1]][:, mask] *= 0.45

    asphalt = np.array([70, 72, 76], np.float32)
    for lot in lots:
        paint(None, lot.cx, lot.cy, lot.length / 2, lot.width / 2, lot.angle, fill(asphalt))
    # Shadows first (offset down-right), then bodies, so a shadow never covers a neighbour.
    for veh in vehicles:
        paint(None, veh.cx + 1.5, veh.cy + 1.5, veh.length / 2, veh.width / 2, veh.angle, darken)
    for veh in vehicles:
        color = np.asarray(veh.color, np.float32)

        def body(mask, u_loc, sl, veh=veh, color=color):
            view = img[:, sl[0], sl[1]]
            view[:, mask] = color[:, None]
            if veh.cls == 0:  # windscreen
                glass = mask & (u_loc > veh.length * 0.1) & (u_loc < veh.length * 0.3)
                view[:, glass] = view[:, glass] * 0.4 + 10

        paint(None, veh.cx, veh.cy, veh.length / 2, veh.width / 2, veh.angle, body)
    rng = np.random.default_rng([seed, int(x0), int(y0)])
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img, 1, 255)


def _vehicles_in(vehicles, boxes, x0, y0, x1, y1, pad=3.0):
    """The vehicles whose box (padded for the shadow) reaches into the block."""
    hit = (boxes[:, 2] + pad >= x0) & (boxes[:, 0] - pad <= x1) & (boxes[:, 3] + pad >= y0) & (boxes[:, 1] - pad <= y1)
    return [vehicles[i] for i in np.flatnonzero(hit)]


def _in_nodata(x, y, width, height):
    """The nodata region: a triangle in the top-left corner (a collar, as in real scenes)."""
    return x / width + y / height < 0.35


def make_scene(
    image_path: str | Path,
    labels_path: str | Path,
    size: int | tuple[int, int] = 1024,
    gsd_m: float = 0.3,
    seed: int = 0,
    dtype: str = "uint8",
    bands: int = 3,
    nodata_region: bool = False,
    epsg: int = 32633,
    origin: tuple[float, float] = (500000.0, 4600000.0),
    density: float = 1.0,
) -> SyntheticScene:
    """Write a synthetic GeoTIFF and its GeoPackage of labels; returns what was written."""
    import geopandas as gpd
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window
    from shapely.geometry import Polygon

    width, height = (size, size) if isinstance(size, int) else size
    if width <= 0 or height <= 0:
        raise GeodetError(f"scene size must be positive, got {width} x {height}")
    if dtype not in ("uint8", "uint16"):
        raise GeodetError(f"dtype must be uint8 or uint16, got {dtype}")
    if bands not in (1, 3, 4):
        raise GeodetError(f"bands must be 1, 3 or 4, got {bands}")
    image_path, labels_path = Path(image_path), Path(labels_path)
    for folder in {image_path.parent, labels_path.parent}:
        folder.mkdir(parents=True, exist_ok=True)
    transform = from_origin(origin[0], origin[1], gsd_m, gsd_m)
    roads, lots, vehicles = make_layout(width, height, seed, density)
    if nodata_region:
        vehicles = [v for v in vehicles if not any(_in_nodata(x, y, width, height) for x, y in v.corners())]
    profile = dict(
        driver="GTiff", width=width, height=height, count=bands, dtype=dtype, crs=f"EPSG:{epsg}",
        transform=transform, tiled=True, blockxsize=256, blockysize=256, compress="deflate",
    )
    if nodata_region:
        profile["nodata"] = NODATA
    boxes = np.array([v.bbox() for v in vehicles], float).reshape(-1, 4)
    tmp = image_path.with_name(image_path.name + ".tmp")
    with rasterio.open(tmp, "w", **profile) as dst:
        for by in range(0, height, BLOCK):
            for bx in range(0, width, BLOCK):
                w, h = min(BLOCK, width - bx), min(BLOCK, height - by)
                near = _vehicles_in(vehicles, boxes, bx, by, bx + w, by + h)
                rgb = render_block(bx, by, w, h, roads, lots, near, seed)
                if bands == 1:
                    data = rgb.mean(axis=0, keepdims=True)
                elif bands == 4:
                    # NIR: vegetation bright, paved surfaces and vehicles dark.
                    green = rgb[1] - 0.5 * (rgb[0] + rgb[2])
                    nir = np.clip(60 + 3.0 * green + 0.3 * rgb.mean(axis=0), 1, 255)
                    data = np.concatenate([rgb, nir[None]], axis=0)
                else:
                    data = rgb
                if dtype == "uint16":
                    data = data * 16.0 + 200.0  # 12-bit-like sensor counts
                out = np.round(data).astype(dtype)
                if nodata_region:
                    xs = np.arange(bx, bx + w)[None, :] + 0.5
                    ys = np.arange(by, by + h)[:, None] + 0.5
                    out[:, _in_nodata(xs, ys, width, height)] = NODATA
                dst.write(out, window=Window(bx, by, w, h))
    tmp.replace(image_path)

    polys = []
    for v in vehicles:
        pts = v.corners()
        xs, ys = transform * (pts[:, 0], pts[:, 1])
        polys.append(Polygon(np.column_stack([xs, ys])))
    gdf = gpd.GeoDataFrame(
        {"label": [CLASSES[v.cls] for v in vehicles]}, geometry=polys, crs=f"EPSG:{epsg}"
    )
    if labels_path.exists():
        labels_path.unlink()
    gdf.to_file(labels_path, driver="GPKG", engine="pyogrio", VERSION="1.2")  # as geodet writes GeoPackages
    return SyntheticScene(image_path, labels_path, width, height, gsd_m, len(vehicles), f"EPSG:{epsg}")


def vehicle_pixel_boxes(width: int, height: int, seed: int, density: float = 1.0) -> np.ndarray:
    """Pixel-edge boxes [N, 4] of the vehicles a scene of this size and seed holds."""
    _, _, vehicles = make_layout(width, height, seed, density)
    return np.array([v.bbox() for v in vehicles], float).reshape(-1, 4)
