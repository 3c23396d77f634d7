"""Small real samples shipped with geodet, for the README's examples and first tries without data
of one's own: ``geodet data trees -o sample/`` (or ``write_sample("trees", "sample")``).

``trees``: two 400 x 400 px RGB aerial scenes at 0.1 m from the US National Ecological
Observatory Network (NEON; public domain / CC0) with hand-drawn crown boxes from the sample
annotations of the ``deepforest`` package 2.1.0 (MIT licence, (c) 2019 Ben Weinstein):
``osbs_029`` (Ordway-Swisher, Florida, EPSG:32617, 61 crowns) and ``soap_061`` (Soaproot Saddle,
California, EPSG:32611, 37 crowns, classes Alive/Dead). Crowns are about 20-100 px across.
"""

from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path

from ..errors import GeodetError

log = logging.getLogger(__name__)

SAMPLES = {"trees": ("osbs_029", "soap_061")}
NOTICE = __doc__.split("\n\n", 1)[1]


def write_sample(name: str, out_dir: str | Path) -> dict[str, dict[str, Path]]:
    """Copy the sample ``name`` into ``out_dir`` (created): per scene, its GeoTIFF and labels
    (GeoJSON, column ``label``), and a README naming the sources and licences. Returns
    ``{scene: {"scene": tif, "labels": geojson}}``."""
    if name not in SAMPLES:
        raise GeodetError(f"unknown sample '{name}': choose one of {', '.join(SAMPLES)}")
    if not str(out_dir).strip():
        raise GeodetError("no folder given for the sample: -o FOLDER (e.g. -o sample)")
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
                paths[scene][kind] = target
                shipped = (src / f"{scene}{ext}").read_bytes()
                if target.is_file() and target.read_bytes() != shipped:  # the user's edits (labels fixed in QGIS)
                    log.warning("%s differs from the sample's (edited?): kept; delete it to get the sample's again",
                                target)
                    continue
                with atomic_path(target) as tmp:
                    tmp.write_bytes(shipped)
        with atomic_path(out / "README.txt") as tmp:
            tmp.write_text(f"geodet sample '{name}'\n\n{NOTICE}", encoding="utf-8")
    except OSError as exc:  # a read-only or full file system, a folder we may not write in
        raise GeodetError(f"cannot write the sample in {out} ({exc.strerror or exc}): choose another folder") from None
    return paths
