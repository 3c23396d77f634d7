"""Detection on a Ray cluster (or a local Ray instance): the block plan of ``pipeline.blocks``
spread over an actor pool of Ray Data, with exactly the result ``detect_scene`` gives.

    detect_ray(scenes, model, out_dir, address=None, workers=2, gpus_per_worker=0, block_tiles=8)

- Every scene is planned once on the driver (``plan_scene``: its tile grid, scaling statistics
  and k x k blocks of tiles, with a fingerprint of everything that decides the result).
- The blocks go through ``ray.data.from_items(...).map_batches(BlockWorker, concurrency=N,
  num_gpus=G)``: each actor loads the model once (on its GPU when the cluster gives it one), runs
  the per-tile detection generator over its block, stitches the block's own tiles and writes
  its boxes to ``OUT/scene=<id>/part-<block>.parquet`` (GeoParquet, scene CRS): those final
  there, and the seam boxes a tile outside the block could change, deferred to the reduce. A
  ``.json`` sidecar written after it marks the part finished and carries the fingerprint. Ray
  restarts a crashed actor and retries its block; a block whose detection raised is run again in
  up to ``retries`` more rounds.
- Each scene is reduced as soon as its last block is in, by one of a few reducer actors beside
  the blocks still running (``finish_scene``: ``reduce_scene`` merges the deferred seam boxes
  with the same seam merge and puts the blocks' boxes in one process's order),
  written to ``OUT/scene=<id>/detections.parquet`` and then, last, ``_SUCCESS.json`` (model
  SHA-256, fingerprint, grid, counts, seconds).
- Every file is written to a temporary name and renamed, so a retried block cannot duplicate
  rows and a killed job leaves no partial final file. A rerun skips scenes whose
  ``_SUCCESS.json`` matches and blocks whose part matches; it runs only what is missing.

``merge_outputs(OUT, path)`` gathers the finished scenes into one file (``geodet merge``). The
files themselves (parts, markers, the final file and its reduce) are ``parts.py``'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import GeodetError
from .blocks import ScenePlan, plan_scene, prepare_detector, run_block
from .ray_resources import init_keeping_sigterm, remove_empty, check_fits, check_worker_resources
from .parts import (FINAL, SUCCESS, check_one_setting, finish_scene, part_done, read_json, remove_stale_parts,
                    scene_done, unclaimed_ids, write_json, write_part)

log = logging.getLogger(__name__)

RAY_MISSING = ("the ray engine needs Ray, which is not installed: pip install 'geodet[ray]' "
               "(or pip install 'ray[data]')")
PLAN_THREADS = 8  # scenes planned at a time on the driver


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise GeodetError(RAY_MISSING) from None
    return ray


def scene_ids(paths: Sequence, names: Sequence[str] | None = None) -> list[str]:
    """Partition names (``scene=<id>``): ``names`` (e.g. STAC item ids) or the file stems, made
    safe for a folder name; names that repeat get a short hash of their path."""
    raw = names if names is not None else [Path(str(p).rstrip("/")).stem for p in paths]
    stems = [re.sub(r"[^A-Za-z0-9._-]+", "_", str(n)) or "scene" for n in raw]
    return [f"{s}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}" if stems.count(s) > 1 else s
            for p, s in zip(paths, stems)]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


class BlockWorker:
    """A Ray Data actor: loads the model once, then runs blocks and writes their parts."""

    def __init__(self, shared: list, device=None):
        import ray

        from .model_files import load_detector_file

        # the model (a file path or an object) and the plans, put in the object store once by the
        # driver, which holds them for the whole run (so a restarted actor finds them too)
        data = ray.get(shared[0])
        model, self.plans = data["model"], data["plans"]
        self.model = load_detector_file(model) if isinstance(model, (str, Path)) else model
        self.dirs, self.device, self.chosen = [Path(d) for d in data["scene_dirs"]], device, data["chosen"]
        self.prepared = (None, None)  # (scene index, detector): blocks of a scene come together

    def detector(self, si: int):
        # chosen for the whole job, the detector serves every scene of the same settings (one
        # ONNX Runtime session per actor); else it is chosen per scene
        key = si if self.chosen is None else self.plans[si].settings
        if self.prepared[0] != key:
            self.prepared = (key, prepare_detector(self.model, self.plans[si], self.device, self.chosen))
        return self.prepared[1]

    def __call__(self, batch: dict) -> dict:
        import resource

        out = {"scene": [], "block": [], "ok": [], "error": [], "detections": [], "seconds": [], "peak_rss_mb": [],
               "backend": []}
        for si, bi in zip(batch["scene"], batch["block"]):
            si, bi = int(si), int(bi)
            t0 = time.perf_counter()
            ok, err, n, ran = True, "", 0, ""
            try:
                plan = self.plans[si]
                det = self.detector(si)
                c = getattr(det, "choice", None)
                ran = f"{c.backend} {c.precision}" if c is not None else "as given"
                result = run_block(plan, plan.blocks[bi], det, self.device)
                n = write_part(self.dirs[si], plan, result, plan.transform, plan.crs)
            except Exception as exc:  # noqa: BLE001 - reported to the driver, which retries the block
                ok, err = False, _one_line(exc)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the actor process, KiB on Linux
            for k, v in zip(out, (si, bi, ok, err, n, time.perf_counter() - t0, peak, ran)):
                out[k].append(v)
        return {k: np.asarray(v) for k, v in out.items()}


class SceneReducer:
    """A Ray actor that runs ``finish_scene`` for the scenes the driver sends it."""

    def finish(self, plan: ScenePlan, scene_dir, classes, model_sha, operating_point=None):
        return finish_scene(plan, scene_dir, classes, model_sha, operating_point)


def _run_round(ray, pending, model_arg, plans, dirs, workers, gpus_per_worker, cpus_per_worker, device, progress):
    """One pass of the actor pool over ``pending`` blocks; yields one row per block as it ends."""
    from ..progress import progress_bar

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start)  # the caller's, restored below
    ctx.enable_progress_bars = False  # geodet's own bar counts blocks
    ctx.print_on_execution_start = False
    items = [{"scene": s, "block": b} for s, b in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    kw = {"num_gpus": gpus_per_worker} if gpus_per_worker else {}
    with warnings.catch_warnings():  # Ray's deprecation notes about its own argument names
        warnings.simplefilter("ignore", DeprecationWarning)
        model_arg, chosen = model_arg
        # held until the round ends
        shared = ray.put({"model": model_arg, "chosen": chosen, "plans": plans, "scene_dirs": dirs})
        ds = _map_blocks(ds, ray, [shared], device, workers, len(items), cpus_per_worker, kw)
    try:
        with progress_bar(total=len(items), desc="blocks", unit="block", enabled=progress) as bar:
            for row in ds.iter_rows():
                bar.update(1)
                yield row
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved


def _map_blocks(ds, ray, shared, device, workers, n_items, cpus_per_worker, kw):
    """The actor pool: ``workers`` actors (at most one per block), each loading the model once;
    Ray restarts an actor that dies and retries its block. ``shared`` holds a reference to the
    model and plans (nested in a list, so the actors' constructor arguments stay small)."""
    return ds.map_batches(
        BlockWorker, fn_constructor_kwargs={"shared": shared, "device": device},
        batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=max(1, min(int(workers), n_items))),
        num_cpus=cpus_per_worker, max_restarts=2, max_task_retries=2, **kw)


