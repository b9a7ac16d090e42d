"""The engine's structural promises: one pass per iteration, data persisted once per fit,
centres broadcast once per iteration rather than embedded in tasks, tree-shaped reduction."""

import collections
import pickle

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster

from dkmeans import KMeans, engine


class CountingRows:
    """An array-like whose reads are counted, so the test sees every pass over the data."""

    reads: collections.Counter = collections.Counter()

    def __init__(self, X):
        self.X, self.shape, self.dtype, self.ndim = X, X.shape, X.dtype, X.ndim

    def __getitem__(self, key):
        rows = key[0] if isinstance(key, tuple) else key
        if isinstance(rows, slice) and (rows.stop or 0) > (rows.start or 0):
            CountingRows.reads[rows.start or 0] += 1
        return self.X[key]


@pytest.fixture(scope="module")
def threads_client():
    """In-process workers, so the read counter is shared with the test."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster, set_as_default=False) as c:
            yield c


@pytest.fixture
def counted(mnist_numpy):
    X = mnist_numpy[0][:12000]
    arr = da.from_array(CountingRows(X), chunks=(1500, 784), asarray=False, lock=False, name="counted-mnist")
    CountingRows.reads.clear()
    return X, arr


def _init(X, k=10):
    return X[np.random.default_rng(3).choice(X.shape[0], k, replace=False)].astype(np.float64)


def test_persisted_data_is_read_once_per_fit(counted, threads_client):
    X, arr = counted
    km = KMeans(10, init=_init(X), max_iter=6, tol=0, client=threads_client).fit(arr)
    assert km.data_persisted_
    assert km.n_iter_ == 6
    assert sorted(CountingRows.reads) == list(range(0, 12000, 1500))
    assert set(CountingRows.reads.values()) == {1}  # 8 chunks, each read exactly once for 7 passes


def test_streamed_data_is_read_once_per_iteration(counted, threads_client, monkeypatch):
    X, arr = counted
    monkeypatch.setattr(engine, "PERSIST_MEMORY_FRACTION", 0.0)  # pretend it does not fit in memory
    km = KMeans(10, init=_init(X), max_iter=6, tol=0, client=threads_client).fit(arr)
    assert not km.data_persisted_
    passes = km.n_iter_ + 1  # the final pass labels the returned centres: no other pass
    assert set(CountingRows.reads.values()) == {passes}, CountingRows.reads
    # and the result is what an in-memory fit gives
    ref = KMeans(10, init=_init(X), max_iter=6, tol=0, client=threads_client, chunk_rows=1700).fit(X)
    np.testing.assert_array_equal(km.labels_, ref.labels_)
    np.testing.assert_allclose(km.cluster_centers_, ref.cluster_centers_, rtol=0, atol=1e-9)


def test_centres_are_broadcast_once_per_pass_not_embedded(counted, threads_client, monkeypatch):
    X, arr = counted
    sent = []
    graphs = []
    real_submit, real_compute = threads_client.submit, threads_client.compute

    def submit(func, *args, **kwargs):
        sent.append((func, [np.shape(a) for a in args]))
        return real_submit(func, *args, **kwargs)

    def compute(collections_, *args, **kwargs):
        graphs.append(
            dask.base.collections_to_expr(collections_).__dask_graph__() if isinstance(collections_, list) else None
        )
        return real_compute(collections_, *args, **kwargs)

    monkeypatch.setattr(threads_client, "submit", submit)
    monkeypatch.setattr(threads_client, "compute", compute)
    # Passes as tasks (chunk hosts get the centres in their calls; tests/test_chunk_hosts.py)
    monkeypatch.setitem(dask.config.config, "dkmeans", {"chunk-hosts": False})
    # 64 x 784 float64 centres are 401 kB: above this, they must not ride inside each chunk's task
    monkeypatch.setattr(engine, "BROADCAST_BYTES", 300_000)
    k = 64
    km = KMeans(k, init=_init(X, k), max_iter=3, tol=0, client=threads_client).fit(arr)
    # one task per pass carries the centres (a recomputable task, so a lost worker does not lose them)
    centre_sends = [func for func, shapes in sent if shapes == [(k, 784)]]
    assert len(centre_sends) == km.n_iter_ + 1
    assert all(func is engine._constant for func in centre_sends)
    centres_bytes = k * 784 * 8
    for graph in filter(None, graphs):
        # 8 chunk tasks plus reductions: were the centres embedded, each task would carry 400 kB
        assert len(pickle.dumps(dict(graph))) < centres_bytes


def test_tree_reduce_groups_by_split_every():
    parts = [dask.delayed(np.array)([i]) for i in range(20)]
    total = engine.tree_reduce(parts, lambda group: np.sum(group, axis=0), name="t")
    graph = dict(total.__dask_graph__())
    reduce_keys = [key for key in graph if isinstance(key, tuple) and str(key[0]).startswith("dkmeans-t-")]
    assert len(reduce_keys) == 4  # 20 -> 3 -> 1
    assert total.compute(scheduler="synchronous")[0] == sum(range(20))
