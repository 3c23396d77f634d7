"""The files of a run in blocks (``ray_engine``): each block's part (GeoParquet in the scene's
CRS, with the block's stitch) and its sidecar marker, then each scene's final file and, last,
its ``_SUCCESS.json``. Every file is written to a temporary name and renamed; a rerun trusts
only parts and scenes whose fingerprint matches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import GeodetError
from .blocks import BlockResult, ScenePlan, reduce_scene

log = logging.getLogger(__name__)

PART_COLUMNS = ["kind", "key", "px_x0", "px_y0", "px_x1", "px_y1", "score", "label", "tile_row", "tile_col",
                "whole", "owned"]
SUCCESS = "_SUCCESS.json"
FINAL = "detections.parquet"


def write_json(data: dict, path: Path) -> None:
    """``data`` to ``path`` atomically: a temporary name, then a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    """A marker's contents, or None when it is missing or torn."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def part_paths(scene_dir: Path, block: int) -> tuple[Path, Path]:
    return scene_dir / f"part-{block:05d}.parquet", scene_dir / f"part-{block:05d}.json"


def part_done(scene_dir: Path, plan: ScenePlan, block: int) -> bool:
    data, meta = part_paths(scene_dir, block)
    m = read_json(meta)
    return bool(m) and m.get("fingerprint") == plan.fingerprint and data.is_file()


def scene_done(scene_dir: Path, plan: ScenePlan, model_sha: str | None) -> bool:
    m = read_json(scene_dir / SUCCESS)
    return bool(m) and m.get("fingerprint") == plan.fingerprint and m.get("model_sha256") == model_sha \
        and (scene_dir / FINAL).is_file()


def remove_stale_parts(scene_dir: Path, plan: ScenePlan) -> None:
    """Parts of an earlier run with other settings, weights or blocks: they would only mislead."""
    for meta in scene_dir.glob("part-*.json"):
        m = read_json(meta)
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
    write_json({"fingerprint": plan.fingerprint, "scene": plan.scene, "scene_path": scene_path(plan.scene),
                "block": result.block,
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
    m = read_json(meta)
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


# the detection settings that change a scene's detections (not where or how fast they run)
RESULT_SETTINGS = ("tile_size", "overlap", "overlap_m", "score_threshold", "nms_iou", "detections_per_tile", "bands",
                   "gsd_m", "percentiles", "min_valid_fraction", "match_iou")


def finish_scene(plan: ScenePlan, scene_dir, classes, model_sha: str | None, operating_point: float | None = None) -> dict:
    """The reduce step of one scene whose parts are all written: stitch, write the final file,
    then ``_SUCCESS.json`` (last). Runs as a Ray task, or in the driver."""
    from ..io.writers import write_detections

    t0 = time.perf_counter()
    d = Path(scene_dir)
    frame = reduce_scene(plan, [read_part(d, b.index) for b in plan.blocks], classes=classes)
    write_detections(frame, d / FINAL)
    rep = frame.attrs["report"]
    write_json({"scene": plan.scene, "scene_path": scene_path(plan.scene), "model_sha256": model_sha,
                "fingerprint": plan.fingerprint,
                "operating_point": operating_point,  # the style of a merged file draws from it, as detect's does
                 "settings_sha256": hashlib.sha256(json.dumps(rep["settings"], sort_keys=True, default=str)
                                                   .encode()).hexdigest(),
                 "settings": {k: rep["settings"].get(k) for k in RESULT_SETTINGS},  # merge compares them
                 "grid": {"width": plan.width, "height": plan.height, "tile_size": plan.settings.tile_size,
                          "overlap": plan.overlap, "tiles": rep["tiles_total"], "blocks": len(plan.blocks)},
                 "counts": {k: rep[k] for k in ("tiles_run", "tiles_skipped", "tiles_capped", "detections",
                                                "detections_before_stitch", "boxes_decided_in_reduce",
                                                "boxes_sent_to_reduce")},
                 "unreadable_tiles": rep["unreadable_tiles"], "reduce_seconds": round(time.perf_counter() - t0, 3),
                 "output": FINAL}, d / SUCCESS)
    return {"scene": plan.scene, "id": d.name, "detections": rep["detections"]}


def check_one_setting(out_dir, dirs, markers):
    """Scenes detected with other thresholds, tiles or bands (runs into one folder with other
    flags) are not merged into one file as if alike; markers of older runs hold no settings."""
    for key in RESULT_SETTINGS:
        seen = {}
        for d, m in zip(dirs, markers):
            if isinstance(m.get("settings"), dict) and key in m["settings"]:
                seen.setdefault(json.dumps(m["settings"][key]), []).append(d.name)
        if len(seen) > 1:
            said = "; ".join(f"{v} in {', '.join(n[:2])}{' ...' if len(n) > 2 else ''}" for v, n in seen.items())
            raise GeodetError(f"{out_dir}: its scenes were detected with different {key} ({said}): run geodet detect "
                              f"--engine ray again on the scenes of the {key} you do not want, with the one you do")


def scene_path(scene: str) -> str:
    """Where ``scene`` is, whatever folder a later run starts in: a local path made absolute, a
    remote address as given."""
    from ..io.raster import split_connection

    s = str(scene)
    parts = split_connection(s)
    if parts is not None:  # GPKG:file:table: the file absolute, in its place
        return f"{parts[0]}:{os.path.abspath(parts[1])}" + (f":{parts[2]}" if parts[2] else "")
    return s if "://" in s or s.startswith("/vsi") else os.path.abspath(s)


def folder_owner(d: Path) -> str | None:
    """The scene an earlier run wrote into the scene folder ``d`` (its marker's, or a part's), if
    any: its absolute path where the run stored one (older runs stored the path as given)."""
    records = [d / SUCCESS, *sorted(d.glob("part-*.json"))] if d.is_dir() else []
    for path in records:
        m = read_json(path)
        if isinstance(m, dict) and (m.get("scene_path") or m.get("scene")):
            return str(m.get("scene_path") or m["scene"])
    return None


def unclaimed_ids(out: Path, scenes: Sequence, ids: list[str]) -> list[str]:
    """Scene folder ids that keep every earlier run's results: a scene an earlier run wrote into
    ``out`` gets that folder again (whatever the other scenes of this job); a scene whose id names
    a folder written for another file that is still there (y2020/tile.tif, then y2021/tile.tif,
    into one output folder) gets its id with a short hash of its path, so both are kept and merged;
    a folder whose scene has gone (moved) is the new path's, and runs again."""
    from ..io.outputs import scene_key
    from ..io.raster import connection_file

    def same_file_key(p):  # a remote scene's address without its query (a signed URL's token changes)
        return scene_key(str(p).split("?", 1)[0] if "://" in str(p) or str(p).startswith("/vsi") else p)

    owners = {}  # same_file_key(scene) -> id of the folder an earlier run wrote for it
    for d in sorted(out.glob("scene=*")):
        owner = folder_owner(d)
        if owner is not None:
            owners.setdefault(same_file_key(owner), d.name[len("scene="):])
    taken = set(owners.values())
    out_ids: list[str] = []
    for p, sid in zip(scenes, ids):
        key = same_file_key(p)
        if key in owners:
            out_ids.append(owners[key])
            continue
        owner = folder_owner(out / f"scene={sid}")
        if owner is not None and not ("://" in owner or owner.startswith("/vsi")) and \
                not Path(connection_file(owner) or owner).exists():
            log.warning("%s: scene=%s held the detections of %s, which is no longer there: they are replaced", p,
                        sid, owner)
        elif sid in taken or sid in out_ids:
            new = f"{sid}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"
            log.warning("%s: scene=%s holds the detections of another file%s: this scene's go to scene=%s", p, sid,
                        f" ({owner})" if owner else "", new)
            sid = new
        out_ids.append(sid)
    return out_ids
