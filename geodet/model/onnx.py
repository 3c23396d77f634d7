"""ONNX models: the network core exported with its card, run by ONNX Runtime, optionally int8.

What is exported is the core only (band normalisation, backbone, FPN, both subnets) with a
dynamic batch; anchors, box decoding and NMS stay in torch and are the very code the torch
model runs (``decode.Decoder``), so an fp32 ONNX model gives the torch model's detections.

An exported file carries the whole model card and its provenance in ONNX ``metadata_props``
(``geodet.*`` keys), so it is as self-describing as a geodet ``.pt``. Loading one runs no
Python from the file; files without geodet metadata, with another metadata version, or whose
input does not match the card are refused.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import GeodetError
from .card import ModelCard

log = logging.getLogger(__name__)

ONNX_FORMAT = "geodet-onnx"
ONNX_VERSION = 1
OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAMES = ("cls_logits", "bbox_regression")
# the output convs of both subnets: int8 there moves scores and boxes most, so they stay float
FLOAT_NODE_PATTERNS = ("cls_logits", "bbox_reg")
# export check: largest allowed logit difference of ONNX fp32 against torch, relative to the
# logit's size with a floor of 1 (so absolute for every logit that can become a detection; a
# logit of -137, a score of 1e-60, may differ by 1.4e-2 in the last bits of float32 sums)
FP32_MAX_DIFF = 1e-4
INT8_MIN_AGREEMENT = 0.95  # export check: detection F1 of int8 against fp32 at the operating point


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise GeodetError("the ONNX backend needs onnxruntime: pip install onnxruntime (geodet's own install "
                          "includes it)") from None
    return onnxruntime


class ExportCore(nn.Module):
    """The exported graph: ``(x - mean) / std`` per band, then the network core."""

    def __init__(self, model):
        super().__init__()
        self.net = model.net
        c = model.card.n_bands
        self.register_buffer("mean", torch.tensor(model.card.mean, dtype=torch.float32).view(c, 1, 1))
        self.register_buffer("std", torch.tensor(model.card.std, dtype=torch.float32).view(c, 1, 1))

    def forward(self, x):
        return self.net.core((x - self.mean) / self.std)


def export_core(model, path: str | Path, tile_size: int | None = None) -> None:
    """Write the fp32 core of ``model`` to ``path`` (no metadata yet): input ``images``
    ``[batch, C, H, W]`` with batch, H and W dynamic (H and W multiples of 32)."""
    import warnings

    card = model.card
    if card.model.resize_min_size:
        raise GeodetError("models that resize tiles (model.resize_min_size) cannot be exported: they exist only for "
                          "comparisons with torchvision's stock settings")
    size = int(tile_size or card.tile_size)
    size = -(-size // 32) * 32
    core = ExportCore(model).eval().cpu()
    x = torch.rand(2, card.n_bands, size, size)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            core, (x,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), opset_version=OPSET,
            dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                          OUTPUT_NAMES[0]: {0: "batch", 1: "anchors"}, OUTPUT_NAMES[1]: {0: "batch", 1: "anchors"}},
            dynamo=False,
        )


def _downstream(graph, names: Sequence[str]) -> list[str]:
    """The nodes fed, directly or not, by the nodes ``names``: the reshapes and concatenations
    between the float output convs and the graph outputs, which would otherwise round the
    logits and box deltas to uint8 steps again on their way out."""
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    by_name = {n.name: n for n in graph.node}
    seen: set[str] = set(names)
    out: list[str] = []
    todo = [by_name[n] for n in names if n in by_name]
    while todo:
        node = todo.pop()
        for o in node.output:
            for c in consumers.get(o, []):
                if c.name and c.name not in seen:
                    seen.add(c.name)
                    out.append(c.name)
                    todo.append(c)
    return out


def quantize_int8(fp32_path: str | Path, out_path: str | Path, batches: Sequence[np.ndarray], method: str = "minmax",
                  float_patterns: Sequence[str] = FLOAT_NODE_PATTERNS) -> list[str]:
    """Static int8 quantization (QDQ, per-channel weights, uint8 activations) calibrated on
    ``batches`` (normalised-input-ready float arrays ``[B, C, H, W]``). The output convs of
    both subnets stay float, and so does every node between them and the graph outputs.
    Returns the names of the convs kept in float."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{INPUT_NAME: b.astype(np.float32)} for b in batches])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory(prefix="geodet-quant-") as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        try:
            quant_pre_process(str(fp32_path), pre, skip_symbolic_shape=True)
        except Exception as exc:  # pre-processing is an optimisation; quantize the plain graph if it fails
            log.debug("quant_pre_process failed (%s); quantizing the exported graph as it is", exc)
            pre = str(fp32_path)
        graph = onnx.load(pre).graph
        keep_float = [n.name for n in graph.node if n.op_type == "Conv" and any(p in n.name for p in float_patterns)]
        # Without the nodes after them, the logits would still be rounded to uint8 steps (0.1 logit
        # here) on their way out: 20% more detections and AP50 0.016 lower on the 4096^2 scene.
        excluded = keep_float + _downstream(graph, keep_float)
        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.WARNING))  # the quantizer logs every bias copy on the root logger
        try:
            quantize_static(pre, str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                              "percentile": CalibrationMethod.Percentile}[method])
        finally:
            root.setLevel(level)
    return keep_float


