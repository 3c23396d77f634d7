"""Test helpers: ID-coded scenes, a perfect per-tile detector and a loopback range server."""

from __future__ import annotations

import contextlib
import http.server
import os
import random
import threading
from pathlib import Path

import numpy as np
import torch


def packed_boxes(width, height, min_size, max_size, seed=0, gap_choices=(0, 0, 1, 2)):
    """Dense, non-overlapping integer boxes (many touching) filling a width x height scene."""
    rng = np.random.default_rng(seed)
    occ = np.zeros((height, width), bool)
    boxes = []
    y = 0
    while y < height:
        row_h = int(rng.integers(min_size, max_size + 1))
        x = int(rng.integers(0, 3))
        while x < width:
            w = int(rng.integers(min_size, max_size + 1))
            h = int(rng.integers(min_size, row_h + 1))
            dy = int(rng.integers(0, row_h - h + 1))
            x1, y1 = min(x + w, width), min(y + dy + h, height)
            if x1 - x >= 2 and y1 - (y + dy) >= 2 and not occ[y + dy : y1, x:x1].any():
                occ[y + dy : y1, x:x1] = True
                boxes.append((x, y + dy, x1, y1))
            x = x1 + int(rng.choice(gap_choices))
        y += row_h + int(rng.choice(gap_choices))
    return np.array(boxes, dtype=np.int64)


def encode_ids(boxes, x0, y0, w, h, ids_of=None):
    """RGB uint8 block [3, h, w] where object i (1-based, or ``ids_of[i]``) has colour i."""
    ids = np.zeros((h, w), np.int64)
    numbers = range(1, len(boxes) + 1) if ids_of is None else ids_of
    for i, (a, b, c, d) in zip(numbers, boxes):
        xa, xb = max(a, x0), min(c, x0 + w)
        ya, yb = max(b, y0), min(d, y0 + h)
        if xa < xb and ya < yb:
            ids[ya - y0 : yb - y0, xa - x0 : xb - x0] = i
    return np.stack([(ids >> 16) & 255, (ids >> 8) & 255, ids & 255]).astype(np.uint8)


