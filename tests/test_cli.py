"""The bad-input matrix, through the real CLI in a process of its own (forked with its imports
done, see cli_runner.py; the signal and stdin tests start real interpreters): exit code, one-line
message, no traceback, nothing half-written."""

import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from shapely.geometry import box

from geodet.errors import GeodetError

from cli_runner import run_geodet

ENV = {**os.environ, "GEODET_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


def geodet(*args, cwd=None, fresh=False):
    """``python -m geodet.cli ARGS`` in a process of its own: forked with the imports done
    (cli_runner.py), or with ``fresh`` a new interpreter."""
    return run_geodet(*args, env=ENV, cwd=cwd, timeout=600, fresh=fresh)


def assert_clean_end(r):
    """Nothing printed by the interpreter's own ending: no traceback, no ignored exception."""
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr


def assert_clean_error(r, pattern, code=2):
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("geodet: error:")]
    assert len(lines) == 1, r.stderr
    import re

    assert re.search(pattern, lines[0]), lines[0]


def raster(path, count=3, dtype="uint8", w=100, h=80, crs="EPSG:32633", nodata=None, fill=None):
    data = np.random.default_rng(0).integers(1, 200, (count, h, w)).astype(dtype) if fill is None else np.full((count, h, w), fill, dtype)
    kw = dict(crs=crs, transform=from_origin(500000, 4600000, 0.3, 0.3)) if crs else {}
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=count, dtype=dtype, nodata=nodata, **kw) as d:
        d.write(data)
    return path


def test_help_lists_subcommands():
    r = geodet("--help")
    assert r.returncode == 0
    for cmd in ("tile", "train", "detect", "evaluate", "anchors", "demo"):
        assert cmd in r.stdout
    for cmd in ("tile", "train", "detect", "evaluate", "anchors", "demo"):
        assert geodet(cmd, "--help").returncode == 0


def test_missing_scene(tmp_path, tiny_model):
    assert_clean_error(geodet("detect", tmp_path / "nope.tif", "-m", tiny_model, "-o", tmp_path / "o.gpkg"), "scene not found")


def test_text_file_scene(tmp_path, tiny_model):
    (tmp_path / "a.tif").write_text("hello")
    assert_clean_error(geodet("detect", tmp_path / "a.tif", "-m", tiny_model, "-o", tmp_path / "o.gpkg"), "not a raster")
    assert not (tmp_path / "o.gpkg").exists()


def test_png_without_georeferencing(tmp_path, tiny_model):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3)).astype(np.uint8)).save(tmp_path / "p.png")
    assert_clean_error(geodet("detect", tmp_path / "p.png", "-m", tiny_model, "-o", tmp_path / "o.geojson"), "no CRS.*CSV")
    r = geodet("detect", tmp_path / "p.png", "-m", tiny_model, "-o", tmp_path / "o.csv")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.csv").exists()