def detect_ray(scenes: Sequence, model, out_dir, *, address: str | None = None, workers: int = 2,
               gpus_per_worker: float = 0, cpus_per_worker: float = 1, block_tiles: int = 8, retries: int = 2,
               device: str | None = None, ids: Sequence[str] | None = None, config=None, progress: bool = True,
               **settings) -> dict:
    """Detect over ``scenes`` on Ray and write ``out_dir`` (see the module's docstring). ``model``
    is a model file (loaded by every actor; the path must be reachable from every worker) or a
    loaded model / detector object (sent to the actors). Without ``address`` a local Ray
    instance is started (and stopped); with one, the cluster is joined. ``ids`` name the scenes'
    partitions (default: file stems; STAC item ids from ``io.stac``). Returns the job summary
    (also written to ``OUT/_job.json``); ``summary["failed_scenes"]`` lists the scenes left
    without ``_SUCCESS.json`` and why."""
    ray = require_ray()
    t_start = time.perf_counter()
    if not scenes:
        raise GeodetError("no scenes given")
    if settings.pop("tta", None) or (config is not None and config.detect.tta):
        raise GeodetError("test-time augmentation (tta) runs with the local engine only: detect_to_file / geodet "
                          "detect without --engine ray")
    check_worker_resources(workers, gpus_per_worker, cpus_per_worker)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GeodetError(f"{out} exists and is not a folder: the ray engine writes a folder of per-scene GeoParquet")
    made = [p for p in [out, *out.parents] if not p.exists()]  # removed again, empty, if the job is refused
    out.mkdir(parents=True, exist_ok=True)
    detector, model_sha, model_arg = _job_model(model)
    if ids is not None and len(ids) != len(scenes):
        raise GeodetError(f"{len(ids)} scene ids for {len(scenes)} scenes")
    # ids the user gave (STAC item ids) name their folders as they are; file stems are checked
    dirs = [str(out / f"scene={i}") for i in (scene_ids(scenes, ids) if ids is not None else
                                              unclaimed_ids(out, scenes, scene_ids(scenes)))]
    made = [Path(d) for d in dirs if not Path(d).exists()] + made
    plans, failed = plan_scenes(scenes, detector, block_tiles, config, settings)
    chosen = _job_choice(scenes, detector, plans, config, settings, device, gpus_per_worker)
    pending, done_before = _pending_blocks(plans, dirs, model_sha)
    card = getattr(detector, "card", None)
    run = _Run(plans, dirs, getattr(card, "classes", None), model_sha, pending, done_before, t_start,
               getattr(card, "operating_point", None))
    started = pending and not ray.is_initialized()
    if started:
        init_keeping_sigterm(ray, address)
    try:
        if pending:
            try:  # before any work is submitted: an actor no node can hold waits for ever
                check_fits(ray, gpus_per_worker, cpus_per_worker, own=started and not address)
            except GeodetError:
                remove_empty(made)
                raise
        run.start_reducers(ray, workers)
        for attempt in range(retries + 1):
            if not run.pending:
                break
            if attempt:
                log.warning("running %d failed block(s) again (round %d of %d)", len(run.pending), attempt + 1,
                            retries + 1)
            run.round(_run_round(ray, run.pending, (model_arg, chosen), plans, dirs, workers, gpus_per_worker,
                                 cpus_per_worker, device, progress))
        run.collect(ray, failed)
    finally:
        if started:
            ray.shutdown()
    run.unfinished(failed)
    summary = {"out": str(out), "scenes_total": len(scenes), "scenes_written": len(run.scenes_out),
               "scenes_already_done": len(done_before), "failed_scenes": failed,
               "blocks_total": sum(len(p.blocks) for p in plans if p is not None), "blocks_run": run.blocks_run,
               "seconds": round(time.perf_counter() - t_start, 2), "scenes": run.scenes_out,
               "model_sha256": model_sha, "backend": chosen.choice.to_dict() if chosen is not None else None,
               "worker_backends": run.backends,
               "worker_peak_rss_mb": round(run.peak_rss),
               **_pace(run.arrivals, run.block_seconds, workers)}
    write_json(summary, out / "_job.json")
    return summary


