"""``geodet import``: a torchvision RetinaNet (e.g. DeepForest's release) as a geodet model."""

from __future__ import annotations

from pathlib import Path

from .common import bands, positive, positive_int, share


def add_parser(sub, common) -> None:
    im = sub.add_parser("import", parents=[common], help="turn a torchvision RetinaNet (e.g. DeepForest's) into a geodet model",
                        description="Import a torchvision RetinaNet checkpoint as a geodet model file with a complete card. "
                                    "SOURCE: a Hugging Face model folder (config.json + model.safetensors or "
                                    "pytorch_model.bin, as DeepForest publishes them), hf://ORG/NAME (fetched where the "
                                    "network allows, else read from the Hugging Face cache), or a plain state_dict "
                                    "(.pt/.pth/.safetensors). torchvision's resize to --min-size becomes a ground "
                                    "resolution in the card (scenes are resampled on read).")
    im.add_argument("source", metavar="SOURCE", help="a Hugging Face folder, hf://ORG/NAME, or a state_dict file")
    im.add_argument("--out", "-o", required=True, help="geodet model file to write (.pt)")
    im.add_argument("--gsd", type=positive, help="ground resolution (m) of the imagery the model ran on at home "
                                              "(default: none, scenes run at their native resolution)")
    im.add_argument("--tile-size", type=positive_int, help="window size it ran on at home (DeepForest: patch_size, "
                                                           "400); default: the config's, else --min-size")
    im.add_argument("--min-size", type=positive_int, help="torchvision's resize target (default: 800)")
    im.add_argument("--bands", type=bands, help="scene bands for the network's inputs (default 1,2,3)")
    im.add_argument("--classes", help="class names, comma-separated, in the head's order (default: config.json's "
                                      "label_dict)")
    im.add_argument("--score-threshold", type=share, help="the network's output threshold (default: config.json's, "
                                                           "else torchvision's 0.05)")
    im.add_argument("--detections-per-tile", type=positive_int, help="default 300, as torchvision")


def run(args) -> int:
    from ..io.writers import check_not_an_input, check_output_path
    from ..model import save_model
    from ..model.imports import import_retinanet

    out = check_output_path(args.out, suffixes=(".pt",), example="model.pt")
    check_not_an_input(out, [(p, "the weights to import") for p in _source_files(args.source)])
    _check_replaces_only_an_import(out)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    model = import_retinanet(args.source, gsd_m=args.gsd, tile_size=args.tile_size, min_size=args.min_size,
                             bands=args.bands, classes=classes, score_threshold=args.score_threshold,
                             detections_per_tile=args.detections_per_tile)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    c = model.card
    res = f"{c.gsd_m:g} m" if c.gsd_m else "the scene's native resolution"
    print(f"imported a {c.model.backbone} RetinaNet: classes {', '.join(c.classes)}; tiles of {c.tile_size} px at {res}; "
          f"score threshold {c.model.score_threshold:g}, NMS IoU {c.model.nms_iou:g} -> {out}")
    return 0


def _source_files(source: str) -> list[Path]:
    """The local files ``source`` names (a weights file, or a folder's files): the output must not
    replace one of them."""
    s = str(source)
    path = Path(s[5:] if s.startswith("hf://") else s).expanduser()
    if path.is_dir():
        return [p for p in path.iterdir() if p.is_file()]
    return [path] if path.is_file() else []


def _check_replaces_only_an_import(out: Path) -> None:
    """Refuse, before any work, an import written over a training run's model.pt or checkpoint, or
    over any file but a model an earlier import wrote (and nobody trained since)."""
    from ..errors import GeodetError, brief
    from ..model.card import ModelCard
    from ..model.file import read_model_file

    run = out.parent
    if out.name in ("model.pt", "last.pt") and any((run / n).exists() for n in ("last.pt", "metrics.csv")):
        raise GeodetError(f"{out} belongs to the training run in {run}: an import written there would replace it; "
                          f"give another name, e.g. {run.parent / 'imported.pt'}")
    if not out.is_file():
        return
    try:
        card = ModelCard.from_dict(read_model_file(out)["card"], source=str(out))
    except GeodetError as exc:  # a checkpoint, a damaged or newer model, anything else: not ours to replace
        raise GeodetError(f"{out} exists and is not a model of an earlier geodet import ({brief(exc, 100)}); import "
                          "replaces only those: give another name, e.g. imported.pt") from None
    trained = [t for t in card.trained_on if not (isinstance(t, dict) and "imported_from" in t)]
    if not card.extra.get("imported") or trained:
        raise GeodetError(f"{out} is a model trained with geodet: an import written there would replace it; give "
                          "another name, e.g. imported.pt")
