"""Small text files the user writes (a scene list, STAC JSON, a config): read whatever editor
wrote them, and their relative paths taken as naming files beside them."""

from __future__ import annotations

import codecs
import logging
import os
from pathlib import Path

from .errors import GeodetError

log = logging.getLogger(__name__)

REMOTE = ("http://", "https://", "s3://", "gs://", "az://", "ftp://")


def read_user_text(path, what: str) -> str:
    """The text of ``path`` (``what`` names it in errors, e.g. ``--scene-list list.txt``): UTF-8
    with or without a byte-order mark (Notepad, PowerShell), UTF-16 with one (PowerShell 5's
    ``Out-File``); anything else is refused in one line, as is an address (it is read as a file)."""
    if str(path).startswith(REMOTE):
        raise GeodetError(f"{what}: an address, and this must be a local file: download it first "
                          "(its entries may still be addresses)")
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise GeodetError(f"{what}: cannot be read ({exc.strerror})") from None
    for bom, encoding in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                          (codecs.BOM_UTF16_BE, "utf-16")):
        if raw.startswith(bom):
            break
    else:
        encoding = "utf-8"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        first = exc.start
    import locale

    local = locale.getpreferredencoding(False)  # Windows' ANSI code page (cp1252), as Notepad saved it once
    if codecs.lookup(local).name != "utf-8":
        try:
            text = raw.decode(local)
        except UnicodeDecodeError:
            pass
        else:
            log.warning("%s: not UTF-8: read as %s, this system's encoding", what, local)
            return text
    raise GeodetError(f"{what}: not UTF-8 text (byte {first}): save it as UTF-8")


def beside(p, file, what: str):
    """``p``, a path written in the text file ``file``: a relative one names a file beside
    ``file`` (as a project folder is laid out), so the result is the same from any working folder;
    one found only from the working folder still works, and one that names a different file from
    each is refused as ambiguous. Absolute paths, addresses and GDAL paths stay as written."""
    if not p or "://" in str(p) or str(p).startswith("/vsi") or os.path.isabs(p):
        return p
    from .io.raster import split_connection

    parts = split_connection(p)
    if parts is not None:  # GPKG:file:table: its file, found as any path is
        near = beside(parts[1], file, what)
        return p if near == parts[1] else f"{parts[0]}:{near}" + (f":{parts[2]}" if parts[2] else "")
    here, there = Path(p), Path(file).resolve().parent / p
    if not there.exists() or here.resolve() == there.resolve():
        return p
    if here.exists():
        raise GeodetError(f"{file}: {p} names {here.resolve()} from the working folder and {there} beside "
                          f"{what}: write the path absolute")
    return str(there)
