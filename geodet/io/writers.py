"""Writers for scene detections: GeoJSON (RFC 7946), GeoPackage, FlatGeobuf, Shapefile, CSV.

Every writer writes to a temporary file in the target folder and renames it into place, so an
interrupted run never leaves a half-written output and never touches a previous one.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

from ..errors import GeodetError, brief

log = logging.getLogger(__name__)

FORMATS = {
    ".geojson": "geojson", ".json": "geojson", ".gpkg": "gpkg", ".fgb": "fgb", ".shp": "shp", ".csv": "csv",
    ".parquet": "parquet",
}
SINGLE_CRS = ("fgb", "shp", "parquet")  # formats that hold one CRS per file: EPSG:4326 for scenes in several
SCORE_DECIMALS = 4  # scores are float32 sigmoids: 4 decimals say all a user can act on
GPKG_VERSION = "1.2"  # 1.4 warns in GDAL 3.6 / QGIS 3.22 (Debian 12, Ubuntu 22.04); 1.2 has all we use
DRIVERS = {"geojson": "GeoJSON", "gpkg": "GPKG", "fgb": "FlatGeobuf", "shp": "ESRI Shapefile"}
NEEDS_CRS = {"geojson", "gpkg", "fgb", "shp", "parquet"}


def output_format(path: str | Path, fmt: str | None = None) -> str:
    """The format of an output: ``fmt`` when given (it must agree with a known extension of
    ``path``), else the extension's."""
    suffix = Path(path).suffix.lower()
    if fmt:
        fmt = fmt.lower()
        if fmt not in set(FORMATS.values()):
            raise GeodetError(f"unknown output format '{fmt}': use one of geojson, gpkg, fgb, shp, csv, parquet")
        if suffix in FORMATS and FORMATS[suffix] != fmt:
            raise GeodetError(f"--format {fmt} but the file name {Path(path).name} says {FORMATS[suffix]}: name the "
                              f"file after its format (e.g. {Path(path).with_suffix('.' + fmt).name}) or drop --format")
        return fmt
    if suffix not in FORMATS:
        raise GeodetError(
            f"cannot tell the output format from '{Path(path).name}': use a .geojson, .gpkg, .fgb, .shp, .csv or .parquet "
            "name, or pass --format"
        )
    return FORMATS[suffix]


def same_file_key(path) -> str:
    """A key equal for two names of one local file (a link, ./a.tif and a.tif; a layer's
    ``file|layername=...`` names its file); a URL or /vsi path as it is."""
    p = str(path)
    if "://" in p or p.startswith("/vsi"):
        return p
    return os.path.normcase(os.path.realpath(p.split("|")[0]))


def check_not_an_input(path: str | Path, inputs) -> None:
    """Refuse, before any work, an output that names one of the command's input files:
    ``inputs`` is (file or None, what it is to the user), e.g. (labels, "the labels")."""
    key = same_file_key(path)
    for source, what in inputs:
        if source and same_file_key(source) == key:
            raise GeodetError(f"{path} is {what}: writing the output there would replace it; choose another output "
                              "name")


def _check_other_layers(p: Path, fmt: str | None) -> None:
    """An existing GeoPackage is replaced whole by an output: refuse one that holds layers of its own
    (a project's labels and areas), so writing detections or cells there never deletes them. geodet's
    layers are named after the file (``STEM``, ``STEM_EPSG``) and hold its columns (detections'
    ``score``, suggestions' ``cell_row``): QGIS names a new layer after its file too."""
    if (fmt or FORMATS.get(p.suffix.lower())) != "gpkg" or not p.is_file():
        return
    import re

    try:
        import pyogrio

        names = [str(n) for n in pyogrio.list_layers(p)[:, 0]]
        fields = {n: set(pyogrio.read_info(p, layer=n)["fields"]) for n in names if n != "layer_styles"}
    except Exception:  # not a readable GeoPackage: nothing of the user's can be told apart; it is replaced
        return
    ours = re.compile(rf"{re.escape(p.stem)}(_\d+)*", re.IGNORECASE)
    others = [n for n, f in fields.items() if not (ours.fullmatch(n) and f & {"score", "cell_row"})]
    if others:
        listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise GeodetError(f"{p} holds other layers ({listed}) and the output replaces the whole file: give the output "
                          "a new file name")


