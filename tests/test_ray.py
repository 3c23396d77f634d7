"""The Ray engine: blocks of scenes on a local Ray instance give exactly what one process gives,
failed blocks are retried or reported, reruns run only what is missing, and the finished scenes
merge into one file."""

import json
import os
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from helpers import PerfectDetector, match_counts, packed_boxes, range_server, vsicurl, write_id_scene

from geodet.errors import GeodetError
from geodet.pipeline.scenes import detect_scene

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

from geodet.pipeline import parts, ray_engine, ray_resources  # noqa: E402
from geodet.pipeline.ray_engine import detect_ray, merge_outputs  # noqa: E402

# one process runs them all (one Ray instance), first: pytest-xdist's loadgroup hands out the
# largest group first, so the single tests fill the other processes around it
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]
COLS = ["px_x0", "px_y0", "px_x1", "px_y1", "score", "label", "tile_row", "tile_col"]
SETTINGS = dict(tile_size=128, overlap=24, score_threshold=0.5)
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def local_ray():
    # workers import the tests' helpers (the detectors below) by module, as the driver does
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray_scenes")
    out = []
    for i, (w, h) in enumerate([(700, 500), (420, 610)]):
        boxes = packed_boxes(w, h, 4, 24, seed=40 + i)
        out.append((write_id_scene(d / f"s{i}.tif", boxes, w, h), boxes))
    return out


