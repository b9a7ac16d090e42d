"""MNIST for dkmeans: fetched and verified once, then served as lazy Dask arrays."""

from .fetch import MIRRORS, MNIST_FILES, ChecksumError, DownloadError, default_cache_dir, locate_mnist
from .idx import IDXFormatError, read_idx
from .store import NpyRows, StoreError

__all__ = [
    "MIRRORS",
    "MNIST",
    "MNIST_FILES",
    "ChecksumError",
    "DownloadError",
    "IDXFormatError",
    "NpyRows",
    "StoreError",
    "default_cache_dir",
    "load_mnist",
    "locate_mnist",
    "read_idx",
]


def __getattr__(name: str):
    """MNIST and load_mnist, imported on first use (they bring dask.array; a worker reading chunks does not)."""
    if name in ("MNIST", "load_mnist"):
        from . import mnist

        return getattr(mnist, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