def write_id_scene(path, boxes, width, height, crs="EPSG:32633", transform=None, block=512):
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    transform = transform or from_origin(500000, 4600000, 0.5, 0.5)
    prof = dict(driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs=crs, transform=transform,
                tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    boxes = np.asarray(boxes)
    with rasterio.open(path, "w", **prof) as dst:
        for by in range(0, height, block):
            for bx in range(0, width, block):
                w, h = min(block, width - bx), min(block, height - by)
                sel = np.flatnonzero((boxes[:, 2] > bx) & (boxes[:, 0] < bx + w) & (boxes[:, 3] > by) & (boxes[:, 1] < by + h))
                dst.write(encode_ids(boxes[sel], bx, by, w, h, ids_of=sel + 1), window=Window(bx, by, w, h))
    return path


class PerfectDetector:
    """For each object visible in a tile: the box of its visible pixels, cut at the tile edge."""

    def __call__(self, batch):
        out = []
        arr = torch.round(batch * 255).to(torch.int64).cpu().numpy()
        for img in arr:
            ids = (img[0] << 16) | (img[1] << 8) | img[2]
            ys, xs = np.nonzero(ids)
            vals = ids[ys, xs]
            if len(vals) == 0:
                out.append({"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)})
                continue
            uniq, inv = np.unique(vals, return_inverse=True)
            n = len(uniq)
            x0 = np.full(n, 1 << 30); y0 = np.full(n, 1 << 30); x1 = np.full(n, -1); y1 = np.full(n, -1)
            np.minimum.at(x0, inv, xs); np.minimum.at(y0, inv, ys)
            np.maximum.at(x1, inv, xs + 1); np.maximum.at(y1, inv, ys + 1)
            boxes = np.stack([x0, y0, x1, y1], 1).astype(np.float32)
            out.append({"boxes": torch.from_numpy(boxes), "scores": torch.ones(n), "labels": torch.zeros(n, dtype=torch.int64)})
        return out


def match_counts(pred, truth, iou=0.9):
    """(duplicates, misses): greedy one-to-one matching of predicted to true boxes at ``iou``."""
    from torchvision.ops import box_iou

    if len(pred) == 0:
        return 0, len(truth)
    m = box_iou(torch.tensor(np.asarray(pred, np.float64)), torch.tensor(np.asarray(truth, np.float64))).numpy()
    matched_truth = set()
    dup = 0
    for i in np.argsort(-m.max(axis=1)):
        cands = [j for j in np.flatnonzero(m[i] >= iou) if j not in matched_truth]
        if cands:
            matched_truth.add(max(cands, key=lambda j: m[i, j]))
        else:
            dup += 1
    return dup, len(truth) - len(matched_truth)


def occluded_ids(width, height, n, min_size, max_size, seed=0):
    """An object-ID image [height, width] (0 = background, i = object i) of ``n`` axis-aligned
    rectangles of random sizes painted one after another, so later objects partly (or wholly)
    cover earlier ones, as parked cars and tree crowns do."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((height, width), np.int32)
    w = rng.integers(min_size, max_size + 1, n)
    h = rng.integers(min_size, max_size + 1, n)
    x = rng.integers(0, np.maximum(width - w, 0) + 1)
    y = rng.integers(0, np.maximum(height - h, 0) + 1)
    for i in range(n):
        ids[y[i] : y[i] + h[i], x[i] : x[i] + w[i]] = i + 1
    return ids


def visible_boxes(ids, x0=0, y0=0, x1=None, y1=None):
    """(ids, boxes [N, 4] in window pixels): for each object with pixels in the window, the box of
    its visible pixels there. A perfect detector reports exactly this for each tile; for the whole
    scene it is the truth."""
    x1 = ids.shape[1] if x1 is None else x1
    y1 = ids.shape[0] if y1 is None else y1
    win = ids[y0:y1, x0:x1]
    ys, xs = np.nonzero(win)
    if len(ys) == 0:
        return np.zeros(0, np.int64), np.zeros((0, 4))
    uniq, inv = np.unique(win[ys, xs], return_inverse=True)
    n = len(uniq)
    bx0 = np.full(n, 1 << 30); by0 = np.full(n, 1 << 30); bx1 = np.full(n, -1); by1 = np.full(n, -1)
    np.minimum.at(bx0, inv, xs); np.minimum.at(by0, inv, ys)
    np.maximum.at(bx1, inv, xs + 1); np.maximum.at(by1, inv, ys + 1)
    return uniq, np.stack([bx0, by0, bx1, by1], 1).astype(np.float64)


def visible_tile_feeds(ids, grid):
    """The perfect visible-pixels detector's ``(tile, boxes, scores, labels)`` for every tile."""
    for t in grid:
        x0, y0, x1, y1 = t.valid
        _, b = visible_boxes(ids, x0, y0, x1, y1)
        yield t, b, np.ones(len(b), np.float32), np.zeros(len(b), np.int64)


def write_ids_geotiff(path, ids, crs="EPSG:32633", transform=None):
    """An object-ID image as an RGB uint8 GeoTIFF that ``PerfectDetector`` decodes."""
    import rasterio
    from rasterio.transform import from_origin

    transform = transform or from_origin(500000, 4600000, 0.3, 0.3)
    h, w = ids.shape
    ids = ids.astype(np.int64)
    rgb = np.stack([(ids >> 16) & 255, (ids >> 8) & 255, ids & 255]).astype(np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8", crs=crs,
                       transform=transform, tiled=True, blockxsize=256, blockysize=256, compress="deflate") as dst:
        dst.write(rgb)
    return path


def write_raster(path, data, nodata=None, transform=None, crs="EPSG:32633"):
    """A GeoTIFF of ``data`` [C, H, W] (0.5 m pixels in UTM 33N unless told)."""
    import rasterio
    from rasterio.transform import from_origin

    c, h, w = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=c, dtype=data.dtype.name, crs=crs,
                       transform=transform or from_origin(300000, 5000000, 0.5, 0.5), nodata=nodata) as dst:
        dst.write(data)
    return path


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves one file with HTTP range requests; fails a share of requests with 503 (never two in a
    row, so GDAL's retries get through) or, with ``fail_all``, every request."""

    protocol_version = "HTTP/1.1"  # keep-alive, as object stores serve

    def log_message(self, *args):
        pass

    def _send(self, head: bool):
        srv = self.server
        if not self.path.endswith(".tif"):  # no sidecars (.aux.xml, .ovr) and no folder listing
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        srv.requests += 1
        if srv.fail_all or (srv.last_ok and srv.rng.random() < srv.fail_share):
            srv.last_ok = False
            srv.failed += 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        srv.last_ok = True
        data = srv.data
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            a, b = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
            body = data[a : b + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_GET(self):
        self._send(False)

    def do_HEAD(self):
        self._send(True)


@contextlib.contextmanager
def range_server(path, stop_after_s: float = 120):
    """A loopback HTTP server (127.0.0.1 only) serving ``path`` with range requests, as object
    stores do; it stops by itself after ``stop_after_s``. ``srv.fail_share`` / ``srv.fail_all``
    make it fail requests with 503; ``url(srv, name)`` is its GDAL path."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    srv.data, srv.rng, srv.fail_share, srv.fail_all = Path(path).read_bytes(), random.Random(1), 0.0, False
    srv.requests = srv.failed = 0
    srv.last_ok = True
    os.environ.setdefault("GDAL_HTTP_TIMEOUT", "20")  # a broken test server fails the test, never hangs it
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    timer = threading.Timer(stop_after_s, srv.shutdown)
    timer.daemon = True
    timer.start()
    try:
        yield srv
    finally:
        timer.cancel()
        srv.shutdown()
        srv.server_close()


def vsicurl(srv, name):
    return f"/vsicurl/http://127.0.0.1:{srv.server_address[1]}/{name}"


def noisy_tile_views(grid, seed, n_objects, noise=1.0, max_size=None):
    """What an imperfect detector reports per tile of ``grid``: each object's part inside the
    window, jittered, sometimes missed, sometimes only a partial view (cut short on one side),
    plus a few false positives; two classes and random scores. Yields ``(tile, boxes, scores,
    labels)`` in grid order, boxes in tile pixels."""
    rng = np.random.default_rng(seed)
    W, H = grid.width, grid.height
    size = rng.uniform(4, max_size or max(6, grid.tile_size * 0.45), (n_objects, 2))
    x0, y0 = rng.uniform(-5, W, n_objects), rng.uniform(-5, H, n_objects)
    objs = np.column_stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]])
    objs[:, 0::2] = objs[:, 0::2].clip(0, W)
    objs[:, 1::2] = objs[:, 1::2].clip(0, H)
    objs = objs[(objs[:, 2] - objs[:, 0] > 2) & (objs[:, 3] - objs[:, 1] > 2)]
    classes = rng.integers(0, 2, len(objs))
    out = []
    for t in grid:
        win = np.array([t.col_off, t.row_off, t.col_off + grid.tile_size, t.row_off + grid.tile_size], float)
        cb = np.column_stack([np.maximum(objs[:, :2], win[:2]), np.minimum(objs[:, 2:], win[2:])])
        seen = (cb[:, 2] > cb[:, 0] + 1) & (cb[:, 3] > cb[:, 1] + 1) & (rng.random(len(objs)) > 0.1)
        b = cb[seen] + rng.normal(0, noise, (int(seen.sum()), 4))
        part = rng.random(len(b)) < 0.15
        b[part, 2] = b[part, 0] + (b[part, 2] - b[part, 0]) * 0.55
        fp = rng.random((int(rng.integers(0, 4)), 4)) * grid.tile_size + np.tile(win[:2], 2)
        fp = np.column_stack([np.minimum(fp[:, 0], fp[:, 2]), np.minimum(fp[:, 1], fp[:, 3]),
                              np.maximum(fp[:, 0], fp[:, 2]) + 3, np.maximum(fp[:, 1], fp[:, 3]) + 3])
        b = np.concatenate([b, fp]) - np.tile(win[:2], 2)
        labels = np.concatenate([classes[seen], rng.integers(0, 2, len(fp))])
        out.append((t, b.astype(np.float32), rng.random(len(b)).astype(np.float32), labels))
    return out


def half_nodata_scene(path, dtype, shape):
    """A ``Scene`` of random values in ``dtype`` with nodata (0) on its left half and, for
    float32, one NaN: what the readers must zero, skip and pad alike."""
    from geodet.io.scene import Scene

    rng = np.random.default_rng(1)
    data = rng.uniform(1, 250, shape).astype(dtype)
    data[:, :, : shape[2] // 2] = 0
    if dtype == "float32":
        data[0, 5, -5] = np.nan
    return Scene(write_raster(path, data, nodata=0), bands=list(range(1, shape[0] + 1)))
