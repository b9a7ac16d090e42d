"""Tests for dkmeans.KMeans on the real MNIST training set, against scikit-learn and numpy oracles."""

import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster
from sklearn.cluster import KMeans as SKKMeans

from dkmeans import KMeans, kernels
from dkmeans.engine import MIN_ROUND_PICKS, OVERSAMPLING, PARALLEL_ROUNDS, RECLUSTER_ITER, chunk_data, lloyd
from dkmeans.seeding import init_centers, init_centers_many

K = 10


# --- numpy oracles ----------------------------------------------------------------------


def np_sq_distances(X, C, block=1000):
    """(n, k) squared distances from the plain difference formula, in float64, a block of rows at a time."""
    C = np.asarray(C, dtype=np.float64)
    out = np.empty((len(X), len(C)))
    for s in range(0, len(X), block):
        xb = np.asarray(X[s : s + block], dtype=np.float64)
        out[s : s + block] = ((xb[:, None, :] - C[None, :, :]) ** 2).sum(axis=2)
    return out


def np_inertia_of(X, C, labels, block=10000):
    """Sum of squared distances of every row to the centre it is labelled with."""
    C = np.asarray(C, dtype=np.float64)
    total = 0.0
    for s in range(0, len(X), block):
        diff = np.asarray(X[s : s + block], dtype=np.float64) - C[labels[s : s + block]]
        total += float((diff * diff).sum())
    return total


def np_means(X, labels, k):
    return np.stack([np.asarray(X[labels == j], dtype=np.float64).mean(axis=0) for j in range(k)])


def row_indices(X, rows):
    """For each given row, the indices of X rows equal to it (asserting there is at least one)."""
    out = []
    for r in rows:
        assert np.array_equal(r, np.round(r)), "a centre with non-integer pixels is not a row of X"
        hits = np.flatnonzero((X == r.astype(X.dtype)).all(axis=1))
        assert hits.size, "centre is not a row of X"
        out.append(hits)
    return out


def assert_distinct_rows(X, centers):
    hits = row_indices(X, centers)
    assert len(np.unique(centers, axis=0)) == len(centers), "duplicate centres"
    return hits


def assert_same_fit(a, b, centre_atol=1e-6):
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, rtol=0, atol=centre_atol)
    np.testing.assert_allclose(a.inertia_, b.inertia_, rtol=1e-9)
    assert a.n_iter_ == b.n_iter_
    np.testing.assert_allclose(a.loss_history_, b.loss_history_, rtol=1e-9)


# --- shared data and fits ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def X(mnist_numpy):
    return mnist_numpy[0]


@pytest.fixture(scope="module")
def Xd(mnist):
    return mnist.train_images


@pytest.fixture(scope="module")
def Xs(X):
    """A 6000-row subsample (the first rows) for the slower or repeated fits."""
    return np.ascontiguousarray(X[:6000])


@pytest.fixture(scope="module")
def init10(X):
    rng = np.random.default_rng(12345)
    init = X[rng.choice(len(X), size=K, replace=False)].astype(np.float64)
    assert len(np.unique(init, axis=0)) == K
    return init


@pytest.fixture(scope="module")
def sk_full(X, init10):
    return SKKMeans(K, init=init10, n_init=1, max_iter=20, tol=0, algorithm="lloyd").fit(X.astype(np.float64))


@pytest.fixture(scope="module")
def dk_full(Xd, init10, client):
    calls = []
    init = init10.copy()
    km = KMeans(K, init=init, max_iter=20, tol=0, client=client, callback=lambda *a: calls.append(a)).fit(Xd)
    np.testing.assert_array_equal(init, init10)  # the given array is not modified
    km.test_calls = calls
    return km


# --- parity with scikit-learn ---------------------------------------------------------------


def test_lloyd_parity_with_sklearn_full_mnist(sk_full, dk_full):
    """To the last digit: every label, and centres and inertia within float64 rounding of scikit-learn's."""
    assert sk_full.n_iter_ == 20
    assert dk_full.n_iter_ == sk_full.n_iter_
    np.testing.assert_array_equal(dk_full.labels_, sk_full.labels_)
    np.testing.assert_allclose(dk_full.inertia_, sk_full.inertia_, rtol=1e-12)
    np.testing.assert_allclose(dk_full.cluster_centers_, sk_full.cluster_centers_, rtol=0, atol=1e-9)


