"""MNIST as lazy, row-chunked Dask arrays, optionally subsampled."""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
from dask.base import tokenize

from .fetch import MNIST_FILES, default_cache_dir, locate_mnist
from .fsstore import FsspecStore, ensure_fs_store
from .store import IMAGE_SHAPE, Store, dask_rows, ensure_store, ensure_store_at

__all__ = ["MNIST", "load_mnist"]


@dataclass(frozen=True)
class MNIST:
    """Images stay lazy (they are what gets distributed); labels are small and eager."""

    train_images: da.Array  # uint8, (n_train, 784), chunked by rows
    train_labels: np.ndarray  # int64, (n_train,), read-only
    test_images: da.Array  # uint8, (n_test, 784), chunked by rows
    test_labels: np.ndarray  # int64, (n_test,), read-only
    image_shape: tuple[int, int] = IMAGE_SHAPE


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    chunk_rows: int = 6000,
    train_per_digit: int | None = None,
    test_size: int | None = None,
    seed: int | None = 0,
    store: str | os.PathLike[str] | None = None,
    storage_options: dict | None = None,
) -> MNIST:
    """Load MNIST, fetching and converting it into the cache on first use.

    `train_per_digit` keeps that many training images of each digit (a
    balanced subset) and `test_size` that many random test images; both are
    reproducible from `seed`, and each draws from its own random stream so
    one choice does not change the other's sample.

    `store` puts the chunked store somewhere every worker can read instead
    of the cache: a folder, or an fsspec URL (`s3://bucket/mnist-store`, with
    `storage_options` for its filesystem); see data/fsstore.py.
    """
    _check_int("chunk_rows", chunk_rows, low=1)
    if train_per_digit is not None:
        _check_int("train_per_digit", train_per_digit, low=1)
    if test_size is not None:
        _check_int("test_size", test_size, low=1)

    sources = {name: spec.sha256 for name, spec in MNIST_FILES.items()}
    if store is not None and "://" in str(store):
        store = ensure_fs_store(
            str(store), sources, lambda: locate_mnist(data_dir=data_dir, cache_dir=cache_dir), storage_options
        )
    else:
        files = locate_mnist(data_dir=data_dir, cache_dir=cache_dir)
        cache = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
        store = ensure_store(files, cache, sources) if store is None else ensure_store_at(files, store, sources)

    train_x, train_y = _lazy(store, "train-images", chunk_rows), store.load("train-labels")
    test_x, test_y = _lazy(store, "test-images", chunk_rows), store.load("test-labels")

    train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    if train_per_digit is not None:
        keep = _balanced(train_y, train_per_digit, train_rng)
        train_x, train_y = train_x[keep].rechunk((chunk_rows, train_x.shape[1])), train_y[keep]
    if test_size is not None:
        _check_int("test_size", test_size, low=1, high=len(test_y))
        keep = np.sort(test_rng.choice(len(test_y), size=test_size, replace=False))
        test_x, test_y = test_x[keep].rechunk((chunk_rows, test_x.shape[1])), test_y[keep]

    return MNIST(train_x, _frozen_labels(train_y), test_x, _frozen_labels(test_y))


def _lazy(store: Store | FsspecStore, name: str, chunk_rows: int) -> da.Array:
    """Wrap a stored array so each task reads its own rows; the name is stable across loads."""
    rows = store.rows(name)
    return dask_rows(
        rows, (chunk_rows, rows.shape[1]), f"mnist-{name}-{tokenize(store.token, str(rows.path), chunk_rows)}"
    )


def _balanced(labels: np.ndarray, per_digit: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `per_digit` random examples of each digit; sorted keeps Dask reads sequential."""
    by_digit = [np.flatnonzero(labels == digit) for digit in range(10)]
    rarest = min(range(10), key=lambda digit: len(by_digit[digit]))
    _check_int(
        "train_per_digit",
        per_digit,
        low=1,
        high=len(by_digit[rarest]),
        why=f"digit {rarest} has only {len(by_digit[rarest])} training images",
    )
    return np.sort(np.concatenate([rng.choice(idx, size=per_digit, replace=False) for idx in by_digit]))


def _frozen_labels(labels: np.ndarray) -> np.ndarray:
    out = labels.astype(np.int64)  # avoids uint8 wrap-around in user arithmetic
    out.flags.writeable = False
    return out


def _check_int(name: str, value: object, low: int, high: int | None = None, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        reason = f" ({why})" if why else ""
        raise ValueError(f"{name} must be {bound}{reason}, got {value}")
