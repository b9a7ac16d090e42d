"""Let glibc keep the kernels' tile temporaries instead of returning them to the OS after every use.

Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 so that freed
memory goes back to the OS promptly. Setting it also freezes glibc's mmap
threshold at 128 KiB, so every tile-sized temporary (a few MiB) is a fresh
mmap whose pages fault in again: measured on MNIST, the Lloyd kernels ran
3-5x slower in such a worker than in a plain process. Raising both
thresholds to 4 MiB in the worker, above the kernels' tiles (at most 2 MiB
with TILE_ELEMENTS = 2**18) and below a stored chunk (4.7 MB for 6000 MNIST
rows), restores the plain-process speed: tiles reuse heap memory, while
chunks are still mapped and unmapped whole, so a streaming worker does not
fragment its heap, and at most 4 MiB of freed memory stays with the process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

THRESHOLD = 4 << 20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

log = logging.getLogger(__name__)
_done = False


def keep_tile_memory() -> bool:
    """Raise this process's glibc trim and mmap thresholds if something set them low; True if it did."""
    global _done
    if _done:
        return False
    _done = True
    fixed = [name for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_") if name in os.environ]
    if not sys.platform.startswith("linux") or not fixed:
        return False  # glibc's dynamic thresholds already adapt to the tiles
    if all(_as_int(os.environ[name]) >= THRESHOLD for name in fixed):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): nothing to tune
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD) == 1
    if ok:
        log.info("raised glibc's malloc trim and mmap thresholds to %d MiB for the dkmeans kernels", THRESHOLD >> 20)
    return ok


def _as_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0