def test_yinyang_and_lloyd_give_the_same_fit_iteration_by_iteration(Xd, X, client):
    """The bounds only skip work: k=64 on full MNIST, every loss and the final state bit for bit."""
    k = 64
    init = X[np.random.default_rng(64).choice(len(X), size=k, replace=False)].astype(np.float64)
    shifts = {}
    fits = {}
    for algorithm in ("lloyd", "yinyang"):
        seen = shifts.setdefault(algorithm, [])
        model = KMeans(k, init=init, max_iter=12, tol=0, algorithm=algorithm, client=client)
        model.callback = lambda *a, seen=seen: seen.append(a[2])
        fits[algorithm] = model.fit(Xd)
    a, b = fits["lloyd"], fits["yinyang"]
    assert a.n_iter_ == b.n_iter_ == 12
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert a.loss_history_ == b.loss_history_ and a.inertia_ == b.inertia_
    assert shifts["lloyd"] == shifts["yinyang"]
    np.testing.assert_array_equal(np_sq_distances(X, b.cluster_centers_).argmin(axis=1), b.labels_)


def _split_blocks() -> int:
    """On a worker: how many of the blocks it remembers have their rows split for the products."""
    from dkmeans import worker_state

    return sum(getattr(value, "columns", None) is not None for _, (_, value) in list(worker_state._entries.items()))


def test_many_centres_score_split_rows_and_stay_sklearns_fit(X, client):
    """From SPLIT_MIN_CENTRES centres the workers score their rows split (MNIST's rare pixels from lists:
    compiled.ColumnSplit); the fit is still scikit-learn's from the same start, label for label."""
    Xs = X[:12000]
    k = kernels.SPLIT_MIN_CENTRES + 32
    init = Xs[np.random.default_rng(8).choice(len(Xs), size=k, replace=False)].astype(np.float64)
    split = []
    model = KMeans(k, init=init, max_iter=8, tol=0, client=client)
    model.callback = lambda *a: split.append(sum(client.run(_split_blocks).values()))
    model.fit(Xs)
    assert split[0] >= 2  # a block on each worker (the fit's entries go when it ends)
    sk = SKKMeans(k, init=init, n_init=1, max_iter=8, tol=0, algorithm="lloyd").fit(Xs.astype(np.float64))
    assert model.n_iter_ == sk.n_iter_ == 8
    np.testing.assert_array_equal(model.labels_, sk.labels_)
    np.testing.assert_allclose(model.cluster_centers_, sk.cluster_centers_, rtol=0, atol=1e-9)
    np.testing.assert_allclose(model.inertia_, sk.inertia_, rtol=1e-12)


def test_unknown_algorithm_is_a_clear_error(X):
    with pytest.raises(ValueError, match="Unknown algorithm 'elkan'; expected one of auto, yinyang, lloyd"):
        KMeans(3, algorithm="elkan").fit(X[:100])


def test_lloyd_parity_with_sklearn_float32(X, init10, client):
    """float32 in: close to scikit-learn's float32 run (dkmeans labels by float64 distances, sklearn by float32)."""
    X32 = X.astype(np.float32) / np.float32(255)
    init = (init10 / 255).astype(np.float32)
    sk = SKKMeans(K, init=init, n_init=1, max_iter=10, tol=0, algorithm="lloyd").fit(X32)
    dk = KMeans(K, init=init, max_iter=10, tol=0, client=client, chunk_rows=7500).fit(X32)
    assert dk.n_iter_ == sk.n_iter_ == 10
    np.testing.assert_allclose(dk.inertia_, sk.inertia_, rtol=1e-4)
    agree = int((dk.labels_ == sk.labels_).sum())
    assert agree >= 0.999 * 60000, f"only {agree} of 60000 labels agree"
    # scikit-learn accumulates the sums in float32, dkmeans in float64: the <0.1% of rows whose
    # label differs move a few centre pixels by up to ~0.2% of the [0, 1] range.
    np.testing.assert_allclose(dk.cluster_centers_, sk.cluster_centers_, rtol=0, atol=5e-3)
    assert np.abs(dk.cluster_centers_ - sk.cluster_centers_).mean() < 5e-4
    assert dk.transform(X32[:10]).dtype == np.float32


