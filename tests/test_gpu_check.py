"""The GPU check script's plumbing, in its CPU mode (CUDA parts skipped with a clear line)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

ROOT = Path(__file__).resolve().parents[1]


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_mosaic_repeats_the_scene_with_exact_georeferencing(tmp_path):
    from geodet.synthetic import make_scene

    s = make_scene(tmp_path / "s.tif", tmp_path / "s.gpkg", size=(200, 150), seed=3)
    vrt = gpu_check_module().mosaic_vrt(tmp_path / "s.tif", tmp_path / "m.vrt", 3)
    with rasterio.open(s.image) as src, rasterio.open(vrt) as m:
        a = src.read()
        assert (m.width, m.height, m.count, m.crs) == (3 * src.width, 3 * src.height, src.count, src.crs)
        assert m.transform == src.transform
        big = m.read()
    for i in range(3):
        for j in range(3):
            np.testing.assert_array_equal(big[:, i * a.shape[1]:(i + 1) * a.shape[1], j * a.shape[2]:(j + 1) * a.shape[2]], a)


def test_card_peaks_are_found_by_name():
    g = gpu_check_module()
    assert g.card_peak("NVIDIA H200") == 989e12
    assert g.card_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert g.card_peak("NVIDIA H100 PCIe") == 756e12
    assert g.card_peak("some new card") is None


@pytest.mark.slow
def test_gpu_check_runs_on_a_cpu_and_says_cuda_was_skipped(tmp_path):
    out = tmp_path / "g.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--out", str(out),
                        "--workdir", str(tmp_path / "w"), "--budget", "200"], capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "CUDA parts skipped" in r.stderr
    res = json.loads(out.read_text())
    assert res == json.loads(r.stdout)
    assert res["device"] == "cpu" and res["skipped_for_time"] == [] and "errors" not in res, res.get("errors")
    core = res["core"][0]
    assert core["tiles_per_s"] > 0 and core["gflops_per_tile"] > 0 and core["cuda_graph"] is False
    read = res["read_bound"][0]  # the bare rasterio loop and the pipeline's reader, over the same windows
    assert read["workers"] == 1 and read["bare_tiles_per_s"] > 0 and read["pipeline_reader_tiles_per_s"] > 0
    default, dense = (next(r for r in res["detect"] if r["run"] == run) for run in ("default", "dense"))
    assert default["preset"] == "cpu" and default["tiles"] > 0 and default["nms"] == "per_image"
    assert default["share_of_core_alone"] > 0 and default["share_of_read_bound"] > 0
    assert set(default["stage_seconds"]) == {"read_wait", "model", "model_core", "model_decode", "stitch"}
    assert dense["preset"] == "small_objects_trained" and res["dense"]["before"] == 120.0
    assert res["train"][0]["steps_per_s"] > 0 and res["train"][0]["steps"] == 4
    # a batch's decoding: the CPU's NMS and the pair NMS agree exactly on real tiles
    decode = res["decode"][0]
    assert decode["agreement"]["f1"] == 1.0 and decode["detections"]["pairs"] == decode["detections"]["per_image"] > 0
    assert res["stitch"]["identical"] and res["stitch"]["rows"] > 1000
    assert res["stitch"]["paced_after_last_tile_s"] >= 0  # the tiles also came at 360 tiles/s
    assert any("dense stitching" in k for k in res["goals"])
    assert "cuda_vs_cpu" not in res  # CUDA only
    assert any("dense model" in k for k in res["goals"])
    ddp = res["ddp"]  # the trainer's step through a DDP wrapper (gloo here, NCCL on CUDA)
    assert ddp["backend"] == "gloo" and ddp["steps"] == 4 and ddp["all_finite"] and ddp["all_reduce_ok"]