def _job_model(model):
    """``(the detector on the driver, the model file's SHA-256, what the actors get)``: a model
    file goes to them as its absolute path (each loads it), an object as itself."""
    from ..hashing import file_sha256
    from .model_files import load_detector_file

    is_file = isinstance(model, (str, Path))
    detector = load_detector_file(model) if is_file else model
    on_disk = is_file and Path(str(model)).is_file()
    model_sha = file_sha256(model) if on_disk else (getattr(detector, "source", None) or {}).get("sha256")
    return detector, model_sha, (str(Path(str(model)).resolve()) if on_disk else detector)


def _job_choice(scenes: Sequence, detector, plans: list, config, settings: dict, device, gpus_per_worker: float):
    """The backend one process would choose for this job (``scenes.job_detector``: checked on the
    first readable scene, for the job's tile count), made once here for CPU workers, who apply
    it as it is (``choice.JobChoice``). Left to each actor, a job of small scenes ran torch where
    one process runs ONNX, and every node calibrated its own int8 model on another scene. Each
    plan's fingerprint takes the choice, so parts of another backend are not reused. None for
    GPU workers (CUDA has one choice) and for detectors without a choice to make."""
    import dataclasses

    from .choice import JobChoice
    from .scenes import job_detector
    from .settings import resolve_detect_settings

    card = getattr(detector, "card", None)
    if card is None or gpus_per_worker or getattr(detector, "backend", None) is not None:
        return None
    s = resolve_detect_settings(card, config, **settings)
    if str(device or s.device).startswith("cuda"):
        return None
    if s.precision == "bf16":  # asked for: each worker runs it where its CPU has it natively, or refuses
        if s.backend == "onnx":  # refused on every worker: refused here, before Ray starts
            raise GeodetError("the onnx backend runs fp32 or int8: use --backend torch for bf16")
        return None
    planned = [sc for sc, p in zip(scenes, plans) if p is not None]  # as one process takes the readable ones
    if not planned:
        return None
    runner = job_detector(planned, detector, dataclasses.replace(s, device="cpu"), failures=[])
    chosen = JobChoice.of(runner, detector)
    if chosen is not None:
        for p in plans:
            if p is not None:
                key = json.dumps([p.fingerprint, chosen.choice.backend, chosen.choice.precision, chosen.digest])
                p.fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
        log.info("backend for every worker: %s %s (%s)", chosen.choice.backend, chosen.choice.precision,
                 chosen.choice.reason)
    return chosen


