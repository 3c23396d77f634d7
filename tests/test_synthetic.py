import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.features import rasterize

from geodet.io.labels import map_bounds_to_pixels
from geodet.io.writers import boxes_to_polygons
from geodet.synthetic import make_layout, make_scene


def test_labels_fall_exactly_on_painted_objects(tmp_path):
    s = make_scene(tmp_path / "s.tif", tmp_path / "s.gpkg", size=512, seed=7)
    g = gpd.read_file(s.labels)
    assert set(g.label) == {"car", "truck"} and len(g) == s.n_objects > 50
    _, _, vehicles = make_layout(512, 512, 7)
    with rasterio.open(s.image) as src:
        img = src.read().astype(float)
        assert src.crs.to_epsg() == 32633 and src.transform.a == pytest.approx(0.3)
        good = 0
        for geom, v in zip(g.geometry, vehicles):
            # pixels whose centres lie inside the label polygon, through the geotransform
            m = rasterize([(geom, 1)], out_shape=(512, 512), transform=src.transform, all_touched=False).astype(bool)
            if m.sum() == 0:
                continue
            diff = np.abs(img[:, m] - np.asarray(v.color)[:, None]).max(axis=0)
            good += (np.mean(diff < 25) > 0.6)  # body colour (a car's windscreen is darker)
        assert good / len(g) > 0.95
    # shifted by one pixel, labels no longer sit on their objects
    shifted = g.translate(xoff=0.6, yoff=0)
    with rasterio.open(s.image) as src:
        hits = 0
        for geom, v in zip(shifted.geometry, vehicles):
            m = rasterize([(geom, 1)], out_shape=(512, 512), transform=src.transform).astype(bool)
            if m.sum():
                hits += np.mean(np.abs(img[:, m] - np.asarray(v.color)[:, None]).max(axis=0) < 25) > 0.95
        assert hits / len(g) < 0.9


def test_variants_uint16_four_bands_nodata(tmp_path):
    s = make_scene(tmp_path / "s.tif", tmp_path / "s.gpkg", size=300, seed=1, dtype="uint16", bands=4, nodata_region=True)
    with rasterio.open(s.image) as src:
        assert src.count == 4 and src.dtypes[0] == "uint16" and src.nodata == 0
        mask = src.dataset_mask()
        assert (mask == 0).mean() == pytest.approx(0.35**2 / 2, abs=0.01)  # the corner triangle
    a = make_scene(tmp_path / "a.tif", tmp_path / "a.gpkg", size=200, seed=5)
    b = make_scene(tmp_path / "b.tif", tmp_path / "b.gpkg", size=200, seed=5)
    with rasterio.open(a.image) as ra, rasterio.open(b.image) as rb:
        assert (ra.read() == rb.read()).all()  # deterministic for a seed


coord = st.floats(-1e6, 1e6, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(x0=st.floats(0, 5000), y0=st.floats(0, 5000), w=st.floats(0.5, 300), h=st.floats(0.5, 300),
       ox=coord, oy=coord, res=st.floats(0.01, 30), rot=st.sampled_from([0.0, 0.0, 15.0]))
def test_pixel_map_pixel_round_trip(x0, y0, w, h, ox, oy, res, rot):
    t = Affine.translation(ox, oy) * Affine.rotation(rot) * Affine.scale(res, -res)
    boxes = np.array([[x0, y0, x0 + w, y0 + h]])
    poly = boxes_to_polygons(boxes, t)[0]
    # corners map exactly through the affine of pixel edges
    assert poly.exterior.coords[0] == pytest.approx(t * (x0, y0))
    assert poly.exterior.coords[2] == pytest.approx(t * (x0 + w, y0 + h))
    if rot == 0.0:
        back = map_bounds_to_pixels(np.array([poly.bounds]), t)[0]
        assert back == pytest.approx(boxes[0], abs=1e-6 * max(1.0, abs(ox), abs(oy)) / res)
