"""The one postprocess every backend shares: anchors for a padded input, box decoding and NMS of
the network core's outputs (``cls_logits``, ``bbox_regression``). The torch model and the ONNX
backend run this same code, so their boxes agree exactly when their cores do."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..errors import GeodetError
from .nms import nms_tiles


def feature_shapes(levels: Sequence[int], height: int, width: int) -> list[tuple[int, int]]:
    """Feature map sizes of pyramid levels ``levels`` (min, max) for a ``height`` x ``width``
    input: every stride-2 stage (ResNet stem, pool and stages, the extra P6+ convs) rounds up."""
    lo, hi = levels
    return [(-(-height // 2**k), -(-width // 2**k)) for k in range(lo, hi + 1)]


class Decoder:
    """Anchors, box decoding and NMS for the core's outputs: the one postprocess that the torch
    model and the ONNX backend share (same code, same anchors, same thresholds)."""

    def __init__(self, anchor_generator, box_coder, levels: Sequence[int]):
        self.anchor_generator = anchor_generator
        self.box_coder = box_coder
        self.levels = (int(levels[0]), int(levels[1]))
        self._anchors: dict = {}

    def anchors(self, height: int, width: int, shapes: list[tuple[int, int]], device) -> Tensor:
        """All anchors for a padded ``height`` x ``width`` input, cached per size and device."""
        key = (height, width, tuple(shapes), str(device))
        if key not in self._anchors:
            from torchvision.models.detection.image_list import ImageList

            # shapes only: stride-0 views, no memory
            images = ImageList(torch.zeros((), device=device).expand(1, 1, height, width), [(height, width)])
            maps = [torch.zeros((), device=device).expand(1, 1, h, w) for h, w in shapes]
            self._anchors[key] = self.anchor_generator(images, maps)[0]
        return self._anchors[key]

    def split(self, cls_logits: Tensor, bbox_regression: Tensor, padded_hw: tuple[int, int]):
        """The core's outputs and the anchors, level by level: ``(logits, regression, anchors)``."""
        height, width = int(padded_hw[0]), int(padded_hw[1])
        shapes = feature_shapes(self.levels, height, width)
        anchors = self.anchors(height, width, shapes, cls_logits.device)
        a = self.anchor_generator.num_anchors_per_location()[0]
        per_level = [h * w * a for h, w in shapes]
        if sum(per_level) != cls_logits.shape[1] or anchors.shape[0] != cls_logits.shape[1]:
            raise GeodetError(f"the network returned {cls_logits.shape[1]} anchors' outputs but its levels and tile size "
                              f"give {sum(per_level)}: the model file's card does not match its weights")
        return (list(cls_logits.split(per_level, dim=1)), list(bbox_regression.split(per_level, dim=1)),
                list(anchors.split(per_level)))

    def candidates(self, cls_logits: Tensor, bbox_regression: Tensor, padded_hw: tuple[int, int], image_sizes,
                   score_thresh: float, topk_candidates: int):
        """The fixed-shape part of decoding (no host sync, so a CUDA graph can hold it):
        ``level_candidates`` of the core's outputs."""
        logits, regression, anchors = self.split(cls_logits, bbox_regression, padded_hw)
        return level_candidates(self.box_coder, logits, regression, anchors, image_sizes, score_thresh,
                                topk_candidates)

    def detect(self, cls_logits: Tensor, bbox_regression: Tensor, padded_hw: tuple[int, int], image_sizes,
               score_thresh: float, nms_thresh: float, detections_per_img: int, topk_candidates: int,
               nms: str | None = None) -> "TileBoxes":
        """A batch's detections as flat tensors (``TileBoxes``), tile after tile."""
        found = self.candidates(cls_logits, bbox_regression, padded_hw, image_sizes, score_thresh, topk_candidates)
        return finish_candidates(*found, score_thresh, nms_thresh, detections_per_img, nms)

    def __call__(self, cls_logits: Tensor, bbox_regression: Tensor, padded_hw: tuple[int, int], image_sizes,
                 score_thresh: float, nms_thresh: float, detections_per_img: int, topk_candidates: int):
        return self.detect(cls_logits, bbox_regression, padded_hw, image_sizes, score_thresh, nms_thresh,
                           detections_per_img, topk_candidates).per_tile()


