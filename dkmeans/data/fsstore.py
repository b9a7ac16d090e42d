"""The chunked store in any fsspec location, for clusters without a shared disk.

The layout is the local store's (one `.npy` per array and `manifest.json`),
so a store folder built locally can be copied to an object store as is. Each
worker reads its own rows with one ranged read (`fs.cat_file(path, start,
end)`): for `s3://` that is one HTTP range request per chunk, nothing else is
downloaded. The workers need the filesystem's package (s3fs, gcsfs, ...) and
its credentials, exactly as the client does.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from fsspec.core import url_to_fs

from .store import _PAIRS, FORMAT_VERSION, IMAGE_SHAPE, StoreError, _read_pair

__all__ = ["FsspecRows", "FsspecStore", "ensure_fs_store", "open_fs_store"]

log = logging.getLogger(__name__)


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def _npy_header(url: str, storage_options: Mapping[str, Any]) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and the byte offset where a C-ordered `.npy` file's data starts."""
    with fsspec.open(url, "rb", **storage_options) as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(f)
        if fortran_order:
            raise StoreError(f"{url}: Fortran-ordered arrays cannot be read by rows")
        return tuple(shape), np.dtype(dtype), f.tell()


class FsspecRows:
    """A lazy, picklable view of a `.npy` file at an fsspec URL; each read fetches only the rows asked for."""

    __slots__ = ("url", "shape", "dtype", "offset", "storage_options")

    def __init__(self, url: str, shape, dtype, offset: int, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = str(url)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.offset = int(offset)
        self.storage_options = dict(storage_options or {})

    @property
    def path(self) -> str:  # what load_mnist tokenizes, as for NpyRows
        return self.url

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        rows, rest = key[0], key[1:]
        if isinstance(rows, slice) and rows.step in (None, 1):
            start, stop, _ = rows.indices(self.shape[0])
            stop, pick = max(start, stop), slice(None)
        else:  # integers, index arrays, other steps: read the span that covers them once
            idx = np.arange(self.shape[0])[rows]
            start, stop = (int(idx.min()), int(idx.max()) + 1) if idx.size else (0, 0)
            pick = idx - start
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        if stop > start:
            fs, path = url_to_fs(self.url, **self.storage_options)
            raw = fs.cat_file(path, start=self.offset + start * row_bytes, end=self.offset + stop * row_bytes)
        else:
            raw = b""
        block = np.frombuffer(bytearray(raw), dtype=self.dtype).reshape((stop - start,) + self.shape[1:])
        return block[(pick,) + rest]

    def __reduce__(self):
        return (FsspecRows, (self.url, self.shape, self.dtype.str, self.offset, self.storage_options))

    def __repr__(self) -> str:
        return f"FsspecRows({self.url!r}, shape={self.shape}, dtype={self.dtype})"


@dataclass(frozen=True)
class FsspecStore:
    """A validated store at an fsspec URL; the same interface as store.Store."""

    path: str
    manifest: Mapping[str, Any]
    token: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def rows(self, name: str) -> FsspecRows:
        url = _join(self.path, self.manifest["arrays"][name]["file"])
        shape, dtype, offset = _npy_header(url, self.storage_options)
        return FsspecRows(url, shape, dtype, offset, self.storage_options)

    def load(self, name: str) -> np.ndarray:
        fs, path = url_to_fs(_join(self.path, self.manifest["arrays"][name]["file"]), **self.storage_options)
        return np.load(io.BytesIO(fs.cat_file(path)), allow_pickle=False)


def open_fs_store(
    url: str, sources: Mapping[str, str], storage_options: Mapping[str, Any] | None = None
) -> FsspecStore | None:
    """The store at `url` if its manifest is complete and built from `sources`, else None."""
    options = dict(storage_options or {})
    try:
        fs, root = url_to_fs(url, **options)
        text = fs.cat_file(_join(root, "manifest.json"))
        manifest = json.loads(text)
        if manifest.get("format_version") != FORMAT_VERSION:
            return None
        if manifest.get("sources") != {name: {"sha256": sha} for name, sha in sources.items()}:
            return None
        if set(manifest["arrays"]) != set(sources):
            return None
        for entry in manifest["arrays"].values():
            shape, dtype, _ = _npy_header(_join(url, entry["file"]), options)
            if list(shape) != entry["shape"] or dtype.str != entry["dtype"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return FsspecStore(url, manifest, hashlib.sha256(text).hexdigest()[:16], options)


def ensure_fs_store(
    url: str,
    sources: Mapping[str, str],
    locate_files: Callable[[], Mapping[str, Any]],
    storage_options: Mapping[str, Any] | None = None,
) -> FsspecStore:
    """Open the store at `url`, building it from the IDX files (located only if needed) unless it is valid.

    Object stores cannot rename a folder atomically, so the manifest is the
    commit marker: it is deleted first and written last, and a store without
    a valid manifest is never read.
    """
    options = dict(storage_options or {})
    try:
        fs, root = url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:  # unknown protocol, or its package (s3fs, gcsfs...) missing
        raise StoreError(f"store {url}: {exc}") from exc
    store = open_fs_store(url, sources, options)
    if store is not None:
        return store
    files = locate_files()
    log.info("converting MNIST into the chunked store %s (once)", url)
    fs.makedirs(root, exist_ok=True)
    manifest_path = _join(root, "manifest.json")
    if fs.exists(manifest_path):
        fs.rm(manifest_path)
    arrays: dict[str, dict[str, Any]] = {}
    for images_name, labels_name in _PAIRS:
        images, labels = _read_pair(files[images_name], files[labels_name])
        for name, array in ((images_name, images), (labels_name, labels)):
            with fs.open(_join(root, f"{name}.npy"), "wb") as f:
                np.save(f, array)
            arrays[name] = {"file": f"{name}.npy", "shape": list(array.shape), "dtype": array.dtype.str}
    manifest = {
        "format_version": FORMAT_VERSION,
        "image_shape": list(IMAGE_SHAPE),
        "arrays": arrays,
        "sources": {name: {"sha256": sha} for name, sha in sources.items()},
    }
    fs.pipe_file(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    store = open_fs_store(url, sources, options)
    if store is None:
        raise StoreError(f"{url}: store failed validation right after being built")
    return store
