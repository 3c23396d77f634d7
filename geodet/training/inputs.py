"""What a run trains on: the labelled scenes (labels reprojected to pixel boxes, the labelled
area), the validation areas (separate scenes, or a strip cut from each labelled area), the
unlabelled scenes self-training looks at, and the band statistics the network normalises with.
Everything is read and checked here, before the run folder is made."""

from __future__ import annotations

import logging

import numpy as np

from ..errors import GeodetError
from ..io.labels import class_names, describe_counts, labels_to_boxes, read_labels
from ..io.scene import READ_ERRORS, open_raster, scene_from_config
from .area import centres_inside, read_labelled_area, validation_splits, within
from .sampler import TrainScene

log = logging.getLogger(__name__)
NORM_SAMPLE_SIDE = 512  # long side of the decimated read that normalisation statistics come from


def normalisation(scenes) -> dict:
    """Per-band mean and std of the scaled pixels of ``scenes`` (``Scene`` objects; from decimated
    reads)."""
    sums, sq, n = 0, 0, 0
    for sc in scenes:
        try:
            data, valid, _ = sc.overview(NORM_SAMPLE_SIDE)
        except READ_ERRORS() as exc:
            from rasterio.windows import Window

            raise sc.read_error(Window(0, 0, sc.width, sc.height), exc) from None
        x = sc.scale(data, valid)[:, valid].astype(np.float64)
        sums = sums + x.sum(1)
        sq = sq + (x**2).sum(1)
        n += x.shape[1]
    if n == 0:
        raise GeodetError("training scenes hold no valid pixels")
    mean = sums / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 1e-6))
    return {"mean": mean.tolist(), "std": np.maximum(std, 0.02).tolist()}


def _open_pair(pair, cfg):
    if not pair.scene or not pair.labels:
        raise GeodetError("each training entry needs both 'scene' and 'labels'")
    sc = scene_from_config(pair.scene, cfg.scene)
    sc.skip_hint = False
    if not sc.has_georef:
        from ..io.raster import georeference_advice

        with open_raster(pair.scene) as src:
            advice = georeference_advice(src)
        raise GeodetError(f"{pair.scene}: the scene has no georeferencing (no CRS or geotransform), so vector "
                          f"labels cannot be placed on it: {advice} (or use QGIS's Georeferencer)")
    return sc, read_labels(pair.labels, cfg.train.class_column or None)


def _labelled_part(pair, sc, lb):
    """The labelled area of ``pair`` in ``sc``'s pixels (None: the whole scene) and the pixel
    rectangle chips are drawn from; counts the labels outside it."""
    lp = pair.labels
    if not getattr(pair, "labelled_area", None):
        return None, (0, 0, sc.width, sc.height)
    labelled = read_labelled_area(pair.labelled_area, sc)
    inside = centres_inside(labelled, lb.boxes)
    lb.counts["outside_labelled_area"] = int((~inside).sum())
    if not inside.any():
        raise GeodetError(f"{pair.labelled_area}: no label of {lp} lies inside the labelled area: give the "
                          "polygons of the part of the scene you labelled")
    if lb.counts["outside_labelled_area"]:
        log.warning("%s: %d of %d labels lie outside the labelled area %s: they still count as objects "
                    "where a chip reaches them, but chips are drawn inside the area", lp,
                    lb.counts["outside_labelled_area"], len(lb), pair.labelled_area)
    x0, y0, x1, y1 = labelled.bounds
    area = (max(0, int(np.floor(x0))), max(0, int(np.floor(y0))), min(sc.width, int(np.ceil(x1))),
            min(sc.height, int(np.ceil(y1))))
    return labelled, area


def open_labelled(pairs, cfg, classes: list[str] | None, ref=None) -> tuple[list[TrainScene], list[str]]:
    """The labelled scenes of ``pairs`` (``SceneLabels``) as ``TrainScene`` objects, and the
    classes: ``classes`` when given, else every class name in the labels, sorted. Each is read at
    the ground resolution of ``ref`` (a Scene; default: the first of ``pairs``)."""
    opened = [(*_open_pair(pair, cfg), pair) for pair in pairs]
    ref = ref if ref is not None else opened[0][0] if opened else None
    opened = [(at_gsd_of(sc, cfg, ref, str(pair.scene)), gdf, pair) for sc, gdf, pair in opened]
    col = cfg.train.class_column or None
    if classes is None:
        names = set()
        for _, gdf, _ in opened:
            names |= set(class_names(gdf, col))
        classes = sorted(names)
    out = []
    for sc, gdf, pair in opened:
        lb = labels_to_boxes(gdf, sc, col, classes, cfg.train.unknown_classes, cfg.train.point_box_m,
                             source=str(pair.labels), min_visible=cfg.train.min_visibility)
        if len(lb) == 0:
            raise GeodetError(f"{pair.labels}: no usable label inside {sc.path} ({describe_counts(lb.counts)})")
        classes = lb.classes
        labelled, area = _labelled_part(pair, sc, lb)
        out.append(TrainScene(sc, lb, area, str(pair.labels), labelled))
    return out, classes


