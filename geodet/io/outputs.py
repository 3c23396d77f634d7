"""Where an output may go: checked before any work (the folder takes files, the name fits, no input
or other file of the user's is replaced), and the names of what is written beside it."""

from __future__ import annotations

import errno
import glob
import logging
import os
import tempfile
from pathlib import Path

from ..errors import GeodetError

log = logging.getLogger(__name__)

FORMATS = {
    ".geojson": "geojson", ".json": "geojson", ".gpkg": "gpkg", ".fgb": "fgb", ".shp": "shp", ".csv": "csv",
    ".parquet": "parquet",
}


def same_file_key(path) -> str:
    """A key equal for two names of one local file (a link, ./a.tif and a.tif; a layer's
    ``file|layername=...`` and a GDAL ``GPKG:file:table`` name their file); a URL or /vsi path
    as it is."""
    from .raster import connection_file

    p = str(path)
    if "://" in p or p.startswith("/vsi"):
        return p
    return os.path.normcase(os.path.realpath(connection_file(p) or p.split("|")[0]))


def scene_key(path) -> str:
    """A key equal for two names of one scene: ``same_file_key``, except that the rasters of one
    container (two tables of a GeoPackage, ``GPKG:x.gpkg:a`` and ``GPKG:x.gpkg:b``) are two scenes."""
    from .raster import split_connection

    parts = split_connection(path)
    return same_file_key(path) if parts is None else f"{parts[0]}:{same_file_key(parts[1])}:{parts[2]}"


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
    try:
        is_dir = p.is_dir()
    except OSError as exc:  # a name past the file system's limit, before anything else
        if exc.errno != errno.ENAMETOOLONG:
            raise
        raise GeodetError(f"{p.name[:40]}...: {exc.strerror or exc}: choose a shorter name") from None
    if is_dir:
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


def stem_files(path: Path, suffixes) -> list:
    """Files beside ``path`` of its stem with one of ``suffixes`` (any case)."""
    try:
        return [x for x in path.parent.glob(f"{glob.escape(path.stem)}.*") if x.stem == path.stem
                and x.suffix.lower() in suffixes]
    except OSError:
        return []


def say_shared_style(path: Path, style: str) -> None:
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


def report_path(output: str | Path) -> Path:
    """``out.gpkg`` -> ``out.gpkg.report.json``: named after the whole output name, so outputs that
    differ only in format never share a report."""
    p = Path(output)
    return p.with_name(p.name + ".report.json")
