"""Shared test fixtures: the real MNIST files come from $DKMEANS_DATA_DIR."""

import os
from pathlib import Path

import numpy as np
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
    """Absolute path to a folder with the four original MNIST .gz files.

    CI points $DKMEANS_DATA_DIR at a local copy; on a user's machine without
    it, the real loader downloads and verifies the files into the user cache.
    """
    if MNIST_DIR is None:
        from dkmeans.data import locate_mnist

        files = locate_mnist()
        return files["train-images"].parent
    missing = [name for name in MNIST_FILENAMES if not (MNIST_DIR / name).is_file()]
    if missing:
        pytest.fail(f"DKMEANS_DATA_DIR={MNIST_DIR} lacks {', '.join(missing)}")
    return MNIST_DIR


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One fresh cache (downloads and chunked store) for the whole session."""
    return tmp_path_factory.mktemp("dkmeans-cache")


@pytest.fixture(scope="session")
def mnist(mnist_dir, cache_dir):
    """Full MNIST as lazy Dask arrays, through the real loader."""
    from dkmeans.data import load_mnist

    return load_mnist(data_dir=mnist_dir, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def mnist_numpy(mnist):
    """The same images in memory, for the scikit-learn and numpy oracles."""
    return mnist.train_images.compute(scheduler="synchronous"), np.asarray(mnist.train_labels)


@pytest.fixture(scope="session")
def client():
    """A real two-process LocalCluster (one thread each), shared by the tests that need one."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0", processes=True) as cluster:
        with Client(cluster) as c:
            yield c