def plan_scenes(scenes: Sequence, detector, block_tiles: int, config, settings: dict) -> tuple[list, list[dict]]:
    """Every scene's plan (None for one that cannot be planned), and the failures. A job of one
    scene fails with it."""

    def plan(path):
        try:
            return plan_scene(str(path), detector, block_tiles=block_tiles, config=config, **settings)
        except GeodetError as exc:
            if len(scenes) == 1:
                raise
            return exc

    # Planning opens every scene (a round trip or more for remote COGs; percentiles for 16-bit
    # scenes): a few at a time, as GDAL releases the GIL while it waits.
    with ThreadPoolExecutor(max_workers=max(1, min(PLAN_THREADS, len(scenes)))) as pool:
        plans: list = list(pool.map(plan, scenes))
    failed = []
    for i, p in enumerate(plans):
        if isinstance(p, GeodetError):
            failed.append({"scene": str(scenes[i]), "error": str(p)})
            plans[i] = None
    return plans, failed


def _pending_blocks(plans: list, dirs: list, model_sha: str | None) -> tuple[list, list[str]]:
    """``(scene, block)`` pairs still to run, and the scenes finished by an earlier run. A scene
    to run again loses its old marker and the parts of other settings or weights."""
    pending, done_before = [], []
    for si, plan in enumerate(plans):
        if plan is None:
            continue
        d = Path(dirs[si])
        if scene_done(d, plan, model_sha):
            done_before.append(str(plan.scene))
            continue
        d.mkdir(parents=True, exist_ok=True)
        (d / SUCCESS).unlink(missing_ok=True)  # an old marker of other settings or weights
        remove_stale_parts(d, plan)
        pending += [(si, b.index) for b in plan.blocks if not part_done(d, plan, b.index)]
    return pending, done_before


