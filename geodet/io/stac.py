"""Scenes from a STAC ItemCollection: one GDAL path per item, from the asset the user names (or
the item's one GeoTIFF asset), with the item's id as the scene's id.

Read as plain JSON (a STAC ItemCollection is a GeoJSON FeatureCollection of Items), so no STAC
library is needed to run one; hrefs become GDAL virtual paths: ``https://`` -> ``/vsicurl/``,
``s3://`` -> ``/vsis3/``, ``gs://`` -> ``/vsigs/``, ``az://`` -> ``/vsiaz/``; relative hrefs
are resolved against the JSON file's folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import GeodetError

SCHEMES = {"http://": "/vsicurl/http://", "https://": "/vsicurl/https://", "s3://": "/vsis3/", "gs://": "/vsigs/",
           "az://": "/vsiaz/"}


def gdal_path(href: str, base: Path) -> str:
    """An asset href as a path GDAL opens."""
    if href.startswith("/vsi"):
        return href
    for scheme, prefix in SCHEMES.items():
        if href.startswith(scheme):
            return prefix + href[len(scheme):]
    if href.startswith("file://"):
        href = href[len("file://"):]
    p = Path(href)
    return str(p if p.is_absolute() else (base / p).resolve())


def _is_geotiff(asset: dict) -> bool:
    t = str(asset.get("type", "")).lower()
    return "image/tiff" in t or str(asset.get("href", "")).lower().endswith((".tif", ".tiff"))


def stac_scenes(path, asset: str | None = None) -> list[tuple[str, str]]:
    """``[(item id, GDAL path)]`` for the items of the STAC ItemCollection (or single Item) in
    ``path``. ``asset`` names the asset key; without it each item must hold exactly one GeoTIFF
    asset (or one with the ``data`` role)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except OSError as exc:
        raise GeodetError(f"--stac {path}: cannot be read ({exc.strerror})") from None
    except ValueError as exc:
        raise GeodetError(f"--stac {path}: not JSON ({exc})") from None
    kind = doc.get("type") if isinstance(doc, dict) else None
    if kind == "FeatureCollection":
        items = doc.get("features") or []
    elif kind == "Feature":
        items = [doc]
    else:
        raise GeodetError(f"--stac {path}: not a STAC ItemCollection or Item (type is {kind!r})")
    if not items:
        raise GeodetError(f"--stac {path}: the collection holds no items")
    out = []
    for i, item in enumerate(items):
        assets = item.get("assets") or {}
        name = str(item.get("id") or f"item{i}")
        if asset is not None:
            if asset not in assets:
                raise GeodetError(f"--stac {path}: item {name} has no asset '{asset}' (it has: {', '.join(assets) or 'none'})")
            chosen = assets[asset]
        else:
            tiffs = [k for k, a in assets.items() if _is_geotiff(a)]
            data = [k for k in tiffs if "data" in (assets[k].get("roles") or [])]
            pick = tiffs if len(tiffs) == 1 else data
            if len(pick) != 1:
                raise GeodetError(f"--stac {path}: item {name} has {len(tiffs)} GeoTIFF assets ({', '.join(tiffs) or 'none'}): "
                                  "name one with --asset KEY")
            chosen = assets[pick[0]]
        href = chosen.get("href")
        if not href:
            raise GeodetError(f"--stac {path}: item {name}'s asset has no href")
        out.append((name, gdal_path(str(href), p.parent)))
    ids = [n for n, _ in out]
    if len(set(ids)) != len(ids):
        raise GeodetError(f"--stac {path}: item ids repeat; each item needs its own id")
    return out
