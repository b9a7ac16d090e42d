"""Dask orchestration: map the numpy kernels over row chunks and tree-reduce their partials.

Each Lloyd iteration is one pass over the data: the centres are broadcast to
the workers once, every chunk task returns its labels (kept on its worker) and
its partial sums, and a tree of combine tasks reduces the partials to one small
result that the client turns into new centres.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import dask.array as da
import numpy as np
from dask import delayed
from dask.sizeof import sizeof
from distributed import Client, Future

from . import kernels

# Partials combined per reduction task: a tree of depth log_8(chunks).
SPLIT_EVERY = 8
# Persist the data on the workers when it takes at most this share of their memory.
PERSIST_MEMORY_FRACTION = 0.5
# k-means|| settings (Bahmani et al. 2012): 5 rounds of oversampling ~2k rows each.
PARALLEL_ROUNDS = 5
OVERSAMPLING = 2.0


@dataclass
class ChunkedData:
    """Row chunks of the input as seen by the cluster, and where each chunk starts."""

    blocks: list  # one Delayed or Future per row chunk
    offsets: list[int]
    n_samples: int
    n_features: int
    dtype: np.dtype
    persisted: bool
    _keepalive: object = field(default=None, repr=False)

    @property
    def n_chunks(self) -> int:
        return len(self.blocks)


def chunk_data(client: Client, X, chunk_rows: int | None = None) -> ChunkedData:
    """Make row chunks of X on the cluster; persist them when they fit in worker memory."""
    if isinstance(X, da.Array):
        if chunk_rows is not None:
            X = X.rechunk({0: chunk_rows, 1: -1})
        elif X.numblocks[1] != 1:
            X = X.rechunk({1: -1})
        persisted = _fits_in_memory(client, X.nbytes)
        keep = client.persist(X) if persisted else X
        blocks = list(keep.to_delayed().ravel())
        sizes = X.chunks[0]
    else:
        X = np.asarray(X)
        rows = chunk_rows or _default_chunk_rows(client, X)
        sizes = tuple(min(rows, X.shape[0] - s) for s in range(0, X.shape[0], rows))
        # hash=False: content-hashed keys would be shared with (and released by) an earlier fit of the same array.
        blocks = client.scatter([X[s : s + r] for s, r in zip(np.cumsum((0,) + sizes[:-1]), sizes)], hash=False)
        keep, persisted = blocks, True
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
    return ChunkedData(blocks, offsets, int(X.shape[0]), int(X.shape[1]), X.dtype, persisted, keep)


def _default_chunk_rows(client: Client, X: np.ndarray) -> int:
    threads = max(1, sum(client.nthreads().values()))
    by_threads = math.ceil(X.shape[0] / (2 * threads))
    by_bytes = max(1, (64 << 20) // max(1, X.itemsize * X.shape[1]))
    return max(1, min(by_threads, by_bytes))


def _fits_in_memory(client: Client, nbytes: int) -> bool:
    limits = [w.get("memory_limit") or 0 for w in client.scheduler_info()["workers"].values()]
    if any(limit == 0 for limit in limits):  # no limit set
        return True
    return nbytes <= PERSIST_MEMORY_FRACTION * sum(limits)


@sizeof.register(kernels.ChunkStats)
def _sizeof_chunk_stats(stats: kernels.ChunkStats) -> int:
    """Dask would guess a dataclass at ~100 bytes; its placement and transfer accounting need the real size."""
    arrays = (stats.sums, stats.counts, stats.far_d2, stats.far_index, stats.far_label)
    return 64 + sum(np.asarray(a).nbytes for a in arrays)


# --- map and reduce helpers -----------------------------------------------------


def _tag(name: str) -> str:
    # The dashboard names tasks by key_split, which drops the hex suffix only if it holds a digit;
    # 32 hex characters make an all-letter suffix (shown as part of the name) practically impossible.
    return f"dkmeans-{name}-{uuid.uuid4().hex}"


def map_chunks(data: ChunkedData, func, *args, name: str, nout: int | None = None, per_chunk=None, **kwargs):
    """One task per chunk: func(block, *args, offset=..., **kwargs, **{key: per_chunk[key][i]})."""
    tag = _tag(name)
    per_chunk = per_chunk or {}
    out = []
    for i, (block, offset) in enumerate(zip(data.blocks, data.offsets)):
        own = {key: values[i] for key, values in per_chunk.items()}
        call = delayed(func, pure=False, nout=nout)
        out.append(call(block, *args, offset=offset, **kwargs, **own, dask_key_name=(tag, i)))
    return out


def tree_reduce(parts: list, combine, *args, name: str):
    """Combine partials in groups of SPLIT_EVERY until one remains."""
    tag = _tag(name)
    level = 0
    while len(parts) > 1:
        parts = [
            delayed(combine, pure=False)(parts[i : i + SPLIT_EVERY], *args, dask_key_name=(tag, level, i))
            for i in range(0, len(parts), SPLIT_EVERY)
        ]
        level += 1
    return parts[0]


def broadcast(client: Client, array: np.ndarray) -> Future:
    """Send an array to every worker once; tasks then refer to it by key instead of embedding it."""
    return client.scatter(array, broadcast=True, hash=False)


def fetch_rows(client: Client, data: ChunkedData, indices) -> np.ndarray:
    """Rows at the given global indices, in that order; only their chunks are read."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        return np.empty((0, data.n_features), dtype=data.dtype)
    chunk_of = np.searchsorted(data.offsets, indices, side="right") - 1
    tag = _tag("take")
    tasks, order = [], []
    for c in np.unique(chunk_of):
        where = np.flatnonzero(chunk_of == c)
        local = indices[where] - data.offsets[c]
        tasks.append(delayed(_take, pure=False)(data.blocks[c], local, dask_key_name=(tag, int(c))))
        order.append(where)
    rows = client.compute(tasks, sync=True)
    out = np.empty((indices.size, data.n_features), dtype=data.dtype)
    for where, r in zip(order, rows):
        out[where] = r
    return out