def check_output_path(path: str | Path, fmt: str | None = None, suffixes: tuple = (),
                      example: str = "detections.gpkg") -> Path:
    """Fail before any work starts if the output cannot be written there: the nearest existing
    folder on its path must take a new file (missing folders are made when the output is written),
    with ``suffixes`` its name must end in one of them (what is written is ``example``'s kind),
    and, with ``fmt``, no other output may own its sidecar files (a shapefile's and a CSV's ``.prj``
    and ``.qml`` share the stem)."""
    p = Path(path)
    if p.is_dir():
        raise GeodetError(f"output path is a folder: {p}; give a file name such as {p / example}")
    if suffixes and p.suffix.lower() not in suffixes:
        raise GeodetError(f"{p.name}: this output is a {'/'.join(s.lstrip('.').upper() for s in suffixes)} file: "
                          f"name it so (e.g. {p.with_suffix(suffixes[0]).name if p.suffix or p.name else example})")
    _check_writable_in(p.parent if str(p.parent) else Path("."), p)
    _check_name_fits(p)
    if (fmt or FORMATS.get(p.suffix.lower())) == "gpkg" and p.stem.startswith("-"):
        raise GeodetError(f"{p.name}: its layer is named after the file, and GDAL refuses a GeoPackage layer name "
                          "that begins with '-': name the file otherwise")
    _check_other_layers(p, fmt)
    if fmt == "shp" and p.suffix.lower() != ".shp":  # GDAL makes a folder of a shapefile named otherwise
        raise GeodetError(f"{p.name}: a shapefile's name ends in .shp (its .shx, .dbf and .prj share the stem): "
                          f"name it {p.with_suffix('.shp').name if p.suffix else p.name + '.shp'}")
    if fmt in ("shp", "csv"):
        other = p.with_suffix(".csv" if fmt == "shp" else ".shp")
        if other.exists():
            raise GeodetError(f"{p.name} and {other.name} would share {p.with_suffix('.prj').name} and "
                              f"{p.with_suffix('.qml').name} (the CRS and the style): give this output another name")
    return p


def _stem_files(path: Path, suffixes) -> list:
    """Files beside ``path`` of its stem with one of ``suffixes`` (any case)."""
    try:
        return [x for x in path.parent.glob(f"{glob.escape(path.stem)}.*") if x.stem == path.stem
                and x.suffix.lower() in suffixes]
    except OSError:
        return []


def _say_shared_style(path: Path, style: str) -> None:
    """``STEM.qml`` is QGIS's style for every file of that stem (out.geojson and out.fgb): say so
    when this output's style replaces a different one that another file of the stem still has."""
    q = path.with_suffix(".qml")
    try:
        if not q.is_file() or q.read_text(encoding="utf-8") == style:
            return
        others = sorted(x.name for x in path.parent.glob(f"{glob.escape(path.stem)}.*") if x.stem == path.stem
                        and x.name != path.name and x.suffix.lower() in FORMATS and x.suffix.lower() != ".gpkg")
    except (OSError, UnicodeDecodeError):
        return
    if others:
        log.warning("%s now styles %s too, with this output's classes and threshold (QGIS loads a STEM.qml for every "
                    "file of that stem): give outputs of different models different names", q.name, others[0])


def _check_name_fits(p: Path) -> None:
    """Files are written beside the output under longer names (``OUT.report.json``; SQLite's
    ``-journal``; the temporary folder ``.STEM.xxxxxxxx``): refuse a name they would take past the
    file system's limit, before any work rather than after it."""
    folder = next((a for a in (p.parent, *p.parent.parents) if a.exists()), Path("."))
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    longest = max(len(report_path(p).name.encode()), len(f".{p.stem}.geodet-xxxxxxxx".encode()))
    if longest > limit:
        raise GeodetError(f"{p.name[:40]}...: the name is too long ({len(p.name.encode())} bytes) for the files "
                          f"written beside it ({longest} of the file system's {limit}): choose a shorter name")


