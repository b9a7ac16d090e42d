"""Shared test fixtures: the real MNIST files come from $DKMEANS_DATA_DIR."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MNIST_FILENAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _resolve_data_dir() -> Path | None:
    """CI gives the path relative to the repo root; make it absolute so cwd never matters."""
    value = os.environ.get("DKMEANS_DATA_DIR")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = REPO_ROOT / path
    path = path.resolve()
    os.environ["DKMEANS_DATA_DIR"] = str(path)  # subprocesses and library calls see the same folder
    return path


MNIST_DIR = _resolve_data_dir()


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """Absolute path to the folder with the four original MNIST .gz files."""
    if MNIST_DIR is None:
        pytest.skip("DKMEANS_DATA_DIR is not set; point it at a folder holding the four MNIST .gz files")
    missing = [name for name in MNIST_FILENAMES if not (MNIST_DIR / name).is_file()]
    if missing:
        pytest.fail(f"DKMEANS_DATA_DIR={MNIST_DIR} lacks {', '.join(missing)}")
    return MNIST_DIR
