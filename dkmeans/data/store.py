"""A row-addressable on-disk copy of MNIST, built once in the cache.

Gzipped IDX cannot be read from the middle, so every Dask task would have
to decompress the whole file. Plain `.npy` files can be memory-mapped, which
lets each worker read just its own rows straight from disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import checksum
from .idx import read_idx

__all__ = [
    "STORE_NAME",
    "ChunkedRows",
    "CorruptChunkError",
    "NpyRows",
    "Store",
    "BufferPool",
    "StoreError",
    "build_store",
    "ensure_store",
    "ensure_store_at",
    "open_store",
    "read_chunk",
]

STORE_NAME = "mnist-store-v1"
FORMAT_VERSION = 1
IMAGE_SHAPE = (28, 28)
_PAIRS = (("train-images", "train-labels"), ("test-images", "test-labels"))
_TMP_PREFIX = f".{STORE_NAME}.tmp-"
_STALE_TMP_S = 24 * 3600  # older temporary builds are assumed to be crashed ones
_HEADER_MAX = 1 << 16  # bytes of a chunk file that hold its .npy header (a 2-d array's is ~128)

log = logging.getLogger(__name__)


class StoreError(ValueError):
    """The source files are readable but do not form a consistent MNIST set."""


class CorruptChunkError(StoreError):
    """A chunk file of a store is missing, truncated, or does not match its recorded checksum."""


def read_chunk(
    path: str | os.PathLike[str], rows: int, cols: int, dtype: Any, crc32: int, buffers: BufferPool | None = None
) -> np.ndarray:
    """Read one `.npy` chunk file in a single read, check its CRC-32 and shape, return its rows (read-only).

    The checksum (dkmeans.checksum) costs about 0.1 ms per 4.7 MB chunk
    and turns silent disk corruption into an error that names the file.
    ``buffers`` gives the memory to read into (see BufferPool).
    """
    path = Path(path)
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            raw = bytearray(size) if buffers is None else buffers.take(size)
            got = f.readinto(raw)
    except OSError as exc:
        raise CorruptChunkError(f"chunk {path} cannot be read: {exc.strerror or exc}") from exc
    found = checksum.crc32(raw) if got == size else None
    if found != crc32:
        found = "unreadable" if found is None else f"{found:08x}"
        raise CorruptChunkError(
            f"chunk {path} is corrupted: CRC-32 {found}, the manifest says {crc32:08x} "
            "(rebuild the store with `dkmeans data expand`)"
        )
    f = io.BytesIO(memoryview(raw)[:_HEADER_MAX])  # the header only: BytesIO copies what it is given
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, file_dtype = read_header(f)
    except ValueError as exc:
        raise CorruptChunkError(f"chunk {path} is not a valid .npy file: {exc}") from exc
    if tuple(shape) != (rows, cols) or file_dtype != np.dtype(dtype) or fortran:
        raise CorruptChunkError(f"chunk {path} holds {file_dtype} {shape}, expected {np.dtype(dtype)} {(rows, cols)}")
    out = np.frombuffer(raw, dtype=file_dtype, count=rows * cols, offset=f.tell()).reshape(rows, cols)
    out.flags.writeable = False
    return out


def dask_rows(rows, chunks, name: str):
    """A Dask array over stored rows (ChunkedRows, NpyRows, FsspecRows), each task reading its own rows.

    Its tasks read through _read_rows, not dask.array's own getter: a worker
    would import dask.array to unpickle that, and with it scipy, and numba
    through pydata/sparse, where those are installed: 26 MB more per worker
    with scipy, about 78 MB more with pydata/sparse (dask-ml's dependency),
    of which a streaming worker uses nothing.
    """
    import dask.array as da  # here, not at the top: workers import this module to read chunks

    meta = np.empty((0, 0), dtype=rows.dtype)
    return da.from_array(rows, chunks=chunks, lock=False, asarray=False, getitem=_read_rows, name=name, meta=meta)


def _read_rows(rows, index, asarray=True, lock=None):
    """``rows[index]``, with the arguments of dask.array's getter: the stores return numpy arrays and need no
    lock (dask_rows makes its arrays with ``lock=False``)."""
    return rows[index]


class BufferPool:
    """Read buffers, each used again once no array refers to it any more.

    Reading a 4.7 MB chunk into fresh memory costs about 2 ms of page faults,
    three times the copy itself, and a streamed pass reads every chunk.
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._buffers: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bytearray:
        with self._lock:
            for buffer in self._buffers:
                # Referenced by the list, this loop and getrefcount's argument only: no array uses it.
                if len(buffer) == nbytes and sys.getrefcount(buffer) == 3:
                    return buffer
            buffer = bytearray(nbytes)
            self._buffers = self._buffers[-(self.keep - 1) :] + [buffer] if self.keep > 1 else [buffer]
            return buffer


class ChunkedRows:
    """Rows stored as one `.npy` file per chunk, sliceable like an array (for `da.from_array`).

    A slice that is exactly one chunk (what Dask asks for) costs one checked
    read of that file; any other slice reads the chunks it overlaps.
    """

    def __init__(self, folder, chunks: list[dict], cols: int, dtype: Any) -> None:
        self.folder = Path(folder)
        self.files = [c["file"] for c in chunks]
        self.sizes = [int(c["rows"]) for c in chunks]
        self.crcs = [int(c["crc32"]) for c in chunks]
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.shape = (int(self.starts[-1]), int(cols))
        self.dtype = np.dtype(dtype)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def chunk(self, i: int) -> np.ndarray:
        if self.__dict__.get("_buffers") is None:  # made on first use: it does not travel with the object
            self._buffers = BufferPool()
        path = self.folder / self.files[i]
        return read_chunk(path, self.sizes[i], self.shape[1], self.dtype, self.crcs[i], self._buffers)

    def __getstate__(self) -> dict:
        return {name: value for name, value in self.__dict__.items() if name != "_buffers"}

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        if isinstance(rows, slice) and rows.step in (None, 1):
            start, stop, _ = rows.indices(self.shape[0])
            first = int(np.searchsorted(self.starts, start, side="right")) - 1
            if stop > start and self.starts[first] == start and self.starts[first + 1] == stop:
                return self.chunk(first)[:, cols]
            last = int(np.searchsorted(self.starts, stop, side="left"))
            parts = [self.chunk(i) for i in range(max(first, 0), last) if self.sizes[i]]
            if not parts:
                return np.empty((0, self.shape[1]), self.dtype)[:, cols]
            block = np.concatenate(parts)
            return block[start - self.starts[max(first, 0)] : stop - self.starts[max(first, 0)], cols]
        index = np.arange(self.shape[0])[rows]
        return self[index.min() : index.max() + 1, cols][index - index.min()] if index.size else self[0:0, cols]


class NpyRows:
    """A lazy view of a `.npy` file that Dask can slice.

    It holds only the path, shape and dtype, so pickling it to a worker is a
    few hundred bytes and the worker reads its own rows from disk.
    """

    __slots__ = ("path", "shape", "dtype")

    def __init__(self, path: str | os.PathLike[str], shape: tuple[int, ...], dtype: Any) -> None:
        self.path = Path(path)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> NpyRows:
        array = np.load(path, mmap_mode="r")
        return cls(path, array.shape, array.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        # Copy out of the map so no open file outlives the task that read it.
        return np.array(np.load(self.path, mmap_mode="r")[key])

    def __reduce__(self) -> tuple[Any, ...]:
        return (NpyRows, (str(self.path), self.shape, self.dtype.str))

    def __repr__(self) -> str:
        return f"NpyRows({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"


@dataclass(frozen=True)
class Store:
    """A validated store directory and the digest of its manifest."""

    path: Path
    manifest: Mapping[str, Any]
    token: str

    def rows(self, name: str) -> NpyRows:
        entry = self.manifest["arrays"][name]
        return NpyRows(self.path / entry["file"], entry["shape"], entry["dtype"])

    def load(self, name: str) -> np.ndarray:
        return np.load(self.path / self.manifest["arrays"][name]["file"])


def ensure_store(files: Mapping[str, Path], cache_dir: str | os.PathLike[str], sources: Mapping[str, str]) -> Store:
    """Open `<cache_dir>/mnist-store-v1`, (re)building it unless it matches `sources`.

    `files` maps logical names to IDX files and `sources` maps the same names
    to their SHA-256; the caller is trusted to have verified them.
    """
    return ensure_store_at(files, Path(cache_dir) / STORE_NAME, sources)


def ensure_store_at(files: Mapping[str, Path], dest: str | os.PathLike[str], sources: Mapping[str, str]) -> Store:
    """Open the store folder `dest`, (re)building it unless it matches `sources`."""
    dest = Path(dest).expanduser()
    store = open_store(dest, sources)
    if store is None:
        build_store(files, dest, sources)
        store = open_store(dest, sources)
        if store is None:  # only if something else rewrote it at the same moment
            raise StoreError(f"{dest}: store failed validation right after being built")
    return store


def open_store(dest: str | os.PathLike[str], sources: Mapping[str, str]) -> Store | None:
    """Return the store at `dest` if it is complete and built from `sources`, else None."""
    dest = Path(dest)
    try:
        text = (dest / "manifest.json").read_bytes()
        manifest = json.loads(text)
        if manifest.get("format_version") != FORMAT_VERSION:
            return None
        if manifest.get("sources") != {name: {"sha256": sha} for name, sha in sources.items()}:
            return None
        if set(manifest["arrays"]) != set(sources):
            return None
        for entry in manifest["arrays"].values():
            on_disk = np.load(dest / entry["file"], mmap_mode="r")
            if list(on_disk.shape) != entry["shape"] or on_disk.dtype.str != entry["dtype"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return Store(dest, manifest, hashlib.sha256(text).hexdigest()[:16])


def build_store(files: Mapping[str, Path], dest: str | os.PathLike[str], sources: Mapping[str, str]) -> Path:
    """Convert the IDX files into `.npy` files and move them into `dest` atomically.

    Everything is written to a temporary sibling first, so readers see either
    the old store, no store, or the finished new one.
    """
    dest = Path(dest)
    log.info("converting MNIST into the chunked store %s (once)", dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(dest.parent)
    tmp = _fresh_dir(dest.parent)
    try:
        arrays: dict[str, dict[str, Any]] = {}
        for images_name, labels_name in _PAIRS:
            images, labels = _read_pair(files[images_name], files[labels_name])
            for name, array in ((images_name, images), (labels_name, labels)):
                np.save(tmp / f"{name}.npy", array)
                arrays[name] = {"file": f"{name}.npy", "shape": list(array.shape), "dtype": array.dtype.str}
        manifest = {
            "format_version": FORMAT_VERSION,
            "image_shape": list(IMAGE_SHAPE),
            "arrays": arrays,
            "sources": {name: {"sha256": sha} for name, sha in sources.items()},
        }
        # Written last: a directory without a manifest is never trusted.
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _install(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _read_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE or images.dtype != np.uint8:
        raise StoreError(
            f"{images_path}: expected uint8 images of shape (n, 28, 28), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise StoreError(f"{labels_path}: expected a 1-d uint8 label vector, got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise StoreError(
            f"image/label count mismatch: {images_path} has {len(images)} images "
            f"but {labels_path} has {len(labels)} labels"
        )
    if labels.size and labels.max() > 9:
        raise StoreError(f"{labels_path}: labels must be digits 0-9, found {int(labels.max())}")
    return images.reshape(len(images), -1), labels


def _install(tmp: Path, dest: Path) -> None:
    """Rename `tmp` to `dest`, moving any old store aside first (rename cannot replace a full directory)."""
    old = None
    if dest.exists():
        old = _fresh_dir(dest.parent)
        os.replace(dest, old / "store")
    try:
        os.replace(tmp, dest)
    except OSError:
        if not dest.exists():
            raise
        # Another process installed its build first; theirs is as good as ours.
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _fresh_dir(parent: Path, prefix: str = _TMP_PREFIX) -> Path:
    """A new uniquely named sibling; os.mkdir (unlike mkdtemp) honours the umask."""
    path = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    return path


def _remove_stale_builds(parent: Path, prefix: str = _TMP_PREFIX) -> None:
    cutoff = time.time() - _STALE_TMP_S
    for path in parent.glob(prefix + "*"):
        try:
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass
