"""Fitting many models together (sweeps over k, restarts): each result must be exactly the model's own fit."""

import numpy as np
import pytest
from distributed import Client, LocalCluster

from dkmeans import KMeans, fit_many
from dkmeans.engine import chunk_data, lloyd
from dkmeans.metrics import accuracy, centroid_labels, predict_labels
from dkmeans.seeding import init_centers
from dkmeans.sweep import elbow, parse_inits, parse_k_range


def assert_identical(together, alone):
    """Bit for bit: the shared passes change nothing about any model."""
    np.testing.assert_array_equal(together.cluster_centers_, alone.cluster_centers_)
    np.testing.assert_array_equal(together.labels_, alone.labels_)
    assert together.inertia_ == alone.inertia_
    assert together.n_iter_ == alone.n_iter_
    assert together.loss_history_ == alone.loss_history_


@pytest.fixture(scope="module")
def X(mnist_numpy):
    return mnist_numpy[0]


@pytest.fixture(scope="module")
def Xs(X):
    return np.ascontiguousarray(X[:6000])


# --- parsing the sweep's arguments ----------------------------------------------------------


@pytest.mark.parametrize(
    "text, ks",
    [
        ("5:20", list(range(5, 21))),
        ("5:5", [5]),
        ("8:64:8", [8, 16, 24, 32, 40, 48, 56, 64]),
        ("20,10,10,64", [10, 20, 64]),
    ],
)
def test_parse_k_range(text, ks):
    assert parse_k_range(text) == ks


@pytest.mark.parametrize(
    "text, message",
    [
        ("20:5", "inverted"),
        ("", "expected START:STOP"),
        ("5-20", "expected START:STOP"),
        ("0:3", "at least 1"),
        ("0", "at least 1"),
        ("5:20:0", "step"),
        ("a,b", "expected START:STOP"),
    ],
)
def test_parse_k_range_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_k_range(text)


def test_parse_inits():
    assert parse_inits("sample, random,sample") == ["sample", "random"]
    with pytest.raises(ValueError, match="unknown init 'kmeans'"):
        parse_inits("sample,kmeans")
    with pytest.raises(ValueError, match="no init"):
        parse_inits(" , ")


# --- fit_many: models fitted together equal the same models fitted alone ---------------------


def test_fit_many_equals_fitting_each_model_alone(Xs, client):
    """Ten models of different k and init, converging at different passes, each exactly as alone."""
    params = [(k, init) for init in ("sample", "random", "k-means||") for k in (1, 3, 7)] + [(12, "k-means++")]

    def make(k, init):
        return KMeans(k, init=init, random_state=11, tol=1e-3, chunk_rows=1400)

    together = fit_many([make(k, init) for k, init in params], Xs, client=client)
    n_iters = {m.n_iter_ for m in together}
    assert len(n_iters) >= 3, n_iters  # models dropped out of the shared passes at different times
    for model, (k, init) in zip(together, params):
        assert_identical(model, make(k, init).set_params(client=client).fit(Xs))


def test_fit_many_on_full_mnist_dask_array(mnist, client):
    """Full MNIST from the chunked store: a sweep's models equal their own fits, and their own oracle."""
    Xd = mnist.train_images
    models = [KMeans(k, init="sample", random_state=3, max_iter=8, client=client) for k in (5, 16)]
    fit_many(models, Xd)
    for model in models:
        alone = KMeans(model.n_clusters, init="sample", random_state=3, max_iter=8, client=client).fit(Xd)
        assert_identical(model, alone)
        assert model.labels_.shape == (60000,)


def test_n_init_restarts_share_passes_and_keep_the_first_best(Xs, client):
    """n_init runs its restarts together; the winner is the same restart, bit for bit, as a lone fit of it."""
    best = KMeans(6, init="random", n_init=4, random_state=5, max_iter=30, client=client).fit(Xs)
    seeds = np.random.SeedSequence(5).spawn(4)
    data = chunk_data(client, Xs)
    runs = [
        lloyd(client, data, init_centers(client, data, 6, "random", np.random.default_rng(s)), 30, 1e-4) for s in seeds
    ]
    inertias = [r.inertia for r in runs]
    assert len(set(inertias)) > 1
    chosen = runs[int(np.argmin(inertias))]
    assert best.inertia_ == chosen.inertia
    np.testing.assert_array_equal(best.cluster_centers_, chosen.centers)
    np.testing.assert_array_equal(best.labels_, chosen.labels)


def test_fit_many_rejects_bad_models_before_any_work(Xs, client):
    with pytest.raises(ValueError, match="at least one model"):
        fit_many([], Xs, client=client)
    with pytest.raises(ValueError, match="n_samples=6000 should be >= n_clusters=6001"):
        fit_many([KMeans(3), KMeans(6001)], Xs, client=client)
    with pytest.raises(ValueError, match="share chunk_rows"):
        fit_many([KMeans(3, chunk_rows=100), KMeans(4, chunk_rows=200)], Xs, client=client)
    with pytest.raises(ValueError, match="Unknown init"):
        fit_many([KMeans(3), KMeans(4, init="bogus")], Xs, client=client)


