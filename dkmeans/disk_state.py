"""What streaming workers remember of each chunk between passes, on their host's local disk.

Streamed data is larger than the workers' memory, and so are its Yinyang
bounds (about 28 bytes a row at k = 10, 6,000,000 rows: 170 MB). Without
them every pass computes every distance again. Kept in files instead, next
to nothing in memory, a chunk's row norms and bounds cost a read and a write
of about a tenth of its own size (uint8 MNIST, k = 10), and a pass computes
only the rows its bounds cannot settle.

Files live under ``<dask temporary-directory or the system's>/dkmeans-state/<fit>``,
shared by the workers of one host: a chunk's task finds the state its last
pass left there, on whichever of these workers it runs. A task on another
host (or after a failed write) finds nothing and computes the chunk in full:
results never depend on this state, only the time they take. A file carries
a CRC-32 of its contents, so a torn one (an interrupted write) is ignored,
not used. Writing stops while the disk's free space would fall below its
reserve. A fit's folder is removed when it ends; folders left by clients
that never came back are removed after a day.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
from collections import OrderedDict
from pathlib import Path

import dask
import numpy as np

from .checksum import crc32
from .data.store import _remove_stale_builds
from .screening import ModelState, RowNorms

# Free disk space that remembered state never takes: the larger of these.
RESERVE_BYTES = 1 << 30
RESERVE_FRACTION = 0.1
_CENTRES_FILES = 64  # centre sets kept on disk per fit, the newest: 4 passes of a 16-model sweep
# Centre sets kept in memory (per process), by digest: as many as on disk, in at most this many bytes. (By bytes
# alone, a long k=10 fit could keep about 500 sets of 63 KB: 32 MB of a 400 MB streaming worker.)
_CENTRES_CACHE_BYTES = 32 << 20
_MAGIC = b"DKSTATE1"
_HEAD = struct.Struct("<8sII")  # magic, length of the JSON index, CRC-32 of index and arrays
_STATE_FIELDS = ("labels", "upper", "nearest", "lower", "stamp", "drift", "sums")

log = logging.getLogger(__name__)
_centres: OrderedDict = OrderedDict()
_warned: set = set()


def root() -> Path:
    return Path(dask.config.get("temporary-directory", None) or tempfile.gettempdir()) / "dkmeans-state"


def _folder(fit: str) -> Path:
    return root() / fit


def get(fit: str, index: int, models) -> tuple:
    """A chunk's saved RowNorms and each model's ModelState (None where there is none, or it is unreadable)."""
    arrays = _read(_folder(fit) / f"chunk-{index}.bin")
    if arrays is None:
        return None, [None] * len(models)
    norms = None
    if "sq" in arrays:
        sq, info = arrays["sq"], arrays["norms"]
        screen = np.dtype(np.float32 if info[1] else np.float64)
        norms = RowNorms(sq, np.sqrt(sq), float(info[0]), screen, bool(info[2]))
    states = []
    for m in models:
        try:
            centres = _load_centres(fit, arrays[f"{m}.centres"].tobytes())
            states.append(ModelState(centres, *(arrays.get(f"{m}.{name}") for name in _STATE_FIELDS)))
        except (KeyError, OSError, ValueError):
            states.append(None)
    return norms, states


def put(fit: str, index: int, norms: RowNorms, models, states, digests) -> None:
    """Save a chunk's norms and its models' states (one file), unless the disk is short of space.

    ``digests`` are centres_digest of each state's centres (the same for every chunk of a pass).
    """
    folder = _folder(fit)
    arrays = {"sq": norms.sq, "norms": np.array([norms.total, norms.screen == np.float32, norms.integral])}
    try:
        _prepare(folder)
        for m, state, digest in zip(models, states, digests):
            _save_centres(folder, digest, state.centers)
            arrays[f"{m}.centres"] = np.frombuffer(digest, dtype=np.uint8)
            for name in _STATE_FIELDS:
                if getattr(state, name) is not None:
                    arrays[f"{m}.{name}"] = getattr(state, name)
        _write(folder / f"chunk-{index}.bin", arrays)
    except OSError as exc:
        if fit not in _warned:  # once per fit and process: the fit goes on, every pass computing every row
            _warned.add(fit)
            log.warning("streamed chunks' bounds cannot be kept in %s (%s): every pass computes every row", folder, exc)


def _write(path: Path, arrays: dict) -> None:
    """Overwrite in place (a rename costs ten times the write): a torn file fails its CRC and is not used."""
    index = json.dumps([[name, a.dtype.str, a.shape] for name, a in arrays.items()]).encode()
    body = [index] + [np.ascontiguousarray(a).data for a in arrays.values()]
    size = _HEAD.size + sum(len(b) if isinstance(b, bytes) else b.nbytes for b in body)
    usage = shutil.disk_usage(path.parent)
    if usage.free - size < max(RESERVE_BYTES, RESERVE_FRACTION * usage.total):
        raise OSError(f"free space on {path.parent} is below its reserve")
    crc = 0
    for b in body:
        crc = crc32(b, crc)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.pwritev(fd, [_HEAD.pack(_MAGIC, len(index), crc)] + body, 0)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _read(path: Path) -> dict | None:
    try:
        with open(path, "rb", buffering=0) as f:
            raw = bytearray(os.fstat(f.fileno()).st_size)
            if f.readinto(raw) != len(raw):
                return None
        magic, length, crc = _HEAD.unpack_from(raw)
        if magic != _MAGIC or crc32(memoryview(raw)[_HEAD.size :]) != crc:
            return None
        entries = json.loads(raw[_HEAD.size : _HEAD.size + length])
        arrays, at = {}, _HEAD.size + length
        for name, dtype, shape in entries:
            dtype = np.dtype(dtype)
            count = int(np.prod(shape))
            arrays[name] = np.frombuffer(raw, dtype=dtype, count=count, offset=at).reshape(shape)
            at += count * dtype.itemsize
        return arrays
    except (OSError, ValueError, struct.error):
        return None


def forget(fit: str) -> None:
    shutil.rmtree(_folder(fit), ignore_errors=True)
    for digest in [d for d in _centres if d[0] == fit]:
        del _centres[digest]


def _prepare(folder: Path) -> None:
    if folder.is_dir():
        return
    folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _remove_stale_builds(folder.parent, prefix="")  # fits whose client never came back, after a day
    folder.mkdir(mode=0o700, exist_ok=True)


def _save_centres(folder: Path, digest: bytes, centers: np.ndarray) -> None:
    path = folder / f"centres-{digest.hex()}.bin"
    if (folder.name, digest) in _centres or path.exists():
        return
    _write(path, {"centres": np.ascontiguousarray(centers, dtype=np.float64)})
    _remember(folder.name, digest, centers)
    # States refer to the centres of their chunk's last pass: older sets only fill the disk (a state that
    # still refers to one, left by a chunk that ran elsewhere since, is not used and its chunk is recomputed).
    files = sorted(folder.glob("centres-*.bin"), key=_modified)
    for old in files[:-_CENTRES_FILES]:
        old.unlink(missing_ok=True)


def _modified(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:  # removed by another worker of the host meanwhile
        return 0


def _load_centres(fit: str, digest: bytes):
    found = _centres.get((fit, digest))
    if found is None:
        found = (_read(_folder(fit) / f"centres-{digest.hex()}.bin") or {}).get("centres")
        if found is None:
            raise OSError(f"centres {digest.hex()} not found")
        _remember(fit, digest, found)
    return found


def _remember(fit: str, digest: bytes, centers: np.ndarray) -> None:
    _centres[(fit, digest)] = centers
    _centres.move_to_end((fit, digest))
    while len(_centres) > 1 and (
        len(_centres) > _CENTRES_FILES or sum(c.nbytes for c in _centres.values()) > _CENTRES_CACHE_BYTES
    ):
        _centres.popitem(last=False)
