"""Detection backends: the torch model (fp32, bf16 autocast on CPUs with native bf16, fp16
autocast on CUDA) and ONNX Runtime (fp32, int8), all behind the detector protocol, and the checks
that compare a faster precision with fp32 (detection agreement at the operating point, on tiles
read as the job reads them).

Which backend runs by default, and the ONNX models made on the spot for it, is ``choice.py``'s.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Sequence

import numpy as np
import torch

from ..errors import GeodetError
from .settings import DetectSettings

log = logging.getLogger(__name__)


def cpu_features() -> dict:
    """What this CPU runs natively: ``bf16`` (AVX512_BF16 or AMX-BF16) and ``vnni`` (int8 dot
    products: AVX512_VNNI, AVX-VNNI or AMX-INT8), from torch's CPU capability probe."""
    try:
        caps = torch.cpu.get_capabilities()
    except Exception:  # older torch: no probe, so claim nothing
        caps = {}
    return {
        "bf16": bool(caps.get("avx512_bf16") or caps.get("amx_bf16")),
        "vnni": bool(caps.get("avx512_vnni") or caps.get("avx_vnni") or caps.get("amx_int8")),
        "isa": torch.backends.cpu.get_cpu_capability(),
    }


def has_onnxruntime() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class TorchDetector:
    """A geodet model ready to run with this call's thresholds and precision, without touching
    the caller's object: it runs the model as is when it is already in eval mode on ``device``,
    else an eval copy moved there (channels_last on CUDA). ``precision`` fp32, bf16 or fp16
    runs the network core under autocast of that type; boxes are decoded in float32.

    ``start`` and ``finish`` split a batch for the per-tile loop: ``start`` normalises the batch
    (all tiles at once), runs the core and the fixed-shape part of decoding (on CUDA without a
    host sync, and from the second full batch on as one CUDA graph when ``cuda_graphs``);
    ``finish`` thresholds, runs NMS for the whole batch (``nms``: ``per_image`` on the CPU, so
    CPU results stay torchvision's, ``pairs`` on CUDA) and sends the detections to the host in
    one copy."""

    backend = "torch"

    def __init__(self, model, device: torch.device, settings: DetectSettings, precision: str = "fp32",
                 cuda_graphs: bool = True, nms: str | None = None):
        from ..model.decode import default_nms
        from ..model.network import NativeSizeTransform

        self.card = model.card
        self.source = getattr(model, "source", None)
        on_device = next(model.parameters()).device == device
        if model.training or not on_device:
            model = copy.deepcopy(model).eval().to(device)
            if device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.device = device
        self.precision = precision
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.kw = dict(score_threshold=settings.score_threshold, nms_iou=settings.nms_iou,
                       detections_per_tile=settings.detections_per_tile)
        self.batch_size = settings.batch_size
        self.timings: dict = {}
        net = getattr(model, "net", None)
        # tiles at their own size: normalised as one batch here (a resizing model or a wrapper
        # such as TTA goes through its own predict)
        self.net = net if isinstance(getattr(net, "transform", None), NativeSizeTransform) else None
        if self.net is not None:
            t = self.net.transform
            self.mean = torch.tensor(t.image_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            self.std = torch.tensor(t.image_std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.nms = nms or default_nms(device)
        self.cuda_graphs = cuda_graphs and device.type == "cuda" and self.net is not None
        self.graph = None
        self._full_batches = 0

    def __call__(self, batch):
        return self.model.predict(batch, autocast_dtype=self.autocast_dtype, timings=self.timings, **self.kw)

    def _candidates(self, x: torch.Tensor):
        """Normalise and pad the batch as torchvision's transform does (same values), run the core
        under this precision's autocast, and pick the candidates (fixed shapes)."""
        import torch.nn.functional as F

        h, w = int(x.shape[-2]), int(x.shape[-1])
        x = (x - self.mean) / self.std
        d = int(self.net.transform.size_divisible)
        ph, pw = -(-h // d) * d - h, -(-w // d) * d - w
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        dtype = self.autocast_dtype
        # no autocast weight cache: a CUDA graph must not hold casts made outside it
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False):
            cls_logits, bbox_regression = self.net.core(x)
        return self.net.decoder.candidates(cls_logits.float(), bbox_regression.float(), tuple(x.shape[-2:]),
                                           [(h, w)] * int(x.shape[0]), self.kw["score_threshold"],
                                           self.net.topk_candidates)

    def start(self, batch: torch.Tensor):
        """The core and candidates of ``batch`` (asynchronous on CUDA); see ``finish``."""
        from .graphs import cudnn_autotune, try_capture

        if self.net is None:
            with torch.inference_mode():
                return self(batch)
        t0 = time.perf_counter()
        with torch.inference_mode():
            if self.cuda_graphs and self.graph is None and batch.shape[0] == self.batch_size:
                self._full_batches += 1
                if self._full_batches == 2:  # the first full batch runs as is: a one-batch job never captures
                    self.graph = try_capture(self._candidates, batch, "the network core")
                    self.cuda_graphs = self.graph is not None
            if self.graph is not None and self.graph.fits(batch):
                out = self.graph(batch)
            elif self.device.type == "cuda":
                with cudnn_autotune():
                    out = self._candidates(batch)
            else:
                out = self._candidates(batch)
        self.timings["core"] = self.timings.get("core", 0.0) + time.perf_counter() - t0
        return out

    def finish(self, started):
        """``start``'s candidates thresholded, through NMS, on their way to the host."""
        from ..model.decode import finish_candidates
        from .batches import pack, pack_outputs

        if self.net is None:
            return pack_outputs(started)
        t0 = time.perf_counter()
        with torch.inference_mode():
            tb = finish_candidates(*started, self.kw["score_threshold"], self.kw["nms_iou"],
                                   self.kw["detections_per_tile"], self.nms)
            out = pack(tb.boxes, tb.scores, tb.labels, tb.tiles, tb.n_tiles)
        self.timings["decode"] = self.timings.get("decode", 0.0) + time.perf_counter() - t0
        return out


class OnnxDetector:
    """A geodet ONNX model (``model.onnx.OnnxModel``) on ONNX Runtime: the core runs there, the
    torch model's own decoder makes the boxes."""

    backend = "onnx"

    def __init__(self, onnx_model, settings: DetectSettings):
        from ..model.onnx import decoder_for

        self.onnx = onnx_model
        self.card = onnx_model.card
        self.source = onnx_model.source
        self.precision = onnx_model.precision
        self.decoder = decoder_for(self.card)
        m = self.card.model
        self.args = (settings.score_threshold, settings.nms_iou, settings.detections_per_tile, m.topk_candidates)
        self.timings: dict = {}

    def __call__(self, batch):
        return self.finish(self.start(batch), as_pending=False)

    def start(self, batch):
        """The core on ONNX Runtime (synchronous): ``(cls_logits, bbox_regression, padded size, tile size, n)``."""
        from ..model.onnx import padded_input

        t0 = time.perf_counter()
        arr = batch.detach().cpu().float().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch, np.float32)
        h, w = arr.shape[-2:]
        x = padded_input(arr, self.card.mean)
        cls_logits, bbox_regression = self.onnx.core(x)
        self.timings["core"] = self.timings.get("core", 0.0) + time.perf_counter() - t0
        return torch.from_numpy(cls_logits), torch.from_numpy(bbox_regression), x.shape[-2:], (h, w), len(arr)

    def finish(self, started, as_pending: bool = True):
        """Decoding and NMS of ``start``'s outputs (the torch model's own code): packed for the
        per-tile loop, or (``as_pending=False``) one dict per tile."""
        from .batches import pack

        cls_logits, bbox_regression, padded, hw, n = started
        t0 = time.perf_counter()
        tb = self.decoder.detect(cls_logits, bbox_regression, padded, [hw] * n, *self.args)
        out = pack(tb.boxes, tb.scores, tb.labels, tb.tiles, tb.n_tiles) if as_pending else tb.per_tile()
        self.timings["decode"] = self.timings.get("decode", 0.0) + time.perf_counter() - t0
        return out


# ---------------------------------------------------------------------------------------------
# checks


def match_detections(ref: dict, cand: dict, iou: float = 0.5) -> int:
    """Greedy one-to-one matches (best score first) between two tiles' detections of the same
    label with IoU >= ``iou``."""
    from torchvision.ops import box_iou

    a_boxes, b_boxes = torch.as_tensor(ref["boxes"]).float(), torch.as_tensor(cand["boxes"]).float()
    if len(a_boxes) == 0 or len(b_boxes) == 0:
        return 0
    ov = box_iou(a_boxes, b_boxes)
    ov[torch.as_tensor(ref["labels"])[:, None] != torch.as_tensor(cand["labels"])[None, :]] = 0
    used = torch.zeros(len(b_boxes), dtype=torch.bool)
    n = 0
    for i in torch.argsort(torch.as_tensor(ref["scores"]), descending=True).tolist():
        row = ov[i].masked_fill(used, 0)
        j = int(torch.argmax(row))
        if row[j] >= iou:
            used[j] = True
            n += 1
    return n


def agreement(ref: Sequence[dict], cand: Sequence[dict], min_score: float, iou: float = 0.5) -> dict:
    """How far ``cand``'s detections agree with ``ref``'s (one dict per tile) at ``min_score``:
    the F1 of ``cand`` taking ``ref`` as the truth, and the counts behind it."""
    n_ref = n_cand = n_match = 0
    for r, c in zip(ref, cand):
        r = {k: v[v_keep] for v_keep in [r["scores"] >= min_score] for k, v in r.items()}
        c = {k: v[v_keep] for v_keep in [c["scores"] >= min_score] for k, v in c.items()}
        n_ref, n_cand = n_ref + len(r["scores"]), n_cand + len(c["scores"])
        n_match += match_detections(r, c, iou)
    # with nothing to compare on either side the check says nothing: inconclusive (f1 None), never a pass
    f1 = None if n_ref + n_cand == 0 else round(2 * n_match / (n_ref + n_cand), 4)
    return {"f1": f1, "reference": n_ref, "candidate": n_cand, "matched": n_match, "min_score": min_score,
            "tiles": len(ref), "conclusive": f1 is not None}


def conclusive(a: dict) -> bool:
    """Whether an agreement check compared anything (cards written before geodet said so stored
    F1 1.0 for 0 detections against 0)."""
    return a.get("f1") is not None and a.get("reference", 0) + a.get("candidate", 0) > 0


def describe_agreement(a: dict) -> str:
    """``F1 0.9876`` or why there is none (no detection on either side)."""
    if a.get("f1") is None:
        return (f"inconclusive (no detection at score >= {a['min_score']:.3g} on the {a['tiles']} check tiles, "
                "from either side)")
    return f"F1 {a['f1']:.4f}"


def check_score(card) -> float:
    """The score at which faster precisions are compared with fp32: the operating point (the
    best-F1 score at validation), else the model's output threshold."""
    if card.operating_point is not None:
        return float(card.operating_point)
    return float(card.model.score_threshold)


def run_tiles(detector, tiles: Sequence[np.ndarray], batch_size: int) -> list[dict]:
    out = []
    for s in range(0, len(tiles), batch_size):
        batch = torch.from_numpy(np.stack(tiles[s : s + batch_size]).astype(np.float32))
        with torch.inference_mode():
            out.extend({k: v.float().cpu().numpy() if k != "labels" else v.cpu().numpy() for k, v in d.items()}
                       for d in detector(batch))
    return out


def sample_tiles(scene, settings: DetectSettings, card, n: int, warn: bool = True) -> list[np.ndarray]:
    """Up to ``n`` tiles with valid pixels, spread evenly over ``scene`` (a path or Scene),
    read with the job's bands, GSD and scaling (``warn``: ``open_scene``'s; off for a job's
    scene, which detection opens again)."""
    from ..io.scene import gdal_env
    from .reader import open_scene, scene_grid

    sc = open_scene(scene, settings, card, warn=warn)
    try:
        grid = scene_grid(sc, settings)
        order = np.unique(np.linspace(0, len(grid) - 1, min(len(grid), 3 * n)).round().astype(int))
        tiles = []
        with gdal_env():
            for i in order:
                try:
                    data, frac = sc.read_tile(grid.tile(int(i)))
                except GeodetError:  # an unreadable tile of a damaged scene: the check uses others
                    continue
                if frac > max(0.5, settings.min_valid_fraction):
                    tiles.append(data)
                if len(tiles) >= n:
                    break
        return tiles
    finally:
        if sc is not scene:
            sc.close()


def split_by_content(reference: list[dict], min_score: float) -> tuple[list[int], list[int]]:
    """Tile indices sorted by how many objects fp32 finds, dealt alternately into a calibration
    and a check set, so both hold busy and empty tiles alike."""
    counts = [int((r["scores"] >= min_score).sum()) for r in reference]
    order = sorted(range(len(reference)), key=lambda i: -counts[i])
    return order[0::2], order[1::2]


def bf16_agreement(model, tiles, s: DetectSettings) -> dict:
    """bf16 against fp32 on ``tiles``, both torch on the CPU."""
    cpu = torch.device("cpu")
    ref = run_tiles(TorchDetector(model, cpu, s, "fp32"), tiles, s.batch_size)
    cand = run_tiles(TorchDetector(model, cpu, s, "bf16"), tiles, s.batch_size)
    return agreement(ref, cand, check_score(model.card))
