"""The one progress helper: tqdm bars that stay silent when disabled or not on a terminal."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(total=None, desc: str = "", unit: str = "it", enabled: bool = True, **kwargs):
    """A tqdm bar (rate and time left included), or a silent one when ``enabled`` is False."""
    return tqdm(
        total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
        mininterval=0.5, **kwargs,
    )