def test_convergence_parity_on_subsample(X, client):
    Xs = X[:5000]
    rng = np.random.default_rng(7)
    init = Xs[rng.choice(len(Xs), size=K, replace=False)].astype(np.float64)
    sk = SKKMeans(K, init=init, n_init=1, max_iter=300, tol=0, algorithm="lloyd").fit(Xs.astype(np.float64))
    dk = KMeans(K, init=init, max_iter=300, tol=0, client=client, chunk_rows=1600).fit(Xs)
    assert sk.n_iter_ < 300  # scikit-learn reached the fixed point
    assert dk.n_iter_ == sk.n_iter_
    np.testing.assert_array_equal(dk.labels_, sk.labels_)
    np.testing.assert_allclose(dk.inertia_, sk.inertia_, rtol=1e-10)
    np.testing.assert_allclose(dk.cluster_centers_, sk.cluster_centers_, rtol=0, atol=1e-9)
    # A fixed point: one more update changes nothing, and the counted no-op update repeats the loss.
    np.testing.assert_allclose(np_means(Xs, dk.labels_, K), dk.cluster_centers_, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(np_sq_distances(Xs, dk.cluster_centers_).argmin(axis=1), dk.labels_)
    assert len(dk.loss_history_) == dk.n_iter_ + 1
    assert dk.loss_history_[-1] == dk.loss_history_[-2]


# --- fitted attributes -----------------------------------------------------------------------


def test_fitted_attributes_are_consistent(dk_full, X, init10):
    n = len(X)
    assert dk_full.cluster_centers_.shape == (K, 784)
    assert dk_full.labels_.shape == (n,)
    assert dk_full.n_features_in_ == 784
    np.testing.assert_allclose(dk_full.inertia_, np_inertia_of(X, dk_full.cluster_centers_, dk_full.labels_), rtol=1e-9)
    np.testing.assert_array_equal(dk_full.predict(X), dk_full.labels_)
    hist = np.asarray(dk_full.loss_history_)
    assert hist.shape == (dk_full.n_iter_ + 1,)
    np.testing.assert_allclose(hist[-1] * n, dk_full.inertia_, rtol=1e-12)
    np.testing.assert_allclose(hist[0] * n, np_sq_distances(X, init10).min(axis=1).sum(), rtol=1e-9)
    assert (np.diff(hist) <= 1e-12 * hist[0]).all(), "Lloyd's J_clust may never increase"
    np.testing.assert_allclose(dk_full.score(X), -dk_full.inertia_, rtol=1e-9)
    # the callback saw every pass: iterations 0..n_iter_ with the same losses
    calls = dk_full.test_calls
    assert [c[0] for c in calls] == list(range(dk_full.n_iter_ + 1))
    np.testing.assert_allclose([c[1] for c in calls], hist, rtol=1e-12)
    assert all(c[2] >= 0 for c in calls)


def test_transform_and_predict(dk_full, X, Xd):
    C = dk_full.cluster_centers_
    part = X[:3000]
    np.testing.assert_allclose(dk_full.transform(part), np.sqrt(np_sq_distances(part, C)), rtol=1e-9, atol=1e-6)
    np.testing.assert_array_equal(dk_full.predict(part), np_sq_distances(part, C).argmin(axis=1))
    lazy = dk_full.predict(Xd)
    assert isinstance(lazy, da.Array)
    np.testing.assert_array_equal(lazy.compute(), dk_full.labels_)
    lazy_t = dk_full.transform(Xd[:3000])
    assert isinstance(lazy_t, da.Array)
    np.testing.assert_allclose(lazy_t.compute(), dk_full.transform(part), rtol=1e-12)
    # a plain list is accepted too
    np.testing.assert_array_equal(dk_full.predict(part[:5].tolist()), dk_full.labels_[:5])


def test_fit_predict_and_fit_transform(Xs, client):
    init = Xs[[0, 1, 2, 3, 4, 5, 7, 11, 13, 17]].astype(np.float64)
    params = dict(init=init, max_iter=5, tol=0, client=client)
    ref = KMeans(K, **params).fit(da.from_array(Xs, chunks=(1000, 784)))
    np.testing.assert_array_equal(KMeans(K, chunk_rows=1100, **params).fit_predict(Xs), ref.labels_)
    lazy = KMeans(K, **params).fit_transform(da.from_array(Xs, chunks=(2000, 784)))
    assert isinstance(lazy, da.Array)
    np.testing.assert_allclose(lazy.compute(), ref.transform(Xs), rtol=1e-12)


def test_integer_dtypes_compute_in_float64(Xs, client):
    init = Xs[[10, 20, 30, 40, 50, 60, 70, 80, 90, 100]]
    fits = [
        KMeans(K, init=init, max_iter=4, tol=0, client=client, chunk_rows=1234).fit(Xs.astype(t))
        for t in (np.uint8, np.int64, np.float64)
    ]
    for other in fits[1:]:
        assert_same_fit(fits[0], other, centre_atol=0)


@pytest.fixture(scope="module")
def km_small(Xs, client):
    return KMeans(K, max_iter=3, random_state=0, client=client, chunk_rows=2000).fit(Xs)


def test_predict_on_column_chunked_dask_array(Xs, km_small):
    lazy = km_small.predict(da.from_array(Xs, chunks=(1000, 200)))
    np.testing.assert_array_equal(lazy.compute(), km_small.labels_)


def test_transform_on_column_chunked_dask_array(Xs, km_small):
    lazy = km_small.transform(da.from_array(Xs, chunks=(1000, 200)))
    np.testing.assert_allclose(lazy.compute(), km_small.transform(Xs), rtol=1e-12)


# --- invariance to chunking and cluster size ----------------------------------------------


def test_kmeans_parallel_invariant_to_chunking_and_workers(X, Xd, client):
    params = dict(init="k-means||", random_state=42, max_iter=3, tol=0)
    base = KMeans(K, client=client, **params).fit(Xd)  # the loader's 6000-row chunks
    assert base.n_iter_ == 3
    others = [
        KMeans(K, client=client, chunk_rows=7001, **params).fit(Xd),
        KMeans(K, client=client, **params).fit(X),  # numpy input, scattered in 15000-row chunks
    ]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster, set_as_default=False) as one:
            assert len(one.scheduler_info()["workers"]) == 1
            others.append(KMeans(K, client=one, chunk_rows=5000, **params).fit(Xd))
    for other in others:
        assert_same_fit(base, other)


