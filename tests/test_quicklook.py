"""The quicklook shows what was found: boxes drawn at the threshold asked for, and says so."""

import geopandas as gpd
import numpy as np
import rasterio
from matplotlib.image import imread
from rasterio.transform import from_origin
from shapely.geometry import box

from geodet.io.quicklook import quicklook


def _blue_pixels(png):
    img = imread(png)[..., :3]
    # tab10's first colour (#1f77b4): the colour of class 0's outlines
    return int(((np.abs(img - np.array([0.12, 0.47, 0.71])) < 0.08).all(axis=2)).sum())


def test_boxes_drawn_at_the_threshold_and_none_below(tmp_path, caplog):
    t = from_origin(500000, 4600000, 0.5, 0.5)
    with rasterio.open(tmp_path / "s.tif", "w", driver="GTiff", width=400, height=300, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=t) as dst:
        dst.write(np.full((3, 300, 400), 128, np.uint8))
    x0, y0 = t * (100, 80)
    x1, y1 = t * (200, 160)
    det = gpd.GeoDataFrame({"label": ["Tree", "Tree"], "score": [0.25, 0.18]},
                           geometry=[box(x0, y1, x1, y0), box(x0 + 60, y1 + 60, x1 + 60, y0 + 60)], crs="EPSG:32633")
    with caplog.at_level("INFO"):
        quicklook(tmp_path / "s.tif", det, tmp_path / "all.png", classes=["Tree"], min_score=0.17)
        quicklook(tmp_path / "s.tif", det, tmp_path / "one.png", classes=["Tree"], min_score=0.2)
        quicklook(tmp_path / "s.tif", det, tmp_path / "none.png", classes=["Tree"], min_score=0.3)
    drawn = [_blue_pixels(tmp_path / f"{n}.png") for n in ("all", "one", "none")]
    assert drawn[0] > drawn[1] > 0 and drawn[2] < drawn[1] / 10  # the legend swatch alone may remain
    assert "2 boxes with score >= 0.17" in caplog.text and "0 boxes with score >= 0.3" in caplog.text
