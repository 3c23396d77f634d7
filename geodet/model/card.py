"""The model card: everything needed to use a model, typed, with the model file's dict layout.

Three thresholds are kept apart:
- ``model.score_threshold``: the network's output threshold (candidates it returns at all);
- ``operating_point``: the score picked at validation (best F1), used by the quicklook and
  reported with detections; None until a model is validated;
- a quicklook's drawing threshold (``--min-score``), which defaults to the operating point.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import ModelConfig, SceneConfig, TilingConfig, config_from_dict
from ..errors import GeodetError

# Keys that version-1 files written by earlier geodet releases may hold and that are no longer
# used (``band_stats`` were the training scene's limits; every scene is scaled by its own).
LEGACY_KEYS = ("band_stats",)


@dataclass
class ModelCard:
    classes: list[str]
    bands: list[int]
    mean: list[float]  # per-band normalisation of the 0..1 scaled input
    std: list[float]
    model: ModelConfig = field(default_factory=ModelConfig)
    tile_size: int = field(default_factory=lambda: TilingConfig().tile_size)
    overlap: int = field(default_factory=lambda: TilingConfig().overlap)
    percentiles: list[float] = field(default_factory=lambda: list(SceneConfig().percentiles))
    gsd_m: Optional[float] = None  # ground resolution the model was trained at; None: native
    operating_point: Optional[float] = None  # best-F1 score at validation
    trained_on: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    trained_steps: Optional[int] = None
    created: str = ""
    extra: dict = field(default_factory=dict)  # keys from a newer writer, kept as they were

    @property
    def n_bands(self) -> int:
        return len(self.bands)

    def to_dict(self) -> dict:
        """The card as plain Python values, in the model file's layout."""
        d = {
            "classes": list(self.classes),
            "bands": [int(b) for b in self.bands],
            "normalisation": {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]},
            "percentiles": [float(p) for p in self.percentiles],
            "gsd_m": None if self.gsd_m is None else float(self.gsd_m),
            "tile_size": int(self.tile_size),
            "overlap": int(self.overlap),
            "model": dataclasses.asdict(self.model),
            "operating_point": None if self.operating_point is None else float(self.operating_point),
            "trained_on": self.trained_on,
            "metrics": self.metrics,
            "trained_steps": self.trained_steps,
            "created": self.created,
        }
        d.update(self.extra)
        return plain(d)

    @classmethod
    def from_dict(cls, d: dict, source: str = "model card") -> "ModelCard":
        if not isinstance(d, dict):
            raise GeodetError(f"{source}: the model card is not a mapping")
        try:
            norm = d["normalisation"]
            card = cls(
                classes=[str(c) for c in d["classes"]],
                bands=[int(b) for b in d["bands"]],
                mean=[float(v) for v in norm["mean"]],
                std=[float(v) for v in norm["std"]],
                model=config_from_dict({"model": d["model"]}, source=source).model,
                tile_size=int(d["tile_size"]),
                overlap=int(d["overlap"]),
            )
        except KeyError as exc:
            raise GeodetError(f"{source}: model card lacks {exc}") from None
        except (TypeError, ValueError) as exc:
            raise GeodetError(f"{source}: model card has a malformed value ({exc})") from None
        if d.get("percentiles") is not None:
            card.percentiles = [float(p) for p in d["percentiles"]]
        card.gsd_m = None if d.get("gsd_m") is None else float(d["gsd_m"])
        card.operating_point = None if d.get("operating_point") is None else float(d["operating_point"])
        card.trained_on = list(d.get("trained_on") or [])
        card.metrics = dict(d.get("metrics") or {})
        card.trained_steps = d.get("trained_steps")
        card.created = str(d.get("created") or "")
        known = {f.name for f in dataclasses.fields(cls)} | {"normalisation"} | set(LEGACY_KEYS)
        card.extra = {k: v for k, v in d.items() if k not in known}
        if len(card.mean) != card.n_bands or len(card.std) != card.n_bands:
            raise GeodetError(f"{source}: normalisation has {len(card.mean)} value(s) but the card names {card.n_bands} band(s)")
        return card


def plain(value: Any) -> Any:
    """Card values as plain Python types, which ``weights_only`` loading accepts."""
    import numpy as np
    from pathlib import Path

    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise GeodetError(f"model card holds a value of type {type(value).__name__}, which a model file cannot store")
