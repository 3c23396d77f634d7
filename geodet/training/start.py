"""The model a run starts from: built from the config, from ``--init``'s model file (a trained
detector, an imported one or a pretrained backbone; its card sets the architecture), or from a
checkpoint when resuming; and which backbone stages stay frozen."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import GeodetError, brief
from ..io.labels import integer_name
from ..model import GeodetModel, ModelCard, build_model
from .inputs import normalisation

log = logging.getLogger(__name__)
LOSS_SETTINGS = ("matcher", "box_loss", "fg_iou", "bg_iou", "focal_alpha", "focal_gamma")  # not the architecture
STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


def freeze_stages(model: GeodetModel, n: int | None, keep_statistics: bool = True) -> None:
    """Freeze the backbone body's first ``n`` stages (stem, layer1, ...) and train the rest of
    the body; None leaves the model as built. With ``keep_statistics`` their batch norms keep
    the statistics they came with (off for random weights: theirs mean nothing)."""
    if n is None:
        return
    if not 0 <= int(n) <= len(STAGES):
        raise GeodetError(f"train.freeze_backbone_stages must be 0..{len(STAGES)}, got {n}")
    frozen = tuple(p for stage in STAGES[: int(n)] for p in stage)
    for name, p in model.net.backbone.body.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
    for name, m in model.net.backbone.body.named_modules() if keep_statistics else ():
        if name.startswith(frozen) and type(m) is torch.nn.BatchNorm2d:
            m.__class__ = FrozenStatsBatchNorm2d
            m.eval()


class FrozenStatsBatchNorm2d(torch.nn.BatchNorm2d):
    """A batch norm of a frozen stage: always in eval mode (its running statistics, never a
    batch's), whatever ``model.train()`` says; its state is a ``BatchNorm2d``'s, key for key."""

    def train(self, mode: bool = True):
        return super().train(False)


def apply_init(cfg) -> tuple[dict, ModelCard]:
    """With ``train.init``: the start model's card sets the architecture and, unless the config set
    them, the tile size, overlap, GSD, bands and percentiles (``cfg`` is changed in place).
    Returns the start model's payload and card."""
    from ..model.file import read_model_file

    run = Path(str(cfg.train.init))
    if run.is_dir() and (run / "model.pt").is_file():  # a training run's folder, as -m takes it
        log.info("--init %s is a training run's folder: starting from its model.pt", run)
        cfg.train.init = str(run / "model.pt")
    payload = read_model_file(cfg.train.init)
    card = ModelCard.from_dict(payload["card"], source=f"{cfg.train.init} card")
    written = cfg.written() - {"train.init"}  # YAML, flags, or assigned in Python: this run's, not the card's
    if "scene.bands" in written and len(cfg.scene.bands) != len(card.bands):
        raise GeodetError(f"--init {cfg.train.init} was trained on {len(card.bands)} band(s) ({card.bands}) but this "
                          f"run reads {len(cfg.scene.bands)} ({cfg.scene.bands}): use the same number of bands, or "
                          "train from scratch")
    classes = cfg.model.classes if "model.classes" in written else None
    col = card.extra.get("class_column")
    if col is not None and "train.class_column" not in written:
        cfg.train.class_column = col  # the start model's classes came from this column: so do these
    if "model.pretrained" in written and str(cfg.model.pretrained).lower() not in ("none", ""):
        log.warning("--pretrained %s is not used: the start model (--init %s) gives every weight", cfg.model.pretrained,
                    cfg.train.init)
    loss = {k: getattr(cfg.model, k) for k in LOSS_SETTINGS if f"model.{k}" in written}
    cfg.model = copy.deepcopy(card.model)
    for k, v in loss.items():  # how to learn is this run's; what the network is, the start model's
        setattr(cfg.model, k, v)
    # the classes come from the labels (or the config), as in any training run
    cfg.model.classes = classes if classes is not None else ModelConfig().classes
    for key, value in (("tiling.tile_size", card.tile_size), ("tiling.overlap", card.overlap),
                       ("scene.gsd_m", card.gsd_m), ("scene.bands", list(card.bands)),
                       ("scene.percentiles", list(card.percentiles))):
        if key not in written and value is not None:
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
    if "scene.bands" not in written:
        _check_init_bands(cfg, card)
    log.info("starting from %s (%s, %d classes, %d px tiles%s)", cfg.train.init, card.model.backbone,
             len(card.classes), card.tile_size, f" at {card.gsd_m:g} m" if card.gsd_m else "")
    return payload, card


def _check_init_bands(cfg, card: ModelCard) -> None:
    """A start model's bands that a training scene lacks: said as such (not as a --bands to pass,
    since another number of bands cannot start from this model)."""
    from ..io.raster import open_raster

    said = set()
    for s in [*cfg.train.scenes, *cfg.train.val_scenes]:
        try:
            with open_raster(s.scene) as src:
                count = src.count
        except Exception:  # unreadable: its own error comes when it is read
            continue
        unused = sorted(set(range(1, count + 1)) - set(card.bands))
        if unused and count >= max(card.bands) and count not in said:  # (a 1-band model's 1,1,1 of an RGB scene)
            said.add(count)
            log.warning("--init %s reads band(s) %s of each scene, as it was trained: %s has %d, and band(s) %s go "
                        "unused; pass --bands to read others", cfg.train.init, ",".join(map(str, card.bands)),
                        Path(str(s.scene)).name, count, ",".join(map(str, unused)))
        if count < max(card.bands):
            todo = (f"pass --bands with {len(card.bands)} numbers from 1 to {count}" if count >= len(card.bands) else
                    f"start from a model of {count}-band scenes, or train from scratch (leave out --init)")
            raise GeodetError(f"--init {cfg.train.init} was trained on {len(card.bands)} band(s) ({card.bands}) and "
                              f"{Path(str(s.scene)).name} has {count}: {todo}")


def build_start_model(cfg, train_scenes, classes, overlap: int, state: dict | None, init) -> GeodetModel:
    """The network for this run with its card: normalised by the checkpoint's (``state``), the start
    model's (``init``: (payload, card)) or the training scenes' statistics; ``init``'s weights loaded
    when not resuming; stages frozen as the config says."""
    cfg.model.classes = list(classes)
    if state is not None:
        old = ModelCard.from_dict(state["card"], source="last.pt")
        norm = {"mean": old.mean, "std": old.std}
    elif init is not None:
        norm = {"mean": init[1].mean, "std": init[1].std}
    else:
        norm = normalisation([ts.scene for ts in train_scenes]) if cfg.model.pretrained == "none" else None
    sc0 = train_scenes[0].scene
    model = build_model(cfg.model, bands=sc0.bands, normalisation=norm, tile_size=cfg.tiling.tile_size,
                        overlap=overlap, gsd_m=cfg.scene.gsd_m, percentiles=cfg.scene.percentiles,
                        load_pretrained=state is None)
    card = model.card
    card.trained_on = [{"scene": ts.scene.path, "labels": ts.labels_path, "labels_used": len(ts.labels),
                        "counts": ts.labels.counts} for ts in train_scenes]
    native = float(sc0.pixel_gsd) if sc0.crs is not None and sc0.crs.is_projected else None
    card.gsd_m = cfg.scene.gsd_m if cfg.scene.gsd_m else native
    card.extra["class_column"] = cfg.train.class_column  # --init from this model reads its classes the same way
    # how the pixels it learned from were stored (uint8 scaled 0-255, others by percentiles): detection says a change
    card.extra["scene_dtypes"] = sorted({str(ts.scene.dtype) for ts in train_scenes})
    if init is not None and state is None:
        load_init(model, init[0], init[1], cfg.train.init)
    # batch-norm statistics worth keeping came with the weights: a start model's, or downloaded ones
    started = init is not None or cfg.model.pretrained != "none" or bool(
        (((state or {}).get("config") or {}).get("train") or {}).get("init"))
    freeze_stages(model, cfg.train.freeze_backbone_stages, keep_statistics=started)
    return model


def load_init(model: GeodetModel, payload: dict, init: ModelCard, path) -> None:
    """The start model's weights; with other classes, all but the last classification conv
    (which keeps its prior-probability initialisation)."""
    sd = payload["state_dict"]
    # (integer_name: a model trained when an integer class column's 1 read as 1.0 keeps its head)
    same = [integer_name(n) for n in init.classes] == [integer_name(n) for n in model.card.classes]
    if not same:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.classification_head.cls_logits.")}
        log.info("classes %s differ from the start model's %s: the last classification conv starts afresh",
                 model.card.classes, init.classes)
    try:
        missing, unexpected = model.net.load_state_dict(sd, strict=False)
    except RuntimeError as exc:
        raise GeodetError(f"{path}: its weights do not fit this configuration "
                          f"({brief(exc, 160)})") from None
    expected_missing = set() if same else {"head.classification_head.cls_logits.weight",
                                            "head.classification_head.cls_logits.bias"}
    if set(missing) - expected_missing or unexpected:
        raise GeodetError(f"{path}: its weights do not fit this configuration (missing "
                          f"{sorted(set(missing) - expected_missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.card.extra["fine_tuned_from"] = {"path": str(path), "classes": list(init.classes)}
