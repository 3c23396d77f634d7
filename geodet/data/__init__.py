"""Small real samples shipped with geodet, for the README's examples and first tries without data
of one's own: ``geodet data trees -o sample/`` (or ``write_sample("trees", "sample")``).

``trees``: two 400 x 400 px RGB aerial scenes at 0.1 m from the US National Ecological
Observatory Network (NEON; public domain / CC0) with hand-drawn crown boxes from the sample
annotations of the ``deepforest`` package 2.1.0 (MIT licence, (c) 2019 Ben Weinstein):
``osbs_029`` (Ordway-Swisher, Florida, EPSG:32617, 61 crowns) and ``soap_061`` (Soaproot Saddle,
California, EPSG:32611, 37 crowns, classes Alive/Dead). Crowns are about 20-100 px across.
"""

from __future__ import annotations

import shutil
from importlib.resources import files
from pathlib import Path

from ..errors import GeodetError

SAMPLES = {"trees": ("osbs_029", "soap_061")}
NOTICE = __doc__.split("\n\n", 1)[1]


def write_sample(name: str, out_dir: str | Path) -> dict[str, dict[str, Path]]:
    """Copy the sample ``name`` into ``out_dir`` (created): per scene, its GeoTIFF and labels
    (GeoJSON, column ``label``), and a README naming the sources and licences. Returns
    ``{scene: {"scene": tif, "labels": geojson}}``."""
    if name not in SAMPLES:
        raise GeodetError(f"unknown sample '{name}': choose one of {', '.join(SAMPLES)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GeodetError(f"{out} is a file: give a folder for the sample")
    from ..io.writers import atomic_path, check_output_folder

    check_output_folder(out, "-o")  # the nearest existing folder must take new files
    src = files("geodet") / "data" / name
    paths = {}
    try:
        out.mkdir(parents=True, exist_ok=True)
        for scene in SAMPLES[name]:
            paths[scene] = {}
            for kind, ext in (("scene", ".tif"), ("labels", ".geojson")):
                target = out / f"{scene}{ext}"
                with (src / f"{scene}{ext}").open("rb") as f, atomic_path(target) as tmp, open(tmp, "wb") as g:
                    shutil.copyfileobj(f, g)
                paths[scene][kind] = target
        with atomic_path(out / "README.txt") as tmp:
            tmp.write_text(f"geodet sample '{name}'\n\n{NOTICE}", encoding="utf-8")
    except OSError as exc:  # a read-only or full file system, a folder we may not write in
        raise GeodetError(f"cannot write the sample in {out} ({exc.strerror or exc}): choose another folder") from None
    return paths