def graph_sha256(model_proto) -> str:
    """The SHA-256 of an ONNX model's graph (nodes and weights; not its metadata): stored in the
    metadata at export and checked at load, so a file damaged on disk or in a copy is refused
    rather than run (ONNX Runtime reads damaged weights without a word)."""
    import hashlib

    return hashlib.sha256(model_proto.graph.SerializeToString()).hexdigest()


METADATA_DIGEST = "metadata_sha256"


def metadata_sha256(meta: dict) -> str:
    """The SHA-256 of a file's ``geodet.*`` metadata (the card, precision, checks) but its own
    digest: a card damaged on disk would change every detection without a word."""
    import hashlib

    text = "\n".join(f"{k}={v}" for k, v in sorted(meta.items())
                     if k.startswith("geodet.") and k != f"geodet.{METADATA_DIGEST}")
    return hashlib.sha256(text.encode()).hexdigest()


def write_metadata(path: str | Path, card: ModelCard, props: dict) -> None:
    """Store the card and ``props`` (JSON-able) as ``geodet.*`` metadata_props, in place, with the
    graph's digest (``graph_sha256``)."""
    import onnx

    m = onnx.load(str(path))
    del m.metadata_props[:]
    entries = {"geodet.format": ONNX_FORMAT, "geodet.version": str(ONNX_VERSION), "geodet.card": json.dumps(card.to_dict()),
               "geodet.graph_sha256": json.dumps(graph_sha256(m))}
    entries.update({f"geodet.{k}": json.dumps(v) for k, v in props.items() if k not in ("graph_sha256", METADATA_DIGEST)})
    entries[f"geodet.{METADATA_DIGEST}"] = json.dumps(metadata_sha256(entries))
    for k, v in entries.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    m.producer_name = "geodet"
    onnx.save(m, str(path))


def read_metadata(meta: dict, source: str) -> tuple[ModelCard, dict]:
    """The card and the other ``geodet.*`` properties of an ONNX file's metadata, checked."""
    if meta.get("geodet.format") != ONNX_FORMAT:
        raise GeodetError(f"{source}: an ONNX file without geodet metadata: export geodet models with 'geodet export "
                          "MODEL.pt -o MODEL.onnx'; other ONNX models cannot be run by geodet")
    if meta.get("geodet.version") != str(ONNX_VERSION):
        raise GeodetError(f"{source}: geodet ONNX metadata version {meta.get('geodet.version')!r} is not supported by "
                          f"this geodet (it reads version {ONNX_VERSION}): re-export the model with this geodet")
    digest = meta.get(f"geodet.{METADATA_DIGEST}")  # (files exported before it have none)
    if digest is not None and digest != json.dumps(metadata_sha256(meta)):
        raise GeodetError(f"{source}: the model's card (its settings: bands, resolution, classes, thresholds) is "
                          "damaged or was changed by another tool: copy the file again, or export the model again")
    try:
        card = ModelCard.from_dict(json.loads(meta["geodet.card"]), source=f"{source} card")
        props = {k[len("geodet."):]: json.loads(v) for k, v in meta.items()
                 if k.startswith("geodet.") and k not in ("geodet.format", "geodet.version", "geodet.card",
                                                          f"geodet.{METADATA_DIGEST}")}
    except (KeyError, ValueError) as exc:
        raise GeodetError(f"{source}: damaged geodet metadata ({exc}): re-export the model") from None
    return card, props