def check_output_folder(path: str | Path, flag: str = "--out") -> Path:
    """Fail before any work starts if ``path`` cannot be the run's output folder: it must be a
    folder or not exist yet, and the nearest existing folder on its path must take new files."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise GeodetError(f"{flag} must be a folder, but {p} is a file")
    _check_writable_in(p, p)
    return p


def _check_writable_in(folder: Path, target: Path) -> None:
    """The nearest existing folder on ``folder``'s path must take a new file (for ``target``)."""
    existing = next((a for a in (folder, *folder.parents) if a.exists()), Path("."))
    if not existing.is_dir():
        raise GeodetError(f"cannot write {target}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".geodet-write-test.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise GeodetError(f"cannot write in {existing} ({exc.strerror or exc}): choose another output folder") from None


def missing_folders(path: str | Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, deepest first (what a run will make)."""
    p = Path(os.path.abspath(path))  # normalised: a/../b names b, never a folder of the user's
    return [d for d in (p, *p.parents) if not d.exists()]


def remove_partial(files, folders) -> None:
    """Undo a failed run: remove ``files`` it wrote, then the ``folders`` it made (deepest first)
    while they are empty."""
    gone = set()
    for f in files:
        Path(f).unlink(missing_ok=True)
        gone.add(Path(f))
    WRITTEN[:] = [p for p in WRITTEN if p not in gone]  # an interrupt then names only what is still there
    for d in folders:
        try:
            Path(d).rmdir()
        except OSError:
            break


def boxes_to_polygons(boxes: np.ndarray, transform):
    """Pixel-edge boxes [N, 4] to polygons in the CRS of ``transform`` (exact affine of the corners)."""
    import shapely

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = boxes.T
    cols = np.stack([x0, x1, x1, x0, x0], axis=1)
    rows = np.stack([y0, y0, y1, y1, y0], axis=1)
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    xs = a * cols + b * rows + c
    ys = d * cols + e * rows + f
    coords = np.stack([xs, ys], axis=2)
    return shapely.polygons(coords)


@contextlib.contextmanager
def interrupts_held():
    """Ctrl+C (SIGINT) and SIGTERM that arrive inside are acted on as the block ends, so the
    renames of one output's files are not cut between two of them (main thread only: signal
    handlers are set there; elsewhere the block runs as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held, previous = [], {}
    signals = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else [])
    try:
        for sig in signals:
            if signal.getsignal(sig) is None:  # a handler set outside Python: it cannot be put back, so not held
                continue
            previous[sig] = signal.signal(sig, lambda signum, frame: held.append(signum))
    except (ValueError, OSError):  # not the main interpreter (an embedding host): as it is
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(held):
            handler = previous[sig]
            if callable(handler):
                handler(sig, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), sig)


LEFTOVER_AGE_S = 6 * 3600  # a temporary folder of geodet's untouched this long belongs to a run that was killed
_SWEPT: set = set()  # (folder, pattern) swept by this process: once each


def sweep_leftovers(folder: Path, pattern: str, max_age_s: float = LEFTOVER_AGE_S) -> int:
    """Remove the temporary folders (named by ``pattern``, a regex of the whole name) that a killed
    run left in ``folder``: none of their files was touched for ``max_age_s`` (a run still writing
    touches one every few seconds), so no live run's is taken. Returns how many went (said)."""
    import re as _re
    import time

    if (str(folder), pattern) in _SWEPT:
        return 0
    _SWEPT.add((str(folder), pattern))
    gone = 0
    try:
        entries = [e for e in os.scandir(folder) if e.is_dir(follow_symlinks=False) and _re.fullmatch(pattern, e.name)]
    except OSError:
        return 0
    now = time.time()
    for e in entries:
        try:
            latest = max([e.stat(follow_symlinks=False).st_mtime] +
                         [c.stat(follow_symlinks=False).st_mtime for c in os.scandir(e.path)])
        except OSError:
            continue
        if now - latest > max_age_s:
            shutil.rmtree(e.path, ignore_errors=True)
            gone += not os.path.exists(e.path)
    if gone:
        log.info("removed %d temporary folder(s) a killed run left in %s", gone, folder)
    return gone