class FailsOnce(PerfectDetector):
    """Fails on the first batch it is given, in whichever actor that is (a marker file
    remembers, across actor processes), then detects perfectly."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __call__(self, batch):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text("failed once")
            raise RuntimeError("injected failure")
        return super().__call__(batch)


class FailsOnMarkedPixels(PerfectDetector):
    """Fails on every batch holding a pixel whose red byte is set (object ids here stay below
    65536, so only the pixels marked by hand carry one)."""

    def __call__(self, batch):
        if bool((batch[:, 0] > 0).any()):
            raise RuntimeError("injected permanent failure")
        return super().__call__(batch)


def frames_equal(got, ref):
    got = got.sort_values(COLS).reset_index(drop=True)
    ref = ref.sort_values(COLS).reset_index(drop=True)
    assert len(got) == len(ref)
    for c in COLS:
        assert (got[c].to_numpy() == ref[c].to_numpy()).all(), c
    assert got.geometry.geom_equals(ref.geometry).all()


def test_two_scenes_in_blocks_on_ray_equal_one_process(local_ray, scenes, tmp_path):
    det = PerfectDetector()
    out = tmp_path / "run"
    summary = detect_ray([str(s) for s, _ in scenes], det, out, workers=2, block_tiles=2, progress=False, **SETTINGS)
    assert summary["failed_scenes"] == [] and summary["scenes_written"] == 2
    assert summary["blocks_run"] == summary["blocks_total"] > 4
    for (scene, boxes), sid in zip(scenes, ["s0", "s1"]):
        d = out / f"scene={sid}"
        got = gpd.read_parquet(d / "detections.parquet")
        ref = detect_scene(str(scene), det, progress=False, **SETTINGS)
        frames_equal(got, ref)
        assert got.crs == ref.crs
        assert match_counts(got[COLS[:4]].to_numpy(), boxes) == (0, 0)  # no duplicates or misses at block seams
        ok = json.loads((d / "_SUCCESS.json").read_text())
        assert ok["scene_path"] == os.path.abspath(scene)  # found again from any folder
        assert ok["settings"]["score_threshold"] == 0.5 and ok["settings"]["tile_size"] == 128  # merge compares them
        assert ok["counts"]["detections"] == len(ref) and ok["grid"]["blocks"] == len(list(d.glob("part-*.parquet")))
        part = gpd.read_parquet(sorted(d.glob("part-*.parquet"))[0])  # parts are GeoParquet in the scene CRS
        assert part.crs == ref.crs
    # a rerun finds everything finished and runs nothing
    again = detect_ray([str(s) for s, _ in scenes], det, out, workers=2, block_tiles=2, progress=False, **SETTINGS)
    assert again["blocks_run"] == 0 and again["scenes_already_done"] == 2
    # merge: one file, a scene column, every detection once
    merged = merge_outputs(out, tmp_path / "all.gpkg")
    back = gpd.read_file(tmp_path / "all.gpkg", layer="all")
    assert len(back) == len(merged) == sum(json.loads((out / f"scene={s}" / "_SUCCESS.json").read_text())
                                           ["counts"]["detections"] for s in ("s0", "s1"))
    assert sorted(back["scene"].unique()) == ["s0.tif", "s1.tif"]


def test_runs_into_one_folder_keep_every_scene_of_one_name(local_ray, scenes, tmp_path, caplog):
    """y2020/tile.tif, then y2021/tile.tif, into one output folder: both kept (the second under a
    hashed id, said), a rerun of either finds its own folder, and merge names them apart by path,
    with a report of full paths beside the merged file."""
    import shutil

    paths = []
    for year, (src, _) in zip(("y2020", "y2021"), scenes):
        (tmp_path / year).mkdir()
        paths.append(str(shutil.copy(src, tmp_path / year / "tile.tif")))
    out = tmp_path / "run"
    for p in paths:
        assert detect_ray([p], PerfectDetector(), out, workers=1, block_tiles=4, progress=False,
                          **SETTINGS)["scenes_written"] == 1
    folders = sorted(d.name for d in out.glob("scene=*"))
    assert len(folders) == 2 and folders[0] == "scene=tile" and "holds the detections of another file" in caplog.text
    for p in paths:  # each finds its own results, alone or together
        assert detect_ray([p], PerfectDetector(), out, workers=1, block_tiles=4, progress=False,
                          **SETTINGS)["scenes_already_done"] == 1
    assert detect_ray(paths[::-1], PerfectDetector(), out, workers=1, block_tiles=4, progress=False,
                      **SETTINGS)["scenes_already_done"] == 2
    merged = merge_outputs(out, tmp_path / "all.fgb")
    ref = [detect_scene(p, PerfectDetector(), progress=False, **SETTINGS) for p in paths]
    assert len(merged) == sum(len(r) for r in ref) and set(merged["scene"]) == set(paths)
    report = json.loads((tmp_path / "all.fgb.report.json").read_text())
    assert sorted(report["inputs"]) == sorted(paths) and report["output_crs"] == "EPSG:32633"
    own = out / "scene=tile" / "detections.parquet"  # the merged file in a scene's folder: it would replace its result
    before = own.read_bytes()
    for inside in (own, out / "scene=tile" / "all.gpkg"):
        with pytest.raises(GeodetError, match=r"is inside scene=tile/ of .*: write the merged file elsewhere"):
            merge_outputs(out, inside)
    assert own.read_bytes() == before and not (out / "scene=tile" / "all.gpkg").exists()
    assert len(merge_outputs(out, out / "all.gpkg")) == len(merged)  # beside the scene folders: fine


def test_a_block_that_fails_once_is_retried_and_the_result_is_unchanged(local_ray, scenes, tmp_path):
    scene = str(scenes[0][0])
    det = FailsOnce(tmp_path / "marker")
    summary = detect_ray([scene], det, tmp_path / "run", workers=1, block_tiles=3, progress=False, **SETTINGS)
    assert (tmp_path / "marker").exists()  # it did fail once
    assert summary["failed_scenes"] == [] and summary["blocks_run"] == summary["blocks_total"] + 1
    frames_equal(gpd.read_parquet(tmp_path / "run" / "scene=s0" / "detections.parquet"),
                 detect_scene(scene, PerfectDetector(), progress=False, **SETTINGS))


def test_a_block_that_always_fails_leaves_its_scene_unfinished_and_a_rerun_runs_only_it(local_ray, scenes, tmp_path):
    import rasterio

    boxes = packed_boxes(500, 400, 4, 24, seed=7)
    bad = write_id_scene(tmp_path / "bad.tif", boxes, 500, 400)
    with rasterio.open(bad, "r+") as ds:  # mark a 40 px square in the top-left tile only
        red = ds.read(1)
        red[:40, :40] = 1
        ds.write(red, 1)
    paths = [str(scenes[0][0]), str(bad)]
    out = tmp_path / "run"
    summary = detect_ray(paths, FailsOnMarkedPixels(), out, workers=2, block_tiles=2, retries=1, progress=False,
                         **SETTINGS)
    assert [f["scene"] for f in summary["failed_scenes"]] == [str(bad)]
    assert "1 block(s) failed" in summary["failed_scenes"][0]["error"]
    assert "injected permanent failure" in summary["failed_scenes"][0]["error"]
    assert not (out / "scene=bad" / "_SUCCESS.json").exists() and not (out / "scene=bad" / "detections.parquet").exists()
    assert (out / "scene=s0" / "_SUCCESS.json").exists()  # the other scene is finished
    # the rerun with a detector that works runs only the failed block
    again = detect_ray(paths, PerfectDetector(), out, workers=2, block_tiles=2, progress=False, **SETTINGS)
    assert again["failed_scenes"] == [] and again["blocks_run"] == 1 and again["scenes_already_done"] == 1
    frames_equal(gpd.read_parquet(out / "scene=bad" / "detections.parquet"),
                 detect_scene(str(bad), PerfectDetector(), progress=False, **SETTINGS))


def test_an_interrupted_run_resumes_with_the_missing_blocks_only(local_ray, scenes, tmp_path):
    scene = str(scenes[1][0])
    out = tmp_path / "run"
    first = detect_ray([scene], PerfectDetector(), out, workers=2, block_tiles=2, progress=False, **SETTINGS)
    d = out / "scene=s1"
    # as if killed before the reduce: no final file, no marker, two parts lost
    for f in ("_SUCCESS.json", "detections.parquet", "part-00000.json", "part-00003.parquet"):
        (d / f).unlink()
    again = detect_ray([scene], PerfectDetector(), out, workers=2, block_tiles=2, progress=False, **SETTINGS)
    assert again["blocks_run"] == 2 and first["blocks_total"] == again["blocks_total"]
    frames_equal(gpd.read_parquet(d / "detections.parquet"), detect_scene(scene, PerfectDetector(), progress=False,
                                                                          **SETTINGS))
    # other settings make a new fingerprint: everything runs again
    third = detect_ray([scene], PerfectDetector(), out, workers=2, block_tiles=2, progress=False,
                       **{**SETTINGS, "overlap": 32})
    assert third["blocks_run"] == third["blocks_total"]
    ok = json.loads((d / "_SUCCESS.json").read_text())
    parts = [json.loads(p.read_text()) for p in d.glob("part-*.json")]
    assert len(parts) == third["blocks_total"] and {p["fingerprint"] for p in parts} == {ok["fingerprint"]}


def test_without_ray_the_engine_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(GeodetError, match=r"geodet\[ray\]"):
        ray_engine.require_ray()


def test_the_cli_runs_a_model_file_on_ray_and_merges(local_ray, tiny_model, synth, tmp_path, capsys):
    from geodet.cli import main
    from geodet.model import load_model

    listing = tmp_path / "scenes.txt"
    listing.write_text(f"# scenes\n{synth.image}\n")
    out = tmp_path / "run"
    rc = main(["detect", "--engine", "ray", "--scene-list", str(listing), "-m", str(tiny_model), "-o", str(out),
               "--block-tiles", "1", "--ray-workers", "2", "--backend", "torch", "--precision", "fp32",
               "--score-threshold", "0.3", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    model = load_model(tiny_model)
    ref = detect_scene(synth.image, model, progress=False, backend="torch", precision="fp32", score_threshold=0.3)
    sid = Path(synth.image).stem
    got = gpd.read_parquet(out / f"scene={sid}" / "detections.parquet")
    assert len(ref) > 0 and len(got) == len(ref)
    # the same boxes; a real network's float sums vary in the last bits with the thread count and
    # batch size of the process that runs it (here single-threaded actors, 1-tile blocks)
    g, r = got.sort_values(COLS).reset_index(drop=True), ref.sort_values(COLS).reset_index(drop=True)
    assert (g["label"] == r["label"]).all() and (g["tile_row"] == r["tile_row"]).all()
    np.testing.assert_allclose(g[COLS[:4]].to_numpy(), r[COLS[:4]].to_numpy(), atol=1e-3)
    np.testing.assert_allclose(g["score"].to_numpy(), r["score"].to_numpy(), atol=6e-5)  # written to 4 decimals
    ok = json.loads((out / f"scene={sid}" / "_SUCCESS.json").read_text())
    from geodet.hashing import file_sha256

    assert ok["model_sha256"] == file_sha256(tiny_model)
    capsys.readouterr()
    empty = out / "scene=empty"  # a finished scene without a detection counts as a scene
    empty.mkdir()
    got.iloc[:0].to_parquet(empty / "detections.parquet")
    (empty / "_SUCCESS.json").write_text(json.dumps(ok))
    assert main(["merge", str(out), "-o", str(tmp_path / "all.geojson"), "--quiet"]) == 0
    assert len(gpd.read_file(tmp_path / "all.geojson")) == len(ref)
    assert f"{len(ref)} detections from 2 scene(s)" in capsys.readouterr().out
    # a scene still running (no _SUCCESS.json yet) is left out and said: a half-run job is not the whole
    (out / "scene=later").mkdir()
    (out / "scene=later" / "part-00000.json").write_text("{}")
    assert main(["merge", str(out), "-o", str(tmp_path / "all.geojson")]) == 3  # partial, as detect says it
    said = capsys.readouterr()
    assert "from 2 scene(s)" in said.out and "1 scene(s) of" in said.err and "(scene=later): run the same" in said.err
    (empty / "_SUCCESS.json").write_text(json.dumps(dict(ok, model_sha256="0" * 64)))  # redone with another model
    assert main(["merge", str(out), "-o", str(tmp_path / "mixed.gpkg")]) == 2
    assert "detected by 2 different models" in capsys.readouterr().err and not (tmp_path / "mixed.gpkg").exists()
    # a folder without finished scenes: one line, exit 2
    assert main(["merge", str(tmp_path), "-o", str(tmp_path / "none.gpkg")]) == 2
    assert "no finished scenes" in capsys.readouterr().err


def test_a_cog_over_http_from_a_stac_item_gives_the_local_detections(local_ray, scenes, tmp_path):
    from geodet.io.stac import stac_scenes

    scene = scenes[0][0]
    with range_server(scene) as srv:
        items = tmp_path / "items.json"
        href = vsicurl(srv, "remote.tif").replace("/vsicurl/", "")
        items.write_text(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "id": "tile-17", "assets": {"visual": {"href": href, "type": "image/tiff"}}}]}))
        (sid, path), = stac_scenes(items, "visual")
        assert path.startswith("/vsicurl/http://127.0.0.1:")
        summary = detect_ray([path], PerfectDetector(), tmp_path / "run", ids=[sid], workers=2, block_tiles=2,
                             progress=False, **SETTINGS)
        assert srv.requests > 0
    assert summary["failed_scenes"] == []
    got = gpd.read_parquet(tmp_path / "run" / "scene=tile-17" / "detections.parquet")
    ref = detect_scene(str(scene), PerfectDetector(), progress=False, **SETTINGS)
    frames_equal(got.drop(columns="scene"), ref.drop(columns="scene"))


def test_training_under_ray_train_runs_the_ddp_loop_on_two_workers(local_ray, synth, tmp_path):
    from conftest import tiny_config

    from geodet.model import load_model
    from geodet.training.ray_train import train_ray

    cfg = tiny_config(synth.image, synth.labels, max_steps=4, steps_per_epoch=4, epochs=1, num_workers=0)
    res = train_ray(cfg, tmp_path / "run", workers=2)
    assert res["world_size"] == 2 and not res["resumed"]
    model = load_model(tmp_path / "run" / "model.pt")
    assert model.card.classes == ["car", "truck"]
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    assert len([r for r in rows if r.split(",")[2]]) == 4  # four optimiser steps, logged once (rank 0)
    assert (tmp_path / "run" / "last.pt").is_file()


def _ray_train_workers() -> list[int]:
    """PIDs of this machine's Ray Train worker processes (by their process title)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "RayTrainWorker" in cmd:
                pids.append(int(d.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_ray_train_resumes_from_the_last_checkpoint_after_a_worker_is_killed(local_ray, synth, tmp_path):
    """A worker killed mid-run (as when its node dies): Ray Train restarts the group, which
    resumes from last.pt and finishes the steps asked for, without starting over."""
    import signal
    import threading
    import time

    from conftest import tiny_config

    from geodet.training.ray_train import train_ray

    run = tmp_path / "run"
    cfg = tiny_config(synth.image, synth.labels, max_steps=None, steps_per_epoch=3, epochs=8, num_workers=0)
    result = {}
    job = threading.Thread(target=lambda: result.update(train_ray(cfg, run, workers=2, max_failures=2)))
    job.start()
    deadline = time.monotonic() + 240
    while not (run / "last.pt").is_file() and job.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    killed = _ray_train_workers()
    assert (run / "last.pt").is_file() and killed, "no checkpoint or no worker to kill"
    os.kill(killed[-1], signal.SIGKILL)
    job.join(timeout=300)
    assert not job.is_alive()
    assert result["resumed"] and result["world_size"] == 2
    rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines()[1:]]
    steps = [int(r[0]) for r in rows if r[2]]
    assert max(steps) == 24  # 8 epochs x 3 steps: finished, not cut short
    assert steps.count(1) == 1  # step 1 ran once: the restarted group did not start over


def test_the_backend_is_chosen_once_for_the_job_as_one_process_chooses_it(local_ray, tiny_model, synth, tmp_path,
                                                                           monkeypatch):
    """Two small scenes after one that is no raster: one process runs the job's tiles on ONNX
    Runtime (enough tiles in all to pay for it), and so does every Ray actor, though each sees one
    scene of too few tiles; the broken scene fails alone; the rows are the local ones; a rerun
    whose driver makes the ONNX model again (no cache) finds the scenes done."""
    import shutil

    from geodet.pipeline.job import detect_to_file

    monkeypatch.setenv("GEODET_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken.tif"
    broken.write_text("not a raster")
    paths = [shutil.copy(synth.image, tmp_path / f"{n}.tif") for n in ("a", "b")]
    local = detect_to_file([broken, *paths], tiny_model, tmp_path / "local.gpkg", progress=False,
                           score_threshold=0.3)
    chosen = local.attrs["report"]["scenes"][0]["backend"]
    assert chosen["backend"] == "onnx"  # the job's tiles together pay for ONNX Runtime; one scene's would not
    shutil.rmtree(tmp_path / "cache")
    summary = detect_ray([str(p) for p in [broken, *paths]], str(tiny_model), tmp_path / "run", workers=2,
                         block_tiles=1, progress=False, score_threshold=0.3)
    assert [f["scene"] for f in summary["failed_scenes"]] == [str(broken)] and summary["scenes_written"] == 2
    assert (summary["backend"]["backend"], summary["backend"]["precision"]) == (chosen["backend"], chosen["precision"])
    # what the actors ran, block by block: the driver's choice
    assert summary["worker_backends"] == {f"{chosen['backend']} {chosen['precision']}": summary["blocks_run"]}
    for p in paths:
        got = gpd.read_parquet(tmp_path / "run" / f"scene={Path(p).stem}" / "detections.parquet")
        ref = local[local["scene"] == Path(p).name]
        assert len(ref) > 0 and len(got) == len(ref)
        g, r = got.sort_values(COLS).reset_index(drop=True), ref.sort_values(COLS).reset_index(drop=True)
        assert (g["label"] == r["label"]).all() and (g["tile_row"] == r["tile_row"]).all()
        np.testing.assert_allclose(g[COLS[:4]].to_numpy(), r[COLS[:4]].to_numpy(), atol=1e-3)
        np.testing.assert_allclose(g["score"].to_numpy(), r["score"].to_numpy(), atol=6e-5)
    shutil.rmtree(tmp_path / "cache")  # made again on the rerun: other metadata, the same graph
    again = detect_ray([str(p) for p in paths], str(tiny_model), tmp_path / "run", workers=2, block_tiles=1,
                       progress=False, score_threshold=0.3)
    assert again["scenes_already_done"] == 2 and again["blocks_run"] == 0


def test_bf16_on_the_onnx_backend_is_refused_before_ray_starts(tiny_model, synth, tmp_path):
    """A setting every worker would refuse, block after block and round after round, is refused
    once on the driver, in one line, with nothing written."""
    import ray

    from geodet.errors import GeodetError

    was_running = ray.is_initialized()
    with pytest.raises(GeodetError, match="use --backend torch for bf16"):
        detect_ray([str(synth.image)], str(tiny_model), tmp_path / "run", progress=False, backend="onnx",
                   precision="bf16")
    assert ray.is_initialized() == was_running and not list((tmp_path / "run").glob("scene=*/*.parquet"))


@pytest.mark.parametrize("flag", [["--gpus-per-worker", "-1"], ["--cpus-per-worker", "-2"],
                                  ["--gpus-per-worker", "0.00001"], ["--cpus-per-worker", "nan"]])
def test_negative_or_too_fine_worker_resources_are_usage_errors(tmp_path, capsys, flag):
    from geodet.cli import main

    with pytest.raises(SystemExit) as e:
        main(["detect", "--engine", "ray", "x.tif", "-m", "m.pt", "-o", str(tmp_path / "rc"), *flag])
    assert e.value.code == 2 and flag[0] in capsys.readouterr().err and not (tmp_path / "rc").exists()
    with pytest.raises(SystemExit) as e:  # train's flags too
        main(["train", "x.tif", "--labels", "l.gpkg", "--engine", "ray", "-o", str(tmp_path / "rc"), *flag])
    assert e.value.code == 2 and flag[0] in capsys.readouterr().err and not (tmp_path / "rc").exists()
    # the API refuses them too, before anything is written or Ray starts
    from geodet.training.ray_train import train_ray

    was_running = ray.is_initialized()
    with pytest.raises(GeodetError, match="must be zero or a positive number"):
        detect_ray(["x.tif"], PerfectDetector(), tmp_path / "rc", gpus_per_worker=-1)
    with pytest.raises(GeodetError, match="must be zero or a positive number"):
        train_ray(None, tmp_path / "rc", cpus_per_worker=float("nan"))
    assert not (tmp_path / "rc").exists() and ray.is_initialized() == was_running


def test_a_worker_no_node_can_hold_is_refused_on_geodets_own_instance(local_ray, scenes, tmp_path, monkeypatch,
                                                                    caplog):
    # the module's instance stands in for the one geodet starts (no --address)
    class OwnRay:
        def __getattr__(self, name):
            return {"is_initialized": lambda: False, "init": lambda *a, **k: None,
                    "shutdown": lambda *a, **k: None}.get(name) or getattr(ray, name)

    monkeypatch.setattr(ray_engine, "require_ray", OwnRay)
    out = tmp_path / "new" / "rc"
    for ask in (dict(cpus_per_worker=64), dict(gpus_per_worker=1000)):
        with pytest.raises(GeodetError, match="the local Ray instance has 2 CPU"):
            detect_ray([str(scenes[0][0])], PerfectDetector(), out, progress=False, **SETTINGS, **ask)
        assert not (tmp_path / "new").exists()  # the folders it made are gone again
    # on a cluster joined (which an autoscaler may grow) it is said, not refused
    ray_resources.check_fits(ray, 1, 64, own=False)
    assert "no node of the Ray cluster has the 64 CPU(s) and 1 GPU(s)" in caplog.text
    ray_resources.check_fits(ray, 0, 2, own=True)  # fits: nothing said


def test_a_signed_url_that_changed_still_finds_its_scenes_folder(tmp_path):
    """A remote scene's folder is known by its address without the query (a signed URL's token
    changes between runs): no second folder, so merge never holds it twice; another address is
    another scene."""
    d = tmp_path / "scene=tile"
    d.mkdir()
    (d / "_SUCCESS.json").write_text(json.dumps({"scene": "/vsicurl/https://x.org/a/tile.tif?sig=A"}))
    assert parts.unclaimed_ids(tmp_path, ["/vsicurl/https://x.org/a/tile.tif?sig=B"], ["tile"]) == ["tile"]
    other = parts.unclaimed_ids(tmp_path, ["/vsicurl/https://x.org/b/tile.tif"], ["tile"])
    assert other[0].startswith("tile-") and len(other[0]) == len("tile-") + 8


def test_a_scene_given_relative_is_found_from_another_folder(tmp_path, monkeypatch, caplog):
    """A run started in one folder with a relative scene path, then another started elsewhere
    with the same file: the scene's folder is its own, with no false "no longer there"."""
    (tmp_path / "a" / "data").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    scene = tmp_path / "a" / "data" / "tile.tif"
    scene.write_bytes(b"")
    out = tmp_path / "run"
    (out / "scene=tile").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    marker = {"scene": "data/tile.tif", "scene_path": parts.scene_path("data/tile.tif")}
    assert marker["scene_path"] == str(scene)
    (out / "scene=tile" / "_SUCCESS.json").write_text(json.dumps(marker))
    monkeypatch.chdir(tmp_path / "b")
    with caplog.at_level("WARNING"):
        assert parts.unclaimed_ids(out, ["../a/data/tile.tif"], ["tile"]) == ["tile"]
    assert "no longer there" not in caplog.text
    assert parts.scene_path("/vsicurl/https://x.org/t.tif") == "/vsicurl/https://x.org/t.tif"
