"""What a worker remembers of each fit between passes: its chunks' row norms and last assignments.

A pass that finds its chunk's entry skips work (Yinyang bounds, exact sums
moved by the rows that changed cluster); one that does not (a fresh or
restarted worker, an evicted entry, a chunk moved by work stealing) computes
it all again. Results never depend on it, only the time they take, so tasks
stay safe to rerun anywhere. It takes at most a share of the worker's memory
limit, and a fit's entries are dropped when the fit ends (or make room for a
later fit, if its client never came back to drop them).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

# Share of the worker's memory limit that remembered state may take (1 GiB without a limit).
MEMORY_FRACTION = 0.05
DEFAULT_BUDGET = 1 << 30

_lock = threading.Lock()
_entries: OrderedDict = OrderedDict()  # key -> (nbytes, value); key[0] is the fit's token
_used = 0


def _budget() -> int:
    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
    except (ImportError, ValueError, AttributeError):
        limit = None
    return int(limit * MEMORY_FRACTION) if limit else DEFAULT_BUDGET


def _nbytes(value) -> int:
    """The arrays an entry holds, and those of its parts that count their own (a RowNorms' ColumnSplit)."""
    return sum(v.nbytes for v in vars(value).values() if hasattr(v, "nbytes"))


def get(key):
    with _lock:
        entry = _entries.get(key)
        if entry is None:
            return None
        return entry[1]


def put(key, value, *, stale=None) -> None:
    """Remember value under key (key[0] is the fit), making room by forgetting other fits, oldest first.

    A fit never evicts its own entries, except those ``stale(key, value)``
    says are out of date (labels for centres of an earlier pass, left on this
    worker when the chunk's task ran elsewhere since): when its state does not
    fit, the entries that came first stay (a pass over many chunks then finds
    the same share of them every time, where evicting would find none).
    """
    global _used
    size = _nbytes(value)
    budget = _budget()
    with _lock:
        old = _entries.pop(key, None)
        if old is not None:
            _used -= old[0]
        if _used + size > budget:
            victims = (
                other
                for other in list(_entries)
                if other[0] != key[0] or (stale is not None and stale(other, _entries[other][1]))
            )
            while _used + size > budget and (victim := next(victims, None)) is not None:
                _used -= _entries.pop(victim)[0]
        if _used + size <= budget:
            _entries[key] = (size, value)
            _used += size


def room(fit: str) -> int:
    """Bytes this fit may still put here: the budget less what its own entries hold (other fits' give way)."""
    with _lock:
        held = sum(size for key, (size, _) in _entries.items() if key[0] == fit)
    return _budget() - held


def entries(fit: str) -> list:
    """(key, value) of every entry of one fit."""
    with _lock:
        return [(key, entry[1]) for key, entry in _entries.items() if key[0] == fit]


def forget(fit: str) -> int:
    """Drop every entry of one fit; returns how many there were."""
    global _used
    with _lock:
        keys = [key for key in _entries if key[0] == fit]
        for key in keys:
            _used -= _entries.pop(key)[0]
    return len(keys)
