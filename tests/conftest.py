import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# pytest-xdist runs the suite in one process per core (pyproject's addopts: -n auto): each process,
# and every geodet it starts, computes on its share of the cores, never more (two processes of two
# OpenMP threads each on two cores made an 8-second training take minutes, threads spinning at
# barriers for cores the other process held); set before torch is imported


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if _WORKERS > 1:  # an inherited OMP_NUM_THREADS (of one process's share) would oversubscribe the cores again
    os.environ["OMP_NUM_THREADS"] = str(max(1, min(4, _cores() // _WORKERS)))
os.environ.setdefault("GEODET_NO_PROGRESS", "1")
# derived models (ONNX exports, int8) go to a cache of the test run's own, never the user's
os.environ["GEODET_CACHE"] = _CACHE = tempfile.mkdtemp(prefix="geodet-test-cache-")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "trees"


def pytest_xdist_auto_num_workers(config):
    """-n auto: one process per core, at most 4 (each holds torch, about 0.5 GB)."""
    return max(1, min(4, _cores()))


def pytest_sessionfinish(session, exitstatus):
    """The run's cache of derived models (tens of MB) goes with the run."""
    import shutil

    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def trees_dir():
    if not (SHARED / "yell_541000.tif").exists():
        pytest.skip("shared tree data not found beside the checkout")
    return SHARED


def tiny_config(scene, labels, **train):
    from geodet.config import SceneLabels, load_config

    cfg = load_config("cpu")
    cfg.tiling.tile_size, cfg.tiling.overlap = 128, 24
    cfg.model.channels, cfg.model.head_depth = 32, 1
    cfg.train.scenes = [SceneLabels(str(scene), str(labels))]
    cfg.train.batch_size = 2
    cfg.train.steps_per_epoch = 6
    cfg.train.epochs = 2
    cfg.train.warmup_steps = 2
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    from geodet.synthetic import make_scene

    d = tmp_path_factory.mktemp("synth")
    return make_scene(d / "s.tif", d / "s.gpkg", size=384, seed=3)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, synth):
    from geodet.training.trainer import train

    out = tmp_path_factory.mktemp("run")
    # 96 steps (about 8 s): enough for the tiny network to find the synthetic objects (validation
    # AP50 about 0.8), so the model the tests run detects something at the end of its schedule
    path = train(tiny_config(synth.image, synth.labels, epochs=16), out, progress=False)
    return path
