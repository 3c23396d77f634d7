"""The batch-vectorised box decoding gives, tile for tile, what torchvision's per-image loop
gives, and a tile's detections do not depend on the other tiles in its batch."""

import numpy as np
import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import boxes as box_ops

from geodet.model.decode import decode_levels


def per_image_reference(box_coder, head_outputs, anchors, image_shapes, score_thresh, nms_thresh, detections_per_img,
                        topk_candidates):
    """torchvision's RetinaNet.postprocess_detections (0.16-0.29), thresholds as arguments."""
    out = []
    for index in range(len(image_shapes)):
        boxes_all, scores_all, labels_all = [], [], []
        for reg, logits, anc in zip(head_outputs["bbox_regression"], head_outputs["cls_logits"], anchors[index]):
            reg, logits = reg[index], logits[index]
            num_classes = logits.shape[-1]
            scores = torch.sigmoid(logits).flatten()
            keep = scores > score_thresh
            scores = scores[keep]
            idxs = torch.where(keep)[0]
            scores, top = scores.topk(det_utils._topk_min(idxs, topk_candidates, 0))
            idxs = idxs[top]
            anchor_idxs = torch.div(idxs, num_classes, rounding_mode="floor")
            boxes = box_coder.decode_single(reg[anchor_idxs], anc[anchor_idxs])
            boxes_all.append(box_ops.clip_boxes_to_image(boxes, image_shapes[index]))
            scores_all.append(scores)
            labels_all.append(idxs % num_classes)
        boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
        keep = box_ops.batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
        out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return out


def random_heads(batch, classes, seed):
    g = torch.Generator().manual_seed(seed)
    heads, anchors = {"cls_logits": [], "bbox_regression": []}, []
    for (h, w), stride in zip([(32, 32), (16, 16), (8, 8)], (4, 8, 16)):
        n = h * w * 3
        heads["cls_logits"].append(torch.randn(batch, n, classes, generator=g) * 2 - 3)
        heads["bbox_regression"].append(torch.randn(batch, n, 4, generator=g) * 0.3)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        centres = torch.stack([xs, ys], -1).reshape(-1, 1, 2).float() * stride + stride / 2
        size = torch.tensor([8.0, 12.0, 16.0])[None, :, None] * stride / 4
        anchors.append(torch.cat([centres - size / 2, centres + size / 2], -1).reshape(-1, 4))
    return heads, anchors


def canonical(d):
    """Rows ordered by score, then box and label (equal scores may come in either order)."""
    keys = torch.cat([d["scores"][:, None], d["boxes"], d["labels"][:, None].float()], 1).numpy()
    order = torch.from_numpy(np.lexsort(keys.T[::-1].copy()))
    return d["boxes"][order], d["scores"][order], d["labels"][order]


@pytest.mark.parametrize("thresh,nms,cap,topk", [(0.05, 0.5, 300, 1000), (0.3, 0.4, 40, 150), (0.01, 0.6, 5000, 5000),
                                                 (0.99999, 0.5, 10, 10)])
def test_batched_decoding_equals_torchvisions_per_image_loop(thresh, nms, cap, topk):
    coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    heads, anchors = random_heads(5, 3, seed=int(thresh * 100))
    shapes = [(128, 128), (128, 128), (100, 128), (128, 70), (128, 128)]  # edge tiles are smaller
    ref = per_image_reference(coder, heads, [anchors] * 5, shapes, thresh, nms, cap, topk)
    got = decode_levels(coder, heads, [anchors] * 5, shapes, thresh, nms, cap, topk)
    assert len(got) == 5
    for i, (r, g) in enumerate(zip(ref, got)):
        for a, b in zip(canonical(r), canonical(g)):
            assert torch.equal(a, b), i
        # alone in its batch, a tile gets the same detections
        alone = decode_levels(coder, {k: [t[i:i + 1] for t in v] for k, v in heads.items()}, [anchors], shapes[i:i + 1],
                              thresh, nms, cap, topk)[0]
        for a, b in zip(canonical(alone), canonical(g)):
            assert torch.equal(a, b)
    if thresh < 0.5:
        assert sum(len(g["scores"]) for g in got) > 0  # the case is not vacuous
