"""Which tiles to label next: the suggested cells are where labels fix the most mistakes."""

import numpy as np
import pytest

from geodet.errors import GeodetError


def _cell_errors(model, scene, cell):
    """The known answer: per cell, the model's mistakes at its operating point (missed labels and
    false detections, matched at IoU 0.5), which labelling that cell would teach it."""
    from geodet.io.labels import load_scene_labels
    from geodet.io.scene import Scene
    from geodet.pipeline.backends import match_detections
    from geodet.pipeline.scenes import detect_scene

    import torch

    frame = detect_scene(scene.image, model, progress=False)
    frame = frame[frame["score"] >= model.card.operating_point]
    sc = Scene(scene.image)
    lb = load_scene_labels(sc, scene.labels, None)
    rows, cols = -(-sc.height // cell), -(-sc.width // cell)
    err = np.zeros((rows, cols))
    det = frame[["px_x0", "px_y0", "px_x1", "px_y1"]].to_numpy(np.float64)
    for r in range(rows):
        for c in range(cols):
            def inside(b):
                cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
                return (cx // cell == c) & (cy // cell == r)

            d, g = det[inside(det)], lb.boxes[inside(lb.boxes)]
            # class-agnostic: a box of the wrong class still counts as found here
            ref = {"boxes": torch.as_tensor(g), "scores": torch.ones(len(g)), "labels": torch.zeros(len(g))}
            cand = {"boxes": torch.as_tensor(d), "scores": torch.ones(len(d)), "labels": torch.zeros(len(d))}
            matched = match_detections(ref, cand, 0.5) if len(g) and len(d) else 0
            err[r, c] = (len(g) - matched) + (len(d) - matched)
    return err


def test_suggested_cells_hold_more_of_the_models_mistakes_than_random_ones(tiny_model, tmp_path):
    from geodet.model import load_model
    from geodet.synthetic import make_scene
    from geodet.training.suggest import suggest_tiles, write_suggestions

    model = load_model(tiny_model)
    scene = make_scene(tmp_path / "new.tif", tmp_path / "new.gpkg", size=768, seed=21)
    cell, n = 128, 6
    out = suggest_tiles(model, [scene.image], n=n, cell=cell, progress=False)
    assert list(out["rank"]) == list(range(1, n + 1)) and out["uncertainty"].is_monotonic_decreasing
    err = _cell_errors(model, scene, cell)
    picked = sum(err[r, c] for r, c in zip(out["cell_row"], out["cell_col"]))
    random_mean = err.mean() * n  # what n random cells hold on average
    assert picked >= 1.5 * random_mean, (picked, random_mean)
    # written as a styled GeoPackage: the rank as a label
    import sqlite3

    import geopandas as gpd

    write_suggestions(out, tmp_path / "next.gpkg")
    back = gpd.read_file(tmp_path / "next.gpkg", layer="next")
    assert len(back) == n and set(back.columns) >= {"rank", "reason", "uncertainty"}
    style = sqlite3.connect(tmp_path / "next.gpkg").execute("SELECT styleQML FROM layer_styles").fetchone()[0]
    assert "rank" in style


def test_suggest_needs_an_operating_point_and_skips_labelled_cells(tiny_model, tmp_path, synth):
    import geopandas as gpd
    import rasterio
    from shapely.geometry import box

    from geodet.model import load_model
    from geodet.training.suggest import suggest_tiles

    model = load_model(tiny_model)
    with rasterio.open(synth.image) as src:
        b = src.bounds
    gpd.GeoDataFrame(geometry=[box(b.left, b.bottom, (b.left + b.right) / 2, b.top)], crs=synth.crs).to_file(tmp_path / "a.gpkg")
    out = suggest_tiles(model, [synth.image], n=50, cell=64, labelled_area=tmp_path / "a.gpkg", progress=False)
    assert (out["cell_col"] >= 3).all()  # 384 px, 64 px cells: columns 0-2 lie in the labelled half
    model.card.operating_point = None
    model.card.metrics = {"AP50": 0.0}  # validation ran and found nothing
    with pytest.raises(GeodetError, match="no operating point: its validation found no object.*train it longer"):
        suggest_tiles(model, [synth.image], n=5)
    model.card.metrics = {"step": 96, "epoch": 16, "validation": "none"}  # what a run without validation writes
    with pytest.raises(GeodetError, match="no operating point.*use a model trained with validation"):
        suggest_tiles(model, [synth.image], n=5)


def test_picks_spread_over_the_scene():
    from geodet.training.suggest import pick

    u = np.full((8, 8), 1.0)
    u[:3, :3] = [[10, 9, 8], [9, 8, 7], [8, 7, 6]]  # a busy corner
    u[7, 7] = 6.0  # a lone doubtful cell far away, below most of the corner
    allowed = np.ones_like(u, bool)
    allowed[0, 0] = False  # already labelled
    got = pick(u, 3, allowed)
    assert got[0] == (0, 1)  # the most uncertain allowed cell first
    assert (7, 7) in got  # the far cell beats the corner's damped neighbours
    assert len(set(got)) == 3 and (0, 0) not in got


def test_done_cells_join_the_labelled_area_in_its_own_crs(tmp_path, synth, capsys):
    """The loop without editing two files: suggest writes cells with a 'done' field, the user ticks
    the ones labelled, and --done adds them to the labelled-area file (made when missing, kept in
    its own CRS, the ticked cells only); bad calls are one line."""
    import geopandas as gpd
    from shapely.geometry import box

    from geodet.cli import main

    x0, y0 = 500000.0, 4000000.0
    cells = gpd.GeoDataFrame({"rank": [1, 2, 3], "done": [1, 0, 1]},
                             geometry=[box(x0, y0, x0 + 30, y0 + 30), box(x0 + 30, y0, x0 + 60, y0 + 30),
                                       box(x0 + 60, y0, x0 + 90, y0 + 30)], crs="EPSG:32633")
    cells.to_file(tmp_path / "next.gpkg", layer="next")
    area = tmp_path / "sub" / "area.gpkg"
    assert main(["suggest", "--done", str(tmp_path / "next.gpkg"), "--labelled-area", str(area), "-q"]) == 0
    got = gpd.read_file(area)
    assert len(got) == 2 and got.crs == cells.crs
    assert sorted(got.geometry.bounds.minx.round(3)) == [x0, x0 + 60]
    # a labelled area kept in another CRS stays in it; with no cell ticked, every cell is added
    ll = tmp_path / "ll.gpkg"
    gpd.GeoDataFrame({"note": ["first"]}, geometry=[box(x0, y0 + 100, x0 + 30, y0 + 130)], crs="EPSG:32633") \
        .to_crs("EPSG:4326").to_file(ll)
    cells.assign(done=0).to_file(tmp_path / "next2.gpkg", layer="next2")
    assert main(["suggest", "--done", str(tmp_path / "next2.gpkg"), "--labelled-area", str(ll), "-q"]) == 0
    back = gpd.read_file(ll)
    assert len(back) == 4 and back.crs.to_epsg() == 4326
    assert back.to_crs("EPSG:32633").geometry.iloc[1].equals_exact(cells.geometry.iloc[0], 1e-3)
    capsys.readouterr()
    assert main(["suggest", "--done", str(tmp_path / "next.gpkg")]) == 2
    assert "needs --labelled-area" in capsys.readouterr().err
    assert main(["suggest", str(synth.image), "-o", str(tmp_path / "x.gpkg")]) == 2
    err = capsys.readouterr().err
    assert "needs --model" in err and len(err.strip().splitlines()) == 1
    assert main(["suggest", str(synth.image), "-m", "m.pt", "-o", str(tmp_path / "x.csv")]) == 2
    assert "polygons to label" in capsys.readouterr().err


def test_done_reads_a_numeric_field_with_empty_cells_and_keeps_the_other_layers(tmp_path):
    """A 'done' field with empty cells reads as numbers: only the ticked cells are added (not every
    cell, as when none is ticked); the labelled area's layer in a GeoPackage of several is named,
    rewritten, and the file's other layers (the user's labels) stay as they were."""
    import geopandas as gpd
    import pyogrio
    from shapely.geometry import box

    from geodet.training.suggest import add_done_cells

    x0, y0 = 500000.0, 4000000.0
    cells = gpd.GeoDataFrame({"rank": [1, 2, 3, 4], "done": [1, 0, None, 0]},
                             geometry=[box(x0 + 30 * i, y0, x0 + 30 * (i + 1), y0 + 30) for i in range(4)],
                             crs="EPSG:32633")
    cells.to_file(tmp_path / "next.gpkg", layer="next")
    project = tmp_path / "project.gpkg"
    gpd.GeoDataFrame({"note": ["first"]}, geometry=[box(x0, y0 + 100, x0 + 30, y0 + 130)],
                     crs="EPSG:32633").to_file(project, layer="aoi")
    labels = gpd.GeoDataFrame({"label": ["car"] * 3}, geometry=[box(x0 + i, y0 + i, x0 + i + 2, y0 + i + 2)
                                                                for i in range(3)], crs="EPSG:32633")
    labels.to_file(project, layer="labels")
    with pytest.raises(GeodetError, match="holds 2 layers"):
        add_done_cells(tmp_path / "next.gpkg", project)
    assert add_done_cells(tmp_path / "next.gpkg", f"{project}|layername=aoi") == (1, 2)
    assert sorted(name for name, _ in pyogrio.list_layers(project)) == ["aoi", "labels"]
    area = gpd.read_file(project, layer="aoi")
    assert len(area) == 2 and area.geometry.iloc[1].equals_exact(cells.geometry.iloc[0], 1e-6)
    assert gpd.read_file(project, layer="labels").geometry.geom_equals(labels.geometry).all()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    fresh = tmp_path / "fresh.gpkg"  # a new file takes the layer named for it, so the same name reads it back
    assert add_done_cells(tmp_path / "next.gpkg", f"{fresh}|layername=area") == (1, 1)
    assert [name for name, _ in pyogrio.list_layers(fresh)] == ["area"]


def test_a_scene_without_georeferencing_is_refused_before_detection(tiny_model, tmp_path, monkeypatch):
    import rasterio

    from geodet.model import load_model
    from geodet.pipeline import scenes
    from geodet.training.suggest import suggest_tiles

    p = tmp_path / "plain.tif"
    with rasterio.open(p, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8") as d:
        d.write(np.zeros((3, 64, 64), np.uint8))
    monkeypatch.setattr(scenes, "detect_scene", lambda *a, **k: pytest.fail("detected before refusing"))
    with pytest.raises(GeodetError, match="no CRS or georeferencing"):
        suggest_tiles(load_model(tiny_model), [str(p)], n=2, progress=False)


def test_suggest_refuses_what_cannot_be_meant_and_says_what_it_ranked(tiny_model, tmp_path, synth, capsys, caplog):
    """A scene named twice: one line before any detection; a labelled area that reaches no scene
    or holds nothing yet is said. --bands picks the model's bands from a 1-band scene. A cell without doubt is
    not called unsure. --done run twice adds nothing the second time."""
    import shlex

    import geopandas as gpd
    import rasterio
    from shapely.geometry import box

    from geodet.cli import main

    def err_of(args):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    base = ["suggest", "-m", str(tiny_model), "-o", str(tmp_path / "n.gpkg"), "--count", "4", "-q"]
    assert "named twice" in err_of([*base, str(synth.image), str(synth.image)])
    with rasterio.open(synth.image) as src:
        b, crs, profile, band = src.bounds, src.crs, src.profile, src.read(1)
    assert not (tmp_path / "n.gpkg").exists()
    # a labelled area drawn as lines: refused as training refuses it (it was ignored without a word)
    from shapely.geometry import LineString

    line = LineString([(b.left, b.bottom), (b.right, b.top)])
    gpd.GeoDataFrame(geometry=[line], crs=crs).to_file(tmp_path / "l.gpkg")
    assert "the labelled area must be polygons (it holds LineString)" in err_of(
        [*base, str(synth.image), "--labelled-area", str(tmp_path / "l.gpkg")])
    # a project's area labelled elsewhere so far, or still empty: said, and every cell may be suggested
    gpd.GeoDataFrame(geometry=[box(b.left + 1e5, b.bottom, b.right + 1e5, b.top)], crs=crs).to_file(tmp_path / "far.gpkg")
    gpd.GeoDataFrame(geometry=[], crs=crs).to_file(tmp_path / "empty.gpkg")
    for area, said in [("far.gpkg", "reaches none of these scenes"), ("empty.gpkg", "holds no polygon yet")]:
        with caplog.at_level("WARNING"):
            assert main([*base, str(synth.image), "--labelled-area", str(tmp_path / area)]) == 0
        assert said in caplog.text
    one = tmp_path / "one band.tif"
    with rasterio.open(one, "w", **dict(profile, count=1)) as dst:
        dst.write(band[None])
    spaced = tmp_path / "next cells.gpkg"
    assert main([*base[:3], "-o", str(spaced), *base[5:], str(one), "--bands", "1,1,1"]) == 0
    assert f"--done {shlex.quote(str(spaced))} " in capsys.readouterr().out  # a command to paste as it is
    cells = gpd.read_file(spaced)
    assert len(cells) == 4 and (cells["scene"] == "one band.tif").all()
    for _, c in cells.iterrows():
        assert ("the model is unsure there" in c["reason"]) == (c["uncertain"] > 0)
    area = tmp_path / "area.gpkg"
    for added in (4, 0):
        assert main(["suggest", "--done", str(spaced), "--labelled-area", str(area), "-q"]) == 0
        assert f"added {added} labelled cell(s)" in capsys.readouterr().out
    assert len(gpd.read_file(area)) == 4


def test_done_refuses_its_own_file_and_keeps_the_areas_whole_numbers(tmp_path):
    """--done naming the suggestions file as the labelled area would rewrite the suggestions:
    refused, the file unchanged; an area's integer field stays whole numbers (null for the cells)."""
    import geopandas as gpd
    import pyogrio
    from shapely.geometry import box

    from geodet.errors import GeodetError
    from geodet.training.suggest import add_done_cells

    x0, y0 = 500000.0, 4000000.0
    cells = gpd.GeoDataFrame({"rank": [1, 2], "done": [1, 0]},
                             geometry=[box(x0, y0, x0 + 30, y0 + 30), box(x0 + 30, y0, x0 + 60, y0 + 30)],
                             crs="EPSG:32633")
    cells.to_file(tmp_path / "next.gpkg", layer="next")
    before = (tmp_path / "next.gpkg").read_bytes()
    with pytest.raises(GeodetError, match="is the suggestions file"):
        add_done_cells(tmp_path / "next.gpkg", f"{tmp_path / 'next.gpkg'}|layername=next")
    assert (tmp_path / "next.gpkg").read_bytes() == before
    area = tmp_path / "area.gpkg"
    gpd.GeoDataFrame({"plot": [7]}, geometry=[box(x0, y0 + 100, x0 + 30, y0 + 130)], crs="EPSG:32633").to_file(area)
    assert add_done_cells(tmp_path / "next.gpkg", area) == (1, 2)
    assert pyogrio.read_info(area)["dtypes"][list(pyogrio.read_info(area)["fields"]).index("plot")] == "int64"
    got = gpd.read_file(area)
    assert got["plot"].iloc[0] == 7 and got["plot"].isna().iloc[1]


def test_per_object_ranks_by_doubt_per_object_and_scenes_of_one_name_are_told_apart(tiny_model, tmp_path):
    """per-object's ranks follow its own priority (doubt per expected object), not the summed
    doubt; two scenes named s.tif in two folders are named apart, as detect names them."""
    import shutil

    import rasterio

    from geodet.model import load_model
    from geodet.synthetic import make_scene
    from geodet.training.suggest import suggest_tiles

    model = load_model(tiny_model)
    scene = make_scene(tmp_path / "new.tif", tmp_path / "new.gpkg", size=512, seed=21)
    out = suggest_tiles(model, [scene.image], n=10, cell=64, strategy="per-object", progress=False)
    priority = (out["uncertainty"] / (1 + out["confident"])).to_numpy()
    assert len(out) == 10 and (np.diff(priority) <= 1e-3).all(), out[["uncertainty", "confident"]]
    for folder, dx in (("a", 0), ("b", 1000)):
        (tmp_path / folder).mkdir()
        shutil.copy(scene.image, tmp_path / folder / "s.tif")
        with rasterio.open(tmp_path / folder / "s.tif", "r+") as dst:
            t = dst.transform
            dst.transform = rasterio.Affine(t.a, t.b, t.c + dx, t.d, t.e, t.f)
    paths = [tmp_path / "a" / "s.tif", tmp_path / "b" / "s.tif"]
    two = suggest_tiles(model, paths, n=6, cell=64, progress=False)
    assert set(two["scene"]) == set(map(str, paths))  # the paths as given, as detect's scene column
