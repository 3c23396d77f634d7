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

``merge_outputs(OUT, path)`` gathers the finished scenes into one file (``geodet merge``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import GeodetError
from .blocks import BlockResult, ScenePlan, plan_scene, prepare_detector, reduce_scene, run_block

log = logging.getLogger(__name__)

RAY_MISSING = ("the ray engine needs Ray, which is not installed: pip install 'geodet[ray]' "
               "(or pip install 'ray[data]')")
PART_COLUMNS = ["kind", "key", "px_x0", "px_y0", "px_x1", "px_y1", "score", "label", "tile_row", "tile_col",
                "whole", "owned"]
SUCCESS = "_SUCCESS.json"
PLAN_THREADS = 8  # scenes planned at a time on the driver
FINAL = "detections.parquet"


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


def _write_json(data: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def part_paths(scene_dir: Path, block: int) -> tuple[Path, Path]:
    return scene_dir / f"part-{block:05d}.parquet", scene_dir / f"part-{block:05d}.json"


def part_done(scene_dir: Path, plan: ScenePlan, block: int) -> bool:
    data, meta = part_paths(scene_dir, block)
    m = _read_json(meta)
    return bool(m) and m.get("fingerprint") == plan.fingerprint and data.is_file()


def scene_done(scene_dir: Path, plan: ScenePlan, model_sha: str | None) -> bool:
    m = _read_json(scene_dir / SUCCESS)
    return bool(m) and m.get("fingerprint") == plan.fingerprint and m.get("model_sha256") == model_sha \
        and (scene_dir / FINAL).is_file()


def _remove_stale_parts(scene_dir: Path, plan: ScenePlan) -> None:
    """Parts of an earlier run with other settings, weights or blocks: they would only mislead."""
    for meta in scene_dir.glob("part-*.json"):
        m = _read_json(meta)
        if not m or m.get("fingerprint") != plan.fingerprint or int(m.get("block", -1)) >= len(plan.blocks):
            meta.unlink(missing_ok=True)
            meta.with_suffix(".parquet").unlink(missing_ok=True)
    (scene_dir / FINAL).unlink(missing_ok=True)


def write_part(scene_dir: Path, plan: ScenePlan, result: BlockResult, transform, crs) -> int:
    """A block's stitch as GeoParquet (scene CRS): its kept boxes (``kind`` 0), the objects merged
    inside it (1), the seam boxes whose objects the reduce decides (2) and those the reduce only
    looks at (3), with exact float64 pixel boxes and scene-wide order keys; then its sidecar
    (the marker)."""
    import geopandas as gpd

    from ..io.writers import boxes_to_polygons

    data, meta = part_paths(scene_dir, result.block)
    st = result.stitch
    d = st.deferred
    groups = [st.final, st.merged, tuple(a[d[8]] for a in d), tuple(a[~d[8]] for a in d)]
    cat = [np.concatenate([g[i] for g in groups]) for i in range(5)]
    n = [len(g[0]) for g in groups]
    boxes = cat[0].reshape(-1, 4)
    frame = gpd.GeoDataFrame({
        "kind": np.repeat(np.arange(4, dtype=np.int8), n),
        "key": np.concatenate([g[5] if len(g) == 6 else g[7] for g in groups]).astype(np.int64),
        "px_x0": boxes[:, 0], "px_y0": boxes[:, 1], "px_x1": boxes[:, 2], "px_y1": boxes[:, 3],
        "score": cat[1].astype(np.float32), "label": cat[2].astype(np.int64),
        "tile_row": cat[3].astype(np.int32), "tile_col": cat[4].astype(np.int32),
        "whole": np.concatenate([np.zeros(n[0] + n[1], bool), groups[2][5], groups[3][5]]),
        "owned": np.concatenate([np.zeros(n[0] + n[1], bool), groups[2][6], groups[3][6]]),
    }, geometry=boxes_to_polygons(boxes, transform), crs=crs)
    tmp = data.with_name(f".{data.name}.{os.getpid()}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, data)
    _write_json({"fingerprint": plan.fingerprint, "scene": plan.scene, "block": result.block,
                 "tiles_run": result.tiles_run, "tiles_capped": result.tiles_capped, "skipped": result.skipped,
                 "unreadable": list(result.unreadable), "on_nodata": int(result.on_nodata),
                 "detections_in": int(st.n_in),
                 "kept": n[0], "merged": n[1], "decided_in_reduce": n[2], "context_for_reduce": n[3]}, meta)
    return int(st.n_in)


def read_part(scene_dir: Path, block: int) -> BlockResult:
    """A finished part back as the block's result (exact float64 boxes and order keys)."""
    import pyarrow.parquet as pq

    from .stitch import BlockStitch

    data, meta = part_paths(scene_dir, block)
    m = _read_json(meta)
    table = pq.read_table(data, columns=PART_COLUMNS).to_pandas()
    kind = table["kind"].to_numpy()

    def rows(sel, deferred: bool = False) -> tuple:
        g = table[sel]
        out = (g[["px_x0", "px_y0", "px_x1", "px_y1"]].to_numpy(np.float64), g["score"].to_numpy(np.float32),
               g["label"].to_numpy(np.int64), g["tile_row"].to_numpy(np.int32), g["tile_col"].to_numpy(np.int32))
        if deferred:
            out += (g["whole"].to_numpy(bool), g["owned"].to_numpy(bool))
        out += (g["key"].to_numpy(np.int64),)
        return out + (g["kind"].to_numpy() == 2,) if deferred else out

    st = BlockStitch(rows(kind == 0), rows(kind == 1), rows(kind >= 2, True), int(m["detections_in"]))
    return BlockResult(m["scene"], block, st, list(m["tiles_run"]), list(m["tiles_capped"]), list(m["skipped"]),
                       list(m["unreadable"]), int(m.get("on_nodata", 0)))


class BlockWorker:
    """A Ray Data actor: loads the model once, then runs blocks and writes their parts."""

    def __init__(self, shared: list, device=None):
        import ray

        from .job import load_detector_file

        # the model (a file path or an object) and the plans, put in the object store once by the
        # driver, which holds them for the whole run (so a restarted actor finds them too)
        data = ray.get(shared[0])
        model, self.plans = data["model"], data["plans"]
        self.model = load_detector_file(model) if isinstance(model, (str, Path)) else model
        self.dirs, self.device = [Path(d) for d in data["scene_dirs"]], device
        self.prepared = (None, None)  # (scene index, detector): blocks of a scene come together

    def detector(self, si: int):
        if self.prepared[0] != si:
            self.prepared = (si, prepare_detector(self.model, self.plans[si], self.device))
        return self.prepared[1]

    def __call__(self, batch: dict) -> dict:
        import resource

        out = {"scene": [], "block": [], "ok": [], "error": [], "detections": [], "seconds": [], "peak_rss_mb": []}
        for si, bi in zip(batch["scene"], batch["block"]):
            si, bi = int(si), int(bi)
            t0 = time.perf_counter()
            ok, err, n = True, "", 0
            try:
                plan = self.plans[si]
                det = self.detector(si)
                result = run_block(plan, plan.blocks[bi], det, self.device)
                n = write_part(self.dirs[si], plan, result, plan.transform, plan.crs)
            except Exception as exc:  # noqa: BLE001 - reported to the driver, which retries the block
                ok, err = False, _one_line(exc)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the actor process, KiB on Linux
            for k, v in zip(out, (si, bi, ok, err, n, time.perf_counter() - t0, peak)):
                out[k].append(v)
        return {k: np.asarray(v) for k, v in out.items()}


def finish_scene(plan: ScenePlan, scene_dir, classes, model_sha: str | None) -> dict:
    """The reduce step of one scene whose parts are all written: stitch, write the final file,
    then ``_SUCCESS.json`` (last). Runs as a Ray task, or in the driver."""
    from ..io.writers import write_detections

    t0 = time.perf_counter()
    d = Path(scene_dir)
    frame = reduce_scene(plan, [read_part(d, b.index) for b in plan.blocks], classes=classes)
    write_detections(frame, d / FINAL)
    rep = frame.attrs["report"]
    _write_json({"scene": plan.scene, "model_sha256": model_sha, "fingerprint": plan.fingerprint,
                 "settings_sha256": hashlib.sha256(json.dumps(rep["settings"], sort_keys=True, default=str)
                                                   .encode()).hexdigest(),
                 "grid": {"width": plan.width, "height": plan.height, "tile_size": plan.settings.tile_size,
                          "overlap": plan.overlap, "tiles": rep["tiles_total"], "blocks": len(plan.blocks)},
                 "counts": {k: rep[k] for k in ("tiles_run", "tiles_skipped", "tiles_capped", "detections",
                                                "detections_before_stitch", "boxes_decided_in_reduce",
                                                "boxes_sent_to_reduce")},
                 "unreadable_tiles": rep["unreadable_tiles"], "reduce_seconds": round(time.perf_counter() - t0, 3),
                 "output": FINAL}, d / SUCCESS)
    return {"scene": plan.scene, "id": d.name, "detections": rep["detections"]}


class SceneReducer:
    """A Ray actor that runs ``finish_scene`` for the scenes the driver sends it."""

    def finish(self, plan: ScenePlan, scene_dir, classes, model_sha):
        return finish_scene(plan, scene_dir, classes, model_sha)


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
        shared = ray.put({"model": model_arg, "plans": plans, "scene_dirs": dirs})  # held until the round ends
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
    from ..hashing import file_sha256
    from .job import load_detector_file

    t_start = time.perf_counter()
    if not scenes:
        raise GeodetError("no scenes given")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GeodetError(f"{out} exists and is not a folder: the ray engine writes a folder of per-scene GeoParquet")
    out.mkdir(parents=True, exist_ok=True)
    is_file = isinstance(model, (str, Path))
    detector = load_detector_file(model) if is_file else model
    model_sha = file_sha256(model) if is_file and Path(str(model)).is_file() else (
        (getattr(detector, "source", None) or {}).get("sha256"))
    model_arg = str(Path(str(model)).resolve()) if is_file and Path(str(model)).is_file() else detector
    if ids is not None and len(ids) != len(scenes):
        raise GeodetError(f"{len(ids)} scene ids for {len(scenes)} scenes")
    ids = scene_ids(scenes, ids)
    dirs = [str(out / f"scene={i}") for i in ids]
    failed, done_before = [], []

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
    for i, p in enumerate(plans):
        if isinstance(p, GeodetError):
            failed.append({"scene": str(scenes[i]), "error": str(p)})
            plans[i] = None
    pending = []
    for si, plan in enumerate(plans):
        if plan is None:
            continue
        d = Path(dirs[si])
        if scene_done(d, plan, model_sha):
            done_before.append(str(plan.scene))
            continue
        d.mkdir(parents=True, exist_ok=True)
        (d / SUCCESS).unlink(missing_ok=True)  # an old marker of other settings or weights
        _remove_stale_parts(d, plan)
        pending += [(si, b.index) for b in plan.blocks if not part_done(d, plan, b.index)]
    blocks_total = sum(len(p.blocks) for p in plans if p is not None)
    blocks_run, errors, peak_rss = 0, {}, 0.0
    arrivals, block_seconds = [], []  # when each block's row reached the driver; the actor's seconds on it
    classes = getattr(getattr(detector, "card", None), "classes", None)
    todo = {si for si, p in enumerate(plans) if p is not None and str(p.scene) not in done_before}
    remaining = {si: set() for si in todo}
    for si, bi in pending:
        remaining[si].add(bi)
    reducing, scenes_out = {}, []
    started = pending and not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 configure_logging=False)
    try:
        reducers = []
        if ray.is_initialized():
            # a few long-lived reducer actors (geodet imported once each, started now so they are
            # ready when the first scene is): 0 CPUs reserved, reducing is light beside detection
            actor = ray.remote(num_cpus=0, max_restarts=2, max_task_retries=2)(SceneReducer)
            reducers = [actor.remote() for _ in range(max(1, min(4, int(workers) // 4 + 1)))]

        def reduce_when_done(si):
            # a scene is reduced as soon as its last block is in, while other scenes' blocks run
            if not remaining[si] and si not in reducing:
                args = (plans[si], dirs[si], classes, model_sha)
                reducing[si] = reducers[len(reducing) % len(reducers)].finish.remote(*args) if reducers else args

        for si in todo:
            reduce_when_done(si)  # every part already written by an earlier run
        for attempt in range(retries + 1):
            if not pending:
                break
            if attempt:
                log.warning("running %d failed block(s) again (round %d of %d)", len(pending), attempt + 1,
                            retries + 1)
            failed_now = []
            for r in _run_round(ray, pending, model_arg, plans, dirs, workers, gpus_per_worker, cpus_per_worker,
                                device, progress):
                si, bi = int(r["scene"]), int(r["block"])
                blocks_run += 1
                arrivals.append(time.perf_counter() - t_start)
                block_seconds.append(float(r["seconds"]))
                peak_rss = max(peak_rss, float(r["peak_rss_mb"]))
                if r["ok"]:
                    remaining[si].discard(bi)
                    reduce_when_done(si)
                else:
                    failed_now.append((si, bi))
                    errors[(si, bi)] = str(r["error"])
            pending = failed_now
        for si in sorted(reducing):
            try:
                job = reducing[si]
                scenes_out.append(ray.get(job) if reducers else finish_scene(*job))
            except Exception as exc:  # noqa: BLE001 - a scene whose reduce fails fails alone
                cause = getattr(exc, "cause", None) or exc
                failed.append({"scene": plans[si].scene, "error": f"reduce failed: {_one_line(cause)}"})
    finally:
        if started:
            ray.shutdown()
    for si in sorted(todo - set(reducing)):
        missing = sorted(remaining[si])
        why = errors.get((si, missing[0]), "not run")
        failed.append({"scene": plans[si].scene, "error": f"{len(missing)} block(s) failed, e.g. block {missing[0]}: {why}"})
    summary = {"out": str(out), "scenes_total": len(scenes), "scenes_written": len(scenes_out),
               "scenes_already_done": len(done_before), "failed_scenes": failed, "blocks_total": blocks_total,
               "blocks_run": blocks_run, "seconds": round(time.perf_counter() - t_start, 2), "scenes": scenes_out,
               "model_sha256": model_sha, "worker_peak_rss_mb": round(peak_rss), **_pace(arrivals, block_seconds, workers)}
    _write_json(summary, out / "_job.json")
    return summary


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


def merge_outputs(out_dir, path, fmt: str | None = None):
    """Every finished scene of a ray run's ``out_dir`` in one file (``geodet merge``), with a
    ``scene`` column naming each feature's scene; scenes in several CRSs are written as
    ``geodet detect`` writes them (``io.writers.write_detections``). Returns the merged frame (one
    CRS, or EPSG:4326 with a ``crs`` column)."""
    import geopandas as gpd

    from ..io.writers import check_output_path, combine_frames, output_format, write_detections

    dirs = finished_scenes(out_dir)
    if not dirs:
        raise GeodetError(f"{out_dir}: no finished scenes (no scene=*/{SUCCESS}): run geodet detect --engine ray first")
    fmt = output_format(path, fmt)
    out = check_output_path(path, fmt)
    frames = [gpd.read_parquet(d / FINAL) for d in dirs]
    write_detections(frames, out, fmt)  # several CRSs: as geodet detect writes them
    return combine_frames(frames)