def test_kmeans_plusplus_invariant_to_chunking(Xs, client):
    params = dict(init="k-means++", random_state=3, max_iter=2, tol=0, client=client)
    base = KMeans(K, chunk_rows=1000, **params).fit(da.from_array(Xs, chunks=(1000, 784)))
    for other in (
        KMeans(K, chunk_rows=1501, **params).fit(da.from_array(Xs, chunks=(1000, 784))),
        KMeans(K, **params).fit(Xs),
        KMeans(K, chunk_rows=6000, **params).fit(Xs),
    ):
        assert_same_fit(base, other)


def test_zero_and_one_row_chunks(Xs, client):
    params = dict(init="k-means||", random_state=5, max_iter=3, tol=0, client=client)
    odd = da.from_array(Xs, chunks=((0, 3000, 1, 0, 2999), (784,)))
    assert_same_fit(KMeans(K, chunk_rows=2500, **params).fit(Xs), KMeans(K, **params).fit(odd))


# --- initialisations ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chunked(client, Xd):
    return chunk_data(client, Xd)


@pytest.fixture(scope="module")
def random_init(client, chunked):
    return init_centers(client, chunked, K, "random", np.random.default_rng(1))


def test_random_init_within_feature_range(X, client, chunked, random_init):
    lo, hi = X.min(axis=0).astype(np.float64), X.max(axis=0).astype(np.float64)
    C = random_init
    assert C.shape == (K, 784)
    assert ((C >= lo) & (C <= hi)).all()
    np.testing.assert_array_equal(C[:, lo == hi], np.broadcast_to(lo[lo == hi], (K, int((lo == hi).sum()))))
    varying = hi > lo
    assert varying.sum() > 600
    assert (C[:, varying].std(axis=0) > 0).all()  # drawn per centre and feature, not a constant
    np.testing.assert_array_equal(init_centers(client, chunked, K, "random", np.random.default_rng(1)), C)


def test_inits_drawn_together_equal_the_inits_drawn_one_by_one(X, client, chunked):
    """A sweep's inits share their round trips (init_centers_many); each is still exactly its own draw."""
    requests = [(5, "sample", 1), (12, "random", 2), (7, "k-means++", 3), (9, "cluster", 4), (3, "random", 5)]
    together = init_centers_many(client, chunked, [(k, init, np.random.default_rng(s)) for k, init, s in requests])
    for (k, init, s), centers in zip(requests, together):
        np.testing.assert_array_equal(centers, init_centers(client, chunked, k, init, np.random.default_rng(s)))
        assert centers.shape == (k, 784)
    assert_distinct_rows(X, together[0])  # training rows, as sample and cluster inits draw
    assert_distinct_rows(X, together[3])


