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
    """An asset href as a path GDAL opens. A local href is a URI reference (``file:`` or
    relative): its percent-escapes are decoded (``sc%C3%A8ne%201.tif`` is ``scène 1.tif``)."""
    from urllib.parse import unquote

    if href.startswith("/vsi"):
        return href
    for scheme, prefix in SCHEMES.items():
        if href.startswith(scheme):
            return prefix + href[len(scheme):]
    if href.startswith("file:"):
        href = href[len("file:"):]
        if href.startswith("//"):  # file:///abs or file://localhost/abs (a host other than this one is not ours)
            host, _, rest = href[2:].partition("/")
            if host not in ("", "localhost"):
                raise GeodetError(f"{href}: a file on host {host}: mount it and give its local path")
            href = "/" + rest
    p = Path(href)
    if "%" in href and not (p if p.is_absolute() else base / p).exists():
        p = Path(unquote(href))
    return str(p if p.is_absolute() else (base / p).resolve())


def _is_geotiff(asset: dict) -> bool:
    t = str(asset.get("type", "")).lower()
    return "image/tiff" in t or str(asset.get("href", "")).lower().endswith((".tif", ".tiff"))


def _roles(asset: dict) -> list[str]:
    roles = asset.get("roles") or []
    return [str(r) for r in roles] if isinstance(roles, list) else [str(roles)]


# an item's small previews: never the scene, however they are typed
PREVIEWS = {"thumbnail", "overview"}


def _items(doc, path) -> list[dict]:
    kind = doc.get("type") if isinstance(doc, dict) else None
    if kind == "FeatureCollection":
        items = doc.get("features") or []
    elif kind == "Feature":
        items = [doc]
    else:
        raise GeodetError(f"--stac {path}: not a STAC ItemCollection or Item (type is {kind!r})")
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise GeodetError(f"--stac {path}: 'features' must be a list of STAC Items (JSON objects)")
    if not items:
        raise GeodetError(f"--stac {path}: the collection holds no items")
    return items


def _pick(assets: dict, name: str, path, asset: str | None) -> dict:
    """The asset of item ``name`` to read: the one ``asset`` names, or the item's one GeoTIFF
    asset that is not a preview (or the one of those with the ``data`` role)."""
    if asset is not None:
        if asset not in assets:
            raise GeodetError(f"--stac {path}: item {name} has no asset '{asset}' (it has: {', '.join(assets) or 'none'})")
        return assets[asset]
    tiffs = [k for k, a in assets.items() if _is_geotiff(a) and not PREVIEWS & set(_roles(a))]
    data = [k for k in tiffs if "data" in _roles(assets[k])]
    pick = tiffs if len(tiffs) == 1 else data
    if len(pick) != 1:
        previews = [k for k, a in assets.items() if _is_geotiff(a) and k not in tiffs]
        also = f"; {', '.join(previews)} only a preview" if previews else ""
        raise GeodetError(f"--stac {path}: item {name} has {len(tiffs)} GeoTIFF assets ({', '.join(tiffs) or 'none'}"
                          f"{also}): name the one to read with --asset KEY (it has: {', '.join(assets) or 'none'})")
    return assets[pick[0]]


def stac_scenes(path, asset: str | None = None) -> list[tuple[str, str]]:
    """``[(item id, GDAL path)]`` for the items of the STAC ItemCollection (or single Item) in
    ``path``. ``asset`` names the asset key; without it each item must hold exactly one GeoTIFF
    asset that is not a thumbnail or overview (or one of them with the ``data`` role)."""
    from ..textfiles import read_user_text

    p = Path(path)
    try:
        doc = json.loads(read_user_text(path, f"--stac {path}"))
    except ValueError as exc:
        raise GeodetError(f"--stac {path}: not JSON ({exc})") from None
    out = []
    for i, item in enumerate(_items(doc, path)):
        assets = item.get("assets") or {}
        name = str(item.get("id") or f"item{i}")
        if not isinstance(assets, dict) or not all(isinstance(a, dict) for a in assets.values()):
            raise GeodetError(f"--stac {path}: item {name}: 'assets' must be an object of assets, each an object "
                              "with an 'href'")
        href = _pick(assets, name, path, asset).get("href")
        if not href or not isinstance(href, str):
            raise GeodetError(f"--stac {path}: item {name}'s asset has no href (a text address)")
        out.append((name, gdal_path(href, p.parent)))
    ids = [n for n, _ in out]
    if len(set(ids)) != len(ids):
        raise GeodetError(f"--stac {path}: item ids repeat; each item needs its own id")
    return out
