import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("GEODET_NO_PROGRESS", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "trees"


@pytest.fixture(scope="session")
def trees_dir():
    if not (SHARED / "yell_541000.tif").exists():
        pytest.skip("shared tree data not found beside the checkout")
    return SHARED