WRITTEN: list[Path] = []  # outputs renamed into place by this process (the command says so when interrupted)


class atomic_path:
    """``with atomic_path(out) as tmp:`` write to ``tmp``; it replaces ``out`` only on success."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmpdir = None
        self.made: list[Path] = []  # folders made for it, removed again when the write fails
        self.stale: list[Path] = []  # files of an earlier output that go when this one lands (unless written anew)

    def __enter__(self) -> Path:
        # the folder normalised (a/../b is b: "a" is neither made nor needed)
        parent = self.parent = Path(os.path.abspath(self.path.parent if str(self.path.parent) else "."))
        try:
            self.made = missing_folders(parent)
            parent.mkdir(parents=True, exist_ok=True)
            sweep_leftovers(parent, rf"\.{re.escape(self.path.stem)}\.geodet-[a-z0-9_]{{8}}")  # a killed run's
            self.tmpdir = Path(tempfile.mkdtemp(prefix=f".{self.path.stem}.geodet-", dir=parent))
        except OSError as exc:
            remove_partial([], self.made)
            todo = "free some space there or choose" if exc.errno in _WRITE_ERRNOS else "choose"
            raise GeodetError(f"cannot write {self.path} ({exc.strerror or exc}): {todo} another output folder") from None
        return self.tmpdir / self.path.name

    def __exit__(self, exc_type, exc, tb):
        failed = exc is not None
        full = failed and _disk_refused(exc, self.tmpdir)  # asked while the failed write still fills the disk
        try:
            if exc_type is None:
                produced = sorted(self.tmpdir.iterdir())
                with interrupts_held():  # the output and its report land together, or neither does
                    for f in produced:  # a shapefile is several files with one stem
                        try:
                            os.replace(f, self.parent / f.name)
                        except OSError as err:
                            raise GeodetError(f"cannot write {self.path}: {brief(err)}: choose another output") from None
                        if f.name == self.path.name:
                            WRITTEN.append(self.path)
                    names = {f.name for f in produced}
                    for old in self.stale:
                        if old.name not in names:
                            old.unlink(missing_ok=True)
        except BaseException:
            failed = True
            raise
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            if failed:
                remove_partial([], self.made)
        if full:  # a full disk, a quota: one line, nothing left
            raise GeodetError(f"cannot write {self.path}: {brief(exc)}: free some space there or choose another "
                              "output folder") from None
        return False


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _disk_refused(exc: BaseException, tmpdir: Path) -> bool:
    """Whether ``exc`` (an OSError, or a writer's error wrapping GDAL's) says the disk refused
    the write into ``tmpdir`` (the output's folder): no space, a quota, a file too large, a
    read-only file system. Elsewhere (a temporary file of a library in /tmp) it is not the output's."""
    name = getattr(exc, "filename", None)
    if name and not Path(os.path.abspath(os.fsdecode(name))).is_relative_to(os.path.abspath(tmpdir)):
        return False
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
        return True
    text = str(exc)
    if any(s in text for s in ("No space left", "Disk quota", "File too large", "Read-only file system",
                               "database or disk is full")):
        return True
    # GDAL's drivers say it their own way ("Cannot write feature", "Unexpected I/O failure"): a
    # writer's failure (GDAL's, SQLite's, Arrow's) where the disk has (next to) nothing left failed for that
    writer = type(exc).__module__.split(".")[0] in ("pyogrio", "sqlite3", "pyarrow", "rasterio", "fiona")
    if not writer:
        return False
    try:
        st = os.statvfs(tmpdir)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < FULL_BYTES


FULL_BYTES = 1 << 20  # a disk with less free is full, for a writer's failure


def check_reaches_wgs84(crs, xy, fmt: str, what: str) -> None:
    """GeoJSON is written in WGS 84 (RFC 7946), as is a one-CRS file of scenes in several CRSs:
    ``crs`` (of ``what``, a scene) must have a way there at ``xy``; a local or engineering CRS has
    none, refused in one line (a ProjError ended the job once every tile had run)."""
    from pyproj import CRS, Transformer

    try:
        name = CRS.from_user_input(crs).name
    except Exception:
        name = str(crs)
    try:
        x, y = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(*xy, errcheck=True)
        ok = bool(np.isfinite([x, y]).all())
    except Exception:  # pyproj's CRSError, ProjError: no transformation
        ok = False
    if not ok:
        why = ("GeoJSON (RFC 7946) is written in WGS 84" if fmt == "geojson" else
               f"a .{fmt} of scenes in several CRSs is written in WGS 84")
        raise GeodetError(f"{what}: its CRS ({name}) has no transformation to WGS 84 (a local or engineering CRS?) "
                          f"and {why}: write .gpkg (each CRS in a layer of its own) or .csv")


def _check_groups_reach_wgs84(groups, fmt: str) -> None:
    """``check_reaches_wgs84`` for each CRS group of frames, at its first detections' centre, where
    they are written in WGS 84: GeoJSON, and a one-CRS format of several CRSs."""
    if not (fmt == "geojson" or fmt in SINGLE_CRS and len(groups) > 1):
        return
    for crs, members in groups:
        b = [m.total_bounds for m in members if len(m)]
        if crs is not None and b:
            scenes = sorted({str(v) for m in members if "scene" in m.columns for v in m["scene"]})
            check_reaches_wgs84(crs, ((b[0][0] + b[0][2]) / 2, (b[0][1] + b[0][3]) / 2), fmt,
                                ", ".join(scenes)[:200] or "the detections")


def crs_text(crs) -> str | None:
    """A CRS as text that names it exactly: its authority code where one matches it exactly (rasterio's
    ``to_string`` takes a 70 % match, naming a custom Lambert ESRI:54094), else its WKT."""
    if crs is None:
        return None
    from pyproj import CRS

    return CRS.from_user_input(crs).to_string()


def crs_groups(frames) -> list:
    """Frames grouped by CRS, in first-seen order: ``[(crs, [frames])]``."""
    groups = []
    for f in frames:
        for crs, members in groups:
            if crs == f.crs:
                members.append(f)
                break
        else:
            groups.append((f.crs, [f]))
    return groups


def distinct_crss(crss: list) -> list:
    distinct = []
    for c in crss:
        if c is not None and all(c != d for d in distinct):
            distinct.append(c)
    return distinct


def combine_frames(frames):
    """One frame of several scenes' detections: in their CRS when they share one, else in EPSG:4326
    (with a ``crs`` column naming each row's scene CRS) rather than in one scene's projection; rows
    of a scene without a CRS (CSV output) have no geometry there, their pixel boxes in ``px_*``."""
    import geopandas as gpd
    import pandas as pd

    groups = crs_groups(frames)
    if len(groups) <= 1:
        out = pd.concat(frames, ignore_index=True)
        return out.set_crs(frames[0].crs, allow_override=True) if frames[0].crs is not None else out
    parts = []
    for crs, members in groups:
        g = pd.concat(members, ignore_index=True)
        g.insert(1, "crs", crs.to_string() if crs is not None else None)
        if crs is None:  # pixel boxes have no place on the Earth: these rows keep them in px_x0..px_y1 only
            g = g.set_geometry(gpd.GeoSeries([None] * len(g), index=g.index, crs="EPSG:4326"))
        parts.append(to_wgs84(g))
    return pd.concat(parts, ignore_index=True)


def to_wgs84(frame):
    """``frame`` in EPSG:4326, a box that crosses the antimeridian split there into a MultiPolygon
    (as RFC 7946 asks), not a polygon 360 degrees wide the other way round the Earth."""
    import shapely
    from shapely import affinity

    out = frame.to_crs("EPSG:4326")
    geoms = np.array(out.geometry.values, dtype=object)
    b = shapely.bounds(geoms)
    cross = np.flatnonzero(np.nan_to_num(b[:, 2] - b[:, 0]) > 180)
    if not len(cross):
        return out

    def east_of_zero(xy):  # longitudes -180..0 as 180..360: the box is whole again
        return np.c_[np.where(xy[:, 0] < 0, xy[:, 0] + 360, xy[:, 0]), xy[:, 1]]

    for i in cross:
        whole = shapely.transform(geoms[i], east_of_zero)
        west = shapely.clip_by_rect(whole, -180, -90, 180, 90)
        east = affinity.translate(shapely.clip_by_rect(whole, 180, -90, 540, 90), xoff=-360)
        parts = [p for g in (west, east) for p in shapely.get_parts(g) if p.geom_type == "Polygon" and not p.is_empty]
        geoms[i] = shapely.MultiPolygon(parts) if len(parts) > 1 else parts[0] if parts else geoms[i]
    return out.set_geometry(list(geoms), crs="EPSG:4326")


def write_detections(gdf, path: str | Path, fmt: str | None = None, csv_geometry: str = "wkt",
                     style_min_score: float | None = None, report=None) -> Path:
    """Write detections (a frame, or a list of per-scene frames); the format comes from ``fmt`` or
    the file's extension. What a GIS user opens:

    - GeoPackage 1.2 with the default style in its ``layer_styles`` table; other vector formats
      get the same style as a ``.qml`` sidecar (QGIS loads it with the layer); with
      ``style_min_score`` (the model's operating point) the style draws only detections scoring
      at least that;
    - CSV with ``.prj`` (the CRS) and ``.csvt`` (column types) sidecars, which GDAL's CSV driver
      reads, and full-precision WKT;
    - GeoParquet (``.parquet``, with ``geo`` metadata) for large results;
    - scores rounded to ``SCORE_DECIMALS``.

    Scenes in several CRSs (one rule for ``geodet detect`` and ``geodet merge``): GeoJSON is
    EPSG:4326 anyway; a GeoPackage gets one layer per CRS (``STEM_EPSG``), each in its own CRS; CSV
    gets each row's WKT in its scene's CRS and a ``crs`` column; FlatGeobuf, Shapefile and
    GeoParquet (one CRS per file) are written in EPSG:4326 with a ``crs`` column naming each
    row's scene CRS.

    ``report`` (a function returning a dict, called once the detections are written): the JSON
    report ``OUT.report.json``, renamed into place with the output, so neither lands without
    the other."""
    import pandas as pd
    import pyogrio
    import shapely

    from .style import add_gpkg_style, qml

    import geopandas as gpd

    path = Path(path)
    fmt = output_format(path, fmt)
    if csv_geometry not in ("wkt", "pixel"):
        raise GeodetError(f"csv_geometry must be wkt or pixel, got {csv_geometry!r}")
    given = list(gdf) if isinstance(gdf, (list, tuple)) else [gdf]
    if not given or not all(isinstance(f, gpd.GeoDataFrame) for f in given):
        raise GeodetError("write_detections takes detections as a GeoDataFrame (what detect_scene returns) or a "
                          "list of them")
    frames = [_rounded(f) for f in given]
    groups = crs_groups(frames)
    if fmt in NEEDS_CRS and any(c is None for c, _ in groups):
        raise GeodetError(
            f"the scene has no CRS, so {fmt} output cannot be georeferenced: write CSV (-o out.csv) for pixel "
            "boxes, or assign the scene a CRS (gdal_edit.py -a_srs EPSG:xxxx)"
        )
    _check_groups_reach_wgs84(groups, fmt)  # before anything is written (merge too)
    classes = sorted({str(v) for f in frames if "label" in f.columns for v in f["label"]})
    if fmt == "shp" and path.suffix.lower() != ".shp":
        raise GeodetError(f"{path.name}: a shapefile's name ends in .shp: name it {path.stem}.shp")
    style = qml(classes, style_min_score)
    if fmt != "gpkg":
        _say_shared_style(path, style)
    landing = atomic_path(path)
    # one CRS no more: no old .prj left to lie (unless it is a shapefile's, beside: that is not the CSV's)
    landing.stale = [path.with_suffix(".prj")] if fmt == "csv" and not _stem_files(path, (".shp",)) else []
    with landing as tmp, warnings.catch_warnings():
        # GDAL's advice on a name that --format overrides (out.dat as gpkg) is not the user's business
        warnings.filterwarnings("ignore", message="The filename extension should be", category=RuntimeWarning)
        if fmt == "csv":
            _write_csv(groups, tmp, csv_geometry)
            tmp.with_suffix(".qml").write_text(style, encoding="utf-8")
        elif fmt == "gpkg":
            used = set()
            for k, (crs, members) in enumerate(groups):
                g = pd.concat(members, ignore_index=True).set_crs(crs, allow_override=True)
                epsg = crs.to_epsg()
                layer = path.stem if len(groups) == 1 else f"{path.stem}_{epsg if epsg else k + 1}"
                if layer.lower() in used:  # two CRSs with one EPSG code (another datum, a custom UTM): a layer each
                    layer = f"{layer}_{k + 1}"
                used.add(layer.lower())
                pyogrio.write_dataframe(g, tmp, driver=DRIVERS[fmt], layer=layer, geometry_type="Polygon",
                                        append=k > 0, dataset_options={"VERSION": GPKG_VERSION} if k == 0 else None)
                add_gpkg_style(tmp, layer, classes, style_min_score)
        elif fmt == "parquet":
            _typed_text(combine_frames(frames)).to_parquet(tmp, index=False)
            tmp.with_suffix(".qml").write_text(style, encoding="utf-8")
        else:
            out = combine_frames(frames)
            layer_opts = None
            if fmt == "geojson":
                out = to_wgs84(out)
                out = out.set_geometry(shapely.orient_polygons(out.geometry.values, exterior_cw=False), crs="EPSG:4326")
                # 9 decimals (0.1 mm) keep a 2 cm drone scene's boxes where they are; GDAL's default, 7, is 1 cm
                layer_opts = {"RFC7946": "YES", "WRITE_BBOX": "NO", "COORDINATE_PRECISION": "9"}
            if fmt == "shp":
                out = _shapefile_text(out)
            multi = bool((out.geom_type == "MultiPolygon").any())  # boxes split at the antimeridian
            target = tmp if fmt != "fgb" or tmp.suffix.lower() == ".fgb" else tmp.with_name(tmp.name + ".fgb")
            pyogrio.write_dataframe(out, target, driver=DRIVERS[fmt], layer_options=layer_opts,
                                    geometry_type="MultiPolygon" if multi else "Polygon", promote_to_multi=multi)
            if target != tmp:  # GDAL makes a folder of a FlatGeobuf named otherwise
                target.rename(tmp)
            tmp.with_suffix(".qml").write_text(style, encoding="utf-8")
            if fmt == "shp" and tmp.suffix != ".shp":  # GDAL names a shapefile's parts in lower case: A.SHP as given
                for part in tmp.parent.glob(f"{glob.escape(tmp.stem)}.*"):
                    if part.suffix in (".shp", ".shx", ".dbf", ".prj", ".cpg"):
                        part.rename(part.with_suffix(part.suffix.upper() if tmp.suffix.isupper() else part.suffix))
                if not tmp.exists():
                    tmp.with_suffix(".shp").rename(tmp)
        if report is not None:
            (tmp.parent / report_path(path).name).write_text(
                json.dumps(json_safe(report()), indent=2, default=str, allow_nan=False), encoding="utf-8")
    return path


def _typed_text(frame):
    """Text columns typed as text when there are no rows (an empty object column is Arrow's ``null``
    type, which a dataset of files with detections cannot be combined with): the type pandas gives
    a column of text (pandas 3's ``str``, Arrow's string on pandas 2)."""
    if len(frame):
        return frame
    import pandas as pd

    text = pd.Series(["x"]).dtype
    if text == object:  # pandas 2
        import pyarrow as pa

        text = pd.ArrowDtype(pa.string())
    for c in ("scene", "label", "crs"):
        if c in frame.columns and frame[c].dtype == object:
            frame[c] = frame[c].astype(text)
    return frame


SHP_TEXT = 254  # bytes in a shapefile's text field


def _shapefile_text(frame):
    """A shapefile's text fields hold 254 bytes: a ``crs`` column's WKT (a CRS without an authority
    code) is written as its PROJ string, which fits; a class name that does not fit is refused."""
    from pyproj import CRS

    if "crs" in frame.columns:
        long = {v for v in frame["crs"].dropna().unique() if len(str(v).encode()) > SHP_TEXT}
        if long:
            with warnings.catch_warnings():  # pyproj's note that a PROJ string is not the whole WKT: said here
                warnings.simplefilter("ignore", UserWarning)
                short = {v: CRS.from_user_input(v).to_proj4() for v in long}
            frame = frame.assign(crs=frame["crs"].map(lambda v: short.get(v, v)))
    if "label" in frame.columns:
        too_long = [v for v in frame["label"].dropna().unique() if len(str(v).encode()) > SHP_TEXT]
        if too_long:
            raise GeodetError(f"the class name {str(too_long[0])[:40]}... is longer than a shapefile's text field "
                              f"({SHP_TEXT} bytes): write .gpkg, .fgb or .parquet")
    return frame


def _rounded(frame):
    if "score" in frame.columns:
        frame = frame.copy()
        frame["score"] = frame["score"].astype("float64").round(SCORE_DECIMALS)
    return frame


# .csvt tokens that both GDAL's CSV driver and QGIS's Delimited Text reader accept (QGIS refuses the
# whole file for WKT, Integer64 or Integer(Boolean)); GDAL still finds the geometry in the wkt column
# by its name
CSVT = {"i": "Integer", "u": "Integer", "f": "Real", "b": "Integer"}


def _write_csv(groups, tmp: Path, csv_geometry: str) -> None:
    """CSV with full-precision WKT, a ``.csvt`` of column types and, with one CRS, a ``.prj``."""
    import pandas as pd

    parts = []
    for crs, members in groups:
        g = pd.concat(members, ignore_index=True)
        df = g.drop(columns="geometry").copy()
        if len(groups) > 1:
            df.insert(1, "crs", crs.to_string() if crs is not None else None)
        if csv_geometry == "wkt":
            df["wkt"] = g.geometry.to_wkt(rounding_precision=-1)
        parts.append(df)
    df = pd.concat(parts, ignore_index=True)
    df.to_csv(tmp, index=False)
    kinds = [CSVT.get(df[c].dtype.kind, "String") if c != "wkt" else "String" for c in df.columns]
    tmp.with_suffix(".csvt").write_text(",".join(f'"{k}"' for k in kinds) + "\n", encoding="ascii")
    crss = [c for c, _ in groups if c is not None]
    if len(groups) == 1 and crss:
        tmp.with_suffix(".prj").write_text(crss[0].to_wkt("WKT1_GDAL"), encoding="ascii")


def write_json(data: dict, path: str | Path) -> Path:
    """``data`` as JSON (RFC 8259: NaN and infinities, which JSON has no words for, as null)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(data), indent=2, default=str, allow_nan=False), encoding="utf-8")
    return path


def json_safe(v):
    """``v`` with every NaN or infinity (JSON has no words for them) as None, in dicts and lists."""
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def report_path(output: str | Path) -> Path:
    """``out.gpkg`` -> ``out.gpkg.report.json``: named after the whole output name, so outputs that
    differ only in format never share a report."""
    p = Path(output)
    return p.with_name(p.name + ".report.json")