def test_sample_and_cluster_inits_are_distinct_rows(X, client, chunked):
    a = init_centers(client, chunked, K, "sample", np.random.default_rng(5))
    b = init_centers(client, chunked, K, "cluster", np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (K, 784)
    assert_distinct_rows(X, a)
    c = init_centers(client, chunked, K, "sample", np.random.default_rng(6))
    assert not np.array_equal(a, c)


def test_sample_and_cluster_aliases_fit_the_same(Xs, client):
    params = dict(random_state=3, max_iter=2, tol=0, client=client)
    a = KMeans(K, init="sample", chunk_rows=1700, **params).fit(Xs)
    b = KMeans(K, init="cluster", chunk_rows=1800, **params).fit(Xs)
    assert_same_fit(a, b, centre_atol=0)


@pytest.mark.parametrize("init", ["k-means++", "k-means||"])
def test_dsquared_inits_beat_random(init, X, client, chunked, random_init):
    C = init_centers(client, chunked, K, init, np.random.default_rng(1))
    assert C.shape == (K, 784)
    if init == "k-means++":
        assert_distinct_rows(X, C)
    else:  # reclustered candidates: weighted means of rows, distinct
        assert len(np.unique(C, axis=0)) == K
    j = np_sq_distances(X, C).min(axis=1).mean()
    j_random = np_sq_distances(X, random_init).min(axis=1).mean()
    assert j < j_random


def test_kmeans_parallel_recluster_is_weighted_lloyd_on_its_candidates(X, client, chunked, monkeypatch):
    """The k-means|| start is Lloyd (scikit-learn, sample weights) on the candidates and weights it drew."""
    from dkmeans import seeding

    seen = {}
    plusplus = kernels.weighted_kmeans_plusplus

    def spy(points, k, weights, rng):
        seen.update(points=points.copy(), weights=weights.copy())
        seen["start"] = plusplus(points, k, weights, rng)
        return seen["start"]

    monkeypatch.setattr(seeding.kernels, "weighted_kmeans_plusplus", spy)
    C = init_centers(client, chunked, K, "k-means||", np.random.default_rng(4))
    expected = PARALLEL_ROUNDS * max(OVERSAMPLING * K, MIN_ROUND_PICKS)  # picks, drawn at random
    assert 0.7 * expected <= len(seen["points"]) <= 1.3 * expected
    assert seen["weights"].sum() == len(X)  # every row counted once, at its nearest candidate
    ref = SKKMeans(K, init=seen["start"], n_init=1, tol=0, algorithm="lloyd")
    ref.fit(seen["points"], sample_weight=seen["weights"])
    assert ref.n_iter_ < RECLUSTER_ITER  # so both ran to convergence
    np.testing.assert_allclose(C, ref.cluster_centers_, rtol=1e-12, atol=1e-9)


def test_explicit_init_array_is_used_as_given(X, Xd, client, init10):
    km = KMeans(K, init=init10, max_iter=1, tol=0, client=client).fit(Xd)
    d2 = np_sq_distances(X, init10)
    labels0 = d2.argmin(axis=1)
    assert (np.bincount(labels0, minlength=K) > 0).all()
    np.testing.assert_allclose(km.loss_history_[0] * len(X), d2.min(axis=1).sum(), rtol=1e-9)
    # one update: the means of the rows nearest to each given centre
    assert km.n_iter_ == 1
    np.testing.assert_allclose(km.cluster_centers_, np_means(X, labels0, K), rtol=0, atol=1e-9)


def test_init_array_dtypes(Xs, client):
    init = Xs[[3, 14, 15, 92, 65, 35, 89, 79, 323, 84]]
    fits = [
        KMeans(K, init=init.astype(t), max_iter=2, tol=0, client=client, chunk_rows=rows).fit(Xs)
        for t, rows in ((np.float64, 1300), (np.uint8, 1400), (np.int32, 1600), (np.float32, 1900))
    ]
    for other in fits[1:]:
        assert_same_fit(fits[0], other, centre_atol=0)
    np.testing.assert_allclose(
        fits[0].loss_history_[0] * len(Xs), np_sq_distances(Xs, init).min(axis=1).sum(), rtol=1e-9
    )


def test_n_init_keeps_the_lowest_inertia(Xs, client):
    """The restarts use SeedSequence(random_state).spawn(n_init); replay them through the engine."""
    params = dict(init="sample", max_iter=4, tol=0, client=client)
    best = KMeans(K, n_init=3, random_state=7, chunk_rows=1250, **params).fit(Xs)
    data = chunk_data(client, Xs, 1350)
    runs = []
    for child in np.random.SeedSequence(7).spawn(3):
        centers = init_centers(client, data, K, "sample", np.random.default_rng(child))
        runs.append(lloyd(client, data, centers, max_iter=4, tol=0))
    inertias = [r.inertia for r in runs]
    assert len(set(inertias)) == 3  # the restarts differ, so the choice matters
    chosen = runs[int(np.argmin(inertias))]
    np.testing.assert_allclose(best.inertia_, min(inertias), rtol=1e-12)
    np.testing.assert_array_equal(best.labels_, chosen.labels)
    np.testing.assert_allclose(best.cluster_centers_, chosen.centers, rtol=0, atol=1e-9)
    # n_init=1 with the same seed is the first restart, so it can never beat n_init=3
    single = KMeans(K, n_init=1, random_state=7, chunk_rows=1450, **params).fit(Xs)
    np.testing.assert_allclose(single.inertia_, inertias[0], rtol=1e-12)
    assert best.inertia_ <= single.inertia_


# --- empty clusters ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def X10k(X):
    return np.ascontiguousarray(X[:10000])


def test_far_centre_is_relocated_like_sklearn(X10k, client):
    init = X10k[[0, 100, 200, 300, 400, 500, 600, 700, 800]].astype(np.float64)
    init = np.vstack([init, np.full((1, 784), 2550.0)])  # nearest to no row: cluster 9 starts empty
    d2 = np_sq_distances(X10k, init)
    labels0 = d2.argmin(axis=1)
    assert 9 not in labels0
    # numpy oracle for the first update: cluster 9 takes the farthest row, which leaves its cluster
    min_d2 = d2.min(axis=1)
    far = int(np.flatnonzero(min_d2 == min_d2.max())[0])
    labels1 = labels0.copy()
    labels1[far] = 9
    expected = np_means(X10k, labels1, K)
    one = KMeans(K, init=init, max_iter=1, tol=0, client=client, chunk_rows=3000).fit(X10k)
    np.testing.assert_allclose(one.cluster_centers_, expected, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(one.cluster_centers_[9], X10k[far])
    # several iterations: the same as scikit-learn, which applies the same rule
    dk = KMeans(K, init=init, max_iter=6, tol=0, client=client, chunk_rows=3500).fit(X10k)
    sk = SKKMeans(K, init=init, n_init=1, max_iter=6, tol=0, algorithm="lloyd").fit(X10k.astype(np.float64))
    assert (np.bincount(dk.labels_, minlength=K) > 0).all()
    np.testing.assert_allclose(dk.inertia_, np_inertia_of(X10k, dk.cluster_centers_, dk.labels_), rtol=1e-9)
    assert dk.n_iter_ == sk.n_iter_
    np.testing.assert_array_equal(dk.labels_, sk.labels_)
    np.testing.assert_allclose(dk.cluster_centers_, sk.cluster_centers_, rtol=0, atol=1e-9)
    np.testing.assert_allclose(dk.inertia_, sk.inertia_, rtol=1e-9)


def test_two_empty_clusters_take_the_two_farthest_rows(X10k, client):
    init = X10k[[1, 101, 201, 301, 401, 501, 601, 701]].astype(np.float64)
    init = np.vstack([init, np.full((1, 784), 2550.0), np.full((1, 784), -2550.0)])
    d2 = np_sq_distances(X10k, init)
    labels0 = d2.argmin(axis=1)
    assert not np.isin([8, 9], labels0).any()
    min_d2 = d2.min(axis=1)
    far = np.lexsort((np.arange(len(X10k)), -min_d2))[:2]
    assert min_d2[far[0]] > min_d2[far[1]]  # no tie, so which row is "farthest" is unambiguous
    one = KMeans(K, init=init, max_iter=1, tol=0, client=client, chunk_rows=2500).fit(X10k)
    C = one.cluster_centers_
    # the farthest row goes to the first empty cluster, the next to the second; both leave their clusters
    labels1 = labels0.copy()
    labels1[far] = [8, 9]
    np.testing.assert_allclose(C, np_means(X10k, labels1, K), rtol=0, atol=1e-9)
    dk = KMeans(K, init=init, max_iter=5, tol=0, client=client, chunk_rows=2700).fit(X10k)
    assert (np.bincount(dk.labels_, minlength=K) > 0).all()
    np.testing.assert_allclose(dk.inertia_, np_inertia_of(X10k, dk.cluster_centers_, dk.labels_), rtol=1e-9)


# --- bad input ----------------------------------------------------------------------------


def _float_data(bad_row, bad_value, dtype=np.float64, seed=0):
    X = np.random.default_rng(seed).normal(size=(100, 5)).astype(dtype)
    X[bad_row, 3] = bad_value
    return X


BADS = [np.nan, np.inf, -np.inf]
INITS = ["k-means||", "k-means++", "random", "sample", "array"]


@pytest.mark.parametrize("bad", BADS, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("init", INITS)
def test_nan_and_inf_are_reported_with_their_row(bad, init, client):
    # distinct data per case, so no two fits scatter identical chunks (see test_refit_same_numpy_array)
    X = _float_data(57, bad, seed=1 + 3 * INITS.index(init) + BADS.index(bad))
    init = np.zeros((3, 5)) if init == "array" else init
    with pytest.raises(ValueError, match=r"NaN or infinity.*\b57\b"):
        KMeans(3, init=init, random_state=0, chunk_rows=20, client=client).fit(X)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_in_a_later_dask_chunk(dtype, client):
    X = da.from_array(_float_data(85, np.nan, dtype), chunks=(20, 5))
    with pytest.raises(ValueError, match=r"NaN or infinity.*\b85\b"):
        KMeans(3, random_state=0, client=client).fit(X)


def test_nan_in_predict_input(client):
    km = KMeans(3, random_state=0, max_iter=2, client=client).fit(_float_data(0, 0.0, seed=99))
    with pytest.raises(ValueError, match=r"NaN or infinity.*\b4\b"):
        km.predict(_float_data(4, np.nan))


@pytest.mark.parametrize(
    "X, error, pattern",
    [
        (np.arange(10.0), ValueError, r"2-D.*got 1-D"),
        (np.zeros((4, 3, 2)), ValueError, r"2-D.*got 3-D"),
        (np.zeros((0, 5)), ValueError, r"empty"),
        (np.zeros((5, 0)), ValueError, r"empty"),
        (np.array([["a", "b"], ["c", "d"]]), TypeError, r"numeric.*<U1"),
        (np.array([[1, "b"], [None, 2.0]], dtype=object), TypeError, r"numeric.*object"),
        (np.ones((4, 2), dtype=np.complex128), TypeError, r"numeric.*complex128"),
        (da.ones((4, 2), dtype=np.complex64, chunks=2), TypeError, r"numeric.*complex64"),
        (da.ones(10, chunks=5), ValueError, r"2-D.*got 1-D"),
    ],
    ids=["1d", "3d", "no-rows", "no-features", "str", "object", "complex", "dask-complex", "dask-1d"],
)
def test_bad_data(X, error, pattern, client):
    with pytest.raises(error, match=pattern):
        KMeans(2, client=client).fit(X)


@pytest.mark.parametrize(
    "params, pattern",
    [
        (dict(n_clusters=0), r"n_clusters must be an integer >= 1, got 0"),
        (dict(n_clusters=-1), r"n_clusters must be an integer >= 1, got -1"),
        (dict(n_clusters=1.5), r"n_clusters must be an integer >= 1, got 1.5"),
        (dict(n_clusters="3"), r"n_clusters must be an integer"),
        (dict(n_clusters=11), r"n_samples=10 should be >= n_clusters=11"),
        (dict(init=np.zeros((3, 4))), r"init array has shape \(3, 4\), expected .* \(3, 5\)"),
        (dict(init=np.zeros((2, 5))), r"init array has shape \(2, 5\), expected .* \(3, 5\)"),
        (dict(init=np.zeros(5)), r"init array has shape \(5,\)"),
        (dict(init=np.full((3, 5), np.nan)), r"init array contains NaN"),
        (dict(init="kmeans++"), r"Unknown init 'kmeans\+\+'"),
        (dict(init="K-MEANS||"), r"Unknown init"),
        (dict(max_iter=0), r"max_iter must be an integer >= 1, got 0"),
        (dict(max_iter=2.5), r"max_iter must be an integer"),
        (dict(n_init=0), r"n_init must be an integer >= 1, got 0"),
        (dict(tol=-1e-3), r"tol must be a number >= 0"),
        (dict(tol=float("nan")), r"tol must be a number >= 0"),
        (dict(chunk_rows=0), r"chunk_rows must be an integer >= 1"),
        (dict(random_state=-1), r"random_state must be"),
        (dict(random_state="seed"), r"random_state must be"),
    ],
    ids=lambda p: repr(p) if isinstance(p, dict) else "",
)
def test_bad_parameters(params, pattern, client):
    X = np.random.default_rng(0).normal(size=(10, 5))
    params = {"n_clusters": 3, **params}
    with pytest.raises(ValueError, match=pattern):
        KMeans(client=client, **params).fit(X)


def test_init_array_of_strings(client):
    with pytest.raises(TypeError, match="init array must be numeric"):
        KMeans(2, init=np.array([["a", "b"], ["c", "d"]]), client=client).fit(np.zeros((4, 2)))


def test_predict_before_fit_and_wrong_features(client):
    X = np.random.default_rng(98).normal(size=(20, 5))
    km = KMeans(3, client=client)
    for method in (km.predict, km.transform, km.score):
        with pytest.raises(AttributeError, match="not fitted"):
            method(X)
    km.fit(X)
    with pytest.raises(ValueError, match="X has 4 features, but KMeans was fitted with 5"):
        km.predict(X[:, :4])
    with pytest.raises(ValueError, match="X has 6 features, but KMeans was fitted with 5"):
        km.transform(np.hstack([X, X[:, :1]]))
    with pytest.raises(ValueError, match="2-D"):
        km.predict(X[0])


# --- random_state -----------------------------------------------------------------------------


def test_random_state_reproducible_and_seed_dependent(Xs, client):
    params = dict(init="k-means||", max_iter=2, tol=0, client=client)
    # (each fit its own chunking, so no two fits scatter identical chunks: see test_refit_same_numpy_array)
    a = KMeans(K, random_state=11, chunk_rows=1010, **params).fit(Xs)
    b = KMeans(K, random_state=11, chunk_rows=1020, **params).fit(Xs)
    assert_same_fit(a, b, centre_atol=0)
    c = KMeans(K, random_state=12, chunk_rows=1030, **params).fit(Xs)
    assert c.loss_history_[0] != a.loss_history_[0]  # a different initialisation
    assert not np.array_equal(c.cluster_centers_, a.cluster_centers_)
    # a numpy Generator works too: equal generators, equal results
    g1 = KMeans(K, random_state=np.random.default_rng(4), chunk_rows=1040, **params).fit(Xs)
    g2 = KMeans(K, random_state=np.random.default_rng(4), chunk_rows=1050, **params).fit(Xs)
    assert_same_fit(g1, g2, centre_atol=0)


# --- refitting the same in-memory array -----------------------------------------------------


def test_refit_same_numpy_array():
    """Fitting one in-memory array several times in a row on one client must just work."""
    X = np.random.default_rng(21).integers(0, 256, size=(2000, 50)).astype(np.uint8)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        with Client(cluster, set_as_default=False) as own:
            fits = [KMeans(5, init=X[:5], max_iter=1, chunk_rows=500, client=own).fit(X) for _ in range(4)]
    for other in fits[1:]:
        assert_same_fit(fits[0], other, centre_atol=0)


def test_fit_without_any_client_uses_a_temporary_cluster(Xs, tmp_path):
    """Plain scikit-learn style use, in a fresh process with no Dask client anywhere."""
    import subprocess
    import sys

    np.save(tmp_path / "X.npy", Xs[:2000])
    script = (
        "import numpy as np, distributed\n"
        "from dkmeans import KMeans\n"
        f"X = np.load({str(tmp_path / 'X.npy')!r})\n"
        "km = KMeans(8, init=X[:8].astype(float), max_iter=10, tol=0).fit(X)\n"
        "try:\n"
        "    distributed.get_client()\n"
        "    leaked = True\n"
        "except ValueError:\n"
        "    leaked = False\n"
        f"np.savez({str(tmp_path / 'out.npz')!r}, centers=km.cluster_centers_, labels=km.labels_,"
        " inertia=km.inertia_, n_iter=km.n_iter_, leaked=leaked)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, capture_output=True)
    out = np.load(tmp_path / "out.npz")
    sk = SKKMeans(8, init=Xs[:8].astype(float), n_init=1, max_iter=10, tol=0, algorithm="lloyd").fit(
        Xs[:2000].astype(np.float64)
    )
    assert not out["leaked"]  # the temporary cluster and its client are closed after fit
    assert int(out["n_iter"]) == sk.n_iter_
    np.testing.assert_array_equal(out["labels"], sk.labels_)
    np.testing.assert_allclose(out["centers"], sk.cluster_centers_, rtol=0, atol=1e-9)
    assert float(out["inertia"]) == pytest.approx(sk.inertia_, rel=1e-9)
