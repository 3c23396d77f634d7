"""Typed settings for every stage, with one source of defaults: the dataclasses below.

YAML files override these defaults (the built-in presets live in the package, ``geodet/configs/``, and
are read with importlib.resources, so a wheel has them too); CLI flags override the YAML.
Unknown keys and wrong types raise a GeodetError naming the key and the file.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import GeodetError



def config_dir():
    """The built-in presets (``geodet/configs/*.yaml``), wherever geodet is installed."""
    from importlib.resources import files

    return files("geodet") / "configs"


def preset_names() -> list[str]:
    """Names of the built-in presets, e.g. ``cpu``, ``small_objects``, ``trees``."""
    d = config_dir()
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml")) if d.is_dir() else []


@dataclass
class SceneConfig:
    """How a raster is read: bands, dtype scaling, ground resolution."""

    bands: list[int] = field(default_factory=lambda: [1, 2, 3])
    # uint16 and float bands are scaled to 0..1 between these per-band percentiles.
    percentiles: list[float] = field(default_factory=lambda: [2.0, 98.0])
    # Resample on read to this ground resolution (metres per pixel); None keeps the native grid.
    gsd_m: Optional[float] = None
    # Tiles whose valid (not nodata) fraction is at or below this are skipped.
    min_valid_fraction: float = 0.0


@dataclass
class TilingConfig:
    tile_size: int = 512
    overlap: int = 64
    # If set, the overlap in metres; converted to pixels at the (resampled) GSD.
    overlap_m: Optional[float] = None


@dataclass
class ModelConfig:
    classes: list[str] = field(default_factory=lambda: ["object"])
    backbone: str = "resnet18"  # resnet18 | resnet34 | resnet50 | resnet101
    # none | imagenet (torchvision's weights, from its cache) | a path to a torchvision ImageNet
    # weights file (e.g. resnet50-0676ba61.pth, hash-checked) | imported (geodet import: frozen BN)
    pretrained: str = "none"
    trainable_layers: int = 5
    # Pyramid levels [min, max]: P2 has stride 4, P7 stride 128.
    levels: list[int] = field(default_factory=lambda: [2, 5])
    # One base anchor size (pixels) per level, smallest first.
    anchor_sizes: list[float] = field(default_factory=lambda: [12.0, 24.0, 48.0, 96.0])
    scales_per_octave: int = 1
    # Every anchor size, level by level (levels x scales_per_octave), instead of anchor_sizes
    # times 2**(i/scales): for imported models whose sizes were rounded (torchvision: 32, 40, 50, ...)
    anchor_size_list: Optional[list[float]] = None
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    channels: int = 128  # FPN and head width
    head_depth: int = 4  # conv layers in each subnet before the output conv
    group_norm: bool = False
    # how anchors are assigned to objects in training: iou (fixed thresholds fg_iou / bg_iou) or
    # atss (per object: the k anchors nearest its centre on each level, threshold mean + std of their IoUs)
    matcher: str = "iou"
    # the box regression loss: l1 (on the encoded offsets), smooth_l1, giou, diou or ciou (on the boxes)
    box_loss: str = "l1"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    prior_probability: float = 0.01
    fg_iou: float = 0.5
    bg_iou: float = 0.4
    score_threshold: float = 0.05
    nms_iou: float = 0.5
    topk_candidates: int = 3000
    detections_per_tile: int = 1000
    # None runs tiles at native size. A number resizes every tile so its short side is this
    # (torchvision's stock behaviour, min_size=800): kept only for like-for-like comparisons.
    resize_min_size: Optional[int] = None


@dataclass
class SceneLabels:
    scene: str = ""
    labels: str = ""
    # polygons (any OGR format, any CRS) of where the labels are complete; None: the whole scene.
    # Chips are drawn inside it, the loss ignores anchors outside it (never taught as background)
    # and the validation strip is cut from it.
    labelled_area: Optional[str] = None


@dataclass
class TrainConfig:
    scenes: list[SceneLabels] = field(default_factory=list)
    # Separate validation scenes; when empty a spatial block of each training scene is held out.
    val_scenes: list[SceneLabels] = field(default_factory=list)
    # Scenes without labels for self-training (same sensor, bands and GSD as the labelled ones)
    unlabelled: list[str] = field(default_factory=list)
    # Self-training: an EMA teacher labels the unlabelled scenes and the rest of each labelled scene
    # outside its labelled area, in rounds after a burn-in; on by itself when `unlabelled` is given
    self_training: bool = False
    burn_in: float = 0.4  # share of the run trained on the labels alone
    pseudo_rounds: int = 3  # times the teacher labels the unlabelled areas again after the burn-in
    pseudo_share: float = 0.5  # share of the chips drawn from the teacher's boxes
    ema_decay: float = 0.99  # the teacher's weights: this much of the old, 1 - this of the student's, per step
    # a teacher's detection from this share of its threshold up to the threshold is a doubt: ignored by
    # the loss (neither object nor background); below it, background
    pseudo_doubt: float = 0.3
    class_column: str = "label"
    unknown_classes: str = "drop"  # drop | keep (keep adds them as new classes)
    point_box_m: float = 1.0  # points become squares of this side
    # None: 10 epochs without a time limit; with one, the clock ends the run. A number caps the run
    # (with or without a time limit), as max_steps does.
    epochs: Optional[int] = None
    steps_per_epoch: int = 50  # a unit of the step count and the metrics log; validation may skip epochs
    max_steps: Optional[int] = None
    # minutes: the learning-rate schedule spans them (from the measured step rate) and training,
    # final validation included, ends near the limit
    time_limit_min: Optional[float] = None
    batch_size: int = 4
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 0.001
    weight_decay: float = 0.0001
    warmup_steps: int = 50
    grad_clip: float = 10.0
    negative_fraction: float = 0.2
    min_visibility: float = 0.5
    max_nodata_fraction: float = 0.5
    # chips may reach past the labelled area (and a validation strip) into the real pixels around,
    # whose anchors the loss ignores; false: chips are cut at the area's edge and padded with zeros
    chip_context: bool = False
    val_fraction: float = 0.2
    # give the validation strip's labels back to training once the run's progress reaches this share
    # (the validation then, which sets the operating point and the card's metrics, is the last);
    # None: the strip stays held out for the whole run
    val_give_back: Optional[float] = None
    # also measure the operating point of test-time augmentation (detect --tta) at the validation that
    # sets model.pt's (the last, or the one before the strip is given back): 8 more passes over the
    # strip, reserved inside the time limit; without it, --tta styles at the plain operating point
    tta_operating_point: bool = False
    # which model becomes model.pt: "last" (the end of the schedule, where the LR has decayed) or "best"
    # (the best validation AP50 seen); validation always sets the card's metrics and operating point.
    # "last": with a few hundred labels the validation strip holds a few dozen objects; picking by it
    # was never better beyond the seeds' spread, far worse where the strip held almost no labels, and
    # less steady in most settings (docs/benchmarks.md, "Few labels")
    keep: str = "last"
    # flips, 90-degree rotations and mild brightness/contrast (off: none of the augmentations below either)
    augment: bool = True
    # chips resampled by a factor within 1 +/- this of the model's GSD (0: off)
    scale_jitter: float = 0.0
    # probability that a chip gets copies of labelled objects pasted where nothing is labelled (0: off)
    copy_paste: float = 0.0
    # strength of hue/saturation jitter (3-band images) and per-band gain (0: off)
    photometric: float = 0.0
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    # start from this geodet model file (trained or imported): its architecture, weights, tile
    # size, GSD and bands unless set here; new classes re-initialise only the last classification conv
    init: Optional[str] = None
    # freeze the backbone's first N stages (1: stem, 2: + layer1, ..., 5: + layer4); None: as
    # model.trainable_layers says (pretrained backbones) or nothing frozen (from scratch)
    freeze_backbone_stages: Optional[int] = None
    # auto: fp16 autocast on CUDA, bf16 autocast on CPUs with native bf16 (AVX512_BF16/AMX), else
    # fp32; the losses are always computed in float32
    precision: str = "auto"


@dataclass
class DetectConfig:
    batch_size: int = 8
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: Optional[int] = None  # None: 0 on a CPU with <= 2 cores, else a few (see detect.default_workers)
    score_threshold: Optional[float] = None  # None: the model card's
    # Seam merge: two tiles' boxes are one object when they agree to this IoU where both looked.
    match_iou: float = 0.5
    # auto | torch | onnx, and auto | fp32 | bf16 | fp16 | int8: auto picks the fastest path whose
    # accuracy is vouched for (pipeline/backends.py); the report says which ran and why
    backend: str = "auto"
    precision: str = "auto"
    # a tile GDAL cannot read (damaged file, failed remote read): fail (stop, nothing written) or
    # skip (run the other tiles, list the unreadable windows in the report, exit code 3)
    on_read_error: str = "fail"
    # test-time augmentation: each tile also run flipped and turned (8 views on square tiles, 4
    # on others), the views' boxes fused (model/tta.py); about 8x the detection time, torch only
    tta: bool = False


@dataclass
class OutputConfig:
    format: Optional[str] = None  # geojson | gpkg | fgb | shp | csv | parquet; None: by extension
    csv_geometry: str = "wkt"  # wkt | pixel


@dataclass
class Config:
    scene: SceneConfig = field(default_factory=SceneConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def explicit(self) -> set:
        """Dotted keys set by a YAML file or overrides (not defaults): for the settings resolver,
        a value the user wrote beats the model card's, a default does not."""
        return self.__dict__.setdefault("_explicit", set())

    def written(self) -> set:
        """``explicit``, and the keys whose value differs from the default: set by assignment in
        Python (``cfg.tiling.tile_size = 64``, as a notebook does), which beats a model card as a
        value in a YAML file does."""
        keys = set(self.explicit)
        defaults = Config()
        for section in dataclasses.fields(self):
            mine, base = getattr(self, section.name), getattr(defaults, section.name)
            for f in dataclasses.fields(mine):
                value = getattr(mine, f.name)
                if hasattr(value, "tolist"):  # numpy
                    value = value.tolist()
                if isinstance(value, tuple):
                    value = list(value)
                try:
                    differs = bool(value != getattr(base, f.name))
                except (TypeError, ValueError):
                    differs = True
                if differs:
                    keys.add(f"{section.name}.{f.name}")
        return keys

    @property
    def from_arguments(self) -> set:
        """Of ``explicit``, the keys the command line (or an API argument) set, not a file: the
        report says where each setting came from."""
        return self.__dict__.setdefault("_from_arguments", set())


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in that type."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except GeodetError:
                pass
        raise GeodetError(f"{source}: '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise GeodetError(f"{source}: '{key}' must be a {_type_name(tp)}, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise GeodetError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return _merge(tp(), value, key, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise GeodetError(f"{source}: '{key}' must be {_type_name(tp)}, got {value!r}")


def _merge(obj: Any, data: dict, prefix: str, source: str, root: Any = None) -> Any:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise GeodetError(f"{source}: unknown key '{full}' (allowed here: {', '.join(names)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            _merge(current, value, full, source, root or obj)
        else:
            setattr(obj, key, _coerce(value, hints[key], full, source))
            if isinstance(root or obj, Config):
                (root or obj).explicit.add(full)
    return obj


def resolve_config_path(name_or_path: str | Path):
    """A path to a YAML file, or the name of a built-in preset (``trees`` -> geodet/configs/trees.yaml).
    Returns a path-like object with ``read_text()``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    d = config_dir()
    for candidate in (d / f"{name_or_path}.yaml", d / str(name_or_path)):
        if candidate.is_file():  # a preset, even where a folder of its name is in the working folder
            return candidate
    if path.is_dir():
        raise GeodetError(f"config {name_or_path} is a folder: give a YAML file in it (or a built-in preset's name)")
    known = preset_names()
    hint = f" (built-in presets: {', '.join(known)})" if known else ""
    raise GeodetError(f"config file not found: {name_or_path}{hint}")


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last without
    a word: a ``lr:`` pasted below another would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # << *anchor: merged below, its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise _DuplicateKey(f"{key!r} is given twice (lines {seen[key]} and "
                                        f"{key_node.start_mark.line + 1}): keep one")
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: the safe loader says so itself
                continue
        return super().construct_mapping(node, deep=deep)


def _paths_beside(cfg: Config, file: Path) -> None:
    """A config file's relative scene, label and area paths name files beside the config
    (``textfiles.beside``), so the run is the same from any working folder."""
    from .textfiles import beside

    def near(p):
        return beside(p, file, "the config")

    t = cfg.train
    for s in [*t.scenes, *t.val_scenes]:
        s.scene, s.labels, s.labelled_area = near(s.scene), near(s.labels), near(s.labelled_area)
    t.unlabelled = [near(u) for u in t.unlabelled]


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides`` (dotted keys)."""
    cfg = Config()
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise GeodetError(f"load_config takes a preset name or a YAML file's path (str or pathlib.Path), not "
                          f"{type(path).__name__}")
    if path is not None:
        file = resolve_config_path(path)
        try:
            data = yaml.load(file.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except _DuplicateKey as exc:
            raise GeodetError(f"{file}: {exc}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise GeodetError(f"{file}: not valid YAML{where}: fix the syntax") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise GeodetError(f"cannot read config {file}: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise GeodetError(f"{file}: the top level must be a mapping of sections (scene, tiling, model, ...)")
        _merge(cfg, data, "", str(file))
        if isinstance(file, Path):
            _paths_beside(cfg, file)
    if overrides:
        apply_overrides(cfg, overrides)
    return cfg


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str = "command line") -> Config:
    """Set dotted keys such as ``{"tiling.tile_size": 256}``; ``None`` values are ignored."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.rpartition(".")
        nested: dict[str, Any] = {key: value}
        for part in reversed(section.split(".")) if section else []:
            nested = {part: nested}
        _merge(cfg, nested, "", source)
        if source == "command line":
            cfg.from_arguments.add(dotted)
        else:
            cfg.from_arguments.discard(dotted)
    return cfg


def config_from_dict(data: dict, source: str = "config") -> Config:
    return _merge(Config(), copy.deepcopy(data), "", source)


def as_config(config) -> Config:
    """A config as the API takes it: a ``Config``, a preset's name or a YAML path, a dict of sections."""
    if isinstance(config, (str, Path)):
        return load_config(config)
    if isinstance(config, dict):
        return config_from_dict(config)
    if not isinstance(config, Config):
        raise GeodetError(f"config must be a geodet Config (geodet.load_config), a preset's name, a YAML path or a "
                          f"dict, got {type(config).__name__}")
    return config


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def check_run_values(cfg: Config) -> None:
    """Refuse, before any work, values a training or pretraining run cannot start with (one line
    naming the key; the flag of the same name sets it too)."""
    import math

    t, tr = cfg.tiling, cfg.train

    def refuse(key: str, value, want: str):
        raise GeodetError(f"{key} must be {want}, got {value!r}: fix it in the config (or its flag)")

    if t.tile_size < 1:
        refuse("tiling.tile_size", t.tile_size, "a positive number of pixels")
    if t.overlap_m is not None:
        if not (math.isfinite(t.overlap_m) and t.overlap_m >= 0):
            refuse("tiling.overlap_m", t.overlap_m, "zero or a positive number of metres")
    elif not 0 <= t.overlap < t.tile_size:
        refuse("tiling.overlap", t.overlap, f"zero or more and smaller than the tile size ({t.tile_size} px)")
    if tr.batch_size < 1:
        refuse("train.batch_size", tr.batch_size, "at least 1")
    if tr.steps_per_epoch < 1:
        refuse("train.steps_per_epoch", tr.steps_per_epoch, "at least 1")
    if tr.epochs is not None and tr.epochs < 1:
        refuse("train.epochs", tr.epochs, "at least 1 (or unset)")
    if tr.max_steps is not None and tr.max_steps < 1:
        refuse("train.max_steps", tr.max_steps, "at least 1 (or unset)")
    if not (math.isfinite(tr.lr) and tr.lr > 0):
        refuse("train.lr", tr.lr, "a positive number")
    if not 0 <= tr.val_fraction < 1:
        refuse("train.val_fraction", tr.val_fraction, "from 0 (no validation strip) to less than 1")
    if tr.keep not in ("best", "last"):
        refuse("train.keep", tr.keep, "best or last")
    if tr.val_give_back is not None:
        if not 0 < tr.val_give_back < 1:
            refuse("train.val_give_back", tr.val_give_back, "a share of the run between 0 and 1")
        if tr.keep == "best":
            raise GeodetError("train.val_give_back trains on the validation strip, which then cannot pick the best "
                              "model: use train.keep: last, or leave val_give_back unset")
