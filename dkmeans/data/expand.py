"""A larger-than-memory MNIST: every training digit plus randomly shifted (and deformed) copies.

In the spirit of "infinite MNIST" (Loosli, Canu and Bottou 2007), the
expanded set is the 60,000 training digits followed by ``factor - 1`` more
copies of each, moved by a random sub-pixel translation of up to
``max_shift`` pixels and optionally an elastic deformation (Simard, Steinkraus
and Platt 2003: a random displacement field smoothed by a Gaussian of width
``sigma`` and scaled by ``alpha``). Row ``r`` is a variant of training digit
``r % 60000`` and keeps its label.

The store is written one chunk (one `.npy` file) at a time into a temporary
sibling folder, with its manifest (rows and CRC-32 of every chunk) last, and
then renamed into place: only a finished store is ever at its path. A folder
there without a valid manifest is a half-built store and is rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from ..checksum import crc32
from .store import IMAGE_SHAPE, ChunkedRows, StoreError, _fresh_dir, _install, _remove_stale_builds, dask_rows

__all__ = ["ExpandedStore", "expand_mnist", "default_expanded_path", "open_expanded"]

KIND = "mnist-expanded"
FORMAT_VERSION = 1
_TMP_PREFIX = f".mnist-expanded.tmp-{socket.gethostname()}-"
# Simard et al.'s settings for MNIST.
ELASTIC_ALPHA = 34.0
ELASTIC_SIGMA = 4.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpandedStore:
    """A finished expanded store: lazy images chunked as stored, labels in memory."""

    path: Path
    manifest: dict
    token: str

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def nbytes(self) -> int:
        return self.n_rows * int(self.manifest["n_features"]) * np.dtype(self.manifest["dtype"]).itemsize

    def rows(self) -> ChunkedRows:
        m = self.manifest
        return ChunkedRows(self.path, m["chunks"], m["n_features"], m["dtype"])

    def images(self) -> da.Array:
        """The images as a Dask array with one block per chunk file; each task reads and checks its file."""
        rows = self.rows()
        return dask_rows(rows, (tuple(rows.sizes), (rows.shape[1],)), f"{KIND}-{self.token}")

    def labels(self) -> np.ndarray:
        entry = self.manifest["labels"]
        raw = (self.path / entry["file"]).read_bytes()
        if crc32(raw) != entry["crc32"]:
            raise StoreError(f"labels file {self.path / entry['file']} is corrupted (CRC-32 mismatch)")
        labels = np.load(self.path / entry["file"]).astype(np.int64)
        labels.flags.writeable = False
        return labels


def default_expanded_path(cache_dir, factor: int, seed: int, elastic: bool, chunk_rows: int) -> Path:
    return Path(cache_dir) / f"{KIND}-x{factor}-seed{seed}{'-elastic' if elastic else ''}-rows{chunk_rows}"


def open_expanded(path) -> ExpandedStore:
    """The finished store at `path`, or StoreError saying why it is not one (cheap: no chunk is read)."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    try:
        text = manifest_path.read_bytes()
        manifest = json.loads(text)
    except FileNotFoundError:
        raise StoreError(
            f"{path} is not a finished expanded store (no manifest.json; a half-built store has none): "
            "build it with `dkmeans data expand`"
        ) from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{manifest_path} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise StoreError(f"{path} is not an expanded MNIST store (manifest kind {manifest.get('kind')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path} has store format {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    row_bytes = int(manifest["n_features"]) * np.dtype(manifest["dtype"]).itemsize
    for entry in manifest["chunks"]:
        file = path / entry["file"]
        try:
            size = file.stat().st_size
        except OSError:
            raise StoreError(f"{path} is incomplete: chunk {file} is missing") from None
        if size != entry["bytes"] or size < entry["rows"] * row_bytes:
            raise StoreError(f"{path} is damaged: chunk {file} has {size} bytes, expected {entry['bytes']}")
    if sum(c["rows"] for c in manifest["chunks"]) != manifest["n_rows"]:
        raise StoreError(f"{manifest_path}: chunk rows do not add up to n_rows")
    return ExpandedStore(path, manifest, hashlib.sha256(text).hexdigest()[:16])


def expand_mnist(
    factor: int,
    *,
    out=None,
    data_dir=None,
    cache_dir=None,
    seed: int = 0,
    elastic: bool = False,
    max_shift: float = 2.0,
    chunk_rows: int = 6000,
    progress: Callable[[int, int], None] | None = None,
) -> ExpandedStore:
    """Build (or reuse) the expanded store of `factor` times the 60,000 training digits.

    An existing store at the path built with the same settings is reused;
    anything else there that is a half-built or older expanded store is rebuilt.
    ``progress(rows_written, rows_total)`` is called after every chunk.
    """
    from .fetch import default_cache_dir
    from .mnist import load_mnist

    for name, value, low in (("factor", factor, 1), ("chunk_rows", chunk_rows, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not max_shift >= 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift!r}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    mnist = load_mnist(data_dir=data_dir, cache_dir=cache, chunk_rows=60000)
    dest = Path(out) if out is not None else default_expanded_path(cache, factor, seed, elastic, chunk_rows)
    settings = {
        "factor": factor,
        "seed": seed,
        "elastic": bool(elastic),
        "max_shift": float(max_shift),
        "chunk_rows": chunk_rows,
        "source": mnist.train_images.name,
    }
    if dest.exists():
        try:
            store = open_expanded(dest)
            if store.manifest.get("settings") == settings:
                log.info("expanded store %s is already built", dest)
                return store
            log.info("rebuilding %s: it was built with other settings", dest)
        except StoreError as exc:
            _check_replaceable(dest)
            log.info("rebuilding %s: %s", dest, exc)
    images = mnist.train_images.compute(scheduler="synchronous").reshape(-1, *IMAGE_SHAPE)
    labels = np.asarray(mnist.train_labels, dtype=np.uint8)
    n_rows = factor * len(images)
    d = images.shape[1] * images.shape[2]
    _check_free_space(dest.parent, n_rows * (d + 1))

    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(dest.parent, _TMP_PREFIX)
    _remove_dead_builds(dest.parent)
    tmp = _fresh_dir(dest.parent, _TMP_PREFIX)
    log.info("writing %d x %d images (%.2f GB) to %s", n_rows, d, n_rows * d / 1e9, dest)
    try:
        label_file = np.lib.format.open_memmap(tmp / "labels.npy", mode="w+", dtype=np.uint8, shape=(n_rows,))
        chunks = []
        for c, start in enumerate(range(0, n_rows, chunk_rows)):
            stop = min(start + chunk_rows, n_rows)
            rows = np.arange(start, stop)
            source = rows % len(images)
            rng = np.random.default_rng([seed, c])
            block = deform(images[source], rng, rows >= len(images), max_shift, elastic).reshape(len(rows), d)
            name = f"images-{c:06d}.npy"
            chunks.append(_save_chunk(tmp / name, block))
            label_file[start:stop] = labels[source]
            if progress is not None:
                progress(stop, n_rows)
        label_file.flush()
        del label_file
        label_raw = (tmp / "labels.npy").read_bytes()
        manifest = {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "settings": settings,
            "n_rows": n_rows,
            "n_features": d,
            "dtype": np.dtype(np.uint8).str,
            "image_shape": list(IMAGE_SHAPE),
            "chunks": chunks,
            "labels": {"file": "labels.npy", "crc32": crc32(label_raw)},
        }
        _fsync_file(tmp / "labels.npy")
        # Written last: a folder without a manifest is never trusted.
        with open(tmp / "manifest.json", "w") as f:
            f.write(json.dumps(manifest, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _install(tmp, dest)
    except OSError as exc:
        raise OSError(
            exc.errno, f"writing the expanded store {dest} failed ({exc.strerror or exc}); nothing was installed"
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_expanded(dest)


def deform(images: np.ndarray, rng: np.random.Generator, which: np.ndarray, max_shift: float, elastic: bool):
    """Random sub-pixel translation (and elastic deformation) of the images where `which`; others unchanged.

    Bilinear resampling of each image at displaced coordinates, zero outside the image.
    """
    out = images.copy()
    idx = np.flatnonzero(which)
    if idx.size == 0:
        return out
    n, (h, w) = idx.size, images.shape[1:]
    shift = rng.uniform(-max_shift, max_shift, size=(n, 2)).astype(np.float32)
    if not elastic:
        # A translation is separable: resample the rows, then the columns, each a (28 x 28) tent matrix.
        out[idx] = _to_uint8(
            _shift_matrix(h, shift[:, 0])
            @ images[idx].astype(np.float32)
            @ _shift_matrix(w, shift[:, 1]).transpose(0, 2, 1)
        )
        return out
    grid_y, grid_x = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    fields = rng.uniform(-1, 1, size=(n, 2, h, w)).astype(np.float32)
    gy, gx = _gaussian_matrix(h, ELASTIC_SIGMA), _gaussian_matrix(w, ELASTIC_SIGMA)
    smooth = np.einsum("ij,nzjk,lk->nzil", gy, fields, gx, optimize=True) * ELASTIC_ALPHA
    y = grid_y[None] - shift[:, 0, None, None] + smooth[:, 0]
    x = grid_x[None] - shift[:, 1, None, None] + smooth[:, 1]
    out[idx] = _to_uint8(_bilinear(images[idx].astype(np.float32), y, x))
    return out


def _shift_matrix(size: int, shift: np.ndarray) -> np.ndarray:
    """(n, size, size) linear-interpolation matrices: output pixel i takes source position i - shift."""
    i = np.arange(size, dtype=np.float32)
    source = i[None, :, None] - shift[:, None, None]
    return np.maximum(0.0, 1.0 - np.abs(i[None, None, :] - source))


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _gaussian_matrix(size: int, sigma: float) -> np.ndarray:
    """Convolution by a unit-sum Gaussian as a matrix (zero beyond the border)."""
    offsets = np.arange(size)[:, None] - np.arange(size)[None, :]
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / (sigma * np.sqrt(2 * np.pi))).astype(np.float32)


def _bilinear(images: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    n, h, w = images.shape
    padded = np.zeros((n, h + 2, w + 2), dtype=np.float32)
    padded[:, 1:-1, 1:-1] = images
    y = np.clip(y + 1, 0, h + 1 - 1e-4)  # +1: the zero border
    x = np.clip(x + 1, 0, w + 1 - 1e-4)
    y0, x0 = np.floor(y).astype(np.intp), np.floor(x).astype(np.intp)
    y1, x1 = np.minimum(y0 + 1, h + 1), np.minimum(x0 + 1, w + 1)
    fy, fx = y - y0, x - x0
    flat = padded.reshape(n, -1)
    base = (np.arange(n) * (h + 2) * (w + 2))[:, None, None]

    def at(yy, xx):
        return flat.reshape(-1)[base + yy * (w + 2) + xx]

    top = at(y0, x0) * (1 - fx) + at(y0, x1) * fx
    bottom = at(y1, x0) * (1 - fx) + at(y1, x1) * fx
    return top * (1 - fy) + bottom * fy


def _save_chunk(path: Path, block: np.ndarray) -> dict[str, Any]:
    buffer = io.BytesIO()
    np.save(buffer, block)
    raw = buffer.getvalue()
    with open(path, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    return {"file": path.name, "rows": int(block.shape[0]), "bytes": len(raw), "crc32": crc32(raw)}


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _remove_dead_builds(parent: Path) -> None:
    """Temporary folders of builds on this host whose process is gone (killed mid-build)."""
    for path in parent.glob(_TMP_PREFIX + "*"):
        pid = path.name[len(_TMP_PREFIX) :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, a build interrupted by the end of process %s", path, pid)
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_free_space(folder: Path, needed: int) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise OSError(
            28,
            f"not enough free disk space for the expanded store: it needs {needed / 1e9:.2f} GB, "
            f"{probe} has {free / 1e9:.2f} GB free",
        )


def _check_replaceable(dest: Path) -> None:
    """Refuse to delete a folder that does not look like (part of) an expanded store."""
    if not dest.is_dir():
        raise StoreError(f"{dest} exists and is not a folder")
    foreign = [p.name for p in dest.iterdir() if not (p.name.startswith("images-") or p.name in _OWN_FILES)]
    if foreign:
        raise StoreError(f"{dest} exists and holds files that are not an expanded store ({', '.join(foreign[:3])})")


_OWN_FILES = {"labels.npy", "manifest.json"}