def labels_inside(ts: TrainScene, area) -> int:
    """How many of ``ts``'s labels lie wholly in ``area`` with their centre in its labelled area."""
    b = ts.labels.boxes
    return int((within(b, area) & centres_inside(ts.labelled, b)).sum())


def validation_strips(train_scenes: list[TrainScene], fraction: float) -> list[tuple]:
    """Cut a validation strip of ``fraction`` from each scene's training area (across its longer
    side): the scene's ``area`` shrinks to the rest, the strip is ``held_out`` (its labels and
    pixels never teach) and the full area is kept in ``full_area`` (for giving the strip back).
    Returns [(TrainScene, strip)]."""
    val_sets = []
    for ts in train_scenes:
        # the first split (across the longer side, the far strip) whose strip and rest both hold labels;
        # without a labelled area the whole scene is said to be labelled: the far strip, as it is
        splits = list(validation_splits(ts.area, fraction, ts.labelled))[:None if ts.labelled is not None else 1]
        parts = next((p for p in splits if labels_inside(ts, p[0]) and labels_inside(ts, p[1])),
                     splits[0] if splits else None)
        if parts is None:
            continue
        ts.full_area = ts.area
        ts.area, val_area = parts
        ts.held_out = val_area
        if not labels_inside(ts, ts.area):
            raise GeodetError(f"{ts.labels_path}: every label lies in the validation strip {val_area} of "
                              f"{ts.scene.path}: label more of the scene, or set train.val_fraction: 0")
        val_sets.append((ts, val_area))
    return val_sets


def check_validation_scenes(val_scenes: list[TrainScene], train_scenes: list[TrainScene]) -> None:
    """Say when a validation scene cannot tell how the model finds new objects: it is a training
    scene (its AP is how well the model fits its own training data), or it has no valid pixel."""
    import os

    trained = {os.path.realpath(ts.scene.path) for ts in train_scenes}
    for v in val_scenes:
        if os.path.realpath(v.scene.path) in trained:
            log.warning("--val-scene %s is also a training scene: its validation AP measures the fit to the training "
                        "data, not how new objects are found (give a scene the model does not train on, or leave "
                        "out --val-scene for a held-out strip)", v.scene.path)
        elif not v.scene.holds_data(NORM_SAMPLE_SIDE):
            log.warning("--val-scene %s holds no valid pixel (all nodata): its validation AP will be 0", v.scene.path)


def check_unlabelled(paths, train_scenes: list[TrainScene], val_sets) -> None:
    """An --unlabelled scene is pseudo-labelled whole: a labelled scene there would have its labels
    (and its validation strip) taught from the teacher's boxes, a validation scene would be
    trained on; both refused."""
    import os

    trained = {os.path.realpath(ts.scene.path) for ts in train_scenes}
    validating = {os.path.realpath(ts.scene.path) for ts, _ in val_sets} - trained
    for p in paths:
        real = os.path.realpath(str(p))
        if real in trained:
            raise GeodetError(f"--unlabelled {p} is a labelled training scene: it would be pseudo-labelled whole, "
                              "its labels and validation strip included; to self-train on the part of it you did not "
                              "label, give that part with --labelled-area and --self-training instead")
        if real in validating:
            raise GeodetError(f"--unlabelled {p} is a validation scene: training on it would make its validation AP "
                              "measure the fit to the training data; give another scene to one of them")


def open_unlabelled(path: str, cfg, ref):
    """An unlabelled scene read as the labelled ones (``ref``, a Scene) are: same bands, resampled
    to their GSD."""
    sc = scene_from_config(path, cfg.scene)
    sc.skip_hint = False
    if sc.count != ref.count:
        raise GeodetError(f"--unlabelled {path}: {sc.count} band(s) where the labelled scenes have {ref.count}: "
                          "give scenes of the same sensor, or pick the same bands with --bands")
    return at_gsd_of(sc, cfg, ref, f"--unlabelled {path}")


