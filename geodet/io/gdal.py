"""The GDAL settings geodet reads scenes in, and the exceptions and messages of a failed read."""

from __future__ import annotations

import os

# GDAL's block cache defaults to 5% of RAM and fills as a scene streams through, so memory would
# grow with scene size. A row of overlapping tiles shares blocks with the next, which a cache of
# this size holds (without one, every tile decodes its blocks again: 7x slower reads). geodet's
# reads run with this cap (unless GDAL_CACHEMAX is set); nothing changes for the rest of the process.
GDAL_CACHE_MB = 128


def gdal_env():
    """The ``rasterio.Env`` that geodet streams scenes in: GDAL's block cache capped at
    ``GDAL_CACHE_MB`` unless the user set ``GDAL_CACHEMAX``; leaving it restores GDAL. Wrap a
    whole loop of reads in it (``with gdal_env(): for tile in grid: scene.read_tile(tile)``), not
    each read: entering it re-applies the cache limit, ~2 ms each time."""
    import rasterio

    # in bytes: rasterio hands an integer to GDALSetCacheMax64, so 128 would be a 128-byte cache (no
    # cache at all: every overlapping tile decoded its blocks again, 7x slower reads)
    options = {} if os.environ.get("GDAL_CACHEMAX") else {"GDAL_CACHEMAX": GDAL_CACHE_MB * 1024 * 1024}
    # remote reads (/vsicurl/, /vsis3/, ...): retry transient failures (HTTP 429, 5xx, dropped
    # connections), waiting GDAL_HTTP_RETRY_DELAY s, then twice as long each time
    for key, value in HTTP_RETRY.items():
        if not os.environ.get(key):
            options[key] = value
    return rasterio.Env(**options)


HTTP_RETRY = {"GDAL_HTTP_MAX_RETRY": "5", "GDAL_HTTP_RETRY_DELAY": "0.5",
              # a remote scene is one object: do not list its folder or probe for sidecars
              "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}



def READ_ERRORS() -> tuple:
    """The exceptions of a failed GDAL read (a damaged block, a truncated file, a failed range
    request)."""
    from rasterio.errors import RasterioError

    try:
        from rasterio._err import CPLE_BaseError
    except ImportError:  # rasterio's private module moved
        return (RasterioError,)
    return (RasterioError, CPLE_BaseError)


def gdal_message(exc: BaseException) -> str:
    """GDAL's own words: rasterio's 'Read failed. See previous exception' points back to them."""
    msgs = []
    e = exc
    while e is not None and len(msgs) < 4:
        text = " ".join(str(e).split())
        if text and "See previous exception" not in text:
            msgs.append(text)
        e = e.__cause__ or e.__context__
    return "; ".join(dict.fromkeys(msgs)) or " ".join(str(exc).split()) or type(exc).__name__
