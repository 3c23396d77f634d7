"""Writing an output whole or not at all: a temporary folder beside it, renamed into place with
interrupts held; a full disk said in one line; a killed run's leftovers swept."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from ..errors import GeodetError, brief

log = logging.getLogger(__name__)


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
