"""Which backend and precision run, and the ONNX models made on the spot for them.

The default on a CPU (``backend=auto, precision=auto``) is the fastest path whose accuracy is
vouched for, in this order: ONNX int8 (a check stored in the ``.onnx`` file, or made on the spot
against fp32 on tiles of the job's first scene, the quantized model then cached), torch bf16 (only
where the CPU has native bf16; checked the same way), ONNX fp32 (exact by construction, checked
at export), torch fp32. The report says which ran and why.

The choice belongs to the job that runs a detector, above the per-tile loop (``detect.py``),
which takes whatever detector it is given. An int8 model made here is calibrated on some tiles of
the first scene and checked on others (``convert.calibration_tiles``), never on the same tile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..errors import GeodetError, brief
from .backends import (OnnxDetector, TorchDetector, bf16_agreement, conclusive, cpu_features, has_onnxruntime,
                       sample_tiles)
from .settings import DetectSettings

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
# on-the-spot int8 (export, calibration, check: ~10 s once per model) only for jobs this large
AUTO_INT8_MIN_TILES = 200
AUTO_ONNX_MIN_TILES = 16  # an fp32 export (~1-2 s) pays off from about this many tiles
CHECK_TILES = 16  # tiles for an on-the-spot check (and as many others to calibrate int8)
BF16_MIN_AGREEMENT = 0.95  # detection F1 of bf16 against fp32 at the operating point
INT8_SCENE_TRIES = 8  # scenes an int8 model made on the spot tries to calibrate on
NOTHING_TO_RUN = object()  # int8 asked for on scenes without a valid pixel: no tile runs


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


@dataclass
class JobChoice:
    """A backend chosen once for a whole job of CPU workers (on the Ray driver) that each worker
    applies: the ``Choice`` and, where it runs an ONNX model derived on the spot (which a worker
    on another machine has no cache for, or would calibrate on another scene), that model's
    bytes; ``digest`` names what decides the detections (the graph's digest, not the file's:
    a model made again on another driver differs only in its metadata)."""

    choice: Choice
    onnx: bytes | None = None
    digest: str = ""

    @classmethod
    def of(cls, runner, model) -> "JobChoice | None":
        """The choice ``runner`` (from ``choose_detector``) made for ``model``; None where there was
        none to make (a plain callable, an ONNX file: every worker runs it as it is)."""
        choice = getattr(runner, "choice", None)
        if choice is None or not (isinstance(model, torch.nn.Module) and hasattr(model, "predict")):
            return None
        if isinstance(runner, OnnxDetector):
            data = Path(runner.onnx.source["path"]).read_bytes()
            digest = runner.onnx.props.get("graph_sha256") or hashlib.sha256(data).hexdigest()
            return cls(choice, data, digest)
        return cls(choice)

    def detector(self, model, settings: DetectSettings):
        """``model`` ready to run as chosen, on this worker's CPU. bf16 chosen on a driver with
        native bf16 runs as fp32 on a worker without it (never emulated; fp32 is what bf16 was
        checked against), and the choice says so."""
        from ..model.onnx import load_onnx

        choice = self.choice
        if self.onnx is not None:
            with tempfile.TemporaryDirectory(prefix="geodet-onnx-") as tmp:
                path = Path(tmp) / "chosen.onnx"
                path.write_bytes(self.onnx)
                det = OnnxDetector(load_onnx(path), settings)  # the session holds the graph: the file can go
        else:
            if choice.precision == "bf16" and not cpu_features()["bf16"]:
                choice = Choice("torch", "fp32", "bf16 was chosen for the job, but this worker's CPU has no native "
                                "bf16: fp32, which bf16 was checked against", choice.checks)
            det = TorchDetector(model, torch.device("cpu"), settings, choice.precision)
        det.choice = choice
        return det


# ---------------------------------------------------------------------------------------------
# choosing the backend


def choose_detector(detector, device: torch.device, settings: DetectSettings, scene=None, n_tiles: int = 0,
                    more_scenes: Sequence = ()):
    """The detector that runs: a geodet model or ONNX model becomes a Torch/OnnxDetector with the
    backend and precision of ``settings`` (``auto``: see the module doc), with a ``choice``
    attribute saying what and why; any other callable is used as it is. ``scene`` (the job's
    first scene) and ``n_tiles`` (the job's tiles) let ``auto`` check and pay for faster paths;
    an int8 model made on the spot is calibrated on the first of ``scene`` and ``more_scenes``
    (the job's other scenes, paths) with enough tiles holding data."""
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
            how = {"int8": "export the model.pt again (geodet export -m MODEL.pt -o OUT.onnx --int8 --calibrate SCENE)",
                   "fp32": "export the model.pt again without --int8, or run the model.pt"}.get(
                precision, "run the model.pt it came from (an ONNX file holds fp32 or int8)")
            raise GeodetError(f"this .onnx file is {detector.precision}; for {precision} {how}")
        det = OnnxDetector(detector, settings)
        det.choice = Choice("onnx", detector.precision, "the model is an ONNX file", {"export": detector.props.get("check")})
        return det
    if not (isinstance(detector, torch.nn.Module) and hasattr(detector, "predict")):
        return detector
    choice, onnx_model = _decide(detector, device, settings, [scene, *more_scenes] if scene is not None else [],
                                 n_tiles)
    if onnx_model is not None:
        det = OnnxDetector(onnx_model, settings)
    else:
        det = TorchDetector(detector, device, settings, choice.precision)
    det.choice = choice
    return det


def _decide(model, device: torch.device, s: DetectSettings, scenes: list, n_tiles: int):
    """``(Choice, the ONNX model to run or None)``; ``scenes``: the job's, the first open."""
    scene = scenes[0] if scenes else None
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
    if wants_onnx and not source.get("sha256"):
        raise GeodetError("the onnx backend and int8 run models derived from a model file (cached by its hash), and "
                          "this model was not loaded from one (or was changed since, as by test-time augmentation or "
                          "batch-norm adaptation): save and load it, or use --backend torch")
    if backend == "auto" and precision == "auto" and not source.get("sha256"):
        return Choice("torch", "fp32", "the model is not a model file's network as loaded (test-time augmentation, "
                      "batch-norm adaptation, or built in Python), and the faster paths are derived from model files; "
                      "--precision bf16 runs it in bf16 where the CPU has it"), None
    checks: dict = {}
    # int8 first: the fastest when vouched for
    # (a small job never runs int8 unasked, even where an earlier int8 run cached one: the same command
    # gives the same detections whatever the cache holds)
    if precision in ("auto", "int8") and backend in ("auto", "onnx") and has_onnxruntime() and (
            precision == "int8" or n_tiles >= AUTO_INT8_MIN_TILES):
        explicit = precision == "int8"
        m, how = _derived_onnx(model, s, "int8", scenes, checks, on_the_spot=True, explicit=explicit)
        if m is NOTHING_TO_RUN:
            return Choice("torch", "fp32", "int8 was asked for, but no scene of the job holds a valid pixel to "
                          "calibrate it on: no tile runs, so nothing needed int8", checks), None
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
        m, how = _derived_onnx(model, s, "fp32", scenes, checks, on_the_spot=True, explicit=backend == "onnx")
        if m is not None:
            return Choice("onnx", "fp32", f"ONNX Runtime fp32 (same detections as torch, checked at export; {how})",
                          checks), m
    why = "asked for" if backend == "torch" and precision == "fp32" else "no faster path is vouched for here"
    if backend == "auto" and n_tiles < AUTO_ONNX_MIN_TILES:
        why = f"a small job ({n_tiles} tiles): a faster backend would not pay for its set-up"
    return Choice("torch", "fp32", why, checks), None


def _derived_onnx(model, s: DetectSettings, precision: str, scenes: list, checks: dict, on_the_spot: bool,
                  explicit: bool):
    """The cached ONNX model (fp32 or int8) derived from ``model``'s file, made and checked on
    the spot (tiles of ``scenes``) when missing and ``on_the_spot``, and where it came from;
    ``(None, None)`` when not vouched for, ``(NOTHING_TO_RUN, None)`` when int8 was asked for
    and no scene holds data. The check's figures go into ``checks[precision]``."""
    from ..model.onnx import load_onnx

    sha = model.source["sha256"]
    key = cache_key(sha, precision, model.card)
    # the cache, then this run's temporary folder where the cache could not be written
    for folder in [cache_dir() / "models", *([_TEMP_CACHE] if _TEMP_CACHE is not None else [])]:
        path, failed = folder / f"{key}.onnx", folder / f"{key}.failed.json"
        if path.is_file():
            try:
                m = load_onnx(path)
                checks[precision] = (m.props.get("check") or {}).get(precision if precision == "int8" else "fp32")
                made_on = ((m.props.get("calibration") or {}).get("scenes") or [None])[0]
                first = Path(str(getattr(scenes[0], "path", scenes[0]))).name if scenes else None
                if precision == "int8" and made_on and first and Path(str(made_on)).name != first:
                    log.info("int8: the cached model calibrated on %s runs (%s)", made_on, path)
                return m, f"cached: {path}" + (f", calibrated on {made_on}" if precision == "int8" and made_on else "")
            except GeodetError as exc:
                log.warning("ignoring a damaged cached model %s (%s)", path, exc)
        record = _failed_record(failed) if not explicit else None
        if record is not None:
            checks[precision] = record
            return None, None
    if not on_the_spot or (not scenes and precision == "int8"):
        return None, None
    tiles = _spot_tiles(model, s, precision, scenes, explicit)
    if tiles is None or tiles is NOTHING_TO_RUN:
        return tiles, None
    calib, check, ref, where = tiles
    folder = _writable_models_folder()
    path, failed = folder / f"{key}.onnx", folder / f"{key}.failed.json"
    t0 = time.perf_counter()
    try:
        from .convert import build_onnx

        meta = {"calibration": {"scenes": [where], "tiles": len(calib), "method": "minmax", "per_channel": True,
                                "format": "QDQ"} if precision == "int8" else None,
                "check_tiles_from": where, "made_on_the_spot": True}
        result = build_onnx(model, path, precision, calib, check, s, extra_meta=meta, reference=ref)
    except OSError as exc:  # a full disk, a quota: the torch model runs instead, unless ONNX was asked for
        from ..errors import brief

        said = f"the {precision} ONNX model could not be written in {folder} ({brief(exc)})"
        if explicit:
            raise GeodetError(f"{said}: free some space there, or set GEODET_CACHE to another folder") from None
        log.warning("%s: the torch model runs instead; free some space there, or set GEODET_CACHE to another folder",
                    said)
        return None, None
    except GeodetError as exc:  # the model fails its check: remembered, not retried
        from .convert import CheckInconclusive

        record = {"passed": False, "reason": str(exc)}
        if isinstance(exc, CheckInconclusive):  # these tiles could not tell: other scenes may; nothing remembered
            record["passed"] = None
        else:
            from ..io.writers import write_json

            write_json(record, failed)  # whole or not at all: a cut-short record is never read
        checks[precision] = record
        if explicit:
            raise
        log.info("%s not vouched for: %s", precision, exc)
        return None, None
    log.info("made a checked %s ONNX model in %.1f s, cached at %s", precision, time.perf_counter() - t0, path)
    checks[precision] = result.get(precision if precision == "int8" else "fp32")
    return load_onnx(path), f"made and checked on tiles of {where}, cached at {path}"


def _failed_record(failed: Path) -> dict | None:
    """The record of a check that failed (the model is then not made again), or None where there
    is none; a damaged one (cut short, edited) is ignored, so the check is made again and the
    record replaced, as a damaged cached model is."""
    try:
        text = failed.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        if not failed.exists():
            return None
        log.warning("ignoring an unreadable record of a failed check %s (%s)", failed, exc.strerror or exc)
        return None
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict) or record.get("passed") is not False:
        log.warning("ignoring a damaged record of a failed check %s: the check is made again", failed)
        return None
    if str(record.get("reason", "")).startswith("export check inconclusive"):  # (kept by earlier geodets): the
        return None  # tiles could not tell, which is no failure of the model
    return record


# where this process makes ONNX models when the cache cannot be written (removed at exit)
_TEMP_CACHE: Path | None = None


def _writable_models_folder() -> Path:
    """The cache's model folder, made where missing; where it cannot be written (a read-only home
    on a cluster or in a container, $GEODET_CACHE naming a file), a temporary folder for this
    run, said once: the model is made each run then, which is slower but gives the same
    detections."""
    global _TEMP_CACHE

    folder = cache_dir() / "models"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK | os.X_OK):
            return folder
        why = "not writable"
    except OSError as exc:
        why = exc.strerror or str(exc)
    if _TEMP_CACHE is None:
        import atexit
        import shutil

        _TEMP_CACHE = Path(tempfile.mkdtemp(prefix="geodet-models-"))
        atexit.register(shutil.rmtree, str(_TEMP_CACHE), True)
        log.warning("the model cache %s cannot be written (%s): ONNX models are made in a temporary folder for this "
                    "run and not kept; set GEODET_CACHE to a writable folder to keep them", folder, why)
    return _TEMP_CACHE