def test_a_crs_without_a_geotransform_is_no_georeferencing(tmp_path, tiny_model):
    """GDAL reads a scene with a CRS and no geotransform with the identity: its pixel boxes once went
    out as map coordinates of that CRS (upside down, in the Gulf of Guinea for a UTM zone)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rasterio's NotGeoreferencedWarning
        with rasterio.open(tmp_path / "c.tif", "w", driver="GTiff", width=120, height=90, count=3, dtype="uint8",
                           crs="EPSG:32633") as d:
            d.write(np.random.default_rng(0).integers(0, 255, (3, 90, 120)).astype(np.uint8))
    assert_clean_error(geodet("detect", tmp_path / "c.tif", "-m", tiny_model, "-o", tmp_path / "o.geojson"),
                       "a CRS but no geotransform.*CSV")
    assert not (tmp_path / "o.geojson").exists()
    r = geodet("detect", tmp_path / "c.tif", "-m", tiny_model, "-o", tmp_path / "o.csv", "--score-threshold", "0.0")
    assert r.returncode == 0, r.stderr
    rows = pd.read_csv(tmp_path / "o.csv")
    assert len(rows) and ("crs" not in rows or not rows["crs"].notna().any())  # pixel boxes: no CRS claimed


def test_scene_smaller_than_tile_works(tmp_path, tiny_model):
    p = raster(tmp_path / "s.tif", w=50, h=40)
    r = geodet("detect", p, "-m", tiny_model, "-o", tmp_path / "o.gpkg", "--score-threshold", "0.0")
    assert r.returncode == 0, r.stderr
    g = gpd.read_file(tmp_path / "o.gpkg")
    if len(g):
        b = g.total_bounds
        assert b[0] >= 500000 - 1e-6 and b[2] <= 500000 + 15 + 1e-6  # inside the 50 px x 0.3 m scene


def test_all_nodata_scene_zero_detections(tmp_path, tiny_model):
    p = raster(tmp_path / "s.tif", w=300, h=300, nodata=0, fill=0)
    r = geodet("detect", p, "-m", tiny_model, "-o", tmp_path / "o.gpkg")
    assert r.returncode == 0, r.stderr
    assert len(gpd.read_file(tmp_path / "o.gpkg")) == 0
    rep = json.loads((tmp_path / "o.gpkg.report.json").read_text())
    s = rep["scenes"][0]
    assert s["tiles_skipped"] == s["tiles_total"] > 1 and s["tiles_run"] == 0


@pytest.mark.parametrize("count,dtype", [(1, "uint8"), (4, "uint16"), (4, "float32")])
def test_band_mismatch_message_and_bands_flag(tmp_path, tiny_model, count, dtype):
    p = raster(tmp_path / "s.tif", count=count, dtype=dtype)
    r = geodet("detect", p, "-m", tiny_model, "-o", tmp_path / "o.gpkg")
    if count == 1:
        assert_clean_error(r, r"model expects 3 band\(s\) \(1,2,3\); scene s.tif has 1: repeat a band with "
                              r"--bands \(e\.g\. 1,1,1\)")
        r = geodet("detect", p, "-m", tiny_model, "-o", tmp_path / "o.gpkg", "--bands", "1,1,1")
    else:
        assert r.returncode == 0, r.stderr  # bands 1,2,3 of a 4-band scene, said so
        assert "s.tif has 4 bands; the model reads bands 1,2,3" in r.stderr
        r = geodet("detect", p, "-m", tiny_model, "-o", tmp_path / "o.gpkg", "--bands", "4,3,2")
    assert r.returncode == 0, r.stderr
    r = geodet("detect", p, "-m", tiny_model, "-o", tmp_path / "o.gpkg", "--bands", "1,2")
    assert_clean_error(r, "model expects 3 band")


def _train_args(tmp_path, scene, labels, *extra):
    return ("train", scene, "--labels", labels, "--config", "cpu", "--out", tmp_path / "run",
            "--max-steps", "1", "--tile-size", "128", "--overlap", "16", *extra)


def test_bad_labels(tmp_path, synth):
    (tmp_path / "l.gpkg").write_text("not a vector")
    assert_clean_error(geodet(*_train_args(tmp_path, synth.image, tmp_path / "l.gpkg")), "not a vector file")
    empty = gpd.GeoDataFrame({"label": []}, geometry=[], crs="EPSG:32633")
    empty.to_file(tmp_path / "e.gpkg")
    assert_clean_error(geodet(*_train_args(tmp_path, synth.image, tmp_path / "e.gpkg")), "no features")
    nocrs = gpd.GeoDataFrame({"label": ["car"]}, geometry=[box(500010, 4599990, 500012, 4599992)])
    nocrs.to_file(tmp_path / "n.geojson", driver="GeoJSON")
    # GeoJSON readers assume WGS84; a shapefile without .prj truly has no CRS
    nocrs.to_file(tmp_path / "n.shp")
    assert_clean_error(geodet(*_train_args(tmp_path, synth.image, tmp_path / "n.shp")), "no CRS")
    far = gpd.GeoDataFrame({"label": ["car"]}, geometry=[box(0, 0, 5, 5)], crs="EPSG:32633")
    far.to_file(tmp_path / "f.gpkg")
    assert_clean_error(geodet(*_train_args(tmp_path, synth.image, tmp_path / "f.gpkg")), r"labels extent .* scene extent")
    wrongcol = gpd.read_file(synth.labels).rename(columns={"label": "kind"})
    wrongcol.to_file(tmp_path / "w.gpkg")
    assert_clean_error(geodet(*_train_args(tmp_path, synth.image, tmp_path / "w.gpkg")), "available columns: kind")


def test_invalid_geometries_repaired_and_counted(tmp_path, synth):
    from shapely.geometry import Polygon

    g = gpd.read_file(synth.labels)
    x0, y0, x1, y1 = g.geometry[0].bounds
    bow = Polygon([(x0, y0), (x1, y1), (x1, y0), (x0, y1)])
    g = gpd.GeoDataFrame({"label": list(g.label) + ["car", "car"]}, geometry=list(g.geometry) + [bow, Polygon()], crs=g.crs)
    g.to_file(tmp_path / "bad.gpkg")
    r = geodet(*_train_args(tmp_path, synth.image, tmp_path / "bad.gpkg"))
    assert r.returncode == 0, r.stderr
    assert "repaired 1" in r.stderr and "empty 1" in r.stderr


def test_bad_model_files(tmp_path):
    p = raster(tmp_path / "s.tif")
    (tmp_path / "rand.pt").write_bytes(os.urandom(4000))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'EVIL'}",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    for name in ("rand.pt", "evil.pt"):  # the pickle with code in a new interpreter, as a user meets it
        r = geodet("detect", p, "-m", tmp_path / name, "-o", tmp_path / "o.gpkg", fresh=name == "evil.pt")
        assert_clean_error(r, "not a model file|not a readable geodet model")
        assert_clean_end(r)
    assert not (tmp_path / "EVIL").exists() and not (tmp_path / "o.gpkg").exists()


def test_truncated_model(tmp_path, tiny_model):
    p = raster(tmp_path / "s.tif")
    (tmp_path / "t.pt").write_bytes(tiny_model.read_bytes()[:5000])
    assert_clean_error(geodet("detect", p, "-m", tmp_path / "t.pt", "-o", tmp_path / "o.gpkg"), "not a readable")


def test_config_unknown_key_and_wrong_type(tmp_path, synth):
    (tmp_path / "c.yaml").write_text("tiling:\n  tile_sise: 256\n")
    assert_clean_error(geodet(*_train_args(tmp_path, synth.image, synth.labels)[:1], "--config", tmp_path / "c.yaml",
                              "--out", tmp_path / "r"), r"c\.yaml: unknown key 'tiling\.tile_sise'")
    (tmp_path / "c.yaml").write_text("train:\n  lr: fast\n")
    assert_clean_error(geodet("train", "--config", tmp_path / "c.yaml", "--out", tmp_path / "r"), r"c\.yaml: 'train\.lr' must be float")


def test_output_folder_missing_or_not_writable(tmp_path, tiny_model):
    p = raster(tmp_path / "s.tif")
    (tmp_path / "afile").write_text("x")
    assert_clean_error(geodet("detect", p, "-m", tiny_model, "-o", tmp_path / "afile" / "o.gpkg"), "is a file, not a folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        assert_clean_error(geodet("detect", p, "-m", tiny_model, "-o", ro / "o.gpkg"), "cannot write in")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("args,pattern", [
    (("--tile-size", "64", "--overlap", "64"), "must be smaller"),
    (("--tile-size", "0"), "positive"),
    (("--tile-size", "-5"), "positive"),
    (("--overlap", "-1"), "zero or positive"),
])
def test_bad_tile_settings(tmp_path, tiny_model, args, pattern):
    p = raster(tmp_path / "s.tif")
    assert_clean_error(geodet("detect", p, "-m", tiny_model, "-o", tmp_path / "o.gpkg", *args), pattern)
    assert not (tmp_path / "o.gpkg").exists()


def test_cuda_requested_without_cuda(tmp_path, tiny_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    p = raster(tmp_path / "s.tif")
    assert_clean_error(geodet("detect", p, "-m", tiny_model, "-o", tmp_path / "o.gpkg", "--device", "cuda"), "CUDA is not available")
    r = geodet("detect", p, "-m", tiny_model, "-o", tmp_path / "o.gpkg", "--device", "auto")
    assert r.returncode == 0, r.stderr


def test_sigterm_during_detect_leaves_previous_output(tmp_path, tiny_model):
    from geodet.synthetic import make_scene

    s = make_scene(tmp_path / "big.tif", tmp_path / "big.gpkg", size=2048, seed=4)
    out = tmp_path / "o.gpkg"
    out.write_bytes(b"previous result")
    proc = subprocess.Popen([sys.executable, "-m", "geodet.cli", "detect", str(s.image), "-m", str(tiny_model), "-o",
                             str(out), "--batch-size", "1"], env=ENV, stderr=subprocess.PIPE, text=True)
    time.sleep(6)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.gpkg", "big.tif", "o.gpkg"]


def test_interrupt_inside_code_run_from_a_string_still_exits_130(tmp_path):
    """A stop that lands in code run from a string (exec: dataclasses, torch.fx, the ONNX export of
    a .pt on its first CPU run) and is caught by geodet still ends ``python -m geodet.cli`` with 130,
    not killed by SIGINT (CI met -2 when SIGTERM came during that export)."""
    (tmp_path / "run_stopped.py").write_text(
        "import sys\n"
        "import geodet.cli as cli\n"
        "def stopped(args):\n"
        "    exec('raise KeyboardInterrupt')\n"
        "cli.COMMANDS['anchors'] = stopped\n"
        "sys.exit(cli.main(['anchors', '--labels', 'x.gpkg']))\n")
    r = subprocess.run([sys.executable, "-m", "run_stopped"], cwd=tmp_path, env={**ENV, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 130, r.stderr
    assert r.stderr == "geodet: interrupted; no partial output was written\n"


def test_the_command_prints_its_own_info_lines_and_other_libraries_only_from_warning():
    """torch, the ONNX quantizer and others log at INFO (torch's fake-tensor statistics at exit, after
    an interrupted ONNX export): the command shows geodet's lines, and theirs only with --verbose."""
    code = ("import logging, sys\n"
            "from geodet.cli.common import setup_logging\n"
            "setup_logging(sys.argv[1] == 'v')\n"
            "logging.getLogger('torch._subclasses.fake_tensor').info('FakeTensor cache stats:')\n"
            "logging.info('a bias copied')\n"
            "logging.getLogger('onnxruntime').warning('a warning of theirs')\n"
            "logging.getLogger('geodet.pipeline').info('12 detections')\n")
    quiet = subprocess.run([sys.executable, "-c", code, "q"], env=ENV, capture_output=True, text=True, timeout=120)
    assert quiet.stderr.splitlines() == ["a warning of theirs", "12 detections"], quiet.stderr
    loud = subprocess.run([sys.executable, "-c", code, "v"], env=ENV, capture_output=True, text=True, timeout=120)
    assert "FakeTensor cache stats:" in loud.stderr and "a bias copied" in loud.stderr, loud.stderr