def session_options(threads: int | None = None):
    ort = require_onnxruntime()
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # no busy-waiting threads between runs: geodet's decode, NMS and reads run on the same cores
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


@dataclass
class OnnxModel:
    """A loaded geodet ONNX file: its session, card, precision and provenance."""

    session: object
    card: ModelCard
    precision: str
    props: dict = field(default_factory=dict)
    source: dict | None = None

    def core(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cls_logits, bbox_regression = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return cls_logits, bbox_regression


def load_onnx(path: str | Path, threads: int | None = None) -> OnnxModel:
    """Load a geodet ONNX file (no Python from the file runs) and check it against its card."""
    from ..hashing import file_sha256

    ort = require_onnxruntime()
    p = Path(path)
    if not p.is_file():
        raise GeodetError(f"model file not found: {path}")
    try:
        session = ort.InferenceSession(str(p), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise GeodetError(f"{path}: not a readable ONNX model ({first})") from None
    card, props = read_metadata(dict(session.get_modelmeta().custom_metadata_map), str(path))
    if props.get("graph_sha256") is not None:  # files exported before the digest have none
        import onnx

        if graph_sha256(onnx.load(str(p))) != props["graph_sha256"]:
            raise GeodetError(f"{path}: the ONNX graph is damaged or was changed by another tool (it no longer matches "
                              "the digest geodet export wrote): copy the file again, or export the model again")
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or len(inputs[0].shape) != 4:
        raise GeodetError(f"{path}: the ONNX graph's input is not the geodet core input '{INPUT_NAME}' [batch, bands, H, W]")
    channels = inputs[0].shape[1]
    if isinstance(channels, int) and channels != card.n_bands:
        raise GeodetError(f"{path}: the ONNX graph takes {channels} band(s) but its card says {card.n_bands}: the file "
                          "was altered; re-export it")
    if [o.name for o in session.get_outputs()] != list(OUTPUT_NAMES):
        raise GeodetError(f"{path}: the ONNX graph's outputs are not the geodet core outputs {list(OUTPUT_NAMES)}")
    if card.extra.get("pretrain_only"):
        raise GeodetError(f"{path} holds a pretrained backbone (geodet pretrain), not a detector: train it on labels "
                          "first (geodet train --init), then export the trained model")
    precision = props.get("precision", "fp32")
    return OnnxModel(session, card, precision, props, {"path": str(path), "sha256": file_sha256(path),
                                                       "source_sha256": props.get("source_sha256")})


def decoder_for(card: ModelCard):
    """The torch model's postprocess (anchors, box coder, NMS) for a card, without weights."""
    from torchvision.models.detection import _utils as det_utils

    from .matching import anchor_generator
    from .decode import Decoder

    return Decoder(anchor_generator(card.model), det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)), card.model.levels)


def padded_input(batch: np.ndarray, mean: Sequence[float], multiple: int = 32) -> np.ndarray:
    """``batch`` padded right and below to a multiple of ``multiple``, with each band's mean (so
    the padding is exactly 0 after normalisation, as torchvision pads after normalising)."""
    b, c, h, w = batch.shape
    hp, wp = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    if (hp, wp) == (h, w):
        return np.ascontiguousarray(batch, dtype=np.float32)
    out = np.empty((b, c, hp, wp), np.float32)
    out[:] = np.asarray(mean, np.float32)[None, :, None, None]
    out[:, :, :h, :w] = batch
    return out


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
