"""The one postprocess every backend shares: anchors for a padded input, box decoding and NMS of
the network core's outputs (``cls_logits``, ``bbox_regression``). The torch model and the ONNX
backend run this same code, so their boxes agree exactly when their cores do."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchvision.ops import boxes as box_ops

from ..errors import GeodetError


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

    def __call__(self, cls_logits: Tensor, bbox_regression: Tensor, padded_hw: tuple[int, int], image_sizes,
                 score_thresh: float, nms_thresh: float, detections_per_img: int, topk_candidates: int):
        height, width = int(padded_hw[0]), int(padded_hw[1])
        shapes = feature_shapes(self.levels, height, width)
        anchors = self.anchors(height, width, shapes, cls_logits.device)
        a = self.anchor_generator.num_anchors_per_location()[0]
        per_level = [h * w * a for h, w in shapes]
        if sum(per_level) != cls_logits.shape[1] or anchors.shape[0] != cls_logits.shape[1]:
            raise GeodetError(f"the network returned {cls_logits.shape[1]} anchors' outputs but its levels and tile size "
                              f"give {sum(per_level)}: the model file's card does not match its weights")
        outputs = {"cls_logits": list(cls_logits.split(per_level, dim=1)),
                   "bbox_regression": list(bbox_regression.split(per_level, dim=1))}
        split_anchors = list(anchors.split(per_level))
        return decode_levels(self.box_coder, outputs, [split_anchors] * len(image_sizes), image_sizes, score_thresh,
                             nms_thresh, detections_per_img, topk_candidates)


def decode_levels(box_coder, head_outputs, anchors, image_shapes, score_thresh: float, nms_thresh: float,
                  detections_per_img: int, topk_candidates: int) -> list[dict[str, Tensor]]:
    """torchvision's ``postprocess_detections`` with the thresholds as arguments, for the whole
    batch at once: per level, scores above ``score_thresh``, the top ``topk_candidates``, decoded
    and clipped; then class-wise NMS per image and the best ``detections_per_img``.

    Thresholding, top-k, decoding and clipping are vectorised over the batch and levels (a few
    kernels per batch, not per tile and level), which matters on a GPU, where the per-tile loop
    cost more than the network. NMS runs per image, as torchvision's, so an image's detections
    never depend on the others in its batch."""
    n = len(image_shapes)
    levels = list(zip(head_outputs["bbox_regression"], head_outputs["cls_logits"], anchors[0]))
    if n == 0:
        return []
    device = levels[0][1].device
    boxes_all, scores_all, labels_all = [], [], []
    for reg, logits, anc in levels:
        num_classes = logits.shape[-1]
        scores = torch.sigmoid(logits[:n].float()).reshape(n, -1)  # [B, A*K]
        k = min(int(topk_candidates), scores.shape[1])
        # below-threshold scores rank last and are dropped after top-k (as the per-image filter)
        top, idxs = scores.masked_fill(scores <= score_thresh, -1.0).topk(k, dim=1)
        anchor_idxs = torch.div(idxs, num_classes, rounding_mode="floor")
        rel = torch.gather(reg[:n].float(), 1, anchor_idxs.unsqueeze(-1).expand(-1, -1, 4))
        boxes = box_coder.decode_single(rel.reshape(-1, 4), anc[anchor_idxs.reshape(-1)]).reshape(n, k, 4)
        boxes_all.append(boxes)
        scores_all.append(top)
        labels_all.append(idxs % num_classes)
    boxes, scores, labels = torch.cat(boxes_all, 1), torch.cat(scores_all, 1), torch.cat(labels_all, 1)
    sizes = torch.as_tensor([[float(w), float(h)] for h, w in image_shapes], device=device, dtype=boxes.dtype)
    upper = sizes.repeat(1, 2).unsqueeze(1)  # [B, 1, 4]: w, h, w, h
    boxes = torch.minimum(boxes.clamp(min=0), upper)  # clip_boxes_to_image, per image
    valid = scores > score_thresh
    counts = valid.sum(1).tolist()  # the one host sync before NMS
    # the candidates of each image, image after image (a boolean mask keeps row-major order)
    boxes, scores, labels = boxes[valid].split(counts), scores[valid].split(counts), labels[valid].split(counts)
    out = []
    for b, sc, lb in zip(boxes, scores, labels):
        keep = box_ops.batched_nms(b, sc, lb, nms_thresh)[:detections_per_img]
        out.append({"boxes": b[keep], "scores": sc[keep], "labels": lb[keep]})
    return out
