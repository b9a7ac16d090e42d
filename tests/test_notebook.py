"""The showcase notebook runs top to bottom, headlessly, on a small subsample (DKMEANS_NOTEBOOK_QUICK=1)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "mnist_kmeans.ipynb"


def test_notebook_executes_without_error(tmp_path, mnist_dir, monkeypatch):
    monkeypatch.setenv("DKMEANS_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("DKMEANS_DATA_DIR", str(mnist_dir))
    monkeypatch.setenv("DKMEANS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel then draws inline, as in Jupyter
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Dask dashboard: http://" in text
    assert "sample:" in text and "random:" in text and "test accuracy" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # two loss curves, two centroid grids, the confusion matrix and the elbow plot
    assert len(images) == 6
    tables = [o for o in outputs if "text/markdown" in o.get("data", {})]
    assert tables and "| sample | 20 |" in tables[-1]["data"]["text/markdown"]


def test_notebook_is_committed_without_outputs():
    """Outputs would go stale with every change; the README shows the figures instead."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")
    if any("execution_count" in c and c["execution_count"] for c in nb.cells):
        pytest.fail("notebook has execution counts; clear it before committing")