def test_names_too_long_for_the_file_system_are_one_line(tmp_path, tiny_model, synth):
    """An output or a model named past the file system's limit (255 bytes a name): one line, exit 2."""
    long = "a" * 300
    for args in (("export", "-m", tiny_model, "-o", tmp_path / f"{long}.onnx"),
                 ("detect", synth.image, "-m", tiny_model, "-o", tmp_path / f"{long}.gpkg"),
                 ("detect", synth.image, "-m", tmp_path / f"{long}.pt", "-o", tmp_path / "d.gpkg"),
                 ("detect", synth.image, "-m", tmp_path / f"{long}.onnx", "-o", tmp_path / "d.gpkg")):
        r = geodet(*args)
        assert_clean_error(r, r"a{20}.*(too long|choose a shorter name)")
    assert sorted(os.listdir(tmp_path)) == []


def test_sigterm_during_train_then_resume(tmp_path, synth):
    run = tmp_path / "runs" / "a"  # parents that do not exist yet: the command creates its run folder
    args = ("train", synth.image, "--labels", synth.labels, "--config", "cpu", "--out", run,
            "--tile-size", "128", "--overlap", "16", "--steps-per-epoch", "4", "--epochs", "400")
    proc = subprocess.Popen([sys.executable, "-m", "geodet.cli", *map(str, args)], env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    state = torch.load(run / "last.pt", weights_only=True)
    step = state["step"]
    assert step >= 4
    with open(run / "metrics.csv", newline="") as f:  # the log says why the run ended there
        notes = [row["note"] for row in csv.DictReader(f) if row["note"]]
    assert notes[-1].startswith("stopped: ") and f"at step {step} " in notes[-1], notes
    r = geodet(*args[:-2], "--epochs", str(step // 4 + 1), "--resume")
    assert r.returncode == 0, r.stderr
    assert torch.load(run / "last.pt", weights_only=True)["step"] > step
    before = (run / "model.pt").read_bytes()
    for engine in ("local", "ray"):  # a rerun into the finished run's folder: refused before any work (Ray's too)
        r = geodet(*args[:-2], "--epochs", "1", "--engine", engine)
        assert_clean_error(r, r"holds a run \(model.pt, last.pt, metrics.csv\): continue it with --resume, replace it "
                              r"with --overwrite")
    r = geodet(*args[:-2], "--epochs", "1", "--resume", "--overwrite")
    assert_clean_error(r, "give one of them")
    assert (run / "model.pt").read_bytes() == before


def test_end_to_end_cli_detect_and_evaluate(tmp_path, tiny_model, synth):
    """The main path in new interpreters, as a user runs it, to their end."""
    out = tmp_path / "d.geojson"
    r = geodet("detect", synth.image, "-m", tiny_model, "-o", out, "--quicklook", tmp_path / "q.png", fresh=True)
    assert r.returncode == 0, r.stderr
    assert_clean_end(r)
    rep = json.loads((tmp_path / "d.geojson.report.json").read_text())
    import hashlib

    assert rep["model"]["sha256"] == hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    assert rep["inputs"][0]["bytes"] == os.path.getsize(synth.image)
    assert rep["quicklooks"] == [str(tmp_path / "q.png")] and rep["scenes"][0]["tiles_capped"] >= 0
    assert (tmp_path / "q.png").stat().st_size > 0
    r = geodet("evaluate", out, synth.labels, "--scene", synth.image, "-o", tmp_path / "m.json", "--plot", tmp_path / "pr.png",
               fresh=True)
    assert r.returncode == 0, r.stderr
    assert_clean_end(r)
    m = json.loads((tmp_path / "m.json").read_text())
    for k in ("AP", "AP50", "AP75", "AP_small", "precision", "recall", "f1", "n_detections", "n_labels", "per_class"):
        assert k in m
    assert m["n_labels"] == len(gpd.read_file(synth.labels))
    r = geodet("anchors", synth.image, "--labels", synth.labels, "--config", "cpu")
    assert r.returncode == 0 and "coverage" in r.stdout
    r = geodet("anchors", synth.image, "--labels", synth.labels, "--config", "cpu", "-o", tmp_path / "new" / "a.yaml")
    assert r.returncode == 0 and "anchor_sizes" in (tmp_path / "new" / "a.yaml").read_text()  # its folder made
    for out, pattern in [(tmp_path / "new", "output path is a folder"), (tmp_path / "a.txt", "a YAML/YML file")]:
        assert_clean_error(geodet("anchors", synth.image, "--labels", synth.labels, "-o", out), pattern)
    r = geodet("tile", synth.image, "--out", tmp_path / "chips", "--tile-size", "128", "--overlap", "16", "--labels", synth.labels)
    assert r.returncode == 0, r.stderr
    coco = json.loads((tmp_path / "chips" / "annotations.json").read_text())
    assert len(coco["images"]) == 16 and len(coco["annotations"]) >= m["n_labels"]


def test_flags_before_or_after_the_command():
    from geodet.cli import build_parser

    p = build_parser()
    for argv in (["-q", "demo"], ["demo", "-q"]):
        a = p.parse_args(argv)
        assert getattr(a, "quiet", False) is True
    assert getattr(p.parse_args(["demo"]), "quiet", False) is False


def _until(proc, predicate, limit=180):
    """Read stderr lines until ``predicate(line)``; returns the lines read."""
    lines, deadline = [], time.time() + limit
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if predicate(line):
            break
    return lines


def _closed_and_read(proc, limit=120):
    """Close the child's stdin once it has made progress; its whole stderr, once it has ended."""
    import threading

    read = _until(proc, lambda ln: '"done": ' in ln and '"done": 0,' not in ln)
    proc.stdin.close()
    guard = threading.Timer(limit, proc.kill)  # a child that does not stop fails the test, not the run
    guard.start()
    try:
        err = "".join(read) + proc.stderr.read()
        proc.wait()
    finally:
        guard.cancel()
        proc.stderr.close()
    return err


def test_closing_stdin_stops_a_driven_detect_and_leaves_nothing(tmp_path, tiny_model):
    """GEODET_STOP_ON_EOF=1 (the QGIS provider's polite stop on Windows, where a GUI program has no
    signal for a child without a console): stdin closing stops geodet as Ctrl+C would."""
    from geodet.synthetic import make_scene

    s = make_scene(tmp_path / "big.tif", tmp_path / "big.gpkg", size=2048, seed=4)
    out = tmp_path / "o.gpkg"
    proc = subprocess.Popen([sys.executable, "-m", "geodet.cli", "--progress", "json", "detect", str(s.image), "-m",
                             str(tiny_model), "-o", str(out), "--batch-size", "1", "--backend", "torch"],
                            env={**ENV, "GEODET_STOP_ON_EOF": "1"}, stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    err = _closed_and_read(proc)
    assert proc.returncode == 130, err
    assert "interrupted; no partial output was written" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.gpkg", "big.tif"]


def test_closing_stdin_stops_a_driven_training_with_its_checkpoint(tmp_path, synth):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "geodet.cli", "--progress", "json", "train", str(synth.image),
                             "--labels", str(synth.labels), "--config", "cpu", "-o", str(run), "--tile-size", "128",
                             "--overlap", "16", "--steps-per-epoch", "4", "--epochs", "400"],
                            env={**ENV, "GEODET_STOP_ON_EOF": "1"}, stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    err = _closed_and_read(proc)
    assert proc.returncode == 130, err
    assert "stopping after this step and saving last.pt" in err and "--resume" in err and "Traceback" not in err
    assert torch.load(run / "last.pt", weights_only=True)["step"] >= 1


def _one_error(capsys, args, pattern):
    from geodet.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("geodet: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    import re

    assert re.search(pattern, lines[0]), lines[0]


def test_an_output_never_replaces_an_input_or_a_projects_other_layers(tmp_path, tiny_model, synth, capsys):
    """evaluate -o naming its detections or labels (.json is GeoJSON too), suggest -o naming its
    labelled area, and any output into a GeoPackage that holds the user's other layers (the output
    replaces the whole file): refused in one line before any work, the files byte for byte as they were."""
    import shutil

    det, lab = tmp_path / "det.json", tmp_path / "lab.json"
    gpd.read_file(synth.labels).to_crs(4326).to_file(lab, driver="GeoJSON")
    shutil.copy(lab, det)
    before = {p: p.read_bytes() for p in (det, lab)}
    _one_error(capsys, ["evaluate", str(det), str(lab), "-o", str(det)],
               r"det\.json is the detections: .*another output name")
    _one_error(capsys, ["evaluate", str(det), str(lab), "-o", str(tmp_path / "." / "lab.json")], "is the labels")
    area = tmp_path / "area.gpkg"
    gpd.read_file(synth.labels).to_file(area, layer="area")
    before[area] = area.read_bytes()
    _one_error(capsys, ["suggest", str(synth.image), "-m", str(tiny_model), "-o", str(area), "--labelled-area",
                        str(area)], r"is the labelled area \(--labelled-area\)")
    project = tmp_path / "project.gpkg"
    gpd.read_file(synth.labels).to_file(project, layer="labels")
    before[project] = project.read_bytes()
    _one_error(capsys, ["detect", str(synth.image), "-m", str(tiny_model), "-o", str(project)],
               r"project\.gpkg holds other layers \(labels\) and the output replaces the whole file")
    listing = tmp_path / "scenes.txt"
    listing.write_text(f"{synth.image}\n")
    before[listing] = listing.read_bytes()
    _one_error(capsys, ["detect", "--scene-list", str(listing), "-m", str(tiny_model), "-o", str(listing),
                        "--format", "csv"], r"scenes\.txt is the scene list \(--scene-list\)")
    _one_error(capsys, ["detect", "--scene-list", str(listing), "-m", str(tiny_model), "-o", str(tmp_path / "d.gpkg"),
                        "--quicklook", str(listing)], r"is the scene list")
    assert {p: p.read_bytes() for p in before} == before
    # a GeoPackage geodet wrote (layers named after it, with its columns) is replaced as before; a layer QGIS
    # named after its file without them is the user's, and a name whose extension says nothing is no way round
    from geodet.io.writers import check_output_path

    gpd.read_file(synth.labels).assign(score=0.5).to_file(tmp_path / "out.gpkg", layer="out_32633")
    check_output_path(tmp_path / "out.gpkg", "gpkg")
    gpd.read_file(synth.labels).to_file(tmp_path / "labels.gpkg", layer="labels")
    with pytest.raises(GeodetError, match=r"holds other layers \(labels\)"):
        check_output_path(tmp_path / "labels.gpkg", "gpkg")
    (tmp_path / "labels.gpkg").rename(tmp_path / "labels.dat")
    with pytest.raises(GeodetError, match=r"holds other layers \(labels\)"):
        check_output_path(tmp_path / "labels.dat", "gpkg")


def test_vector_files_without_geometry_or_crs_are_one_line(tmp_path, synth, capsys):
    """A CSV of x/y columns or a GeoPackage table holds no geometry: one line naming the file and
    what it is to the command (not an AttributeError); a labelled area without a CRS is named as such."""
    import sqlite3

    pd.DataFrame({"label": ["car"], "x": [500010.0], "y": [4599990.0]}).to_csv(tmp_path / "xy.csv", index=False)
    table = tmp_path / "table.gpkg"
    gpd.read_file(synth.labels).head(2).to_file(table, layer="t")
    with sqlite3.connect(table) as db:  # the layer made a table without geometry, as QGIS's "no geometry" export
        db.execute("UPDATE gpkg_contents SET data_type = 'attributes' WHERE table_name = 't'")
        db.execute("DELETE FROM gpkg_geometry_columns WHERE table_name = 't'")
    _one_error(capsys, ["anchors", str(synth.image), "--labels", str(tmp_path / "xy.csv"), "--config", "cpu"],
               r"xy\.csv: the labels file has no geometry .*WKT")
    _one_error(capsys, ["evaluate", str(table), str(synth.labels)], r"table\.gpkg: .*(no geometry|without geometry)")
    _one_error(capsys, ["evaluate", str(synth.labels), str(tmp_path / "xy.csv")], r"the labels file has no geometry")
    _one_error(capsys, ["train", str(synth.image), "--labels", str(synth.labels), "--labelled-area", str(table),
                        "--config", "cpu", "--max-steps", "1", "-o", str(tmp_path / "run")],
               r"table\.gpkg: .*(no geometry|without geometry)")
    gpd.read_file(synth.labels).head(2).set_crs(None, allow_override=True).to_file(tmp_path / "a.shp")
    _one_error(capsys, ["train", str(synth.image), "--labels", str(synth.labels), "--labelled-area",
                        str(tmp_path / "a.shp"), "--config", "cpu", "--max-steps", "1", "-o", str(tmp_path / "run")],
               r"a\.shp: the labelled area has no CRS")
    assert not (tmp_path / "run").exists()


def test_a_local_crs_to_geojson_is_refused_before_any_tile(tmp_path, tiny_model, capsys, monkeypatch):
    """An engineering (local) CRS has no way to WGS 84, which GeoJSON needs: refused before any tile
    (it failed with a ProjError once every tile had run); a GeoPackage keeps the scene's CRS."""
    from rasterio.crs import CRS

    import geodet.pipeline.detect as detect

    local = CRS.from_wkt('LOCAL_CS["site grid",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]')
    with rasterio.open(tmp_path / "l.tif", "w", driver="GTiff", width=64, height=48, count=3, dtype="uint8",
                       crs=local, transform=from_origin(1000, 2000, 0.3, 0.3)) as d:
        d.write(np.full((3, 48, 64), 90, np.uint8))
    ran = []
    monkeypatch.setattr(detect, "batch_results", lambda *a, **k: ran.append(1) or iter(()))
    _one_error(capsys, ["detect", str(tmp_path / "l.tif"), "-m", str(tiny_model), "-o", str(tmp_path / "o.geojson")],
               r"l\.tif: its CRS \(site grid\) has no transformation to WGS 84 .* write \.gpkg")
    assert not ran and not (tmp_path / "o.geojson").exists()
    # two scenes in one local CRS hold one CRS: a FlatGeobuf keeps it (a review found them refused)
    import shutil

    shutil.copy(tmp_path / "l.tif", tmp_path / "m.tif")
    monkeypatch.undo()
    from geodet.cli import main

    assert main(["detect", str(tmp_path / "l.tif"), str(tmp_path / "m.tif"), "-m", str(tiny_model), "-o",
                 str(tmp_path / "o.fgb"), "-q", "--score-threshold", "0.0"]) == 0
    # the writer refuses it too, before a byte (geodet merge writes through it)
    from geodet.io.writers import write_detections

    frame = gpd.read_file(tmp_path / "o.fgb")
    with pytest.raises(GeodetError, match=r"its CRS \(site grid\) has no transformation to WGS 84"):
        write_detections(frame, tmp_path / "w.geojson")
    assert not (tmp_path / "w.geojson").exists()


def test_a_later_scenes_bands_are_refused_before_the_first_scene_runs(tmp_path, tiny_model, synth, capsys,
                                                                      monkeypatch):
    """A job's second scene with fewer bands than the model reads failed after the first had run
    (hours, in a real job): every scene's bands are checked before any tile."""
    import geodet.pipeline.detect as detect

    with rasterio.open(synth.image) as src:
        profile, band = src.profile, src.read(1)
    with rasterio.open(tmp_path / "b1.tif", "w", **dict(profile, count=1)) as dst:
        dst.write(band[None])
    ran = []
    monkeypatch.setattr(detect, "batch_results", lambda *a, **k: ran.append(1) or iter(()))
    _one_error(capsys, ["detect", str(synth.image), str(tmp_path / "b1.tif"), "-m", str(tiny_model), "-o",
                        str(tmp_path / "o.gpkg")], r"model expects 3 band\(s\) .* b1\.tif has 1")
    assert not ran and not (tmp_path / "o.gpkg").exists()
    # an overlap in metres a later scene cannot take (a geographic CRS): refused before the first scene too
    with rasterio.open(tmp_path / "geo.tif", "w", **dict(profile, crs="EPSG:4326",
                                                        transform=from_origin(10.0, 50.0, 1e-5, 1e-5))) as dst:
        dst.write(np.repeat(band[None], 3, 0))
    (tmp_path / "m.yaml").write_text("tiling:\n  overlap_m: 3.0\n")
    _one_error(capsys, ["detect", str(synth.image), str(tmp_path / "geo.tif"), "-m", str(tiny_model), "-o",
                        str(tmp_path / "o.gpkg"), "--config", str(tmp_path / "m.yaml")],
               r"geo\.tif: an overlap in metres needs a projected")
    assert not ran and not (tmp_path / "o.gpkg").exists()


def test_more_bad_inputs_are_one_line_before_any_work(tmp_path, tiny_model, synth, capsys, monkeypatch):
    """Outputs named for another format, folders that cannot be written, a file that is not
    suggestions, a damaged ray output, labels that cannot check an export: each refused in one
    line, with nothing left behind."""
    labels = str(synth.labels)
    _one_error(capsys, ["evaluate", labels, labels, "-o", str(tmp_path / "m.gpkg")], r"m\.gpkg: this output is a JSON")
    _one_error(capsys, ["evaluate", labels, labels, "--plot", str(tmp_path / "p.xyz")], r"p\.xyz: .* PNG file.*p\.png")
    _one_error(capsys, ["detect", str(synth.image), "-m", str(tiny_model), "-o", str(tmp_path / "d.gpkg"),
                        "--quicklook", str(tmp_path / "q.jpg")], r"q\.jpg: .* PNG file")
    _one_error(capsys, ["suggest", "--done", labels, "--labelled-area", str(tmp_path / "area.gpkg")],
               "no 'done' field, so it is not a file geodet suggest wrote")
    _one_error(capsys, ["merge", str(tmp_path / "nothing"), "-o", str(tmp_path / "all.gpkg")], "nothing: not found")
    bad = tmp_path / "ray" / "scene=a"
    bad.mkdir(parents=True)
    (bad / "_SUCCESS.json").write_text("{}")
    (bad / "detections.parquet").write_bytes(b"PAR1 truncated")
    _one_error(capsys, ["merge", str(tmp_path / "ray"), "-o", str(tmp_path / "all.gpkg")],
               r"not a GeoParquet file.*run geodet detect --engine ray again")
    g = gpd.read_file(synth.labels).assign(label=None)
    g.to_file(tmp_path / "noclass.gpkg")

    def work(*args, **kwargs):
        raise AssertionError("the export's work started before its labels were checked")

    monkeypatch.setattr("geodet.pipeline.export.calibration_tiles", work)
    for check in (tmp_path / "missing.gpkg", tmp_path / "noclass.gpkg"):
        _one_error(capsys, ["export", "-m", str(tiny_model), "-o", str(tmp_path / "x.onnx"), "--calibrate",
                            str(synth.image), "--check-labels", str(check)], "labels not found|every label's 'label' is empty")
    run = tmp_path / "run"  # a run folder whose model.pt is damaged: said so, not taken for an import
    run.mkdir()
    (run / "model.pt").write_bytes(b"PK\x03\x04" + os.urandom(400))
    _one_error(capsys, ["detect", str(synth.image), "-m", str(run), "-o", str(tmp_path / "d.gpkg")],
               r"not a readable geodet model file.*copy it again")
    ro = tmp_path / "ro"  # a folder this user cannot write in (root can write anywhere: refused by a stand-in)
    ro.mkdir()
    real = tempfile.mkstemp

    def refusing(*args, dir=None, **kwargs):
        if dir is not None and str(dir).startswith(str(ro)):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refusing)
    _one_error(capsys, ["tile", str(synth.image), "-o", str(ro / "chips")], "cannot write in .*ro .Permission denied")
    _one_error(capsys, ["train", str(synth.image), "--labels", labels, "-o", str(ro / "run"), "--max-steps", "1"],
               "cannot write in .*ro .Permission denied")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noclass.gpkg", "ray", "ro", "run"]
    assert list(ro.iterdir()) == []


def test_labels_with_empty_classes_tile_and_a_run_folder_detects(tmp_path, synth, tiny_model, caplog):
    """Labels whose class is empty are left out (and said so); a run folder given as the model
    runs its model.pt."""
    from geodet.cli import main

    g = gpd.read_file(synth.labels)
    g.loc[:4, "label"] = None
    g.to_file(tmp_path / "some.gpkg")
    assert main(["-q", "tile", str(synth.image), "-o", str(tmp_path / "chips"), "--tile-size", "128", "--overlap", "16",
                 "--labels", str(tmp_path / "some.gpkg")]) == 0
    text = (tmp_path / "chips" / "annotations.json").read_text()
    coco = json.loads(text)
    assert "NaN" not in text and {c["name"] for c in coco["categories"]} <= set(g["label"].dropna())
    assert "5 label(s) with an empty 'label' left out" in caplog.text
    assert main(["-q", "detect", str(synth.image), "-m", str(tiny_model.parent), "-o", str(tmp_path / "d.gpkg")]) == 0
    assert len(gpd.read_file(tmp_path / "d.gpkg", layer="d")) > 0


def test_a_picture_that_cannot_be_written_is_a_partial_result(tmp_path, synth, tiny_model, monkeypatch, capsys):
    """The detections or metrics are written but a quicklook or plot asked for is not: exit 3 and a
    line that says what is there, never "drawn" for a picture that is not (nor exit 0 or 2)."""
    from geodet.cli import main
    from geodet.io import quicklook

    def no_room(*a, **k):
        raise GeodetError("cannot write q.png: No space left on device: free some space there")

    monkeypatch.setattr(quicklook, "quicklook", no_room)
    out = tmp_path / "d.gpkg"
    rc = main(["detect", str(synth.image), "-m", str(tiny_model), "-o", str(out), "--quicklook",
               str(tmp_path / "q.png"), "--tile-size", "128", "--overlap", "16"])
    err = capsys.readouterr().err
    assert rc == 3 and out.exists() and "1 quicklook(s) not drawn (the detections are written)" in err, err
    import geodet.evaluation as evaluation

    monkeypatch.setattr(evaluation, "plot_pr", no_room)
    rc = main(["evaluate", str(out), str(synth.labels), "-o", str(tmp_path / "m.json"), "--plot",
               str(tmp_path / "pr.png")])
    err = capsys.readouterr().err
    assert rc == 3 and (tmp_path / "m.json").exists() and "the metrics are written to" in err, err


def test_anchors_names_the_unit_of_a_geographic_scenes_pixels(tmp_path, capsys):
    from geodet.cli import main

    p = tmp_path / "geo.tif"
    with rasterio.open(p, "w", driver="GTiff", width=200, height=200, count=3, dtype="uint8", crs="EPSG:4326",
                       transform=from_origin(10.0, 45.0, 1e-5, 1e-5)) as d:
        d.write(np.full((3, 200, 200), 60, np.uint8))
    gpd.GeoDataFrame({"label": ["car", "car"]}, geometry=[box(10.0002, 44.9990, 10.0004, 44.9992),
                                                          box(10.0010, 44.9985, 10.0013, 44.9988)],
                     crs="EPSG:4326").to_file(tmp_path / "l.gpkg")
    assert main(["anchors", str(p), "--labels", str(tmp_path / "l.gpkg"), "--config", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "label boxes at 1e-05 degrees/px:" in out and "m/px" not in out, out


def test_anchors_of_a_resizing_config_or_an_anchor_list_are_the_networks(tmp_path, capsys, synth):
    """A config whose network resizes its tiles 4x meets the boxes 4x larger; a config with
    model.anchor_size_list is scored with that list, and the written fit is what training uses."""
    import yaml

    from geodet.cli import main
    from geodet.config import load_config

    cfg = tmp_path / "resize.yaml"
    cfg.write_text("tiling: {tile_size: 256}\nmodel: {levels: [2, 5], anchor_sizes: [12, 24, 48, 96], "
                   "scales_per_octave: 1, resize_min_size: 1024}\n")
    assert main(["anchors", str(synth.image), "--labels", str(synth.labels), "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "resized x4 to model.resize_min_size" in out, out
    listed = tmp_path / "listed.yaml"
    listed.write_text("model: {levels: [2, 5], anchor_sizes: [12, 24, 48, 96], scales_per_octave: 1, "
                      "anchor_size_list: [1000, 2000, 4000, 8000]}\n")
    assert main(["anchors", str(synth.image), "--labels", str(synth.labels), "--config", str(listed),
                 "-o", str(tmp_path / "fit.yaml")]) == 0
    out = capsys.readouterr().out
    assert "(model.anchor_size_list)" in out and "coverage 0.000 (IoU" in out, out
    fitted = load_config(tmp_path / "fit.yaml").model
    assert fitted.anchor_size_list is None and yaml.safe_load((tmp_path / "fit.yaml").read_text())
    assert float(out.split("fitted anchors:")[1].split("coverage ")[1].split()[0]) > 0.5
