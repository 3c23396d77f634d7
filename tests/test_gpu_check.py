"""The GPU check script's plumbing, in its CPU mode (CUDA parts skipped with a clear line)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    assert res["device"] == "cpu" and res["skipped_for_time"] == []
    row = res["detect"][0]
    assert row["tiles"] > 0 and row["tiles_per_s"] > 0 and abs(sum(row["share"].values()) - 1) < 0.01
    assert res["train"][0]["steps_per_s"] > 0 and res["train"][0]["steps"] == 4
