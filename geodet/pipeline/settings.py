"""One place that decides every detection setting.

Order: an explicit argument (API keyword or command-line flag) > a value written in the config
file > the model card > the defaults in ``geodet/config.py``. ``DetectSettings.sources`` says
where each value came from, and the report carries it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config import Config
from ..errors import GeodetError

# setting -> (config key, or keys with the first written winning; card attribute or None)
SETTINGS = {
    "tile_size": ("tiling.tile_size", "tile_size"),
    "overlap": ("tiling.overlap", "overlap"),
    "overlap_m": ("tiling.overlap_m", None),
    # detect.score_threshold, else the network's own threshold where a config writes it as its siblings
    # (model.nms_iou, model.detections_per_tile) are written
    "score_threshold": (("detect.score_threshold", "model.score_threshold"), "model.score_threshold"),
    "nms_iou": ("model.nms_iou", "model.nms_iou"),
    "detections_per_tile": ("model.detections_per_tile", "model.detections_per_tile"),
    "bands": ("scene.bands", "bands"),
    "gsd_m": ("scene.gsd_m", "gsd_m"),
    "percentiles": ("scene.percentiles", "percentiles"),
    "min_valid_fraction": ("scene.min_valid_fraction", None),
    "batch_size": ("detect.batch_size", None),
    "device": ("detect.device", None),
    "num_workers": ("detect.num_workers", None),
    "match_iou": ("detect.match_iou", None),
    "backend": ("detect.backend", None),
    "precision": ("detect.precision", None),
    "on_read_error": ("detect.on_read_error", None),
}


@dataclass(frozen=True)
class DetectSettings:
    tile_size: int
    overlap: int
    overlap_m: Optional[float]
    score_threshold: float
    nms_iou: float
    detections_per_tile: int
    bands: tuple
    gsd_m: Optional[float]
    percentiles: tuple
    min_valid_fraction: float
    batch_size: int
    device: str
    num_workers: Optional[int]
    match_iou: float
    backend: str = "auto"
    precision: str = "auto"
    on_read_error: str = "fail"
    sources: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items() if k != "sources"}


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _config_key(config: Config, keys, written: set) -> str | None:
    """The first of ``keys`` (one key or several) that ``config`` writes (``written``: set by its
    YAML or overrides, or by assignment in Python), None where none is."""
    for key in (keys,) if isinstance(keys, str) else keys:
        value = _get(config, key)
        if value is not None and key in written:
            return key
    return None


def _whole(name: str, v) -> int:
    """A whole number (5, 5.0, numpy's), refused otherwise: 128.7 px is no tile size."""
    import math
    import numbers

    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v != int(v):
        raise GeodetError(f"{name} must be a whole number, got {v!r}")
    return int(v)


def _real(name: str, v) -> float:
    import math
    import numbers

    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise GeodetError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _numbers(name: str, v, kind) -> tuple:
    """A list of numbers (one number is a list of one)."""
    import numbers

    if isinstance(v, numbers.Real):
        v = [v]
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise GeodetError(f"{name} must be a list of numbers, got {v!r}")
    return tuple(kind(name, x) for x in v)


_IGNORED_SAID: set = set()  # model.* keys already said to be ignored, once a process


def _say_ignored(config: Config) -> None:
    """Warn, once, about ``model.*`` keys a config writes that no detection setting takes: they
    describe a network to build and train (levels, anchor sizes, ...), and a trained model's card
    fixes them."""
    import logging

    used = {k for keys, _ in SETTINGS.values() for k in ((keys,) if isinstance(keys, str) else keys)}
    ignored = sorted(k for k in config.explicit if k.startswith("model.") and k not in used and k not in _IGNORED_SAID)
    if ignored:
        _IGNORED_SAID.update(ignored)
        one = len(ignored) == 1
        logging.getLogger(__name__).warning(
            "the config's %s %s ignored for detection: %s the network trained, which the model file fixes (its card)",
            ", ".join(ignored), "is" if one else "are", "it describes" if one else "they describe")


def resolve_detect_settings(card=None, config: Config | None = None, **explicit) -> DetectSettings:
    """Every detection setting from ``explicit`` keywords (None means not given), ``config`` (only
    keys its YAML or overrides set), the model ``card`` (a ``ModelCard``; None for a plain
    detector), then the defaults of ``geodet.config``."""
    unknown = set(explicit) - set(SETTINGS)
    if unknown:
        import difflib

        near = [m for u in sorted(unknown) for m in difflib.get_close_matches(u, SETTINGS, n=1)]
        raise GeodetError(f"unknown detection setting(s): {', '.join(sorted(unknown))}"
                          + (f" (did you mean {', '.join(near)}?)" if near else f"; they are {', '.join(SETTINGS)}"))
    defaults = Config()
    written = config.written() if config is not None else set()
    if config is not None:
        _say_ignored(config)
    values, sources, tier = {}, {}, {}
    for name, (keys, card_attr) in SETTINGS.items():
        key = _config_key(config, keys, written) if config is not None else None
        if explicit.get(name) is not None:
            values[name], sources[name], tier[name] = explicit[name], "argument", 3
        elif key is not None:
            # a command-line flag is folded into the config: reported as the argument it was
            values[name], tier[name] = _get(config, key), 2
            sources[name] = "argument" if key in config.from_arguments else "config"
        elif card is not None and card_attr is not None and _get(card, card_attr) is not None:
            values[name], sources[name], tier[name] = _get(card, card_attr), "card", 1
        else:
            default_key = keys if isinstance(keys, str) else keys[0]
            values[name], sources[name], tier[name] = _get(defaults, default_key), "default", 0
    # an overlap in metres replaces the one in pixels when it was asked for at least as directly
    if values["overlap_m"] is not None and tier["overlap_m"] < tier["overlap"]:
        values["overlap_m"], sources["overlap_m"] = None, "default"
    if values["score_threshold"] is None:  # no card and no config: the network default
        values["score_threshold"] = defaults.model.score_threshold
    s = DetectSettings(
        tile_size=_whole("tile_size", values["tile_size"]), overlap=_whole("overlap", values["overlap"]),
        overlap_m=None if values["overlap_m"] is None else _real("overlap_m", values["overlap_m"]),
        score_threshold=_real("score_threshold", values["score_threshold"]), nms_iou=_real("nms_iou", values["nms_iou"]),
        detections_per_tile=_whole("detections_per_tile", values["detections_per_tile"]),
        bands=_numbers("bands", values["bands"], _whole),
        gsd_m=None if values["gsd_m"] is None else _real("gsd_m", values["gsd_m"]),
        percentiles=_numbers("percentiles", values["percentiles"], _real),
        min_valid_fraction=_real("min_valid_fraction", values["min_valid_fraction"]),
        batch_size=_whole("batch_size", values["batch_size"]), device=str(values["device"]),
        num_workers=None if values["num_workers"] is None else _whole("num_workers", values["num_workers"]),
        match_iou=_real("match_iou", values["match_iou"]), backend=str(values["backend"]), precision=str(values["precision"]),
        on_read_error=str(values["on_read_error"]),
        sources=sources,
    )
    _check(s)
    return s


def _check(s: DetectSettings) -> None:
    if s.tile_size < 1:
        raise GeodetError(f"tile size must be a positive number of pixels, got {s.tile_size}")
    if s.overlap_m is None and s.overlap < 0:
        raise GeodetError(f"overlap must be zero or a positive number of pixels, got {s.overlap}")
    if s.overlap_m is None and s.overlap >= s.tile_size:
        raise GeodetError(f"overlap ({s.overlap} px) must be smaller than the tile size ({s.tile_size} px): "
                          "lower --overlap or raise --tile-size")
    if s.backend not in ("auto", "torch", "onnx"):
        raise GeodetError(f"unknown backend '{s.backend}': use auto, torch or onnx")
    if s.precision not in ("auto", "fp32", "bf16", "fp16", "int8"):
        raise GeodetError(f"unknown precision '{s.precision}': use auto, fp32, bf16, fp16 or int8")
    if s.on_read_error not in ("fail", "skip"):
        raise GeodetError(f"on_read_error must be fail or skip, got '{s.on_read_error}'")
    if s.batch_size < 1:
        raise GeodetError(f"batch size must be at least 1, got {s.batch_size}")
    if not 0 <= s.score_threshold <= 1:
        raise GeodetError(f"score threshold must be between 0 and 1, got {s.score_threshold}")
    if not 0 < s.nms_iou <= 1 or not 0 < s.match_iou <= 1:
        raise GeodetError("nms_iou and match_iou must be in (0, 1]")
    if s.detections_per_tile < 1:
        raise GeodetError(f"detections per tile must be at least 1, got {s.detections_per_tile}")
    if not 0 <= s.min_valid_fraction <= 1:
        raise GeodetError(f"min_valid_fraction must be a share from 0 to 1, got {s.min_valid_fraction}")
    if s.gsd_m is not None and s.gsd_m <= 0:
        raise GeodetError(f"gsd_m must be a positive number of metres per pixel, got {s.gsd_m}")
    if s.overlap_m is not None and s.overlap_m < 0:
        raise GeodetError(f"overlap_m must be zero or a positive number of metres, got {s.overlap_m}")
    if s.num_workers is not None and s.num_workers < 0:
        raise GeodetError(f"num_workers must be zero or more, got {s.num_workers}")
    if any(b < 1 for b in s.bands):
        raise GeodetError(f"bands are numbered from 1, got {list(s.bands)}")
    if len(s.percentiles) != 2 or not 0 <= s.percentiles[0] < s.percentiles[1] <= 100:
        raise GeodetError(f"percentiles must be two numbers 0 <= low < high <= 100, got {list(s.percentiles)}")
