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


def previous_decode_levels(box_coder, head_outputs, anchors, image_shapes, score_thresh, nms_thresh,
                           detections_per_img, topk_candidates):
    """geodet's decoder before the batch-wide NMS (commit 811b2f3): vectorised candidates, then
    torchvision's batched_nms image by image. The CPU path must give exactly its output, in order."""
    n = len(image_shapes)
    levels = list(zip(head_outputs["bbox_regression"], head_outputs["cls_logits"], anchors[0]))
    boxes_all, scores_all, labels_all = [], [], []
    for reg, logits, anc in levels:
        num_classes = logits.shape[-1]
        scores = torch.sigmoid(logits[:n].float()).reshape(n, -1)
        k = min(int(topk_candidates), scores.shape[1])
        top, idxs = scores.masked_fill(scores <= score_thresh, -1.0).topk(k, dim=1)
        anchor_idxs = torch.div(idxs, num_classes, rounding_mode="floor")
        rel = torch.gather(reg[:n].float(), 1, anchor_idxs.unsqueeze(-1).expand(-1, -1, 4))
        boxes_all.append(box_coder.decode_single(rel.reshape(-1, 4), anc[anchor_idxs.reshape(-1)]).reshape(n, k, 4))
        scores_all.append(top)
        labels_all.append(idxs % num_classes)
    boxes, scores, labels = torch.cat(boxes_all, 1), torch.cat(scores_all, 1), torch.cat(labels_all, 1)
    sizes = torch.as_tensor([[float(w), float(h)] for h, w in image_shapes], dtype=boxes.dtype)
    boxes = torch.minimum(boxes.clamp(min=0), sizes.repeat(1, 2).unsqueeze(1))
    valid = scores > score_thresh
    counts = valid.sum(1).tolist()
    boxes, scores, labels = boxes[valid].split(counts), scores[valid].split(counts), labels[valid].split(counts)
    out = []
    for b, sc, lb in zip(boxes, scores, labels):
        keep = box_ops.batched_nms(b, sc, lb, nms_thresh)[:detections_per_img]
        out.append({"boxes": b[keep], "scores": sc[keep], "labels": lb[keep]})
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