def _take(block, local):
    return np.asarray(block[local])


# --- Lloyd -------------------------------------------------------------------------


@dataclass
class LloydResult:
    centers: np.ndarray
    labels: np.ndarray
    inertia: float
    n_iter: int
    loss_history: list[float]


def lloyd(
    client: Client,
    data: ChunkedData,
    centers: np.ndarray,
    max_iter: int,
    tol: float,
    callback: Callable | None = None,
) -> LloydResult:
    """Lloyd iterations, one pass over the data each, until every centre moves less than tol.

    Pass p assigns the rows to the centres after p updates and sums them for
    update p+1. The pass that finds the next update too small (or reaches
    max_iter) keeps its centres, so its labels and inertia are those of the
    returned centres exactly: no separate pass for labels or inertia. As in
    scikit-learn, ``n_iter`` counts updates, and an update that changes
    nothing (a fixed point) is counted.
    """
    centers = np.asarray(centers, dtype=np.float64)
    k = centers.shape[0]
    losses: list[float] = []
    for n_iter in range(max_iter + 1):
        start = time.perf_counter()
        labels_parts, stats = lloyd_pass(client, data, centers, k)
        losses.append(stats.inertia / data.n_samples)
        n_empty = int(np.count_nonzero(stats.counts == 0))
        far_rows = fetch_rows(client, data, stats.far_index[:n_empty]) if n_empty else None
        new_centers = kernels.update_centers(stats, centers, far_rows)
        shift = float(np.sqrt(((new_centers - centers) ** 2).sum(axis=1)).max())
        if callback is not None:
            callback(n_iter, losses[-1], shift, time.perf_counter() - start)
        if shift == 0.0 and n_iter < max_iter:
            n_iter += 1  # the update was a no-op: count it, as scikit-learn does
            losses.append(losses[-1])
            break
        if shift < tol or n_iter == max_iter:
            break
        centers = new_centers
    labels = np.concatenate(client.gather(labels_parts)).astype(np.int64)
    return LloydResult(centers, labels, stats.inertia, n_iter, losses)


def lloyd_pass(client: Client, data: ChunkedData, centers: np.ndarray, n_far: int):
    """Map lloyd_chunk over the chunks, tree-reduce the partials; labels stay on the workers."""
    centers_on_workers = broadcast(client, centers)
    passes = map_chunks(data, kernels.lloyd_chunk, centers_on_workers, n_far=n_far, name="assign", nout=2)
    total = tree_reduce([p[1] for p in passes], kernels.combine_stats, n_far, name="reduce")
    futures = client.compute([p[0] for p in passes] + [total])
    return futures[:-1], futures[-1].result()