def _spot_tiles(model, s: DetectSettings, precision: str, scenes: list, explicit: bool):
    """``(calibration tiles, check tiles, fp32 detections of the check tiles or None, where they
    came from)`` for a model made on the spot: int8 calibrates on ``CHECK_TILES`` tiles of the
    first of ``scenes`` that has enough tiles holding data (unasked: of the first
    ``INT8_SCENE_TRIES``; asked for: of all, up to ``INT8_SCENE_TRIES`` holding data), and is
    checked on as many others; fp32 is checked on 4 tiles of the first scene, or of a synthetic
    scene when it has none. None (or the error, when ``explicit``) when the scenes cannot give
    them: a fault of the scenes, not of the model, so nothing is remembered; ``NOTHING_TO_RUN``
    when int8 was asked for and none of them holds a valid pixel."""
    from .convert import SYNTHETIC, calibration_tiles, synthetic_check_tiles

    scene = scenes[0] if scenes else None
    where = Path(str(getattr(scene, "path", scene))).name if scene is not None else SYNTHETIC
    if precision == "int8":
        # the first scene that gives enough tiles holding data; asked for (``explicit``), every
        # scene is looked at (up to ``INT8_SCENE_TRIES`` holding data), so the job is known empty
        # before nothing is calibrated; unasked, only the first few (a faster path, not a need)
        tried, first_exc = [], None
        for sc in scenes if explicit else scenes[:INT8_SCENE_TRIES]:
            try:
                calib, check, ref, _ = calibration_tiles(model, [sc], CHECK_TILES, s, warn=False)
                return calib, check, ref, Path(str(getattr(sc, "path", sc))).name
            except GeodetError as exc:
                if not explicit:
                    first_exc = first_exc or exc
                    continue
                if _holds_data(sc, s, model.card):
                    tried.append(sc)
                    first_exc = first_exc or exc
                    if len(tried) == INT8_SCENE_TRIES:
                        break
        if explicit and not tried:
            return NOTHING_TO_RUN
        if explicit:
            names = ", ".join(Path(str(getattr(x, "path", x))).name for x in tried[:3]) + (
                f" and {len(tried) - 3} more" if len(tried) > 3 else "")
            raise GeodetError(f"int8 is calibrated and checked on tiles of the job's scenes, and {names} gave no "
                              f"usable calibration tiles ({brief(first_exc, 120)}): export an int8 model calibrated "
                              "on other scenes ('geodet export MODEL.pt -o OUT.onnx --int8 --calibrate SCENES') and "
                              "detect with it, or use fp32") from first_exc
        log.info("int8 not made: %s", first_exc)
        return None
    check = sample_tiles(scene, s, model.card, 4, warn=False) if scene is not None else []
    if not check:
        check, where = synthetic_check_tiles(model, s, 4), SYNTHETIC
    return [], check, None, where


def _holds_data(scene, s: DetectSettings, card) -> bool:
    """Whether ``scene`` (a path or Scene) has any valid pixel; an unreadable one counts as
    holding data (it is not known to be empty)."""
    from .reader import open_scene

    try:
        sc = open_scene(scene, s, card, warn=False)
    except GeodetError:
        return True
    try:
        return sc.holds_data(exact=True)
    except Exception:  # noqa: BLE001 - a damaged file: not known to be empty
        return True
    finally:
        if sc is not scene:
            sc.close()


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
