"""One grammar for every command (rasterio's ``rio`` is the model), checked by walking the real
parsers: the output is -o/--out, the model -m/--model, scenes positional where they are the
subject, a budget --time-limit MINUTES, counts spelled out, --device with its choices, a help line
for every flag, and old spellings only as hidden aliases that say what replaces them."""

import argparse
import re

import pytest

from geodet.cli import MODULES, build_parser, main
from geodet.cli import common
from geodet.cli.common import DEVICE_METAVAR, DeprecatedAlias, device, finite
from geodet.errors import GeodetError

SCENE_COMMANDS = {"detect", "suggest", "pretrain", "tile", "train", "anchors"}  # scenes are the subject
MODEL_COMMANDS = {"detect", "suggest", "export"}
BUDGET_COMMANDS = {"train", "pretrain", "demo"}
OLD_SPELLINGS = {"--n", "--minutes", "--json", "--zip", "--write-config", "--scene"}
SHORT = {"-h": "--help", "-o": "--out", "-m": "--model", "-v": "--verbose", "-q": "--quiet"}
HIDDEN_POSITIONALS = {("export", "model_positional")}  # the old ``geodet export MODEL``; run() warns


def commands() -> dict:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def visible(parser):
    return [a for a in parser._actions if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def option(parser, name):
    return next((a for a in parser._actions if name in a.option_strings), None)


def test_every_command_is_walked():
    assert set(commands()) == set(MODULES) and len(MODULES) >= 13


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_flag_and_argument_has_a_help_line_and_nothing_is_hidden_but_old_spellings(name):
    parser = commands()[name]
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        if a.help is argparse.SUPPRESS:
            assert isinstance(a, DeprecatedAlias) or (name, a.dest) in HIDDEN_POSITIONALS, (name, a.option_strings, a.dest)
            continue
        assert isinstance(a.help, str) and len(a.help.split()) >= 2, (name, a.option_strings or a.dest, a.help)
        # choices are listed in the usage (argparse does this unless a metavar hides them)
        if a.choices is not None and not isinstance(a, argparse._SubParsersAction):
            assert a.metavar is None, (name, a.option_strings)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_spelling_one_meaning_per_short_flag_and_counts_spelled_out(name):
    for a in visible(commands()[name]):
        longs = [o for o in a.option_strings if o.startswith("--")]
        shorts = [o for o in a.option_strings if not o.startswith("--")]
        for o in longs:
            assert re.fullmatch(r"--[a-z][a-z0-9]+(-[a-z0-9]+)*", o), (name, o)  # kebab case, no --n
            assert o not in OLD_SPELLINGS or (name, o) == ("evaluate", "--scene"), (name, o)
        for o in shorts:
            assert SHORT.get(o) in longs, (name, o, longs)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_the_output_is_dash_o_out(name):
    parser = commands()[name]
    out = option(parser, "--out")
    assert out is not None and set(out.option_strings) == {"-o", "--out"} and out.dest == "out", name
    for a in visible(parser):
        assert not {"--output", "--json", "--zip", "--write-config"} & set(a.option_strings), (name, a.option_strings)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_the_model_is_dash_m_model(name):
    parser = commands()[name]
    m = option(parser, "--model")
    if name in MODEL_COMMANDS:
        assert m is not None and set(m.option_strings) == {"-m", "--model"}, name
    else:
        assert m is None, name
    # no visible positional model anywhere
    assert not [a for a in visible(parser) if not a.option_strings and "model" in a.dest], name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_scenes_are_positional_where_they_are_the_subject(name):
    parser = commands()[name]
    positional = [a for a in visible(parser) if not a.option_strings]
    if name in SCENE_COMMANDS:
        assert any(a.metavar == "SCENE" for a in positional), name
        old = option(parser, "--scene")
        assert old is None or isinstance(old, DeprecatedAlias), name
        if name in ("train", "anchors"):  # had --scene: kept for a release
            assert isinstance(old, DeprecatedAlias), name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_budget_steps_and_device(name):
    parser = commands()[name]
    tl = option(parser, "--time-limit")
    if name in BUDGET_COMMANDS:
        assert tl is not None and tl.metavar == "MINUTES" and tl.type is finite, name  # one number type (never nan)
    else:
        assert tl is None, name
    if name in ("train", "pretrain"):
        assert option(parser, "--max-steps") is not None, name
    dev = option(parser, "--device")
    if dev is not None:
        assert dev.type is device and dev.metavar == DEVICE_METAVAR, name
    if name in ("detect", "train", "pretrain", "suggest"):
        assert dev is not None, name
    cc = option(parser, "--class-column")
    if cc is not None:
        assert "''" in cc.help, (name, cc.help)  # '' means no class column (one class) everywhere


def test_device_values():
    for ok in ("auto", "cpu", "cuda", "cuda:0", "cuda:12", " CUDA:1 "):
        assert device(ok) == ok.strip().lower()
    for bad in ("gpu", "cuda:", "cuda:x", "cuda:-1", "mps", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="auto, cpu, cuda or cuda:N"):
            device(bad)


def test_bad_device_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["detect", "a.tif", "-m", "m.pt", "-o", "o.gpkg", "--device", "gpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("geodet: error: argument --device") and "cuda:N" in err[0]


def test_repeated_scene_lists_add_up_and_seeds_are_numpys(capsys):
    """--unlabelled twice (as --labels) keeps both lists, not the last; a seed numpy cannot take
    is a one-line usage error, not a traceback after the scenes were read."""
    p = build_parser()
    a = p.parse_args(["train", "a.tif", "--labels", "a.gpkg", "-o", "r", "--unlabelled", "b.tif", "--unlabelled", "c.tif"])
    assert a.unlabelled == ["b.tif", "c.tif"]
    a = p.parse_args(["export", "-m", "m.pt", "-o", "m.onnx", "--int8", "--calibrate", "a.tif", "--calibrate", "b.tif"])
    assert a.calibrate == ["a.tif", "b.tif"]
    assert p.parse_args(["train", "a.tif", "--labels", "a.gpkg", "-o", "r", "--seed", "4294967295"]).seed == 2**32 - 1
    with pytest.raises(SystemExit):  # import's threshold is a score: named as the flag, not model.score_threshold
        p.parse_args(["import", "w.pt", "-o", "m.pt", "--score-threshold", "5"])
    assert "argument --score-threshold: must be at least 0 and at most 1" in capsys.readouterr().err
    for cmd in (["train", "a.tif", "--labels", "a.gpkg", "-o", "r"], ["pretrain", "a.tif", "-o", "b.pt"], ["demo"]):
        for bad in ("-1", "99999999999999999999999", "1.5"):
            with pytest.raises(SystemExit) as e:
                p.parse_args([*cmd, "--seed", bad])
            assert e.value.code == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "argument --seed" in err[0], err


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(common, "_WARNED", set())


@pytest.mark.parametrize("old,new,dest", [
    (["evaluate", "d.gpkg", "l.gpkg", "--json", "m.json"], ["evaluate", "d.gpkg", "l.gpkg", "-o", "m.json"], "out"),
    (["suggest", "a.tif", "-m", "m.pt", "-o", "n.gpkg", "--n", "7"], ["suggest", "a.tif", "-m", "m.pt", "-o", "n.gpkg",
                                                                     "--count", "7"], "count"),
    (["demo", "--minutes", "2.5"], ["demo", "--time-limit", "2.5"], "time_limit"),
    (["qgis-plugin", "--zip", "p.zip"], ["qgis-plugin", "-o", "p.zip"], "out"),
    (["anchors", "a.tif", "--labels", "l.gpkg", "--write-config", "c.yaml"],
     ["anchors", "a.tif", "--labels", "l.gpkg", "-o", "c.yaml"], "out"),
])
def test_old_spellings_parse_as_the_new_ones_and_say_so_once(old, new, dest, capsys, fresh_warnings):
    p = build_parser()
    a = p.parse_args(new)
    assert capsys.readouterr().err == ""
    b = p.parse_args(old)
    p.parse_args(old)  # a second use: no second line
    assert getattr(a, dest) == getattr(b, dest) and getattr(a, dest) is not None
    err = capsys.readouterr().err.strip().splitlines()
    flag = next(x for x in old if x in OLD_SPELLINGS)
    assert len(err) == 1 and err[0].startswith(f"geodet: warning: {flag} is deprecated") and "use " in err[0], err


def test_old_scene_flags_still_pair_with_labels(capsys, fresh_warnings):
    from geodet.cli.train import train_config

    p = build_parser()
    new = p.parse_args(["train", "a.tif", "b.tif", "--labels", "a.gpkg", "b.gpkg", "-o", "run"])
    old = p.parse_args(["train", "--scene", "a.tif", "--labels", "a.gpkg", "--scene", "b.tif", "--labels", "b.gpkg",
                        "-o", "run"])
    pairs = [[(s.scene, s.labels) for s in train_config(x).train.scenes] for x in (new, old)]
    assert pairs[0] == pairs[1] == [("a.tif", "a.gpkg"), ("b.tif", "b.gpkg")]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--scene is deprecated" in err[0] and "geodet train SCENE" in err[0]
    a = p.parse_args(["anchors", "--scene", "a.tif", "--labels", "l.gpkg"])
    assert a.scene_flag == "a.tif" and "--scene is deprecated" in capsys.readouterr().err


def test_train_pairing_errors_say_how_scenes_and_labels_pair():
    from geodet.cli.train import train_config

    p = build_parser()
    with pytest.raises(GeodetError, match=r"2 scenes: a.tif, b.tif; 1 labels file: a.gpkg\).*pair by position"):
        train_config(p.parse_args(["train", "a.tif", "b.tif", "--labels", "a.gpkg", "-o", "run"]))
    # labels given first swallow the scene: the message names both lists
    with pytest.raises(GeodetError, match=r"0 scenes; 2 labels files: a.gpkg, a.tif"):
        train_config(p.parse_args(["train", "-o", "run", "--labels", "a.gpkg", "a.tif"]))
    with pytest.raises(GeodetError, match="no training scenes: name them"):
        train_config(p.parse_args(["train", "-o", "run"]))
    with pytest.raises(GeodetError, match="both by name"):
        train_config(p.parse_args(["train", "a.tif", "--scene", "b.tif", "--labels", "a.gpkg", "b.gpkg", "-o", "r"]))
    cfg = train_config(p.parse_args(["train", "a.tif", "b.tif", "--labels", "a.gpkg", "b.gpkg", "--labelled-area",
                                     "aoi.gpkg", "-o", "run"]))
    assert [s.labelled_area for s in cfg.train.scenes] == ["aoi.gpkg", "aoi.gpkg"]


def test_export_model_positional_still_works_with_a_line(tmp_path, capsys, fresh_warnings):
    missing = tmp_path / "none.pt"
    assert main(["export", str(missing), "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "geodet: warning: geodet export MODEL is deprecated" in err and "-m MODEL" in err
    assert re.search(r"geodet: error: .*(not found|none\.pt)", err), err
    assert main(["export", str(missing), "-m", str(missing), "-o", str(tmp_path / "m.onnx")]) == 2
    assert "two models given" in capsys.readouterr().err
    assert main(["export", "-o", str(tmp_path / "m.onnx")]) == 2
    assert "no model given: geodet export -m MODEL.pt" in capsys.readouterr().err


def test_tile_class_column_empty_means_one_class(tmp_path, synth):
    import json

    for col, expected in (("", ["object"]), ("label", None)):
        out = tmp_path / f"chips_{col or 'none'}"
        assert main(["tile", str(synth.image), "-o", str(out), "--tile-size", "192", "--overlap", "16", "--labels",
                     str(synth.labels), "--class-column", col, "-q"]) == 0
        names = [c["name"] for c in json.loads((out / "annotations.json").read_text())["categories"]]
        if expected:
            assert names == expected
        else:
            assert names != ["object"] and len(names) >= 1


def test_the_readme_uses_no_old_spelling(capsys, fresh_warnings):
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [ln for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) for ln in b.splitlines()
             if ln.startswith("geodet ")]
    p = build_parser()
    for ln in lines:
        p.parse_args(shlex.split(ln)[1:])
        assert capsys.readouterr().err == "", ln
    assert len(lines) >= 15
