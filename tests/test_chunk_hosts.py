"""Chunk hosts: Lloyd passes as method calls to one Dask actor per worker, against the same passes as tasks."""

from __future__ import annotations

import asyncio
import time

import dask
import numpy as np
import pytest
from distributed.utils import key_split

from dkmeans import engine


def _fit(client, data, init, hosted: bool, bounds: bool, max_iter=12):
    reports = []
    started = time.time()
    with dask.config.set({"dkmeans.chunk-hosts": hosted}):
        result = engine.lloyd(client, data, init, max_iter, 0.0, callback=reports.append, bounds=bounds)
    names = {key_split(t["key"]) for t in client.get_task_stream(start=started)}
    return result, reports, names


@pytest.mark.parametrize("bounds", [True, False], ids=["yinyang", "lloyd"])
def test_hosted_passes_equal_passes_of_tasks_to_the_last_bit(client, mnist_numpy, bounds):
    X = mnist_numpy[0][:24000] / 255.0  # float rows: their sums depend on the order partials are added in
    data = engine.chunk_data(client, X, chunk_rows=2400)  # 10 chunks: more than SPLIT_EVERY, a two-level sum
    init = X[np.random.default_rng(3).choice(X.shape[0], 15, replace=False)]
    client.get_task_stream()  # start recording
    with dask.config.set({"dkmeans.chunk-hosts": True}):
        assert len(engine.ChunkHosts.open(client, data, 15).actors) == 2  # one per worker
        # (2 workers + 10 chunks) x 15 centres x 784 x 8 bytes: 1.1 MB a pass through the client; past the
        # limit, a fit runs in tasks (a large cluster's tree of reductions and broadcast spare the client).
        assert engine.ChunkHosts.open(client, data, engine.HOSTS_MAX_BYTES // (12 * 784 * 8) + 1) is None

    hosted, hosted_reports, hosted_names = _fit(client, data, init, True, bounds)
    tasks, task_reports, task_names = _fit(client, data, init, False, bounds)

    np.testing.assert_array_equal(hosted.centers, tasks.centers)
    np.testing.assert_array_equal(hosted.labels, tasks.labels)
    assert hosted.inertia == tasks.inertia
    assert hosted.loss_history == tasks.loss_history
    assert hosted.n_iter == tasks.n_iter == 12
    # Which way the passes went: hosts measure their compute time and leave no assign tasks.
    assert all(r.kernel_seconds is not None and r.kernel_seconds > 0 for r in hosted_reports)
    assert all(r.kernel_seconds is None for r in task_reports)
    # The hosts also hand over the final labels their workers hold (tasks ask each worker: dkmeans-labels).
    assert not {"dkmeans-assign", "dkmeans-labels"} & hosted_names, hosted_names
    assert {"dkmeans-assign", "dkmeans-labels"} <= task_names and "dkmeans-host" not in task_names, task_names


def test_persisted_whole_numbers_stay_in_their_chunks_and_hosts_join_them(client, mnist_numpy):
    """uint8 rows a user persisted in 10 chunks are not regrouped (no rows move between workers): each host
    joins the chunks its worker holds. The fit equals, bit for bit, the one on the same rows regrouped in
    order and the one in tasks; float rows persisted the same way are still regrouped."""
    import dask.array as da
    from distributed import wait

    X = mnist_numpy[0][:24000]
    init = X[np.random.default_rng(4).choice(X.shape[0], 40, replace=False)].astype(np.float64)
    persisted = client.persist(da.from_array(X, chunks=(2400, 784)))
    wait(persisted)
    data = engine.chunk_data(client, persisted, n_centres=40)
    assert data.n_chunks == 10 and [b.key for b in data.blocks] == [f.key for f in client.futures_of(persisted)]
    regrouped = engine.chunk_data(client, da.from_array(X, chunks=(2400, 784)), n_centres=40)
    assert regrouped.n_chunks == 2  # one per worker thread
    # Past what hosts carry (HOSTS_MAX_BYTES), passes go in tasks, which keep to one chunk per thread.
    too_many = engine.HOSTS_MAX_BYTES // (4 * 784 * 8) + 1
    assert engine.chunk_data(client, persisted, n_centres=too_many).n_chunks == 2
    assert engine.chunk_data(client, persisted).n_chunks == 2  # nothing said of the centres
    hosts = engine.ChunkHosts.open(client, data, 40)
    keys = [f.key for f in hosts._futures]
    joined = client.run(
        lambda dask_worker: [dask_worker.state.actors[k].joined for k in keys if k in dask_worker.state.actors]
    )
    blocks = [parts for per_host in joined.values() for h in per_host for parts in h.values()]
    assert len(blocks) == 2 and sorted(i for parts in blocks for i, _ in parts) == list(range(10))
    hosts.close()

    joined, reports, names = _fit(client, data, init, True, True)
    in_order, _, _ = _fit(client, regrouped, init, True, True)
    tasks, _, _ = _fit(client, data, init, False, True)
    assert all(r.kernel_seconds is not None for r in reports) and "dkmeans-labels" not in names
    for other in (in_order, tasks):
        np.testing.assert_array_equal(joined.centers, other.centers)
        np.testing.assert_array_equal(joined.labels, other.labels)
        assert joined.loss_history == other.loss_history and joined.inertia == other.inertia

    floats = client.persist(da.from_array(X / 255.0, chunks=(2400, 784)))
    wait(floats)
    assert engine.chunk_data(client, floats, n_centres=40).n_chunks < 10  # float sums depend on their grouping


def test_kmeans_on_persisted_whole_numbers_joins_them_and_gives_the_same_fit(client, mnist_numpy, monkeypatch):
    """KMeans tells chunk_data its centres: a persisted uint8 array is joined on the hosts, and the fit is the
    one on the same rows as a numpy array (regrouped), bit for bit."""
    import dask.array as da
    from distributed import wait

    from dkmeans import KMeans

    X = mnist_numpy[0][:12000]
    persisted = client.persist(da.from_array(X, chunks=(1500, 784)))
    wait(persisted)
    seen = []
    real = engine.chunk_data
    monkeypatch.setattr("dkmeans.estimator.chunk_data", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    joined = KMeans(12, init="sample", random_state=2, max_iter=15, tol=0, client=client).fit(persisted)
    alone = KMeans(12, init="sample", random_state=2, max_iter=15, tol=0, client=client).fit(X)
    assert [data.n_chunks for data in seen] == [8, 2]
    np.testing.assert_array_equal(joined.cluster_centers_, alone.cluster_centers_)
    np.testing.assert_array_equal(joined.labels_, alone.labels_)
    assert joined.inertia_ == alone.inertia_ and joined.n_iter_ == alone.n_iter_


def test_only_small_integers_with_exact_totals_are_joined():
    assert engine.exact_in_any_grouping(np.uint8, 60_000_000, 784)
    assert not engine.exact_in_any_grouping(np.uint8, 200_000_000, 784)  # squared norms past 2**53
    assert engine.exact_in_any_grouping(np.int16, 10_000, 784)
    assert not engine.exact_in_any_grouping(np.int16, 1_000_000, 784)
    assert not engine.exact_in_any_grouping(np.float32, 10, 784)
    assert not engine.exact_in_any_grouping(np.int32, 10, 784)


def test_a_host_joins_its_chunks_into_one_run_per_thread():
    chunks = [(i, 100 * i, np.full((rows, 2), i, dtype=np.uint8)) for i, rows in enumerate([6, 6, 6, 6, 6])]
    assert [[i for i, _, _ in run] for run in engine._split_evenly(chunks, 2)] == [[0, 1], [2, 3, 4]]
    assert [[i for i, _, _ in run] for run in engine._split_evenly(chunks, 1)] == [[0, 1, 2, 3, 4]]
    assert len(engine._split_evenly(chunks[:1], 3)) == 1
    host = engine._ChunkHost([0, 1, 2, 3, 4], [0, 6, 12, 18, 24], 2, True, *[b for _, _, b in chunks])
    assert [(index, block.shape[0]) for index, _, block in host.chunks] == [(("joined", 0), 12), (("joined", 2), 18)]
    assert host.joined == {("joined", 0): [(0, 6), (1, 6)], ("joined", 2): [(2, 6), (3, 6), (4, 6)]}
    alone = engine._ChunkHost([0, 1], [0, 6], 2, True, *[b for _, _, b in chunks[:2]])
    assert [index for index, _, _ in alone.chunks] == [0, 1] and not alone.joined  # a chunk per thread already


def test_chunks_are_shared_by_threads_and_moved_only_when_a_worker_has_too_many():
    keys = ["a", "b", "c", "d", "e", "f"]
    # All on one worker: half of them go to the other.
    shares = engine._share_chunks({k: ["w1"] for k in keys}, keys, {"w1": 1, "w2": 1})
    assert shares == {"w1": [0, 1, 2], "w2": [3, 4, 5]}
    # Already balanced: nothing moves, whichever worker holds which.
    who_has = {"a": ["w2"], "b": ["w1"], "c": ["w2"], "d": ["w1"], "e": ["w1"], "f": ["w2"]}
    assert engine._share_chunks(who_has, keys, {"w1": 1, "w2": 1}) == {"w1": [1, 3, 4], "w2": [0, 2, 5]}
    # In proportion to threads: a 2-thread worker takes twice the chunks.
    shares = engine._share_chunks({k: ["w1"] for k in keys}, keys, {"w1": 1, "w2": 2})
    assert shares == {"w1": [0, 1], "w2": [2, 3, 4, 5]}
    # A chunk with a replica on a worker that still has room stays there.
    shares = engine._share_chunks({"a": ["w1"], "b": ["w1", "w2"]}, ["a", "b"], {"w1": 1, "w2": 1})
    assert shares == {"w1": [0], "w2": [1]}


@pytest.mark.parametrize(
    "value, enabled", [(True, True), (False, False), ("false", False), ("False", False), ("off", False), ("1", True)]
)
def test_chunk_hosts_config_reads_like_dask_config(value, enabled):
    with dask.config.set({"dkmeans.chunk-hosts": value}):
        assert engine.hosts_enabled() is enabled


def test_a_callback_that_asks_learns_each_pass_compute_time(client, mnist_numpy):
    from dkmeans import KMeans

    seen = []

    def progress(iteration, j_clust, shift, seconds, kernel_seconds):
        seen.append((seconds, kernel_seconds))

    KMeans(5, init="sample", random_state=0, max_iter=3, tol=0, client=client, callback=progress).fit(
        mnist_numpy[0][:6000]
    )
    assert len(seen) == 4
    assert all(0 < kernel <= seconds for seconds, kernel in seen), seen  # the hosts' compute, within the pass


def test_a_host_runs_its_chunks_on_all_its_workers_threads(mnist_numpy):
    """One worker with 2 threads: its host runs the chunks on a pool of 2; the fit equals passes as tasks and
    scikit-learn's Lloyd from the same centres."""
    from distributed import Client, LocalCluster
    from sklearn.cluster import KMeans as SKKMeans

    X = mnist_numpy[0][:12000]
    init = X[np.random.default_rng(7).choice(X.shape[0], 12, replace=False)].astype(np.float64)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        with Client(cluster, set_as_default=False) as client:
            data = engine.chunk_data(client, X, chunk_rows=3000)  # 4 chunks for one host
            hosts = engine.ChunkHosts.open(client, data, 12)
            assert len(hosts.actors) == 1
            hosts.close()
            hosted, reports, _ = _fit(client, data, init, True, True, max_iter=30)
            tasks, _, _ = _fit(client, data, init, False, True, max_iter=30)
    assert all(r.kernel_seconds is not None for r in reports)
    np.testing.assert_array_equal(hosted.centers, tasks.centers)
    np.testing.assert_array_equal(hosted.labels, tasks.labels)
    assert hosted.loss_history == tasks.loss_history
    ref = SKKMeans(12, init=init, n_init=1, max_iter=30, tol=0, algorithm="lloyd").fit(X.astype(np.float64))
    np.testing.assert_array_equal(hosted.labels, ref.labels_)
    np.testing.assert_allclose(hosted.centers, ref.cluster_centers_, rtol=0, atol=1e-9)


def test_calls_go_straight_to_workers_on_this_machine_else_through_the_scheduler(client, mnist_numpy, monkeypatch):
    """The same fit with host calls sent straight to the workers, relayed by the scheduler (a client set
    direct_to_workers=False), and relayed after a direct call failed to connect."""
    from distributed import Client

    X = mnist_numpy[0][:6000]
    data = engine.chunk_data(client, X, chunk_rows=1500)
    init = X[np.random.default_rng(5).choice(X.shape[0], 8, replace=False)].astype(np.float64)
    calls = []
    real = engine.ChunkHosts._direct_calls

    async def counted(self, method, args):
        calls.append(method)
        return await real(self, method, args)

    monkeypatch.setattr(engine.ChunkHosts, "_direct_calls", counted)
    direct, _, _ = _fit(client, data, init, True, True, max_iter=5)
    assert calls.count("run") == 6 and calls.count("held_labels") == 1  # 6 passes, then the labels

    calls.clear()
    with Client(client.scheduler.address, direct_to_workers=False, set_as_default=False) as relayed_client:
        relayed_data = engine.chunk_data(relayed_client, X, chunk_rows=1500)
        hosts = engine.ChunkHosts.open(relayed_client, relayed_data, 8)
        assert not hosts.direct
        hosts.close()
        relayed, _, _ = _fit(relayed_client, relayed_data, init, True, True, max_iter=5)
    assert not calls

    async def refused(self, method, args):
        calls.append(method)
        raise ConnectionRefusedError("no route to the workers")

    monkeypatch.setattr(engine.ChunkHosts, "_direct_calls", refused)
    monkeypatch.setattr(engine, "HOST_LEFT_WAIT", 0.2)  # every worker stays: relayed after this wait
    fallback, reports, _ = _fit(client, data, init, True, True, max_iter=5)
    assert calls == ["run"]  # tried once, then every call went through the scheduler
    assert all(r.kernel_seconds is not None for r in reports)  # still on the hosts, not tasks

    for other in (relayed, fallback):
        np.testing.assert_array_equal(other.centers, direct.centers)
        np.testing.assert_array_equal(other.labels, direct.labels)
        assert other.loss_history == direct.loss_history


@pytest.mark.parametrize(
    "workers, setting, direct",
    [
        (["tcp://127.0.0.1:4000", "tcp://[::1]:4001", "inproc://10.0.0.1/1/2"], None, True),
        (["tcp://127.0.0.1:4000", "tcp://10.0.0.2:4001"], None, False),  # a remote worker: Dask's relay
        (["tcp://10.0.0.2:4001"], True, True),  # as the client's direct_to_workers says
        (["tcp://127.0.0.1:4000"], False, False),
    ],
)
def test_direct_calls_where_the_client_says_or_every_worker_is_on_this_machine(workers, setting, direct):
    class FakeClient:
        direct_to_workers = setting

    assert engine._reaches_workers(FakeClient(), workers) is direct


def test_a_killed_worker_is_not_tried_again_through_the_relay_before_the_scheduler_sees_it_go(monkeypatch):
    """A connect to a killed worker is refused at once, sometimes before the scheduler has seen the worker go.
    Relayed, the call would try the dead worker again for Dask's 30 s connect timeout: the hosts wait for the
    scheduler instead, and fail (the fit goes on in tasks)."""
    worker = "tcp://127.0.0.1:4000"

    class FakeClient:
        direct_to_workers = True
        looks = 0

        def sync(self, func, *args):
            return asyncio.run(func(*args))

        def nthreads(self):  # the scheduler sees the worker go on its third look
            self.looks += 1
            return {worker: 1} if self.looks < 3 else {}

    class NoRelay:
        def __getattr__(self, name):
            raise AssertionError("the call was relayed to the dead worker")

    async def refused(self, method, args):
        raise ConnectionRefusedError(f"connect to {worker} refused")

    monkeypatch.setattr(engine.ChunkHosts, "_direct_calls", refused)
    hosts = engine.ChunkHosts(FakeClient(), [NoRelay()], ["host-future"], [worker])
    with pytest.raises(OSError, match="left the cluster"):
        hosts.call("run", None)
