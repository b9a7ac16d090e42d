"""Reader for the IDX format that MNIST is distributed in.

Parsing is strict: a file that is cut short or has extra bytes raises
instead of yielding a silently wrong array, because a bad download is far
more likely than a deliberate oddity.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["IDXFormatError", "read_idx"]

# Type codes from the IDX specification; MNIST uses only 0x08.
_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20  # read in pieces so a lying header cannot force a huge allocation


class IDXFormatError(ValueError):
    """A file is not a well-formed IDX file (or not a readable gzip of one)."""


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, gzipped or raw, into a native-endian array.

    Gzip is recognised by its magic bytes, not by the suffix, so renamed or
    already-decompressed files both work.
    """
    path = Path(path)
    with open(path, "rb") as raw:
        is_gzip = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        if not is_gzip:
            return _parse(raw, path)
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                return _parse(stream, path)
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise IDXFormatError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc


def _parse(stream: BinaryIO, path: Path) -> np.ndarray:
    magic = _read_at_most(stream, 4)
    if len(magic) < 4:
        raise IDXFormatError(f"{path}: file is {len(magic)} bytes, too short for an IDX header")
    if magic[0] != 0 or magic[1] != 0:
        raise IDXFormatError(
            f"{path}: bad magic number 0x{magic.hex()}, expected 0x0000 followed by "
            "type code and ndim (e.g. 0x00000803)"
        )
    type_code, ndim = magic[2], magic[3]
    if type_code not in _DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _DTYPES)
        raise IDXFormatError(f"{path}: unknown IDX type code 0x{type_code:02X} (known: {known})")
    if ndim == 0:
        raise IDXFormatError(f"{path}: header declares 0 dimensions")
    dims_raw = _read_at_most(stream, 4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise IDXFormatError(
            f"{path}: header is truncated: {ndim} dimensions need {4 * ndim} bytes of sizes, found {len(dims_raw)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
    dtype = _DTYPES[type_code]
    expected = math.prod(shape) * dtype.itemsize

    payload = _read_at_most(stream, expected)
    if len(payload) == expected:
        extra = _count_remaining(stream)
        if extra == 0:
            # A bytearray buffer keeps the result writable without another copy.
            array = np.frombuffer(payload, dtype=dtype).reshape(shape)
            return array.astype(dtype.newbyteorder("="), copy=False)
        found = expected + extra
    else:
        found = len(payload)
    raise IDXFormatError(f"{path}: payload is {found} bytes, expected {expected} for shape {shape}")


def _read_at_most(stream: BinaryIO, n: int) -> bytearray:
    buf = bytearray()
    while len(buf) < n:
        piece = stream.read(min(_CHUNK, n - len(buf)))
        if not piece:
            break
        buf += piece
    return buf


def _count_remaining(stream: BinaryIO) -> int:
    total = 0
    while piece := stream.read(_CHUNK):
        total += len(piece)
    return total
