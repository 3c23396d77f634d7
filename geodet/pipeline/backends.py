"""Detection backends: the torch model (fp32, bf16 autocast on CPUs with native bf16, fp16
autocast on CUDA) and ONNX Runtime (fp32, int8), all behind the detector protocol, plus the
checks that vouch for a faster precision and the choice of the default path.

The default on a CPU (``backend=auto, precision=auto``) is the fastest path whose accuracy is
vouched for, in this order: ONNX int8 (a check stored in the ``.onnx`` file, or made on the spot
against fp32 on tiles of the job's first scene, the quantized model then cached), torch bf16 (only
where the CPU has native bf16; checked the same way), ONNX fp32 (exact by construction, checked
at export), torch fp32. The report says which ran and why.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import GeodetError
from .settings import DetectSettings

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
# on-the-spot int8 (export, calibration, check: ~10 s once per model) only for jobs this large
AUTO_INT8_MIN_TILES = 200
AUTO_ONNX_MIN_TILES = 16  # an fp32 export (~1-2 s) pays off from about this many tiles
CHECK_TILES = 16  # tiles for an on-the-spot check (and as many again to calibrate int8)
BF16_MIN_AGREEMENT = 0.95  # detection F1 of bf16 against fp32 at the operating point


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
    runs the network core under autocast of that type; boxes are decoded in float32."""

    backend = "torch"

    def __init__(self, model, device: torch.device, settings: DetectSettings, precision: str = "fp32"):
        self.card = model.card
        self.source = getattr(model, "source", None)
        on_device = next(model.parameters()).device == device
        if model.training or not on_device:
            model = copy.deepcopy(model).eval().to(device)
            if device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.precision = precision
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.kw = dict(score_threshold=settings.score_threshold, nms_iou=settings.nms_iou,
                       detections_per_tile=settings.detections_per_tile)
        self.timings: dict = {}

    def __call__(self, batch):
        return self.model.predict(batch, autocast_dtype=self.autocast_dtype, timings=self.timings, **self.kw)


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
        from ..model.onnx import padded_input

        t0 = time.perf_counter()
        arr = batch.detach().cpu().float().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch, np.float32)
        h, w = arr.shape[-2:]
        x = padded_input(arr, self.card.mean)
        cls_logits, bbox_regression = self.onnx.core(x)
        t1 = time.perf_counter()
        dets = self.decoder(torch.from_numpy(cls_logits), torch.from_numpy(bbox_regression), x.shape[-2:],
                            [(h, w)] * len(arr), *self.args)
        self.timings["core"] = self.timings.get("core", 0.0) + t1 - t0
        self.timings["decode"] = self.timings.get("decode", 0.0) + time.perf_counter() - t1
        return dets


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


def sample_tiles(scene, settings: DetectSettings, card, n: int) -> list[np.ndarray]:
    """Up to ``n`` tiles with valid pixels, spread evenly over ``scene`` (a path or Scene),
    read with the job's bands, GSD and scaling."""
    from ..io.scene import gdal_env
    from .detect import open_scene
    from .grid import TileGrid, overlap_pixels

    sc = open_scene(scene, settings, card)
    try:
        overlap = overlap_pixels(settings.overlap_m, sc.pixel_gsd) if settings.overlap_m is not None else settings.overlap
        grid = TileGrid(sc.width, sc.height, settings.tile_size, overlap)
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


# ---------------------------------------------------------------------------------------------
# the cache of derived models


