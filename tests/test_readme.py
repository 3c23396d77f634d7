"""The README's examples work as written: every command line parses with the real parser, and the
Python example runs (scene and label files swapped for a synthetic pair, a 2-step budget)."""

import re
import shlex
import shutil
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_starts_with_the_two_commands():
    first = _blocks("bash")[0].strip().splitlines()
    assert len(first) == 2 and "geodet demo" in first[0] and first[1].strip() == "pytest"


def test_every_command_line_in_the_readme_parses():
    from geodet.cli import build_parser

    parser = build_parser()
    lines = [ln for b in _blocks("bash")[1:] for ln in b.splitlines() if ln.startswith("geodet ")]
    assert len(lines) >= 7
    for ln in lines:
        args = parser.parse_args(shlex.split(ln)[1:])
        assert args.command, ln


@pytest.mark.slow
def test_python_example_runs_as_written(tmp_path, monkeypatch, synth):
    (code,) = [b for b in _blocks("python") if "geodet.train(" in b]
    other = tmp_path / "b.tif"  # a second scene: one scene twice is refused
    shutil.copy(synth.image, other)
    swaps = {'"a.tif"': repr(str(synth.image)), '"b.tif"': repr(str(other)), '"big.tif"': repr(str(synth.image)),
             '"a.gpkg"': repr(str(synth.labels)), '"labels.gpkg"': repr(str(synth.labels))}
    for old, new in swaps.items():
        assert old in code, old
        code = code.replace(old, new)
    budget = "cfg.train.time_limit_min = 20"
    assert budget in code
    code = code.replace(budget, budget + "; cfg.train.max_steps = 2; cfg.tiling.tile_size = 128; cfg.tiling.overlap = 16")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "runs" / "a" / "model.pt").exists() and (tmp_path / "big.geojson").exists()
    assert (tmp_path / "out.gpkg.report.json").exists() and "AP50" in namespace["metrics"]
