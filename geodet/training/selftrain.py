"""Self-training on the pixels nobody labelled: an EMA teacher labels the unlabelled areas in rounds,
and its boxes enter the sampler as labels with a source ("pseudo"), so every other stage (chips,
augmentation, loss) stays as it is.

- **Teacher**: the student as it is at the end of the burn-in, then an exponential moving average
  of the student's weights (``EmaTeacher``), steadier than the student.
- **Rounds**: after a burn-in on the labels alone, the teacher detects over the unlabelled areas
  (``--unlabelled`` scenes, and the rest of a labelled scene outside its ``--labelled-area``) with
  the real pipeline, on unaugmented pixels (the weak view); the student then learns its boxes on
  augmented chips (the strong view: scale jitter, flips, rotations, colour), beside labelled chips.
- **Thresholds** per class and object size, from validation: the teacher's best-F1 score on the
  held-out strip; small and large objects (split at the labels' median size) get their own, as
  small aerial objects score lower (S3OD, arXiv 2310.14718). A detection below its threshold but
  above ``train.pseudo_doubt`` of it (default 0.3; it was 0.75) is a doubt: the loss ignores the
  anchors under it rather than teach them as background (a teacher at recall 0.6 that taught its
  misses as background would unteach 40% of the objects). So are boxes cut by the window's edge
  and boxes reaching into the unlabelled part from outside it. Below the doubt share a box is
  background: a floor at the network's own score threshold (0.05) ignored a third to four fifths
  of the unlabelled pixels, and pseudo chips taught almost no background.
- **The user's labels** outside the labelled area stay labels in the teacher's chips.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..io.labels import LabelBoxes
from .area import centres_inside
from .sampler import TrainScene

log = logging.getLogger(__name__)
MIN_VAL_LABELS = 5  # a size bin with fewer validation labels uses its class's threshold
DOUBT_SHARE = 0.3  # a teacher box from this share of its threshold up to it is a doubt: ignored by the loss
MIN_TEACH = 0.2  # a pseudo window whose doubts leave less than this share of it to teach background is skipped
MAX_AREA_TILES = 64  # an unlabelled area larger than this many tiles is pseudo-labelled in sampled windows


class EmaTeacher:
    """An exponential moving average of a model's weights (buffers copied), updated each step."""

    def __init__(self, model, decay: float):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)

    @torch.no_grad()
    def reset(self, model) -> None:
        """Become the student (at the end of the burn-in: an average over the burn-in would
        carry its first, untrained steps)."""
        self.model.net.load_state_dict(model.net.state_dict())

    @torch.no_grad()
    def update(self, model) -> None:
        for t, s in zip(self.model.net.parameters(), model.net.parameters()):
            t.lerp_(s.detach(), 1.0 - self.decay)
        for t, s in zip(self.model.net.buffers(), model.net.buffers()):
            t.copy_(s)


@dataclass
class Thresholds:
    """Per class: (small, large) score thresholds and the box side (px) that splits them."""

    by_class: dict  # class index -> (small threshold, large threshold)
    split: float

    def of(self, labels: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        side = np.sqrt(np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 0))
        small = np.array([self.by_class.get(int(c), (1.0, 1.0))[0] for c in labels])
        large = np.array([self.by_class.get(int(c), (1.0, 1.0))[1] for c in labels])
        return np.where(side < self.split, small, large)

    def to_dict(self) -> dict:
        return {"by_class": {str(c): [float(a), float(b)] for c, (a, b) in self.by_class.items()},
                "split": float(self.split)}

    @classmethod
    def from_dict(cls, d: dict) -> "Thresholds":
        return cls({int(c): (float(a), float(b)) for c, (a, b) in d["by_class"].items()}, float(d["split"]))

    def describe(self, classes) -> str:
        return "; ".join(f"{classes[c]} {s:.2f}/{lg:.2f}" for c, (s, lg) in sorted(self.by_class.items()))


def _matched(det_b, det_s, gt_b, iou: float = 0.5) -> np.ndarray:
    """Per detection (in descending score order of ``det_s``), whether it matches a label (greedy)."""
    from torchvision.ops import box_iou

    order = np.argsort(-det_s, kind="stable")
    tp = np.zeros(len(det_s), bool)
    if not len(det_b) or not len(gt_b):
        return tp[order]
    ov = box_iou(torch.as_tensor(det_b[order]), torch.as_tensor(gt_b)).numpy()
    used = np.zeros(len(gt_b), bool)
    for i in range(len(order)):
        row = np.where(used, 0.0, ov[i])
        j = int(np.argmax(row))
        if row[j] >= iou:
            used[j] = True
            tp[i] = True
    return tp


