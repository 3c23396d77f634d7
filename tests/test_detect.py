"""detect_scene as an API: it leaves the caller's model as it was, takes thresholds per call,
runs over an area, and gives the same report as the command."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import torch
from helpers import PerfectDetector, packed_boxes, write_id_scene

from geodet.config import ModelConfig
from geodet.model import build_model
from geodet.pipeline.scenes import detect_scene

TINY = dict(classes=["car", "truck"], levels=[2, 4], anchor_sizes=[8.0, 16.0, 32.0], channels=16, head_depth=1)


def test_callers_model_is_left_as_it_was(synth):
    m = build_model(ModelConfig(**TINY, score_threshold=0.0), tile_size=128, overlap=16)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    net_attrs = (m.net.score_thresh, m.net.nms_thresh, m.net.detections_per_img)
    f = detect_scene(synth.image, m, score_threshold=0.3, progress=False, device="cpu")
    assert m.training  # still in train mode
    assert (m.net.score_thresh, m.net.nms_thresh, m.net.detections_per_img) == net_attrs
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # BN statistics untouched
    assert len(f) == 0 or f["score"].min() >= 0.3
    assert f.attrs["report"]["settings"]["score_threshold"] == 0.3
    assert f.attrs["report"]["settings_from"]["score_threshold"] == "argument"


def test_thresholds_travel_with_the_call(synth):
    m = build_model(ModelConfig(**TINY, score_threshold=0.0), tile_size=128, overlap=16).eval()
    lo = detect_scene(synth.image, m, score_threshold=0.0, progress=False)
    hi = detect_scene(synth.image, m, score_threshold=0.2, progress=False)
    again = detect_scene(synth.image, m, score_threshold=0.0, progress=False)
    assert len(hi) < len(lo) == len(again)


def test_area_detection_equals_whole_scene_inside_the_area(tmp_path):
    """Detections over an area, mapped back, equal the whole-scene run's for objects the area's
    tiles see whole (a perfect detector, so both are exact)."""
    from helpers import PerfectDetector, packed_boxes, write_id_scene

    boxes = packed_boxes(600, 500, 4, 20, seed=2)
    p = write_id_scene(tmp_path / "id.tif", boxes, 600, 500)
    area = (200, 100, 520, 420)
    f = detect_scene(p, PerfectDetector(), area=area, tile_size=128, overlap=24, progress=False)
    got = f[["px_x0", "px_y0", "px_x1", "px_y1"]].to_numpy() + [area[0], area[1], area[0], area[1]]
    inside = boxes[(boxes[:, 0] >= area[0]) & (boxes[:, 2] <= area[2]) & (boxes[:, 1] >= area[1]) & (boxes[:, 3] <= area[3])]
    assert {tuple(b) for b in inside} <= {tuple(b) for b in got.astype(int)}
    # and the georeferencing of the area frame is the scene's
    whole = detect_scene(p, PerfectDetector(), tile_size=128, overlap=24, progress=False)
    wb = whole[["px_x0", "px_y0", "px_x1", "px_y1"]].to_numpy().astype(int)
    k = next(i for i, b in enumerate(wb) if tuple(b) == tuple(inside[0]))
    j = next(i for i, b in enumerate(got.astype(int)) if tuple(b) == tuple(inside[0]))
    assert whole.geometry.iloc[k].equals_exact(f.geometry.iloc[j], 1e-9)


def test_api_job_writes_the_same_report_as_the_command(tmp_path, synth, tiny_model):
    from cli_runner import run_geodet

    from geodet.pipeline.job import detect_to_file

    frame = detect_to_file([synth.image], tiny_model, tmp_path / "api.gpkg", progress=False)
    api = json.loads((tmp_path / "api.gpkg.report.json").read_text())
    assert api == json.loads(json.dumps(frame.attrs["report"], default=str))
    r = run_geodet("detect", synth.image, "-m", tiny_model, "-o", tmp_path / "cli.gpkg", "-q",
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    cli = json.loads((tmp_path / "cli.gpkg.report.json").read_text())
    assert cli["detections"] == api["detections"] and cli["model"]["sha256"] == api["model"]["sha256"]
    assert cli["scenes"][0]["settings"] == api["scenes"][0]["settings"]


def test_workers_give_the_same_result(tmp_path):
    boxes = packed_boxes(600, 500, 3, 24, seed=3)
    p = write_id_scene(tmp_path / "id.tif", boxes, 600, 500)
    a = detect_scene(p, PerfectDetector(), tile_size=128, overlap=24, num_workers=0, progress=False)
    b = detect_scene(p, PerfectDetector(), tile_size=128, overlap=24, num_workers=2, progress=False)
    ka = np.sort(a[["px_x0", "px_y0", "px_x1", "px_y1"]].to_numpy(), axis=0)
    kb = np.sort(b[["px_x0", "px_y0", "px_x1", "px_y1"]].to_numpy(), axis=0)
    assert np.array_equal(ka, kb)


def test_memory_flat_on_6000px_scene(tmp_path):
    """Perfect detector over a 6000^2 scene: peak RSS stays under 1.5 GB (the scene alone is 108 MB
    of pixels; the stitcher holds only detections)."""
    boxes = packed_boxes(6000, 6000, 4, 24, seed=9, gap_choices=(20, 40, 60))
    p = write_id_scene(tmp_path / "big.tif", boxes, 6000, 6000)
    code = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str((__import__('pathlib').Path(__file__).parent))!r})
        from helpers import PerfectDetector
        import geodet
        from geodet.pipeline.scenes import detect_scene
        geodet.tune_memory()
        g = detect_scene({str(p)!r}, PerfectDetector(), tile_size=512, overlap=64, num_workers=0, progress=False)
        # VmHWM is this address space's peak; ru_maxrss would carry pytest's peak across exec
        hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
        print(len(g), hwm)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    n, peak_kb = int(out[0]), int(out[1])
    assert n == len(boxes)
    assert peak_kb < 1_500_000


def test_tiles_at_the_detection_cap_are_counted_and_named(tmp_path, caplog):
    """A detector that fills every tile to the cap: the report counts those tiles and a warning
    names the setting to raise."""
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(tmp_path / "s.tif", "w", driver="GTiff", width=300, height=300, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(0, 0, 1, 1)) as dst:
        dst.write(np.full((3, 300, 300), 50, np.uint8))

    def full(batch):
        g = torch.arange(10.0)
        b = torch.stack([g * 10, g * 10, g * 10 + 5, g * 10 + 5], 1)
        return [{"boxes": b, "scores": torch.full((10,), 0.9), "labels": torch.zeros(10, dtype=torch.int64)} for _ in batch]

    with caplog.at_level("WARNING"):
        f = detect_scene(tmp_path / "s.tif", full, tile_size=128, overlap=16, detections_per_tile=10, progress=False)
    rep = f.attrs["report"]
    assert rep["tiles_capped"] == rep["tiles_run"] == 9
    assert "detections_per_tile" in caplog.text
    f2 = detect_scene(tmp_path / "s.tif", full, tile_size=128, overlap=16, detections_per_tile=50, progress=False)
    assert f2.attrs["report"]["tiles_capped"] == 0


def test_the_split_batch_path_gives_the_whole_call_path_row_for_row(synth):
    """geodet's detectors run a batch in two halves (core started before the previous batch's
    tiles are handed out; NMS for the batch and one packed copy after): the scene's detections
    are those of calling the detector whole on each batch, row for row, with and without
    DataLoader workers, with a last batch smaller than the others."""
    from geodet.pipeline.backends import TorchDetector
    from geodet.pipeline.settings import resolve_detect_settings

    from geodet.pipeline.backends import sample_tiles

    torch.manual_seed(5)
    m = build_model(ModelConfig(**TINY, score_threshold=0.0), tile_size=128, overlap=16).eval()
    # random weights: a threshold that keeps the top few percent of this model's scores here
    with torch.inference_mode():
        probe = m.predict(torch.from_numpy(np.stack(sample_tiles(synth.image, resolve_detect_settings(m.card), m.card, 4))))
    thr = float(torch.quantile(torch.cat([d["scores"] for d in probe]), 0.97))
    s = resolve_detect_settings(m.card, score_threshold=thr, batch_size=3)
    det = TorchDetector(m, torch.device("cpu"), s)

    class Whole:  # the detector protocol only, so the loop calls it whole
        card = m.card

        def __call__(self, batch):
            return det(batch)

    for workers in (0, 2):
        kw = dict(score_threshold=thr, batch_size=3, num_workers=workers, progress=False, device="cpu")
        a, b = detect_scene(synth.image, det, **kw), detect_scene(synth.image, Whole(), **kw)
        assert a.attrs["report"]["tiles_run"] % 3 != 0  # a smaller last batch
        assert len(a) > 50
        cols = ["label", "score", "tile_row", "tile_col", "px_x0", "px_y0", "px_x1", "px_y1"]
        assert a[cols].equals(b[cols])


def test_the_graph_bookkeeping_gives_the_eager_detections(synth, monkeypatch):
    """What the CUDA graph path does around the graph, on the CPU: a stand-in for the graph runs
    the captured function on its static input when replayed. Captured at the second full batch,
    replayed for the others, a smaller last batch padded and its extra rows dropped: the scene's
    detections are the eager ones, row for row."""
    import geodet.pipeline.graphs as graphs
    from geodet.pipeline.backends import TorchDetector, sample_tiles
    from geodet.pipeline.settings import resolve_detect_settings

    replays = []

    class Replay:  # torch.cuda.CUDAGraph's part here: replay() refills the static outputs
        def __init__(self, fn, g):
            self.fn, self.g = fn, g

        def replay(self):
            replays.append(1)
            for out, new in zip(self.g.static_out, self.fn(self.g.static_in)):
                out.copy_(new)

    def capture(fn, example, what):
        g = object.__new__(graphs.GraphedBatch)
        g.static_in = example.clone()
        g.static_out = tuple(t.clone() for t in fn(g.static_in))
        g.graph = Replay(fn, g)
        return g

    monkeypatch.setattr(graphs, "try_capture", capture)
    torch.manual_seed(5)
    m = build_model(ModelConfig(**TINY, score_threshold=0.0), tile_size=128, overlap=16).eval()
    with torch.inference_mode():
        probe = m.predict(torch.from_numpy(np.stack(sample_tiles(synth.image, resolve_detect_settings(m.card), m.card, 4))))
    thr = float(torch.quantile(torch.cat([d["scores"] for d in probe]), 0.97))
    s = resolve_detect_settings(m.card, score_threshold=thr, batch_size=3)
    graphed, eager = TorchDetector(m, torch.device("cpu"), s), TorchDetector(m, torch.device("cpu"), s)
    graphed.cuda_graphs = True  # on the CPU only with the stand-in
    kw = dict(score_threshold=thr, batch_size=3, num_workers=0, progress=False, device="cpu")
    a, b = detect_scene(synth.image, graphed, **kw), detect_scene(synth.image, eager, **kw)
    tiles = a.attrs["report"]["tiles_run"]
    assert graphed.graph is not None and tiles % 3 != 0 and len(replays) == -(-tiles // 3) - 1
    assert len(a) > 50
    cols = ["label", "score", "tile_row", "tile_col", "px_x0", "px_y0", "px_x1", "px_y1"]
    assert a[cols].equals(b[cols])


def test_a_batch_size_beyond_the_scenes_tiles_takes_only_the_tiles(tmp_path):
    # a batch buffer for 10 million tiles (terabytes) was allocated up front for a scene of 20
    boxes = packed_boxes(600, 500, 3, 24, seed=3)
    p = write_id_scene(tmp_path / "id.tif", boxes, 600, 500)
    ref = detect_scene(p, PerfectDetector(), tile_size=128, overlap=24, num_workers=0, progress=False)
    key = ["px_x0", "px_y0", "px_x1", "px_y1"]
    for workers in (0, 2):  # read in this process, and by the ring's reader processes
        f = detect_scene(p, PerfectDetector(), tile_size=128, overlap=24, num_workers=workers, batch_size=10**7,
                         progress=False)
        assert np.array_equal(np.sort(f[key].to_numpy(), axis=0), np.sort(ref[key].to_numpy(), axis=0))
