"""Dask orchestration: map the numpy kernels over row chunks and reduce their partials.

Each Lloyd iteration is one pass over the data, shared by every model still
running (a sweep over k, or restarts): each chunk's step gets every model's
centres, leaves each model's labels and bounds in its worker's memory
(worker_state; streamed data: on local disk, disk_state) and returns partial
sums, which the client adds up and turns into new centres. Data in worker
memory is passed over by chunk hosts (one actor per worker, its method called);
streamed data, and any pass the hosts cannot take, by one task per chunk (per
few chunks, streamed), with a tree of reduce tasks when there are many.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable
from urllib.parse import urlsplit

import dask
import numpy as np
from dask import delayed
from dask._task_spec import Alias, DataNode, Task
from dask.core import flatten
from dask.sizeof import sizeof
from distributed import Client, Future, futures_of, get_worker, wait
from distributed.core import send_recv
from distributed.protocol import to_serialize

from . import allocator, disk_state, kernels, screening, worker_state

if TYPE_CHECKING:
    import dask.array as da

# Partials combined per reduction task: a tree of depth log_8(chunks).
SPLIT_EVERY = 8
# Centres larger than this (times the chunks) go to the workers once, as a task, not inside every task.
BROADCAST_BYTES = 1 << 20
# Most bytes of centres and partial sums the client may send and receive a pass for chunk hosts to run it.
HOSTS_MAX_BYTES = 16 << 20
# Seconds a chunk host's direct call may take to connect to its worker. Dask's own connect retries a refused
# connection until distributed.comm.timeouts.connect (30 s by default): a host whose worker was killed between
# two passes stalled the fit that long before it went on in tasks. A live worker on loopback answers in
# milliseconds, and a call that times out only goes through the scheduler instead (ChunkHosts.call).
HOST_CONNECT_TIMEOUT = 5
# How long a failed direct call waits for the scheduler to see its worker leave, before relaying instead.
HOST_LEFT_WAIT = 2.0
# Stored bytes of streamed chunks one task reads and processes (see map_chunk_futures). Fewer, longer tasks cost
# the workers' event loops less: 12-update fits over 6,000,000 MNIST rows (1000 chunks, 2 workers x 400 MB, k=10),
# in alternation, median pass 3.46 / 4.11 s at 32 MB (7 chunks a task), 3.63 / 3.88 at 64, 2.95 / 2.93 / 3.40 /
# 3.22 at 128, 3.19 / 3.71 at 256; the event loops' CPU a pass 0.50-0.62 s at 32 MB, 0.26-0.32 s at 128.
STREAM_GROUP_BYTES = 128 << 20
# Workers with a smaller memory limit run the numpy kernels: numba's runtime and the compiled kernels take
# about 120 MB of each process, and compiling them (numba's cache cold) about 100 MB more. A 12-update
# streamed fit's 400 MB workers peaked at 125-134 MB with the numpy kernels, 246-260 MB with the compiled
# ones (cache warm): the cold cache would pass the point where Dask pauses a worker (80 % of its limit).
COMPILED_MIN_MEMORY = 1 << 30
# Persist the data on the workers when it takes at most this share of their memory.
PERSIST_MEMORY_FRACTION = 0.5
# k-means|| settings (Bahmani et al. 2012): 3 rounds of oversampling ~2k rows each, at least
# MIN_ROUND_PICKS: at small k a round's price is its pass over the data and its round trips, not its few
# more distances. Measured on full MNIST, default fits (with the recluster below), seeds 0-11 at k=10:
# 5 rounds of 20 picks 107 Lloyd iterations on average (seeds 0-4); 5 of 50: 86 iterations, 3.0 s a fit;
# 3 of 50: 80, 2.45 s. At k=256 (seeds 0-2): 5 rounds 90 iterations, 10.9 s; 3 rounds 105, 9.4 s.
PARALLEL_ROUNDS = 3
OVERSAMPLING = 2.0
MIN_ROUND_PICKS = 50
# Lloyd iterations at most on the weighted candidates (k-means||'s recluster step); they usually settle in 5-15.
RECLUSTER_ITER = 30

log = logging.getLogger(__name__)


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
    # Streamed data only, when every chunk is read by one task from literal inputs (from_array over a store):
    # each chunk's task, and those inputs (as futures), so that a pass can read its chunk inside its own task.
    loaders: list | None = field(default=None, repr=False)
    loader_inputs: dict | None = field(default=None, repr=False)
    chunks_per_task: int = 1  # of those chunks, read and processed by one task of a pass

    @property
    def n_chunks(self) -> int:
        return len(self.blocks)

    @property
    def nbytes(self) -> int:
        return self.n_samples * self.n_features * self.dtype.itemsize


def chunk_data(client: Client, X, chunk_rows: int | None = None, n_centres: int | None = None) -> ChunkedData:
    """Make row chunks of X on the cluster; persist them when they fit in worker memory.

    ``n_centres``, the centres a pass will carry (every model's), lets whole numbers already persisted stay in
    their chunks when chunk hosts will take the passes (_hosts_join).
    """
    import dask.array as da  # here, not at the top: workers import this module and need none of dask.array

    per_task = 1
    if isinstance(X, da.Array):
        if chunk_rows is not None:
            X = X.rechunk({0: chunk_rows, 1: -1})
        elif X.numblocks[1] != 1:
            X = X.rechunk({1: -1})
        persisted = fits_in_memory(client, X.nbytes)
        # In memory, one large chunk per thread costs the least per pass. Whole numbers already in the cluster
        # stay in their chunks, where they are: the chunk hosts join each worker's own (exact sums make the
        # grouping immaterial), where regrouping rows in order first moved about half of them between workers.
        regroup = persisted and chunk_rows is None and not _hosts_join(client, X, n_centres)
        log.debug(placement_message(client, X.nbytes, persisted, regrouped=regroup))
        if regroup:
            X = X.rechunk({0: _default_chunk_rows(client, X.shape, X.dtype.itemsize)})
        if persisted:
            keep = client.persist(X)
            by_key = {f.key: f for f in futures_of(keep)}
            blocks = [by_key[key] for key in flatten(keep.__dask_keys__())]
        else:
            keep = X
            blocks = list(keep.to_delayed().ravel())
        sizes = X.chunks[0]
        loaders, inputs = (None, None) if persisted else _chunk_loaders(X)
        if loaders is not None:
            inputs = {key: broadcast(client, value) for key, value in inputs.items()}
            # STREAM_GROUP_BYTES a task, but at least 4 tasks per worker thread, so that the threads finish together.
            threads = max(1, sum(client.nthreads().values()))
            by_bytes = STREAM_GROUP_BYTES // max(1, X.nbytes // max(1, len(loaders)))
            per_task = max(1, min(by_bytes, math.ceil(len(loaders) / (4 * threads))))
    else:
        X = np.asarray(X)
        rows = chunk_rows or _default_chunk_rows(client, X.shape, X.itemsize)
        sizes = tuple(min(rows, X.shape[0] - s) for s in range(0, X.shape[0], rows))
        # hash=False: content-hashed keys would be shared with (and released by) an earlier fit of the same array.
        blocks = client.scatter([X[s : s + r] for s, r in zip(np.cumsum((0,) + sizes[:-1]), sizes)], hash=False)
        keep, persisted, loaders, inputs = blocks, True, None, None
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
    shape = (int(X.shape[0]), int(X.shape[1]))
    return ChunkedData(blocks, offsets, *shape, X.dtype, persisted, keep, loaders, inputs, per_task)


def _chunk_loaders(X: da.Array):
    """Each chunk's own task and the literal inputs they share; (None, None) when a chunk needs other tasks.

    A store read through ``da.from_array`` is one small task per chunk (a
    getter of its file) over one literal input (the store's file list); such
    a task can run inside a pass's task, so that streaming costs one task per
    chunk, not a load task and a step task. A chunk that needs other tasks
    (a rechunk that merges chunks) keeps its own graph.
    """
    keys = list(flatten(X.__dask_keys__()))
    graph = dict(X.__dask_optimize__(X.__dask_graph__(), keys))
    loaders, inputs = [], {}
    for key in keys:
        task = graph[key]
        while isinstance(task, Alias):
            task = graph[task.target]
        if not isinstance(task, Task):
            return None, None
        for dep in task.dependencies:
            if not isinstance(graph[dep], DataNode):
                return None, None
            inputs[dep] = graph[dep].value
        loaders.append(_Loader(task))
    return loaders, inputs


@dataclass(frozen=True)
class _Loader:
    """A chunk's task, wrapped: a bare Task in a task's arguments would be taken as part of its graph."""

    task: Task

    def __call__(self, inputs: dict):
        return self.task(inputs)


def _hosts_join(client: Client, X: da.Array, n_centres: int | None) -> bool:
    """Whether X is already persisted on this cluster, in row chunks of whole numbers whose every partial sum
    (rows and squared norms alike) is exact in any grouping, and chunk hosts will carry passes over
    ``n_centres``: then they join the chunks each worker holds (ChunkHosts.open) instead of the rows being
    regrouped first. (Passes in tasks keep to one chunk per thread: more would mean more tasks, and more
    k x d partials and states on each worker.)"""
    if n_centres is None or not hosts_enabled() or X.numblocks[1] != 1:
        return False
    if not exact_in_any_grouping(X.dtype, *X.shape):
        return False
    if not hosts_carry(client, X.numblocks[0], True, n_centres, X.shape[1]):
        return False
    futures = futures_of(X)
    if {f.key for f in futures} != set(flatten(X.__dask_keys__())):
        return False
    return all(f.client is client for f in futures)


def exact_in_any_grouping(dtype: np.dtype, n_rows: int, n_features: int) -> bool:
    """Whether rows of this integer dtype sum exactly in int64 and their squared norms in float64, however the
    rows are grouped: the largest possible total of squared norms stays below 2**53."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "ui" or dtype.itemsize > 2:
        return False
    info = np.iinfo(dtype)
    largest = max(abs(int(info.min)), int(info.max))
    return n_rows * n_features * largest**2 < 2**53


def _default_chunk_rows(client: Client, shape, itemsize: int) -> int:
    threads = max(1, sum(client.nthreads().values()))
    by_threads = math.ceil(shape[0] / threads)
    by_bytes = max(1, (64 << 20) // max(1, itemsize * shape[1]))
    return max(1, min(by_threads, by_bytes))


def fits_in_memory(client: Client, nbytes: int) -> bool:
    limits = [w.get("memory_limit") or 0 for w in client.scheduler_info()["workers"].values()]
    if any(limit == 0 for limit in limits):  # no limit set
        return True
    return nbytes <= PERSIST_MEMORY_FRACTION * sum(limits)


def placement_message(client: Client, nbytes: int, persisted: bool, regrouped: bool = True) -> str:
    """One line saying whether the data is kept in worker memory or streamed, and why."""
    limits = [w.get("memory_limit") or 0 for w in client.scheduler_info()["workers"].values()]
    total = sum(limits) if limits and all(limits) else None
    budget = "no worker memory limit" if total is None else f"{PERSIST_MEMORY_FRACTION:.0%} of {total / 1e6:,.0f} MB"
    if persisted:
        how = ", regrouped into one chunk per worker thread" if regrouped else ""
        return f"data: persisted in worker memory ({nbytes / 1e6:,.1f} MB fits in {budget}){how}"
    return f"data: streamed from storage every iteration ({nbytes / 1e6:,.1f} MB exceeds {budget})"


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
    for i, offset in enumerate(data.offsets):
        own = {key: values[i] for key, values in per_chunk.items()}
        out.append(on_chunk(data, i, func, *args, key=(tag, i), nout=nout, offset=offset, **kwargs, **own))
    return out


def on_chunk(data: ChunkedData, i: int, func, *args, key, nout: int | None = None, **kwargs):
    """func(chunk i, *args, **kwargs) as one delayed task. A streamed chunk whose loader allows it is read
    inside that task: one task, not a read task and a kernel task with the chunk sent from one to the other."""
    if data.loaders is not None:
        # The loader goes in the function (delayed would take the Task inside it for part of the graph), and
        # the inputs as two lists (delayed resolves futures in a list, not in a dict).
        names = list(data.loader_inputs)
        values = [data.loader_inputs[name] for name in names]
        call = delayed(partial(_kernel_on_read, data.loaders[i]), pure=False, nout=nout)
        return call(func, names, values, *args, dask_key_name=key, **kwargs)
    return delayed(_kernel, pure=False, nout=nout)(func, data.blocks[i], *args, dask_key_name=key, **kwargs)


def _kernel(func, *args, **kwargs):
    """Run a kernel on a worker, set up for it (_prepare_worker)."""
    _prepare_worker()
    return func(*args, **kwargs)


def _kernel_on_read(loader, func, names, values, *args, **kwargs):
    """_kernel on a streamed chunk, read here."""
    return _kernel(func, loader(dict(zip(names, values))), *args, **kwargs)


def _prepare_worker() -> None:
    """Once per worker process: the allocator set for the kernels' tiles (see allocator), and the compiled
    kernels allowed only where the worker's memory limit leaves room for numba (COMPILED_MIN_MEMORY)."""
    global _prepared
    if _prepared:
        return
    _prepared = True
    allocator.keep_tile_memory()
    try:
        limit = get_worker().memory_manager.memory_limit
    except ValueError:  # not in a worker (a local scheduler): the process's own memory
        limit = None
    if limit and limit < COMPILED_MIN_MEMORY:
        kernels.use_compiled(False)
        log.info("memory limit %d MB: the numpy kernels run here, not the compiled ones", limit >> 20)


_prepared = False


def _groups(parts: list):
    """(start, group) of SPLIT_EVERY consecutive partials: one level of every reduction here, so that they
    all add the same partials together in the same order (float sums depend on it)."""
    return [(i, parts[i : i + SPLIT_EVERY]) for i in range(0, len(parts), SPLIT_EVERY)]


def tree_reduce(parts: list, combine, *args, name: str):
    """Combine partials in groups of SPLIT_EVERY until one remains."""
    tag = _tag(name)
    level = 0
    while len(parts) > 1:
        parts = [
            delayed(combine, pure=False)(group, *args, dask_key_name=(tag, level, i)) for i, group in _groups(parts)
        ]
        level += 1
    return parts[0]


def broadcast(client: Client, array: np.ndarray) -> Future:
    """Send an array to the cluster once; tasks then refer to it by key instead of embedding it.

    It is a task that returns the array (not scattered data), so that when a
    worker holding it dies the scheduler can recreate it: scattered data has
    no recipe, and the active memory manager keeps only one replica of it.
    """
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": "1GB"}):
        return client.submit(_constant, array, key=_tag("broadcast"), pure=False)


def shared(client: Client, data: ChunkedData, array: np.ndarray):
    """The array for a pass's tasks: inside each task while small (a broadcast costs a round trip of its own,
    10-20 ms on a LocalCluster), broadcast once when its copies would exceed BROADCAST_BYTES."""
    return broadcast(client, array) if array.nbytes * data.n_chunks > BROADCAST_BYTES else array


def _constant(array):
    return array


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
        tasks.append(on_chunk(data, int(c), _take, local, key=(tag, int(c))))
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


@dataclass
class Iteration:
    """What a progress callback learns after each Lloyd update of one model."""

    model: int  # index into the models of lloyd_many
    n_iter: int  # updates before this pass: 0 for the pass over the initial centres
    loss: float  # J_clust (mean squared distance) of this pass
    shift: float  # largest centre movement of the update it computed
    seconds: float  # wall time of the pass (shared by all models in it)
    kernel_seconds: float | None  # the busiest worker's compute time in it, when the pass ran on chunk hosts
    centers: np.ndarray  # the updated centres
    continues: bool  # the fit goes on from them (a resumable state); False on its last pass
    loss_history: list  # J_clust of every pass so far, this one included


@dataclass(eq=False)
class _Run:
    centers: np.ndarray
    max_iter: int
    tol: float
    n_iter: int = 0  # updates so far
    losses: list = field(default_factory=list)
    result: LloydResult | None = None


def lloyd(
    client: Client,
    data: ChunkedData,
    centers: np.ndarray,
    max_iter: int,
    tol: float,
    callback: Callable | None = None,
    *,
    start_iter: int = 0,
    loss_history: list[float] | None = None,
    on_update: Callable | None = None,
    bounds: bool = True,
) -> LloydResult:
    """Lloyd iterations, one pass over the data each, until every centre moves less than tol.

    Pass p assigns the rows to the centres after p updates and sums them for
    update p+1. The pass that finds the next update too small (or reaches
    max_iter) keeps its centres, so its labels and inertia are those of the
    returned centres exactly: no separate pass for labels or inertia. As in
    scikit-learn, ``n_iter`` counts updates, and an update that changes
    nothing (a fixed point) is counted. ``callback`` receives an Iteration.

    Resuming (checkpoints): ``centers`` after ``start_iter`` updates and the
    ``loss_history`` of the passes before them continue a run exactly where it
    stopped. ``on_update(n_updates, centers, losses)`` is called whenever the
    loop goes on with new centres, i.e. with precisely that resumable state.
    """

    def report(it: Iteration) -> None:
        if callback is not None:
            callback(it)
        if on_update is not None and it.continues:
            on_update(it.n_iter + 1, it.centers, it.loss_history)

    start = [(start_iter, loss_history or [])]
    return lloyd_many(client, data, [centers], [max_iter], [tol], report, start=start, bounds=bounds)[0]


def lloyd_many(
    client: Client,
    data: ChunkedData,
    centers: list[np.ndarray],
    max_iter: list[int],
    tol: list[float],
    callback: Callable | None = None,
    *,
    start: list[tuple[int, list[float]]] | None = None,
    bounds: bool = True,
) -> list[LloydResult]:
    """Several independent Lloyd fits (a sweep over k, or restarts) sharing every pass over the data.

    Each pass reads every chunk once and assigns it for all models still
    running; a model that stops drops out of later passes. Each model's result
    is identical to what ``lloyd`` gives it alone. ``start`` gives each model's
    (updates so far, loss history) when resuming. With ``bounds``, rows whose
    Yinyang bounds show that their centre cannot change are not recomputed
    (the same labels and centres, fewer distances).
    """
    start = start or [(0, [])] * len(centers)
    runs = [
        _Run(np.asarray(c, dtype=np.float64), m, t, n, list(losses))
        for c, m, t, (n, losses) in zip(centers, max_iter, tol, start, strict=True)
    ]
    fit = _tag("fit")
    held: list = []  # the last pass's gathered futures, released after the next pass is submitted
    hosts = ChunkHosts.open(client, data, sum(r.centers.shape[0] for r in runs))
    try:
        while active := [(i, r) for i, r in enumerate(runs) if r.result is None]:
            began = time.perf_counter()
            ids = tuple(i for i, _ in active)
            centers_now = [r.centers for _, r in active]
            kernel = None
            if hosts is not None:
                try:
                    stats, kernel = hosts.lloyd_pass(centers_now, ids, fit, bounds=bounds)
                except Exception as exc:  # a worker lost (or its actor): tasks recover, hosts cannot
                    log.warning("chunk hosts failed (%s); the fit goes on with one task per chunk", exc)
                    hosts.close()
                    hosts = kernel = None
            if hosts is None:
                stats = lloyd_pass(client, data, centers_now, ids, fit, bounds=bounds, held=held)
            far_rows = _relocation_rows(client, data, stats, centers_now, ids, fit)
            seconds = time.perf_counter() - began
            finished = []
            for (index, run), st, rows in zip(active, stats, far_rows):
                inertia = kernels.inertia(st, run.centers)
                run.losses.append(inertia / data.n_samples)
                new_centers = kernels.update_centers(st, run.centers, rows)
                shift = float(np.sqrt(((new_centers - run.centers) ** 2).sum(axis=1)).max())
                done_iter = None
                if shift == 0.0 and run.n_iter < run.max_iter:
                    done_iter = run.n_iter + 1  # the update was a no-op: count it, as scikit-learn does
                elif shift < run.tol or run.n_iter >= run.max_iter:
                    done_iter = run.n_iter
                if callback is not None:
                    loss, goes_on = run.losses[-1], done_iter is None
                    callback(
                        Iteration(index, run.n_iter, loss, shift, seconds, kernel, new_centers, goes_on, run.losses)
                    )
                if done_iter is None:
                    run.centers = new_centers
                    run.n_iter += 1
                else:
                    if done_iter > run.n_iter:
                        run.losses.append(run.losses[-1])
                    run.result = LloydResult(run.centers, None, inertia, done_iter, run.losses)
                    finished.append((index, run))
            for index, run in finished:
                run.result.labels = _final_labels(client, data, run.centers, fit, index, hosts)
    finally:
        held.clear()
        if hosts is not None:
            hosts.close()
        _forget(client, fit)
    return [r.result for r in runs]


def _forget(client: Client, fit: str) -> None:
    """Free the workers' memory of a fit; a cluster that is gone has nothing left to free."""
    try:
        client.run(_forget_here, fit)
    except Exception as exc:  # the fit's own error (a lost cluster) is the one worth reporting
        log.debug("could not clear worker state of %s: %s", fit, exc)


def _forget_here(fit: str) -> None:
    """On a worker: drop a fit's entries in memory and its chunk files on disk (one round trip for both)."""
    worker_state.forget(fit)
    disk_state.forget(fit)


def _relocation_rows(client: Client, data: ChunkedData, stats: list, centers: list, ids: tuple, fit: str) -> list:
    """For each model with empty clusters, its farthest rows (one extra pass and fetch); None for the others.

    The extra pass runs only for those models, over the assignment the pass
    just made (remembered on the workers, or recomputed), asking for their k
    farthest rows; their stats replace the ones without.
    """
    empty = [slot for slot, st in enumerate(stats) if (st.counts == 0).any()]
    if not empty:
        return [None] * len(stats)
    with_far = lloyd_pass(
        client, data, [centers[s] for s in empty], tuple(ids[s] for s in empty), fit, far=True, bounds=False
    )
    for slot, st in zip(empty, with_far):
        stats[slot] = st
    wanted = [st.far_index[: int(np.count_nonzero(st.counts == 0))] for st in with_far]
    rows = fetch_rows(client, data, np.concatenate(wanted))
    edges = np.cumsum([0] + [w.size for w in wanted])
    out = [None] * len(stats)
    for slot, a, b in zip(empty, edges[:-1], edges[1:]):
        out[slot] = rows[a:b]
    return out


def lloyd_pass(
    client: Client,
    data: ChunkedData,
    centers: list[np.ndarray],
    ids: tuple,
    fit: str,
    *,
    far=False,
    bounds=True,
    held: list | None = None,
) -> list[kernels.ChunkStats]:
    """Map the Lloyd chunk step over the chunks and reduce the partials: the stats of each model.

    ``ids`` name the models in the workers' memory of ``fit`` (worker_state):
    each chunk task starts from its last assignment there when it has one.
    With ``far``, each model also gets its k farthest rows (for relocation).
    The chunk tasks' partials are released as soon as they are added up,
    except the few the client gathers (and the broadcast centres): with
    ``held``, those go into it and the futures it held from the previous
    pass are released once this pass is submitted. Releasing is a message on
    the client's batched stream, which then holds the next message for its
    interval (10 ms): released between passes, they delayed every next pass.
    """
    stacked = shared(client, data, np.concatenate(centers))
    # Streamed data is too large for its bounds to stay in the workers' memory: they go to local disk, filed
    # under a digest of their centres (computed here once, not for every chunk).
    digests = None if data.persisted else tuple(screening.centres_digest(c) for c in centers)
    args, combine = _pass_args(stacked, centers, ids, fit, far, bounds, digests)
    parts = map_chunk_futures(client, data, _lloyd_task, *args, name="assign", combine=combine)
    if held is not None:
        held.clear()
        held.append(stacked)
    return reduce_futures(client, parts, combine, name="reduce", held=held)


def _pass_args(stacked, centers: list, ids: tuple, fit: str, far: bool, bounds: bool, digests) -> tuple:
    """_lloyd_task's arguments after the chunk, and the combine of its partials."""
    sizes = tuple(c.shape[0] for c in centers)
    n_far = sizes if far else (0,) * len(sizes)
    return (stacked, sizes, n_far, ids, fit, bounds, digests), partial(kernels.combine_stats_many, n_far=n_far)


class ChunkHosts:
    """One Dask actor per worker over the persisted chunks it holds: a pass is one method call to each.

    A pass of no-op tasks takes about 15 ms on a 2-worker LocalCluster
    (submit, schedule, report, gather), as long as the kernels themselves at
    k=10; a call to an actor's method (not scheduled; straight to a worker
    on this machine, else relayed by the scheduler) takes 1.5 to 5 ms.
    The actors hold the very arrays persisted on their workers and run the
    same _lloyd_task, so the results are identical. An actor dies with its
    worker, where a task is recomputed elsewhere: the fit then goes on with
    tasks. Dask config ``dkmeans.chunk-hosts: false`` keeps every pass in
    tasks (visible in the dashboard's task stream).
    """

    def __init__(self, client: Client, actors: list, futures: list, workers: list):
        self.client = client
        self.actors = actors
        self._futures = futures  # the actors live as long as these
        self._workers = workers  # each actor's worker
        self.direct = _reaches_workers(client, workers)

    @classmethod
    def open(cls, client: Client, data: ChunkedData, n_centres: int) -> ChunkHosts | None:
        """Hosts for data persisted as futures, one per worker, for passes over ``n_centres`` centres in all;
        None when the data is not persisted, or when the client would move more than HOSTS_MAX_BYTES a pass."""
        if not hosts_enabled() or not data.persisted:
            return None
        if not data.blocks or not all(isinstance(b, Future) for b in data.blocks):
            return None
        nthreads = client.nthreads()
        join = exact_in_any_grouping(data.dtype, data.n_samples, data.n_features)
        if not hosts_carry(client, data.n_chunks, join, n_centres, data.n_features):
            return None
        # wait() and the actor proxies use the current client, which need not be the default one
        with client.as_current():
            wait(data.blocks)
            by_worker = _share_chunks(client.who_has(data.blocks), [b.key for b in data.blocks], nthreads)
            tag = _tag("host")
            shares = [(worker, indices) for worker, indices in by_worker.items() if indices]
            futures = [
                client.submit(
                    _ChunkHost,
                    indices,
                    [data.offsets[i] for i in indices],
                    nthreads[worker],
                    join,
                    *[data.blocks[i] for i in indices],
                    actor=True,
                    workers=[worker],
                    allow_other_workers=False,
                    key=(tag, n),
                )
                for n, (worker, indices) in enumerate(shares)
            ]
            return cls(client, client.gather(futures), futures, [worker for worker, _ in shares])

    def lloyd_pass(self, centers: list, ids: tuple, fit: str, *, bounds=True) -> tuple[list, float]:
        """lloyd_pass on the hosts: each model's stats, and the busiest host's compute seconds."""
        if self.client.status != "running":  # called straight (direct_to_workers), hosts outlive the scheduler
            raise OSError(f"the client is {self.client.status}, not connected to the scheduler")
        args, combine = _pass_args(np.concatenate(centers), centers, ids, fit, False, bounds, None)
        done = self.call("run", _lloyd_task, args)
        # Every chunk's partial, added up as reduce_futures would: the same sums to the last bit, wherever
        # the chunks were (float rows give order-dependent sums).
        parts = sorted((part for parts, _ in done for part in parts), key=lambda part: part[0])
        return combine_like_reduce([part for _, part in parts], combine), max(seconds for _, seconds in done)

    def call(self, method: str, *args) -> list:
        """Every host's ``method(*args)``: sent straight to the workers where the client reaches them, else
        relayed by the scheduler (Dask's actor proxy).

        The relay carries the centres and the partial sums twice: at k=256 on 2 workers a pass's calls take
        12.3 ms relayed and 5.7 ms direct (2.3 and 1.5 ms with nothing to carry). A direct call that cannot
        connect switches the hosts to the relay, unless its worker has left the cluster: then the call fails at
        once (the fit goes on in tasks).
        """
        if self.direct:
            try:
                return self.client.sync(self._direct_calls, method, args)
            except OSError as exc:
                gone = self._left_cluster(within=HOST_LEFT_WAIT)
                if gone:  # the relay would only try the dead worker again, for as long as Dask's connect timeout
                    raise OSError(f"chunk host worker(s) {', '.join(sorted(gone))} left the cluster") from exc
                log.info("chunk hosts: the client cannot reach the workers (%s); calls go through the scheduler", exc)
                self.direct = False
        calls = [getattr(actor, method)(*args) for actor in self.actors]
        return [call.result() for call in calls]

    def _left_cluster(self, within: float) -> set:
        """The hosts' workers the scheduler no longer lists, waiting up to ``within`` seconds for it to notice:
        a connect to a killed worker is refused at once, sometimes before the scheduler has seen it go."""
        deadline = time.monotonic() + within
        while not (gone := set(self._workers) - set(self.client.nthreads())) and time.monotonic() < deadline:
            time.sleep(0.1)
        return gone

    async def _direct_calls(self, method: str, args: tuple) -> list:
        async def one(worker, future):
            # The worker's handler for actor calls, as Dask's Actor uses it with a client set direct_to_workers,
            # over the client's pooled connections, but with a bounded connect (HOST_CONNECT_TIMEOUT).
            pool = self.client.rpc
            comm = await pool.connect(worker, timeout=HOST_CONNECT_TIMEOUT)
            try:
                reply = await send_recv(
                    comm,
                    op="actor_execute",
                    actor=future.key,
                    function=method,
                    args=[to_serialize(arg) for arg in args],
                    kwargs={},
                )
            finally:
                pool.reuse(worker, comm)
            if reply["status"] != "OK":
                raise reply["exception"]
            return reply["result"]

        return await asyncio.gather(*(one(w, f) for w, f in zip(self._workers, self._futures)))

    def close(self) -> None:
        """Release the actors (no round trip: this also runs when the scheduler is gone)."""
        self.actors = []
        self._futures = []


def hosts_carry(client: Client, n_chunks: int, join: bool, n_centres: int, n_features: int) -> bool:
    """Whether chunk hosts may take passes over ``n_centres`` centres for ``n_chunks`` chunks (joined into one
    block per worker thread with ``join``), each chunk or block sending its partial sums back.

    The client sends the centres to every host and gets every part's sums back (no tree of reductions on the
    workers, no worker-to-worker broadcast): fine for a few workers, not for a hundred (HOSTS_MAX_BYTES).
    """
    nthreads = client.nthreads()
    parts = min(n_chunks, sum(nthreads.values())) if join else n_chunks
    return (len(nthreads) + parts) * n_centres * n_features * 8 <= HOSTS_MAX_BYTES


def _reaches_workers(client: Client, workers: list) -> bool:
    """Whether host calls go straight to the workers: as the client's direct_to_workers says, and where it says
    nothing (Dask's default), when every worker listens on this machine's loopback or in this process."""
    if client.direct_to_workers is not None:
        return bool(client.direct_to_workers)
    return all(_on_loopback(w) for w in workers)


def _on_loopback(address: str) -> bool:
    if address.startswith("inproc://"):
        return True
    host = urlsplit(address).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hosts_enabled() -> bool:
    """Dask config ``dkmeans.chunk-hosts`` (env DASK_DKMEANS__CHUNK_HOSTS), true unless set to a false value."""
    value = dask.config.get("dkmeans.chunk-hosts", True)
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off")
    return bool(value)


def _share_chunks(who_has: dict, keys: list, nthreads: dict) -> dict:
    """Chunk indices for each worker, in proportion to its threads, leaving as many chunks as possible where
    they are (a chunk given to another worker is copied there once, when its host starts)."""
    total = sum(nthreads.values())
    quota = {w: math.ceil(len(keys) * n / total) for w, n in nthreads.items()}
    shares: dict = {w: [] for w in nthreads}
    moved = []
    for index, key in enumerate(keys):
        holder = next((w for w in who_has.get(key, ()) if w in shares and len(shares[w]) < quota[w]), None)
        if holder is None:
            moved.append(index)
        else:
            shares[holder].append(index)
    for index in moved:
        shares[min(shares, key=lambda w: len(shares[w]) / nthreads[w])].append(index)
    return shares


class _ChunkHost:
    """The actor: a worker's persisted chunks, and a pass over them on as many threads as the worker has.

    With ``join`` (whole numbers, exact in any grouping: exact_in_any_grouping), the chunks are first joined
    into one block per thread: a pass's cost per chunk (preparing the centres, the kernels' set-up, one
    partial to send) is then paid once per thread, and the rows need not be contiguous. A joined block's
    state is filed under ("joined", first chunk index), which no chunk task looks up.
    (Dask runs an actor's methods on one thread of their own; the kernels release the GIL.)
    """

    def __init__(self, indices, offsets, nthreads, join, *blocks):
        self.chunks = list(zip(indices, offsets, blocks))
        self.joined: dict = {}  # a joined block's index: the chunks it holds, as (index, rows)
        if join and len(self.chunks) > nthreads:
            self.chunks = [self._join(group) for group in _split_evenly(self.chunks, nthreads)]
        threads = min(nthreads, len(self.chunks))
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="dkmeans-host") if threads > 1 else None

    def _join(self, group: list) -> tuple:
        if len(group) == 1:
            return group[0]
        index = ("joined", group[0][0])
        self.joined[index] = [(i, block.shape[0]) for i, _, block in group]
        return index, group[0][1], np.concatenate([block for _, _, block in group])

    def run(self, func, args):
        """[(chunk index, func's partial)] for every chunk here, and the seconds they took."""
        _prepare_worker()
        began = time.perf_counter()
        calls = [partial(func, block, *args, offset=offset, index=index) for index, offset, block in self.chunks]
        parts = [call() for call in calls] if self.pool is None else list(self.pool.map(lambda call: call(), calls))
        seconds = time.perf_counter() - began
        return [(index, _narrowed(part)) for (index, _, _), part in zip(self.chunks, parts)], seconds

    def held_labels(self, fit, model, digest) -> dict:
        held = _held_labels(fit, model, digest)
        for index, parts in self.joined.items():
            if index in held:
                ends = np.cumsum([rows for _, rows in parts])
                held.update(zip([i for i, _ in parts], np.split(held.pop(index), ends[:-1])))
        return held

    def __del__(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False)


def _split_evenly(items: list, n: int) -> list[list]:
    """``items`` (chunks) in at most n consecutive runs of about equal rows."""
    rows = np.cumsum([block.shape[0] for _, _, block in items])
    cuts = np.searchsorted(rows, rows[-1] * np.arange(1, n) / n, side="right")
    return [[items[i] for i in run] for run in np.split(np.arange(len(items)), cuts) if run.size]


def _narrowed(part):
    """A chunk's stats with integer sums sent as int32 where they fit (every uint8 chunk under 8 million rows):
    half the bytes back to the client, which widens them as it adds them (kernels.combine_stats)."""
    for st in part:
        if st.sums.dtype == np.int64 and (not st.sums.size or np.abs(st.sums).max() < 2**31):
            st.sums = st.sums.astype(np.int32)
    return part


def _lloyd_task(block, centers, sizes, n_far, ids, fit, bounds, digests, *, offset, index):
    """One chunk's step; its state stays in worker memory, or (streamed data, with ``digests``) on local disk."""
    _prepare_worker()
    if digests is None:
        norms = worker_state.get((fit, index, "norms"))
        states = [worker_state.get((fit, index, m)) for m in ids]
    else:
        norms, states = disk_state.get(fit, index, ids)
    fresh_norms = norms is None or norms.sq.shape[0] != block.shape[0]
    if fresh_norms:
        norms = kernels.chunk_norms(block, offset, split=_split_pays(block, sizes, fit, digests))
    new_states, stats = kernels.lloyd_chunk_many(
        block, centers, sizes, n_far, offset, norms=norms, states=states, bounds=bounds
    )
    if digests is None:
        if fresh_norms:
            worker_state.put((fit, index, "norms"), norms)
        for m, state in zip(ids, new_states):
            worker_state.put((fit, index, m), state)
        return stats
    disk_state.put(fit, index, norms, ids, new_states, digests)
    for m, state, digest in zip(ids, new_states, digests):  # the labels also stay in memory (4 bytes a row)
        labels = _Labels(digest, state.labels)
        worker_state.put((fit, index, m), labels, stale=partial(_stale, m, digest))
    return stats


def _split_pays(block, sizes, fit: str, digests) -> bool:
    """Whether the chunk's rows are also split for the products (kernels.chunk_norms): for passes over many
    centres, on chunks kept in memory, where the split (at most the chunk's size) leaves as much again of the
    worker's state budget for the chunks' bounds. Split norms that did not fit would be made again every pass."""
    if digests is not None or sum(sizes) < kernels.SPLIT_MIN_CENTRES:
        return False
    return worker_state.room(fit) >= 2 * block.nbytes


def _stale(model, digest, key, value) -> bool:
    """A streamed chunk's labels from an earlier pass of the same model (the chunk ran elsewhere since)."""
    return key[2] == model and isinstance(value, _Labels) and value.digest != digest


def chunk_labels(client: Client, data: ChunkedData, centers: np.ndarray, chunks=None) -> list[np.ndarray]:
    """Every row's nearest centre, one int32 array per chunk (of ``chunks`` only, when given)."""
    chunks = range(data.n_chunks) if chunks is None else chunks
    tag = _tag("labels")
    parts = [on_chunk(data, i, kernels.labels_of, centers, data.offsets[i], key=(tag, i)) for i in chunks]
    return client.gather(client.compute(parts))


def _final_labels(client: Client, data: ChunkedData, centers, fit: str, model: int, hosts=None):
    """A finished model's labels: those its last pass left on the workers, without reading the data again.

    The chunk hosts, or else one task per worker (named dkmeans-labels on the
    dashboard), return the labels their workers hold for these centres; the
    chunks whose labels are nowhere (evicted, or a worker lost since) are
    labelled again from the data.
    """
    tag = _tag("labels")
    digest = screening.centres_digest(centers)
    found = {}
    try:
        for labels_by_chunk in hosts.call("held_labels", fit, model, digest) if hosts is not None else []:
            found.update(labels_by_chunk)
    except Exception as exc:  # a host lost since the last pass: the tasks below find what is left
        log.debug("chunk hosts could not give their labels: %s", exc)
        found = {}
    if not found:
        workers = list(client.scheduler_info()["workers"])
        tasks = [
            client.submit(_held_labels, fit, model, digest, key=(tag, "held", i), workers=[w], allow_other_workers=True)
            for i, w in enumerate(workers)
        ]
        for labels_by_chunk in client.gather(tasks):
            found.update(labels_by_chunk)
    missing = [i for i in range(data.n_chunks) if i not in found]
    if missing:
        found.update(zip(missing, chunk_labels(client, data, centers, missing)))
    return np.concatenate([found[i] for i in range(data.n_chunks)]).astype(np.int64)


def _held_labels(fit, model, digest) -> dict:
    """This worker's labels of one model of a fit, by chunk, where they are for the centres with this digest."""
    out = {}
    for (_, index, which), state in worker_state.entries(fit):
        if which != model:
            continue
        if isinstance(state, _Labels):
            if state.digest == digest:
                out[index] = state.labels
        elif screening.centres_digest(state.centers) == digest:
            out[index] = state.labels
    return out


@dataclass
class _Labels:
    """A streamed chunk's last labels, with a digest of the centres they are for (16 bytes, not the centres)."""

    digest: bytes
    labels: np.ndarray

    def __post_init__(self):
        # Labels a pass did not change are a view of the state file it read (all the chunk's bounds, ten times
        # their size at k = 10): kept as they are, a long streamed fit's workers filled up with those files.
        if self.labels.base is not None:
            self.labels = self.labels.copy()


def map_chunk_futures(client: Client, data: ChunkedData, func, *args, name: str, combine=None) -> list[Future]:
    """One task per chunk, submitted now: func(block, *args, offset=..., index=...).

    Persisted chunks are futures and take a plain submit (the cheapest way to
    the scheduler); streamed chunks are read inside their task when their
    loaders allow it (see _chunk_loaders), else they are graphs that load
    them, sent along. Chunks read inside their task go ``data.chunks_per_task``
    (up to STREAM_GROUP_BYTES) at a time into one task, which reads and
    processes them one after another and returns ``combine(partials)``: Dask
    costs a few milliseconds of scheduler time per task, as much as
    computing a chunk of MNIST.
    (Pinning streamed chunks to workers, to find their state again, was
    tried: the restricted tasks bypass the scheduler's queuing, reads ran
    ahead of the kernels, and 400 MB workers paused at their memory limit.)
    """
    tag = _tag(name)
    if data.loaders is not None:
        per_task = 1 if combine is None else data.chunks_per_task
        groups = [range(i, min(i + per_task, data.n_chunks)) for i in range(0, data.n_chunks, per_task)]
        return [
            client.submit(
                _loaded,
                func,
                [data.loaders[i] for i in group],
                data.loader_inputs,
                *args,
                offsets=[data.offsets[i] for i in group],
                indices=list(group),
                combine=combine,
                key=(tag, group[0]),
                pure=False,
            )
            for group in groups
        ]
    if all(isinstance(b, Future) for b in data.blocks):
        return [
            client.submit(func, block, *args, offset=offset, index=i, key=(tag, i), pure=False)
            for i, (block, offset) in enumerate(zip(data.blocks, data.offsets))
        ]
    tasks = [
        delayed(func, pure=False)(block, *args, offset=offset, index=i, dask_key_name=(tag, i))
        for i, (block, offset) in enumerate(zip(data.blocks, data.offsets))
    ]
    return client.compute(tasks)


def _loaded(func, loaders, inputs, *args, offsets, indices, combine):
    """Read streamed chunks here and process each: one task for them all, not a load and a step per chunk.

    A second thread reads the next chunk while this one is processed, so the
    disk and the CPU work at the same time; at most two chunks are in memory.
    Each chunk's partial is added to the running total as it comes (the same
    additions, in the same order, as ``combine`` of them all), so a task holds
    one partial however many chunks it reads.
    """
    total = None
    reader = _reader()
    pending = reader.submit(loaders[0], inputs)
    try:
        for j, (offset, index) in enumerate(zip(offsets, indices)):
            block = pending.result()
            if j + 1 < len(loaders):
                pending = reader.submit(loaders[j + 1], inputs)
            part = func(block, *args, offset=offset, index=index)
            del block
            total = part if total is None else combine([total, part])
    finally:  # a failed chunk leaves no read running into the next task
        wait_for([pending])
    return total


_readers = threading.local()


def _reader() -> ThreadPoolExecutor:
    """The reading thread of this task thread, kept for the worker's life: a thread started and joined per task
    cost about 6 % of a streamed pass's CPU (10.6 against 10.0 s of both workers, passes 1-3 at k=10 over
    6,000,000 MNIST rows, medians of 4 rounds in alternation; reads alone unchanged)."""
    reader = getattr(_readers, "executor", None)
    if reader is None:
        reader = _readers.executor = ThreadPoolExecutor(1, thread_name_prefix="dkmeans-read")
    return reader


def combine_like_reduce(parts: list, combine):
    """reduce_futures on the client: the same groups, in the same order."""
    while len(parts) > SPLIT_EVERY:
        parts = [combine(group) for _, group in _groups(parts)]
    return combine(parts)


def reduce_futures(client: Client, parts: list[Future], combine, *args, name: str, held: list | None = None):
    """Combine partials on the cluster in groups of SPLIT_EVERY, the last group on the client (kept in held)."""
    tag = _tag(name)
    level = 0
    while len(parts) > SPLIT_EVERY:
        parts = [
            client.submit(combine, group, *args, key=(tag, level, i), pure=False, priority=1)
            for i, group in _groups(parts)
        ]
        level += 1
    if held is not None:
        held.extend(parts)
    return combine(client.gather(parts), *args)