def cache_dir() -> Path:
    """``$GEODET_CACHE``, else ``$XDG_CACHE_HOME/geodet``, else ``~/.cache/geodet``."""
    if os.environ.get("GEODET_CACHE"):
        return Path(os.environ["GEODET_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "geodet"


# Raised whenever derived models change while geodet's version does not, so caches are remade
# (2: int8 keeps the nodes after the float output convs in float too).
DERIVATION = 2


def cache_key(sha256: str, precision: str, card) -> str:
    """Derived models are keyed by the source file's hash, the precision, this geodet and the
    way models are derived (``DERIVATION``)."""
    from .. import __version__

    h = hashlib.sha256(json.dumps([sha256, precision, __version__, card.tile_size, DERIVATION],
                                  sort_keys=True).encode()).hexdigest()
    return f"{sha256[:16]}-{precision}-{h[:8]}"


@dataclass
class Choice:
    """Which backend and precision run, and why (the report carries it)."""

    backend: str
    precision: str
    reason: str
    checks: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"backend": self.backend, "precision": self.precision, "reason": self.reason, "checks": self.checks}


# ---------------------------------------------------------------------------------------------
# choosing the backend


def choose_detector(detector, device: torch.device, settings: DetectSettings, scene=None, n_tiles: int = 0):
    """The detector that runs: a geodet model or ONNX model becomes a Torch/OnnxDetector with the
    backend and precision of ``settings`` (``auto``: see the module doc), with a ``choice``
    attribute saying what and why; any other callable is used as it is. ``scene`` (the job's
    first scene) and ``n_tiles`` (the job's tiles) let ``auto`` check and pay for faster paths."""
    from ..model.onnx import OnnxModel

    if isinstance(detector, (TorchDetector, OnnxDetector)):
        return detector
    backend, precision = settings.backend, settings.precision
    if backend not in BACKENDS:
        raise GeodetError(f"unknown backend '{backend}': use {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise GeodetError(f"unknown precision '{precision}': use {', '.join(PRECISIONS)}")
    if isinstance(detector, OnnxModel):
        if backend == "torch":
            raise GeodetError("an .onnx model runs on the onnx backend: drop --backend torch, or give the model.pt")
        if precision not in ("auto", detector.precision):
            raise GeodetError(f"this .onnx file is {detector.precision}; for {precision} export the model.pt again "
                              f"({'geodet export MODEL.pt -o OUT.onnx --int8 --calibrate SCENE' if precision == 'int8' else 'or run the model.pt'})")
        det = OnnxDetector(detector, settings)
        det.choice = Choice("onnx", detector.precision, "the model is an ONNX file", {"export": detector.props.get("check")})
        return det
    if not (isinstance(detector, torch.nn.Module) and hasattr(detector, "predict")):
        return detector
    choice, onnx_model = _decide(detector, device, settings, scene, n_tiles)
    if onnx_model is not None:
        det = OnnxDetector(onnx_model, settings)
    else:
        det = TorchDetector(detector, device, settings, choice.precision)
    det.choice = choice
    return det


def _decide(model, device: torch.device, s: DetectSettings, scene, n_tiles: int):
    """``(Choice, the ONNX model to run or None)``."""
    backend, precision = s.backend, s.precision
    feats = cpu_features() if device.type == "cpu" else {}
    if device.type == "cuda":
        if backend == "onnx" or precision == "int8":
            raise GeodetError("the onnx backend and int8 run on the CPU: add --device cpu, or use --backend torch on CUDA")
        p = "fp16" if precision == "auto" else precision
        return Choice("torch", p, "CUDA: fp16 autocast" if precision == "auto" else "asked for"), None
    if precision == "fp16":
        raise GeodetError("fp16 is for CUDA; on a CPU use --precision fp32, bf16 (CPUs with native bf16) or int8")
    if precision == "bf16":
        if backend == "onnx":
            raise GeodetError("the onnx backend runs fp32 or int8: use --backend torch for bf16")
        if not feats["bf16"]:
            raise GeodetError(f"this CPU ({feats['isa']}) has no native bf16 (AVX512_BF16 or AMX), and geodet does not "
                              "emulate it: use --precision fp32 or int8")
        return Choice("torch", "bf16", "asked for"), None
    if backend == "torch" and precision == "int8":
        raise GeodetError("int8 runs on the onnx backend: use --backend onnx (or auto) with --precision int8")
    source = getattr(model, "source", None) or {}
    wants_onnx = backend == "onnx" or precision == "int8"
    if wants_onnx and not has_onnxruntime():
        raise GeodetError("the onnx backend needs onnxruntime and onnx: pip install onnxruntime onnx")
    if backend == "auto" and precision == "auto" and not source.get("sha256"):
        return Choice("torch", "fp32", "a model not loaded from a file (the faster paths are cached by file hash)"), None
    checks: dict = {}
    # int8 first: the fastest when vouched for
    if precision in ("auto", "int8") and backend in ("auto", "onnx") and has_onnxruntime():
        explicit = precision == "int8"
        m, how = _derived_onnx(model, s, "int8", scene, checks, on_the_spot=explicit or n_tiles >= AUTO_INT8_MIN_TILES,
                               explicit=explicit)
        if m is not None:
            return Choice("onnx", "int8", f"int8 vouched for by its export check ({how})", checks), m
        if explicit:
            raise GeodetError("int8 was asked for but no int8 model could be checked: give a scene, or export one "
                              "with 'geodet export MODEL.pt -o OUT.onnx --int8 --calibrate SCENE'")
    if precision in ("auto", "bf16") and backend in ("auto", "torch") and feats.get("bf16"):
        check = _bf16_check(model, s, scene)
        checks["bf16"] = check
        if check is not None and conclusive(check) and check["f1"] >= BF16_MIN_AGREEMENT:
            return Choice("torch", "bf16", "native bf16 on this CPU, vouched for by a check against fp32", checks), None
    if precision in ("auto", "fp32") and backend in ("auto", "onnx") and has_onnxruntime() and (
            backend == "onnx" or n_tiles >= AUTO_ONNX_MIN_TILES):
        m, how = _derived_onnx(model, s, "fp32", scene, checks, on_the_spot=True, explicit=backend == "onnx")
        if m is not None:
            return Choice("onnx", "fp32", f"ONNX Runtime fp32 (same detections as torch, checked at export; {how})",
                          checks), m
    why = "asked for" if backend == "torch" and precision == "fp32" else "no faster path is vouched for here"
    if backend == "auto" and n_tiles < AUTO_ONNX_MIN_TILES:
        why = f"a small job ({n_tiles} tiles): a faster backend would not pay for its set-up"
    return Choice("torch", "fp32", why, checks), None


def _derived_onnx(model, s: DetectSettings, precision: str, scene, checks: dict, on_the_spot: bool, explicit: bool):
    """The cached ONNX model (fp32 or int8) derived from ``model``'s file, made and checked on
    the spot (tiles of ``scene``) when missing and ``on_the_spot``, and where it came from;
    ``(None, None)`` when not vouched for. The check's figures go into ``checks[precision]``."""
    from ..model.onnx import load_onnx
    from .export import build_onnx, calibration_tiles

    sha = model.source["sha256"]
    folder = cache_dir() / "models"
    key = cache_key(sha, precision, model.card)
    path, failed = folder / f"{key}.onnx", folder / f"{key}.failed.json"
    if path.is_file():
        try:
            m = load_onnx(path)
            checks[precision] = (m.props.get("check") or {}).get(precision if precision == "int8" else "fp32")
            return m, f"cached: {path}"
        except GeodetError as exc:
            log.warning("ignoring a damaged cached model %s (%s)", path, exc)
    if failed.is_file() and not explicit:
        checks[precision] = json.loads(failed.read_text())
        return None, None
    if not on_the_spot or (scene is None and precision == "int8"):
        return None, None
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        if precision == "int8":
            calib, check, ref, names = calibration_tiles(model, [scene], CHECK_TILES, s)
        else:
            calib, ref, names = [], None, []
            check = sample_tiles(scene, s, model.card, 4) if scene is not None else []
            if not check:
                size = model.card.tile_size
                rng = np.random.default_rng(0)
                check = [rng.random((model.card.n_bands, size, size), dtype=np.float32) for _ in range(2)]
        meta = {"calibration": {"scenes": names, "tiles": len(calib), "method": "minmax", "per_channel": True,
                                "format": "QDQ"} if precision == "int8" else None,
                "made_on_the_spot": True}
        result = build_onnx(model, path, precision, calib, check, s, extra_meta=meta, reference=ref)
    except GeodetError as exc:
        record = {"passed": False, "reason": str(exc)}
        failed.write_text(json.dumps(record))
        checks[precision] = record
        if explicit:
            raise
        log.info("%s not vouched for: %s", precision, exc)
        return None, None
    log.info("made a checked %s ONNX model in %.1f s, cached at %s", precision, time.perf_counter() - t0, path)
    checks[precision] = result.get(precision if precision == "int8" else "fp32")
    where = Path(str(getattr(scene, "path", scene))).name if scene is not None else "noise"
    return load_onnx(path), f"made and checked on tiles of {where}, cached at {path}"


def _bf16_check(model, s: DetectSettings, scene) -> dict | None:
    """bf16 against fp32: the check stored in the card (training wrote it), else one made now on
    tiles of ``scene``; None when neither is possible."""
    stored = (model.card.extra.get("checks") or {}).get("bf16")
    if stored and conclusive(stored):
        return {**stored, "from": "model card"}
    sha = (getattr(model, "source", None) or {}).get("sha256")
    if sha in _BF16_CHECKS:  # one check per model file in a process, not one per scene
        return _BF16_CHECKS[sha]
    if scene is None:
        return None
    tiles = sample_tiles(scene, s, model.card, CHECK_TILES)
    if not tiles:
        return None
    result = bf16_agreement(model, tiles, s)
    if sha:
        _BF16_CHECKS[sha] = result
    return result


_BF16_CHECKS: dict = {}


def bf16_agreement(model, tiles, s: DetectSettings) -> dict:
    cpu = torch.device("cpu")
    ref = run_tiles(TorchDetector(model, cpu, s, "fp32"), tiles, s.batch_size)
    cand = run_tiles(TorchDetector(model, cpu, s, "bf16"), tiles, s.batch_size)
    return agreement(ref, cand, check_score(model.card))