def at_gsd_of(sc, cfg, ref, what: str):
    """``sc`` read at ``ref``'s ground resolution where the config sets none and theirs differ (a
    model learns one pixel size, the first training scene's, which its card and detection use).
    Scenes without a projected CRS stay at their own: a geographic first scene gives the card no
    ground resolution (detect runs every scene at its own, so training does), and a geographic
    other scene cannot be resampled (said, as detect says it)."""
    from ..io.scene import Scene

    if cfg.scene.gsd_m is not None or sc is ref or abs(sc.pixel_gsd / ref.pixel_gsd - 1) <= 0.05:
        return sc
    if ref.crs is None or not ref.crs.is_projected:
        return sc
    if not (sc.has_georef and sc.crs.is_projected):
        log.warning("%s: %.3g units/px where the first training scene has %.3g m, and it cannot be resampled (no "
                    "projected CRS): trained at its own resolution, which the model will not meet again (reproject "
                    "it, e.g. gdalwarp -t_srs EPSG:xxxx)", what, sc.pixel_gsd, ref.pixel_gsd)
        return sc
    factor = max(sc.pixel_gsd / ref.pixel_gsd, ref.pixel_gsd / sc.pixel_gsd)
    (log.warning if factor > 1.5 else log.info)(
        "%s: resampled from %.3g m to the first training scene's %.3g m (--gsd sets another)", sc.path, sc.pixel_gsd,
        ref.pixel_gsd)
    out = Scene(sc.path, bands=cfg.scene.bands, gsd_m=ref.pixel_gsd, percentiles=cfg.scene.percentiles)
    out.skip_hint = False
    return out


def check_self_training(tc, world: int, has_validation: bool) -> None:
    if world > 1:
        raise GeodetError("self-training runs in one process: train without --engine ray (or without "
                          "--unlabelled / train.self_training)")
    if not 0 <= tc.burn_in < 1 or tc.pseudo_rounds < 1 or not 0 < tc.pseudo_share < 1 or not 0 < tc.ema_decay < 1:
        raise GeodetError("self-training needs 0 <= train.burn_in < 1, train.pseudo_rounds >= 1, 0 < "
                          "train.pseudo_share < 1 and 0 < train.ema_decay < 1")
    if not has_validation:
        raise GeodetError("self-training chooses the teacher's thresholds on validation: keep a validation strip "
                          f"(train.val_fraction > 0, now {tc.val_fraction:g}, on labelled scenes large enough to hold "
                          "out 16 px or more) or give --val-scene")


def give_back(val_sets) -> int:
    """Return each validation strip to its scene's training area; returns how many labels it
    gives back."""
    n = 0
    for ts, strip in val_sets:
        if ts.held_out is None or ts.full_area is None:
            continue  # a separate validation scene, or given back already
        n += labels_inside(ts, strip)
        ts.area, ts.held_out = ts.full_area, None
    return n


def training_config(config, out_dir):
    """``train``'s config as a notebook gives it (a ``Config``, a dict, a YAML path or preset name),
    its ``train.scenes`` and ``val_scenes`` entries as ``SceneLabels`` ((scene, labels[, area])
    pairs and dicts taken), and ``out_dir`` checked: anything else refused before any work."""
    import copy

    from ..config import SceneLabels, as_config, config_from_dict
    from ..io.writers import check_output_folder

    # the run fills in its start model's card and classes: on its own copy, so the caller's Config
    # trains a second run (another train.init) as it was written
    config = copy.deepcopy(as_config(config))
    check_output_folder(out_dir, "out_dir")
    t = config.train
    for name in ("scenes", "val_scenes"):
        entries = []
        for e in getattr(t, name):
            if isinstance(e, (tuple, list)) and 2 <= len(e) <= 3:
                e = SceneLabels(*map(str, e))
            elif isinstance(e, dict):
                e = getattr(config_from_dict({"train": {name: [e]}}).train, name)[0]
            elif not isinstance(e, SceneLabels):
                raise GeodetError(f"train.{name} entries are SceneLabels(scene, labels[, labelled_area]), (scene, "
                                  f"labels) pairs or dicts, got {type(e).__name__}")
            entries.append(e)
        setattr(t, name, entries)
    return config