class _Run:
    """The driver's state of one job: blocks still to run, scenes reduced as soon as their last
    block is in (while other scenes' blocks run), the figures of the summary."""

    def __init__(self, plans, dirs, classes, model_sha, pending, done_before, t_start, operating_point=None):
        self.plans, self.dirs, self.classes, self.model_sha = plans, dirs, classes, model_sha
        self.operating_point = operating_point
        self.pending, self.t_start = pending, t_start
        self.todo = {si for si, p in enumerate(plans) if p is not None and str(p.scene) not in done_before}
        self.remaining = {si: set() for si in self.todo}
        for si, bi in pending:
            self.remaining[si].add(bi)
        self.reducing, self.reducers, self.scenes_out, self.errors = {}, [], [], {}
        self.blocks_run, self.peak_rss = 0, 0.0
        self.backends: dict[str, int] = {}  # what the actors ran: "backend precision" -> blocks
        self.arrivals, self.block_seconds = [], []  # when each block's row reached the driver; the actor's seconds

    def start_reducers(self, ray, workers: int) -> None:
        if ray.is_initialized():
            # a few long-lived reducer actors (geodet imported once each, started now so they are
            # ready when the first scene is): 0 CPUs reserved, reducing is light beside detection
            actor = ray.remote(num_cpus=0, max_restarts=2, max_task_retries=2)(SceneReducer)
            self.reducers = [actor.remote() for _ in range(max(1, min(4, int(workers) // 4 + 1)))]
        for si in self.todo:
            self.reduce_when_done(si)  # every part already written by an earlier run

    def reduce_when_done(self, si: int) -> None:
        if not self.remaining[si] and si not in self.reducing:
            args = (self.plans[si], self.dirs[si], self.classes, self.model_sha, self.operating_point)
            self.reducing[si] = (self.reducers[len(self.reducing) % len(self.reducers)].finish.remote(*args)
                                 if self.reducers else args)

    def round(self, rows) -> None:
        """One round's rows, one per block as it ends; the failed blocks are the next round's."""
        failed_now = []
        for r in rows:
            si, bi = int(r["scene"]), int(r["block"])
            self.blocks_run += 1
            self.arrivals.append(time.perf_counter() - self.t_start)
            self.block_seconds.append(float(r["seconds"]))
            self.peak_rss = max(self.peak_rss, float(r["peak_rss_mb"]))
            if r["ok"]:
                self.backends[str(r["backend"])] = self.backends.get(str(r["backend"]), 0) + 1
                self.remaining[si].discard(bi)
                self.reduce_when_done(si)
            else:
                failed_now.append((si, bi))
                self.errors[(si, bi)] = str(r["error"])
        self.pending = failed_now

    def collect(self, ray, failed: list) -> None:
        """Wait for every reduce; a scene whose reduce fails fails alone."""
        for si in sorted(self.reducing):
            try:
                job = self.reducing[si]
                self.scenes_out.append(ray.get(job) if self.reducers else finish_scene(*job))
            except Exception as exc:  # noqa: BLE001 - reported in the summary
                cause = getattr(exc, "cause", None) or exc
                failed.append({"scene": self.plans[si].scene, "error": f"reduce failed: {_one_line(cause)}"})

    def unfinished(self, failed: list) -> None:
        """The scenes whose blocks never all ran, with the first failed block's error."""
        for si in sorted(self.todo - set(self.reducing)):
            missing = sorted(self.remaining[si])
            why = self.errors.get((si, missing[0]), "not run")
            failed.append({"scene": self.plans[si].scene,
                           "error": f"{len(missing)} block(s) failed, e.g. block {missing[0]}: {why}"})


def _pace(arrivals: list, block_seconds: list, workers: int) -> dict:
    """How the blocks went: seconds to the first block (start-up: Ray, actors, model loading),
    the steady rate once every actor has delivered a block (blocks after the first ``workers``,
    per hour of the time they took), and the actors' median seconds per block."""
    if not arrivals:
        return {}
    out = {"first_block_s": round(arrivals[0], 2), "median_block_s": round(float(np.median(block_seconds)), 3)}
    k = max(1, min(int(workers), len(arrivals) - 1))
    if len(arrivals) > k and arrivals[-1] > arrivals[k - 1]:
        out["steady_blocks_per_hour"] = round((len(arrivals) - k) / (arrivals[-1] - arrivals[k - 1]) * 3600)
    return out


def finished_scenes(out_dir) -> list[Path]:
    """Scene folders of ``out_dir`` that have ``_SUCCESS.json`` and their final file."""
    return sorted(d for d in Path(out_dir).glob("scene=*") if (d / SUCCESS).is_file() and (d / FINAL).is_file())


def _check_not_in_scene_folders(out, out_dir) -> None:
    """Refuse a merged file written inside a scene's folder of the run (``scene=*/``): it would
    replace that scene's own result (``-o FOLDER/scene=x/detections.parquet``), which the run's
    marker still vouches for, or lie among its parts."""
    import os

    root = Path(os.path.realpath(out_dir))
    for parent in Path(os.path.realpath(out)).parents:
        if parent.parent == root and parent.name.startswith("scene="):
            raise GeodetError(f"{out} is inside {parent.name}/ of {out_dir}, which holds that scene's own result: write "
                              f"the merged file elsewhere, e.g. {Path(out_dir) / ('merged' + (Path(out).suffix or '.gpkg'))}")


def merge_outputs(out_dir, path, fmt: str | None = None):
    """Every finished scene of a ray run's ``out_dir`` in one file (``geodet merge``), with a
    ``scene`` column naming each feature's scene; scenes in several CRSs are written as
    ``geodet detect`` writes them (``io.writers.write_detections``). Returns the merged frame (one
    CRS, or EPSG:4326 with a ``crs`` column)."""
    from ..io.labels import read_geoparquet
    from ..io.writers import check_output_path, combine_frames, output_format, write_detections
    from .scenes import scene_names

    if not Path(out_dir).is_dir():
        raise GeodetError(f"{out_dir}: {'not a folder' if Path(out_dir).exists() else 'not found'}: give the folder "
                          "that geodet detect --engine ray wrote (its -o)")
    dirs = finished_scenes(out_dir)
    done = set(dirs)
    unfinished = sorted(d.name for d in Path(out_dir).glob("scene=*") if d.is_dir() and d not in done)
    if not dirs:
        some = f" ({len(unfinished)} scene folder(s) without a finished result: {', '.join(unfinished[:3])})" \
            if unfinished else f" (no scene=*/{SUCCESS} with its {FINAL})"
        raise GeodetError(f"{out_dir}: no finished scenes{some}: run geodet detect --engine ray (again) to finish them")
    fmt = output_format(path, fmt)
    out = check_output_path(path, fmt)
    _check_not_in_scene_folders(out, out_dir)
    models = {}
    for d in dirs:  # one file of one model's detections: scenes redone with another model are not mixed in
        marker = read_json(d / SUCCESS)
        if not isinstance(marker, dict):
            raise GeodetError(f"{d / SUCCESS}: damaged: run geodet detect --engine ray again on that scene")
        models.setdefault(marker.get("model_sha256"), []).append(d.name)
    if len(models) > 1:
        said = "; ".join(f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''} by model {str(sha)[:12]}"
                         for sha, names in models.items())
        raise GeodetError(f"{out_dir}: its scenes were detected by {len(models)} different models ({said}): run "
                          "geodet detect --engine ray again with one model, or merge one model's scenes")
    frames, markers = [], [read_json(d / SUCCESS) for d in dirs]
    check_one_setting(out_dir, dirs, markers)
    for d in dirs:
        try:
            frames.append(read_geoparquet(d / FINAL))
        except GeodetError as exc:
            raise GeodetError(f"{exc}: run geodet detect --engine ray again on that scene (or delete its folder "
                              f"{d.name} to merge the others)") from None
    # the scene column as detect's: file names, or paths where two scenes share one
    # (a marker without its scene's path, of an older run: the frame's own name for it)
    own = [str(f["scene"].iloc[0]) if len(f) and "scene" in f.columns else None for f in frames]
    paths = [m.get("scene") or (o if o and own.count(o) == 1 else d.name) for m, o, d in zip(markers, own, dirs)]
    for f, name in zip(frames, scene_names(paths)):
        f["scene"] = name

    def report():
        from .job import report_crs

        return {"merged_from": str(Path(out_dir).resolve()), "model_sha256": next(iter(models)),
                "inputs": [m.get("scene") for m in markers], "output_crs": report_crs(fmt, frames),
                "scenes": [{"scene": m.get("scene"), "folder": d.name, "detections": len(f), **(m.get("counts") or {}),
                            "unreadable_tiles": m.get("unreadable_tiles") or []}
                           for m, d, f in zip(markers, dirs, frames)],
                "unfinished_scene_folders": unfinished}

    # several CRSs as geodet detect writes them; styled from the model's operating point, as detect's
    write_detections(frames, out, fmt, style_min_score=markers[0].get("operating_point"), report=report)
    merged = combine_frames(frames)
    merged.attrs["scenes"] = len(dirs)  # scenes without a detection count too
    merged.attrs["unfinished"] = unfinished  # left out: said, so a half-run job is not taken for the whole
    return merged
