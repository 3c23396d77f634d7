"""File fingerprints, below every floor: the model file, its ONNX exports and the detection
outputs are all keyed by the SHA-256 of a file's bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of the file at ``path``, read in 1 MiB chunks (model files run to 100s of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