@dataclass
class TileBoxes:
    """A batch's detections, flat and on the device where they were made: ``boxes [N, 4]``,
    ``scores [N]``, ``labels [N]`` and ``tiles [N]`` (each box's index in the batch), tile after
    tile, each tile's in its NMS order."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    tiles: Tensor
    n_tiles: int

    def per_tile(self) -> list[dict[str, Tensor]]:
        """One ``{"boxes", "scores", "labels"}`` per tile (the detector protocol)."""
        counts = torch.bincount(self.tiles, minlength=self.n_tiles).tolist()
        parts = [t.split(counts) for t in (self.boxes, self.scores, self.labels)]
        return [{"boxes": b, "scores": s, "labels": lb} for b, s, lb in zip(*parts)]


def default_nms(device: torch.device) -> str:
    """``pairs`` on CUDA (one pass for the whole batch), torchvision's per-image NMS elsewhere
    (the CPU's results never change)."""
    return "pairs" if device.type == "cuda" else "per_image"


def level_candidates(box_coder, logits: Sequence[Tensor], regression: Sequence[Tensor], anchors: Sequence[Tensor],
                     image_shapes, score_thresh: float, topk_candidates: int):
    """Per level, scores above ``score_thresh``, the top ``topk_candidates``, decoded and
    clipped, for the whole batch at once: ``(boxes [B, N, 4], scores [B, N], labels [B, N])``
    over all levels, with every candidate at or below the threshold scored -1.

    Vectorised over the batch and levels (a few kernels per batch, not per tile and level), which
    matters on a GPU, where the per-tile loop cost more than the network."""
    n = len(image_shapes)
    boxes_all, scores_all, labels_all = [], [], []
    for reg, lg, anc in zip(regression, logits, anchors):
        num_classes = lg.shape[-1]
        scores = torch.sigmoid(lg[:n].float()).reshape(n, -1)  # [B, A*K]
        k = min(int(topk_candidates), scores.shape[1])
        # below-threshold scores rank last and are dropped after top-k (as the per-image filter)
        top, idxs = scores.masked_fill(scores <= score_thresh, -1.0).topk(k, dim=1)
        anchor_idxs = torch.div(idxs, num_classes, rounding_mode="floor")
        rel = torch.gather(reg[:n].float(), 1, anchor_idxs.unsqueeze(-1).expand(-1, -1, 4))
        boxes = decode_boxes(box_coder, rel.reshape(-1, 4), anc[anchor_idxs.reshape(-1)]).reshape(n, k, 4)
        boxes_all.append(boxes)
        scores_all.append(top)
        labels_all.append(idxs % num_classes)
    boxes, scores, labels = torch.cat(boxes_all, 1), torch.cat(scores_all, 1), torch.cat(labels_all, 1)
    upper = _image_bounds(tuple((int(h), int(w)) for h, w in image_shapes), boxes.dtype, boxes.device)
    return torch.minimum(boxes.clamp(min=0), upper), scores, labels  # clip_boxes_to_image, per image


def decode_boxes(box_coder, rel_codes: Tensor, boxes: Tensor) -> Tensor:
    """torchvision's ``BoxCoder.decode_single``, operation for operation (the same bits), less its
    two scalar tensors made on the device each call: a CUDA graph cannot capture those copies."""
    boxes = boxes.to(rel_codes.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = box_coder.weights
    dx = rel_codes[:, 0::4] / wx
    dy = rel_codes[:, 1::4] / wy
    dw = torch.clamp(rel_codes[:, 2::4] / ww, max=box_coder.bbox_xform_clip)
    dh = torch.clamp(rel_codes[:, 3::4] / wh, max=box_coder.bbox_xform_clip)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    c_to_c_h = pred_h * 0.5  # halving is exact, with a tensor 0.5 as with a number
    c_to_c_w = pred_w * 0.5
    pred = torch.stack((pred_ctr_x - c_to_c_w, pred_ctr_y - c_to_c_h, pred_ctr_x + c_to_c_w, pred_ctr_y + c_to_c_h), dim=2)
    return pred.flatten(1)


@functools.lru_cache(maxsize=64)
def _image_bounds(image_shapes: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[B, 1, 4]``: each image's (w, h, w, h); cached, so a CUDA graph that clips reuses the
    tensor made before its capture (a copy from the host cannot be captured)."""
    sizes = torch.as_tensor([[float(w), float(h)] for h, w in image_shapes], device=device, dtype=dtype)
    return sizes.repeat(1, 2).unsqueeze(1)


def finish_candidates(boxes: Tensor, scores: Tensor, labels: Tensor, score_thresh: float, nms_thresh: float,
                      detections_per_img: int, nms: str | None = None) -> TileBoxes:
    """The candidates above ``score_thresh`` (one host sync), class- and tile-aware NMS (``nms``:
    ``per_image`` or ``pairs``; default ``default_nms``) and the best ``detections_per_img`` per
    tile, for the whole batch."""
    n = boxes.shape[0]
    # the candidates of each tile, tile after tile (row-major, as a boolean mask keeps them)
    tile, pos = (scores > score_thresh).nonzero(as_tuple=True)
    b, s, lb = boxes[tile, pos], scores[tile, pos], labels[tile, pos]
    keep = nms_tiles(b, s, lb, tile, n, nms_thresh, detections_per_img, nms or default_nms(boxes.device))
    return TileBoxes(b[keep], s[keep], lb[keep], tile[keep], n)


def decode_levels(box_coder, head_outputs, anchors, image_shapes, score_thresh: float, nms_thresh: float,
                  detections_per_img: int, topk_candidates: int) -> list[dict[str, Tensor]]:
    """torchvision's ``postprocess_detections`` with the thresholds as arguments, for the whole
    batch at once: per level, scores above ``score_thresh``, the top ``topk_candidates``, decoded
    and clipped; then class-wise NMS per tile and the best ``detections_per_img``. On the CPU,
    NMS is torchvision's, per image, so an image's detections never depend on the others in its
    batch; on CUDA it is the one-pass ``pairs`` NMS (the same greedy result)."""
    if len(image_shapes) == 0:
        return []
    found = level_candidates(box_coder, head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors[0],
                             image_shapes, score_thresh, topk_candidates)
    return finish_candidates(*found, score_thresh, nms_thresh, detections_per_img).per_tile()
