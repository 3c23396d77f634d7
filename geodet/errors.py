"""The one error type that geodet raises for every expected failure."""


class GeodetError(Exception):
    """An expected failure: bad input, a bad setting, a missing file.

    The message says what is wrong and what to do; the CLI prints it as one line.
    """


class ReadError(GeodetError):
    """A window of a raster could not be read: the file is damaged or incomplete, or a remote
    read kept failing. ``info`` holds the window (in the grid's pixels), its map bounds and
    GDAL's message (``read_error`` makes one)."""

    def __init__(self, message: str, info: dict | None = None):
        super().__init__(message)
        self.info = info or {}


REMOTE_PREFIXES = ("/vsicurl", "/vsis3", "/vsigs", "/vsiaz", "/vsiadls", "/vsioss", "/vsiswift", "http://", "https://",
                   "s3://", "gs://", "az://")  # the last three: URLs rasterio turns into /vsis3/, /vsigs/, /vsiaz/


def read_error(path, window: tuple, bounds: tuple | None, gdal_message: str, skip_hint: bool = True) -> ReadError:
    """The one-line ``ReadError`` for an unreadable ``window`` ``(col_off, row_off, width,
    height)`` of ``path``: where (pixels and map), why (GDAL's own words), what to do (and, where
    the command has it, that ``--on-read-error skip`` runs the rest)."""
    path = str(path)
    c0, r0, w, h = (int(v) for v in window)
    where = f"rows {r0}-{r0 + h - 1}, columns {c0}-{c0 + w - 1}"
    if bounds is not None:
        where += f" (map x {bounds[0]:.2f} to {bounds[2]:.2f}, y {bounds[1]:.2f} to {bounds[3]:.2f})"
    remote = path.startswith(REMOTE_PREFIXES)
    cause = ("the remote reads kept failing after retries" if remote else
             "the file looks damaged or incomplete (a partial download or a corrupt block)")
    todo = "check the connection or the object store" if remote else "fetch or copy the file again"
    message = f"{path}: cannot read {where}: {cause}; GDAL says: {gdal_message}. To fix: {todo}"
    if skip_hint:
        message += ", or pass --on-read-error skip to run the other tiles and list the unreadable ones in the report"
    info = {"window": {"col_off": c0, "row_off": r0, "width": w, "height": h},
            "bounds": None if bounds is None else [round(float(v), 3) for v in bounds], "error": gdal_message}
    return ReadError(message, info)


def brief(exc: BaseException, limit: int = 160) -> str:
    """The first line of ``exc``'s message (its type's name when empty), cut at a word boundary
    near ``limit`` characters, for a one-line error."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0].rstrip(",;:(")
    return (cut if len(cut) > limit // 2 else text[:limit]) + "..."
