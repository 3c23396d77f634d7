from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    """Runs on the sample geodet ships (no data beside the checkout needed), as a user would."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("GEODET_NOTEBOOK_STEPS", "3")
    monkeypatch.setenv("GEODET_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("GEODET_NO_PROGRESS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    assert (tmp_path / "soap_061_trees.gpkg").exists()
    assert (tmp_path / "run" / "model.pt").exists()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "AP50" in text and "fitted anchors" in text