def clustered_tiles(seed, counts, classes, size=256):
    """Boxes of several tiles: clusters of jittered boxes (what a dense model's candidates look
    like), of many sizes, some cut at the tile's edge; scores unique (no ties), tile after tile."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for t, n in enumerate(counts):
        c = (torch.rand(n // 6 + 1, 2, generator=g) * size).repeat(6, 1)[:n] + torch.randn(n, 2, generator=g) * 3
        wh = torch.exp(torch.randn(n, 2, generator=g) * 0.7 + 2.5)
        parts.append((torch.cat([c - wh / 2, c + wh / 2], 1).clamp(0, size), torch.randint(0, classes, (n,), generator=g),
                      torch.full((n,), t)))
    boxes, labels, tiles = (torch.cat([p[i] for p in parts]) for i in range(3))
    scores = (torch.randperm(len(boxes), generator=g).float() + 1) / (len(boxes) + 1)
    odd = torch.randint(0, len(boxes), (len(boxes) // 50,), generator=g)
    boxes[odd[::2], 2] = boxes[odd[::2], 0]  # no area: IoU 0 with every box
    boxes[odd[1::2], 2:] = boxes[odd[1::2], :2] + 1e-3  # a thousandth of a pixel
    return boxes, scores, labels, tiles


@pytest.mark.parametrize("classes", [1, 3])
@pytest.mark.parametrize("iou", [0.3, 0.5, 0.7])
def test_one_pass_pair_nms_keeps_what_torchvisions_nms_keeps_per_tile(classes, iou):
    """The CUDA path's NMS (all tiles at once, pairs on a grid, Cluster-NMS fixed point) run on
    the CPU: per tile, the boxes torchvision's batched_nms keeps, in its order, to the cap. Tiles
    of 0 to 2400 boxes (torchvision switches strategy at 1000), one with a single box."""
    from geodet.model.nms import nms_tiles

    counts = [0, 1, 40, 700, 2400, 1500]
    boxes, scores, labels, tiles = clustered_tiles(int(iou * 10) + classes, counts, classes)
    for cap in (10_000, 150):
        ref = nms_tiles(boxes, scores, labels, tiles, len(counts), iou, cap, "per_image")
        got = nms_tiles(boxes, scores, labels, tiles, len(counts), iou, cap, "pairs")
        assert torch.equal(ref, got)
        assert 0 < len(got) < len(boxes)  # something was suppressed, something kept
        assert torch.equal(tiles[got], torch.sort(tiles[got]).values)  # tile after tile


def test_decode_boxes_is_torchvisions_decode_bit_for_bit():
    from geodet.model.decode import decode_boxes

    g = torch.Generator().manual_seed(0)
    rel = torch.randn(5000, 4, generator=g) * 3
    rel[:20] *= 1e4  # beyond the exp clip
    anc = torch.rand(5000, 2, generator=g) * 500
    anc = torch.cat([anc, anc + torch.rand(5000, 2, generator=g) * 100], 1)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        coder = det_utils.BoxCoder(weights=weights)
        assert torch.equal(decode_boxes(coder, rel, anc), coder.decode_single(rel, anc))


@pytest.mark.parametrize("nms", ["per_image", "pairs"])
def test_batch_decoder_equals_the_per_image_loop_on_random_logits(nms):
    """Candidates, thresholds, NMS and cap for the whole batch as flat tensors (what the
    detectors send to the host in one copy) against torchvision's per-image loop: the same
    boxes, scores and labels, bit for bit, per tile; in the same order with the CPU's NMS."""
    from geodet.model.decode import finish_candidates, level_candidates

    coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    heads, anchors = random_heads(6, 3, seed=4)
    shapes = [(128, 128)] * 3 + [(100, 128), (128, 70), (128, 128)]
    for thresh, iou, cap, topk in [(0.05, 0.5, 300, 1000), (0.01, 0.6, 5000, 5000), (0.3, 0.4, 40, 150)]:
        ref = per_image_reference(coder, heads, [anchors] * 6, shapes, thresh, iou, cap, topk)
        previous = previous_decode_levels(coder, heads, [anchors] * 6, shapes, thresh, iou, cap, topk)
        found = level_candidates(coder, heads["cls_logits"], heads["bbox_regression"], anchors, shapes, thresh, topk)
        got = finish_candidates(*found, thresh, iou, cap, nms)
        assert got.n_tiles == 6 and torch.equal(got.tiles, torch.sort(got.tiles).values)
        for r, p, g in zip(ref, previous, got.per_tile()):
            for a, b, c in zip(canonical(r), canonical(p), canonical(g)):
                assert torch.equal(a, b) and torch.equal(a, c)
            if nms == "per_image":  # the CPU path: also the order, tie for tie
                for a, b in zip(p.values(), g.values()):
                    assert torch.equal(a, b)
        assert sum(len(r["scores"]) for r in ref) > 0


def test_the_detectors_batch_path_equals_the_models_predict_on_a_trained_model(synth, tiny_model):
    """The trained tiny model on real tiles: the per-tile loop's path (one normalisation for the
    batch, core, candidates, NMS for the batch, one packed copy) gives ``model.predict``'s
    detections bit for bit, in order; the one-pass NMS gives the same detections."""
    from geodet.model import load_model
    from geodet.pipeline.backends import TorchDetector, sample_tiles
    from geodet.pipeline.settings import resolve_detect_settings

    model = load_model(tiny_model)
    s = resolve_detect_settings(model.card, score_threshold=0.05)
    tiles = torch.from_numpy(np.stack(sample_tiles(synth.image, s, model.card, 6)))
    with torch.inference_mode():
        ref = model.eval().predict(tiles, score_threshold=0.05)
    cpu = torch.device("cpu")
    for nms in ("per_image", "pairs"):
        det = TorchDetector(model, cpu, s, nms=nms)
        got = det.finish(det.start(tiles)).per_tile()
        assert len(got) == len(ref) == 6
        for r, (boxes, scores, labels) in zip(ref, got):
            g = {"boxes": torch.from_numpy(boxes.copy()), "scores": torch.from_numpy(scores.copy()),
                 "labels": torch.from_numpy(labels.copy())}
            for a, b in (zip(r.values(), g.values()) if nms == "per_image" else zip(canonical(r), canonical(g))):
                assert torch.equal(a, b)
    assert sum(len(r["scores"]) for r in ref) > 20  # the model finds objects here