def test_each_pass_reads_the_data_once_for_all_models(mnist_numpy):
    """Streaming data: a sweep of three models reads every chunk once per pass, not once per model."""
    import dask.array as da
    from test_engine import CountingRows  # pytest puts tests/ on sys.path

    from dkmeans import engine

    X = mnist_numpy[0][:6000]
    arr = da.from_array(CountingRows(X), chunks=(1500, 784), asarray=False, lock=False, name="counted-sweep")
    inits = [X[np.random.default_rng(k).choice(6000, k, replace=False)].astype(np.float64) for k in (4, 8, 12)]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster, set_as_default=False) as c:
            original = engine.PERSIST_MEMORY_FRACTION
            engine.PERSIST_MEMORY_FRACTION = 0.0  # pretend it does not fit: stream every pass
            try:
                CountingRows.reads.clear()
                models = fit_many([KMeans(len(i), init=i, max_iter=5, tol=0) for i in inits], arr, client=c)
            finally:
                engine.PERSIST_MEMORY_FRACTION = original
    passes = max(m.n_iter_ for m in models) + 1
    assert all(m.n_iter_ == 5 for m in models)
    assert set(CountingRows.reads.values()) == {passes}, CountingRows.reads  # 6 reads per chunk, not 18


# --- elbow: the sweep with its scores ---------------------------------------------------------


def test_elbow_points_are_the_models_own_fits_and_scores(mnist, client):
    sub = slice(0, 12000)
    X = mnist.train_images[sub]
    y = np.asarray(mnist.train_labels)[sub]
    X_test = mnist.test_images[:2000].compute()
    y_test = np.asarray(mnist.test_labels)[:2000]
    points = elbow(
        X, [4, 9], ["sample", "random"], y=y, X_test=X_test, y_test=y_test, random_state=2, max_iter=40, client=client
    )
    assert [(p.init, p.k) for p in points] == [("sample", 4), ("sample", 9), ("random", 4), ("random", 9)]
    for p in points:
        alone = KMeans(p.k, init=p.init, random_state=2, max_iter=40, client=client).fit(X)
        assert_identical(p.model, alone)
        summary = p.summary()
        assert summary["J_clust"] == pytest.approx(alone.inertia_ / 12000, rel=1e-12)
        assert summary["inertia"] == alone.inertia_
        # majority vote recomputed independently, with a dict count per cluster
        votes = {}
        for c, t in zip(alone.labels_, y):
            votes.setdefault(c, []).append(t)
        mapping = {c: max(sorted(set(v)), key=v.count) for c, v in votes.items()}
        assert summary["train_accuracy"] == pytest.approx(np.mean([mapping[c] == t for c, t in zip(alone.labels_, y)]))
        test_clusters = alone.predict(X_test)
        assert summary["test_accuracy"] == pytest.approx(
            np.mean([mapping.get(c, -1) == t for c, t in zip(test_clusters, y_test)])
        )
    # J_clust falls with k for each init on this data
    for init in ("sample", "random"):
        j = [p.j_clust for p in points if p.init == init]
        assert j[1] < j[0]


def test_elbow_rejects_bad_input(Xs, client):
    with pytest.raises(ValueError, match="at least one k"):
        elbow(Xs, [], client=client)
    with pytest.raises(ValueError, match="integer >= 1"):
        elbow(Xs, [0, 3], client=client)
    with pytest.raises(ValueError, match="unknown init 'nope'"):
        elbow(Xs, [3], ["nope"], client=client)
    with pytest.raises(ValueError, match="needs the training labels"):
        elbow(Xs, [3], X_test=Xs[:10], client=client)


def test_labeling_helpers_agree_with_elbow_accuracy(Xs, mnist_numpy, client):
    y = mnist_numpy[1][:6000]
    (point,) = elbow(Xs, [10], ["sample"], y=y, random_state=1, max_iter=20, client=client)
    mapping = centroid_labels(point.model.labels_, y, 10)
    assert point.train_accuracy == accuracy(y, predict_labels(point.model.labels_, mapping))


def test_elbow_callback_learns_each_pass_and_its_compute_time_when_it_asks(Xs, client):
    plain, timed = [], []
    elbow(Xs, [3, 5], ["sample"], random_state=1, max_iter=6, client=client, callback=lambda *a: plain.append(a))
    points = elbow(
        Xs,
        [3, 5],
        ["sample"],
        random_state=1,
        max_iter=6,
        client=client,
        callback=lambda k, init, it, j, shift, seconds, kernel_seconds: timed.append((k, it, seconds, kernel_seconds)),
    )
    assert plain and all(len(a) == 6 for a in plain)  # a callback without kernel_seconds keeps its six arguments
    for p in points:  # every model reports passes 0 .. n_iter_ (its last pass keeps its centres)
        assert sorted(it for k, it, _, _ in timed if k == p.k) == list(range(p.model.n_iter_ + 1))
    # in-memory data runs on chunk hosts, which time each pass's compute: positive, within the pass's wall time
    assert all(kernel is not None and 0 < kernel <= seconds for _, _, seconds, kernel in timed)
