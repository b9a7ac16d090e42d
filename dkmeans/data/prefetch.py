"""Read the next chunk files of a store in the background, so the disk works while a chunk is computed on.

A streamed pass reads a chunk, then computes on it; with one thread per
worker, the disk would sit idle during the computation and the computation
would wait for every read. Whenever a chunk is read, a daemon thread reads
the next few files into the page cache (and drops the bytes), so the task
that gets one of them, on this worker or another, finds it in memory. It
only warms the page cache: a file read here is read and checked again by its
task, and a failure here is left for that read to report.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict

# Files read ahead of the one being read: 4 MNIST chunks are 19 MB of page cache, not of worker memory.
DEPTH = 4
_BLOCK = 1 << 20

_lock = threading.Lock()
_queue: queue.Queue | None = None
_recent: OrderedDict = OrderedDict()  # paths queued lately, so overlapping requests read each file once


def ahead(paths) -> None:
    """Queue files to be read into the page cache, at most DEPTH of them, skipping those queued lately."""
    global _queue
    with _lock:
        if _queue is None:
            _queue = queue.Queue(maxsize=2 * DEPTH)
            threading.Thread(target=_drain, args=(_queue,), name="dkmeans-prefetch", daemon=True).start()
        for path in list(paths)[:DEPTH]:
            path = os.fspath(path)
            if path in _recent:
                continue
            try:
                _queue.put_nowait(path)
            except queue.Full:  # the disk is behind already: more requests would not help
                return
            _recent[path] = None
            while len(_recent) > 8 * DEPTH:
                _recent.popitem(last=False)


def _drain(pending: queue.Queue) -> None:
    buffer = bytearray(_BLOCK)
    while True:
        path = pending.get()
        try:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer) == _BLOCK:
                    pass
        except OSError:
            pass  # the task that reads this file reports the error