def _threshold(scores_sorted: np.ndarray, tp_sorted: np.ndarray, n_labels: int, fallback: float) -> float:
    """The score at which the detections at or above it have the best F1 against ``n_labels``."""
    if not len(scores_sorted) or not n_labels or not tp_sorted.any():
        return fallback
    tp = np.cumsum(tp_sorted)
    f1 = 2 * tp / (np.arange(1, len(tp_sorted) + 1) + n_labels)
    return float(scores_sorted[int(np.argmax(f1))])


def _side(b: np.ndarray) -> np.ndarray:
    return np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))


def ranked(dets, gts, c: int, small: bool, split: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Over every validation area: the scores of class ``c``'s detections in one size bin, sorted
    descending, whether each matches a label, and the number of labels in the bin. Each area is
    matched on its own; joined, the areas' detections are sorted again into one ranking."""
    s_all, t_all, n_gt = [np.zeros(0)], [np.zeros(0, bool)], 0
    for (db, ds, dl), (gb, gl) in zip(dets, gts):
        dm = (dl == c) & ((_side(db) < split) == small)
        gm = (gl == c) & ((_side(gb) < split) == small)
        n_gt += int(gm.sum())
        order = np.argsort(-ds[dm], kind="stable")
        s_all.append(ds[dm][order])
        t_all.append(_matched(db[dm], ds[dm], gb[gm]))
    s_cat, t_cat = np.concatenate(s_all), np.concatenate(t_all)
    order = np.argsort(-s_cat, kind="stable")
    return s_cat[order], t_cat[order], n_gt


def thresholds_from_validation(teacher, val_sets, classes, overlap: int, device, batch_size: int,
                               min_visibility: float, fallback: float) -> Thresholds:
    """Per class and size bin, the teacher's best-F1 score threshold on the validation areas
    (``fallback``, the operating point, where validation cannot tell)."""
    from ..io.labels import clip_boxes
    from ..pipeline.scenes import detect_scene

    dets, gts = [], []
    for ts, area in val_sets:
        frame = detect_scene(ts.scene, teacher, area=area, overlap=overlap, device=str(device), num_workers=0,
                             progress=False, batch_size=batch_size)
        shift = np.array([area[0], area[1]] * 2, np.float64)
        b = frame[["px_x0", "px_y0", "px_x1", "px_y1"]].to_numpy(np.float64)
        keep = centres_inside(ts.labelled, b + shift)
        index = {n: k for k, n in enumerate(classes)}
        dets.append((b[keep], frame["score"].to_numpy()[keep], frame["label"].map(index).to_numpy(np.int64)[keep]))
        g, kept = clip_boxes(ts.labels.boxes, area, min_visibility)
        inside = centres_inside(ts.labelled, g + shift)
        gts.append((g[inside], ts.labels.labels[kept][inside]))
    sides = np.concatenate([_side(g) for g, _ in gts] or [np.zeros(0)])
    split = float(np.median(sides)) if len(sides) else 0.0
    by_class = {}
    for c in range(len(classes)):
        per_bin = [ranked(dets, gts, c, small, split) for small in (True, False)]
        both_s = np.concatenate([per_bin[0][0], per_bin[1][0]])
        order = np.argsort(-both_s, kind="stable")
        both_t = np.concatenate([per_bin[0][1], per_bin[1][1]])[order]
        class_thr = _threshold(both_s[order], both_t, per_bin[0][2] + per_bin[1][2], fallback)
        by_class[c] = tuple(_threshold(s, t, n, class_thr) if n >= MIN_VAL_LABELS else class_thr for s, t, n in per_bin)
    return Thresholds(by_class, split)


@dataclass
class PseudoArea:
    """What the teacher labels: a scene's rectangle, where its boxes may teach (None: all of it),
    and the user's own labels there (they stay labels: the teacher only adds to them)."""

    scene: object
    rect: tuple
    geom: object = None
    boxes: np.ndarray = None  # the user's labels [N, 4] in scene pixels
    labels: np.ndarray = None

    def __post_init__(self):
        if self.boxes is None:
            self.boxes, self.labels = np.zeros((0, 4)), np.zeros(0, np.int64)


def unlabelled_areas(train_scenes: list[TrainScene], val_sets, unlabelled_scenes: list) -> list[PseudoArea]:
    """What the teacher labels: every unlabelled scene (whole), and for each labelled scene the
    part outside its labelled area (and outside its validation strip), with the user's labels
    that lie there."""
    import shapely
    from shapely.geometry import box

    out = []
    for sc in unlabelled_scenes:
        out.append(PseudoArea(sc, (0, 0, sc.width, sc.height)))
    for ts in train_scenes:
        if ts.labelled is None:
            continue
        sc = ts.scene
        rest = box(0, 0, sc.width, sc.height).difference(ts.labelled)
        for vts, varea in val_sets:
            if vts is ts:
                rest = rest.difference(box(*varea))
        if rest.is_empty or rest.area < 64 * 64:
            continue
        x0, y0, x1, y1 = (int(v) for v in np.round(rest.bounds))
        shapely.prepare(rest)
        b = ts.labels.boxes
        mine = centres_inside(rest, b)
        out.append(PseudoArea(sc, (x0, y0, x1, y1), rest, b[mine], ts.labels.labels[mine]))
    return out


def windows(rect, tile: int, rng, max_tiles: int = MAX_AREA_TILES) -> list[tuple]:
    """The area itself when it is at most ``max_tiles`` tiles, else that many random tile windows of it."""
    x0, y0, x1, y1 = rect
    if (x1 - x0) * (y1 - y0) <= max_tiles * tile * tile:
        return [rect]
    out = []
    for _ in range(max_tiles):
        x = int(rng.integers(x0, max(x0 + 1, x1 - tile + 1)))
        y = int(rng.integers(y0, max(y0 + 1, y1 - tile + 1)))
        out.append((x, y, min(x + tile, x1), min(y + tile, y1)))
    return out


def pseudo_scenes(teacher, areas: list[PseudoArea], thresholds: Thresholds, classes, overlap: int, tile: int, device,
                  batch_size: int, rng, doubt: float = DOUBT_SHARE) -> tuple[list[TrainScene], int, int]:
    """The teacher's boxes over ``areas`` as training scenes: boxes at or above their threshold are
    labels beside the user's own labels there, and every box the teacher half saw (from ``doubt``
    x its threshold up to it), cut by the window's edge, or reaching in from outside the area, is
    cut out of where the loss may teach background. Windows left with too little to teach
    (``MIN_TEACH``) are skipped. Returns (scenes, pseudo boxes, ignored boxes)."""
    out, n_sure, n_doubt = [], 0, 0
    for area in areas:
        for win in windows(area.rect, tile, rng):
            ts, sure, doubtful = _pseudo_window(teacher, area, win, thresholds, classes, overlap, device, batch_size,
                                                doubt)
            n_sure += sure
            n_doubt += doubtful
            if ts is not None:
                out.append(ts)
    return out, n_sure, n_doubt


def _teacher_boxes(teacher, area: PseudoArea, win, classes, overlap, device, batch_size):
    """The teacher's detections over the window, in scene pixels: (boxes, scores, labels)."""
    from ..pipeline.scenes import detect_scene

    index = {n: k for k, n in enumerate(classes)}
    frame = detect_scene(area.scene, teacher, area=win, overlap=overlap, device=str(device), num_workers=0,
                         progress=False, batch_size=batch_size)
    b = frame[["px_x0", "px_y0", "px_x1", "px_y1"]].to_numpy(np.float64) + [win[0], win[1]] * 2
    return b, frame["score"].to_numpy(np.float64), frame["label"].map(index).to_numpy(np.int64)


def _pseudo_window(teacher, area: PseudoArea, win, thresholds, classes, overlap, device, batch_size, doubt_share):
    import shapely
    from shapely.geometry import box
    from torchvision.ops import box_iou

    b, s, lab = _teacher_boxes(teacher, area, win, classes, overlap, device, batch_size)
    region = box(*win) if area.geom is None else area.geom.intersection(box(*win))
    touches = shapely.intersects(region, shapely.box(*b.T)) if len(b) else np.zeros(0, bool)
    inside = centres_inside(area.geom, b)
    b, s, lab, inside = b[touches], s[touches], lab[touches], inside[touches]  # only what reaches the unlabelled part
    mine = centres_inside(box(*win), area.boxes)
    ub, ul = area.boxes[mine], area.labels[mine]
    if len(ub) and len(b):  # the user's label wins over the teacher's box for the same object
        dup = box_iou(torch.as_tensor(b), torch.as_tensor(ub)).amax(1).numpy() >= 0.5
        b, s, lab, inside = b[~dup], s[~dup], lab[~dup], inside[~dup]
    thr = thresholds.of(lab, b)
    sc = area.scene
    # a box on an edge of the window inside the scene may be a cut view of its object
    cut = (((b[:, 0] <= win[0] + 1) & (win[0] > 0)) | ((b[:, 1] <= win[1] + 1) & (win[1] > 0))
           | ((b[:, 2] >= win[2] - 1) & (win[2] < sc.width)) | ((b[:, 3] >= win[3] - 1) & (win[3] < sc.height)))
    sure = (s >= thr) & inside & ~cut
    doubt = ~sure & (s >= doubt_share * thr)
    teach = region
    if doubt.any():
        teach = teach.difference(shapely.union_all(shapely.box(*b[doubt].T)))
    if teach.is_empty or teach.area < MIN_TEACH * max(region.area, 1e-9):
        return None, 0, int(doubt.sum())
    shapely.prepare(teach)
    boxes, labels = np.concatenate([b[sure], ub]), np.concatenate([lab[sure], ul]).astype(np.int64)
    lb = LabelBoxes(boxes, labels, list(classes), {"pseudo": int(sure.sum()), "user": len(ub)})
    ts = TrainScene(area.scene, lb, tuple(int(v) for v in win), "pseudo-labels", teach, kind="pseudo")
    return ts, int(sure.sum()), int(doubt.sum())


def pseudo_round(tr, r, again: bool = False) -> None:
    """Self-training (``tr``: the Trainer, ``r``: its Run): when the run's progress reaches the next
    round, the teacher labels the unlabelled areas again and the chips draw from its boxes from then
    on. ``again``: a resumed run makes its last round's chips again (the checkpoint keeps the round
    count and thresholds, not the boxes), from the resumed model (its EMA teacher is not kept)."""
    import time

    tc = tr.cfg.train
    if r.teacher is None or (r.rounds_done >= tc.pseudo_rounds and not again):
        return
    due = tc.burn_in + r.rounds_done * (1 - tc.burn_in) / tc.pseudo_rounds
    if r.progress < due and not again:
        return
    t0 = time.perf_counter()
    if r.rounds_done == 0 or again:
        r.teacher.reset(r.model)
    teacher = r.teacher.model
    # after the strips are given back, the thresholds measured before on them stay
    thr = tr.thresholds if r.given_back or (again and tr.thresholds is not None) else tr._thresholds(r, teacher)
    tr.thresholds = thr
    rng = np.random.default_rng([tc.seed, 99, r.rounds_done - 1 if again else r.rounds_done])
    scenes, n_sure, n_doubt = pseudo_scenes(teacher, tr.pseudo_areas, thr, tr.classes, tr.overlap,
                                            tr.cfg.tiling.tile_size, r.device, tr.cfg.detect.batch_size, rng,
                                            tc.pseudo_doubt)
    r.data.set_scenes(tr.train_scenes + [s for s in scenes if len(s.labels)], tc.pseudo_share)
    if not again:
        r.rounds_done += 1
    r.model.train()
    what = f"round {r.rounds_done} made again after --resume, from the resumed model" if again else f"round {r.rounds_done}"
    note = (f"pseudo-labels {what}: {n_sure} boxes, {n_doubt} below their threshold ignored; thresholds "
            f"(small/large, split at {thr.split:.0f} px) {thr.describe(tr.classes)} ({time.perf_counter() - t0:.1f} s)")
    log.info(note)
    tr.metrics.note(r, r.budget.elapsed(), note)


def too_few_rounds(tr, r) -> None:
    """Say (log and metrics.csv) that a run ended before all its pseudo-label rounds: they come at
    epoch ends once the run's progress reaches them, never at its last."""
    tc = tr.cfg.train
    note = (f"self-training ran {r.rounds_done} of its {tc.pseudo_rounds} pseudo-label round(s) in {r.epoch} epoch(s): "
            f"rounds come at epoch ends after the burn-in ({round(100 * tc.burn_in)}% of the run); give the run more "
            "epochs (more steps or minutes, or fewer --steps-per-epoch)")
    log.warning(note)
    tr.metrics.note(r, r.budget.elapsed(), note)
