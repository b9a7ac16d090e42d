"""MNIST for dkmeans: fetched and verified once, then served as lazy Dask arrays."""

from .fetch import MIRRORS, MNIST_FILES, ChecksumError, DownloadError, default_cache_dir, locate_mnist
from .idx import IDXFormatError, read_idx
from .mnist import MNIST, load_mnist
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
