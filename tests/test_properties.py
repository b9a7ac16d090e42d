"""Property-based tests (hypothesis) of the kernels and the estimator against plain numpy.

Random shapes and chunkings (zero-length blocks, one-row chunks), duplicated rows, all-identical
points, k = 1 and k = n, float32 and float64, magnitudes from 1e-3 to 1e12. The numpy
reference computes distances by direct differences, so it shares no code or formula with the
kernels' |x|^2 - 2 x.c + |c|^2 expansion.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from dkmeans import KMeans, kernels

KERNEL_SETTINGS = settings(max_examples=100, deadline=None)
ESTIMATOR_SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@st.composite
def datasets(draw, max_rows=24, max_features=5):
    """(X, k): duplicated rows, identical points and extreme scales are all likely."""
    n = draw(st.integers(1, max_rows))
    d = draw(st.integers(1, max_features))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    scale = draw(st.sampled_from([1e-3, 1.0, 255.0, 1e6, 1e12]))
    shape = draw(st.sampled_from(["random", "duplicates", "identical"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if shape == "random":
        X = rng.normal(size=(n, d))
    elif shape == "duplicates":
        pool = rng.normal(size=(draw(st.integers(1, n)), d))
        X = pool[rng.integers(0, len(pool), n)]
    else:
        X = np.repeat(rng.normal(size=(1, d)), n, axis=0)
    X = (X * scale + draw(st.sampled_from([0.0, 3.0 * scale]))).astype(dtype)
    k = draw(st.integers(1, n))
    return X, k


@st.composite
def chunkings(draw, n):
    """Row-chunk sizes summing to n: repeated cuts give zero-length blocks, adjacent ones one-row chunks."""
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=8)))
    return np.diff([0, *cuts, n]).astype(int).tolist()


def direct_d2(X, C):
    X = np.asarray(X, dtype=np.float64)
    return ((X[:, None, :] - np.asarray(C, dtype=np.float64)[None, :, :]) ** 2).sum(axis=2)


def rounding_slack(X, C, dtype):
    """How far the expansion formula may be from the true distance, per row: eps * d * (|x|^2 + |c|^2)."""
    eps = np.finfo(np.dtype(kernels.compute_dtype(dtype))).eps
    x_sq = (np.asarray(X, dtype=np.float64) ** 2).sum(axis=1)
    c_sq = (np.asarray(C, dtype=np.float64) ** 2).sum(axis=1).max()
    return 16 * eps * (X.shape[1] + 2) * (x_sq + c_sq)


def assert_nearest(X, C, labels, dtype):
    d2 = direct_d2(X, C)
    chosen = d2[np.arange(len(X)), labels]
    assert (chosen <= d2.min(axis=1) + rounding_slack(X, C, dtype)).all()


# --- kernels -----------------------------------------------------------------------------


@KERNEL_SETTINGS
@given(data=datasets(), split=st.data(), centre_seed=st.integers(0, 2**32 - 1))
def test_lloyd_chunks_combine_to_numpy_reference(data, split, centre_seed):
    X, k = data
    n = len(X)
    rng = np.random.default_rng(centre_seed)
    C = X[rng.integers(0, n, k)].astype(np.float64) + rng.normal(size=(k, X.shape[1])) * np.abs(X).max() * 0.1
    sizes = split.draw(chunkings(n))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    n_far = k
    parts, labels = [], []
    for s, size in zip(starts, sizes):
        lab, stats = kernels.lloyd_chunk(X[s : s + size], C, n_far, offset=int(s))
        assert lab.shape == (size,)
        parts.append(stats)
        labels.append(lab)
    total = kernels.combine_stats(parts, n_far)
    labels = np.concatenate(labels)

    assert_nearest(X, C, labels, X.dtype)
    np.testing.assert_array_equal(total.counts, np.bincount(labels, minlength=k))
    Xf = X.astype(np.float64)
    expected_sums = np.array([Xf[labels == j].sum(axis=0) for j in range(k)])
    np.testing.assert_allclose(total.sums, expected_sums, rtol=1e-6, atol=1e-6 * np.abs(Xf).max())
    d2 = direct_d2(X, C)[np.arange(n), labels]
    slack = rounding_slack(X, C, X.dtype).sum() + 1e-300
    assert abs(kernels.inertia(total, C) - d2.sum()) <= slack
    # the farthest rows: global indices, descending distances, as many as asked for
    assert len(total.far_index) == min(n_far, n)
    assert (np.diff(total.far_d2) <= 0).all()
    assert set(total.far_index.tolist()) <= set(range(n))
    np.testing.assert_array_equal(total.far_label, labels[total.far_index])
    # each kept distance is that row's distance to its centre, and no row left out is farther
    assert (np.abs(total.far_d2 - d2[total.far_index]) <= rounding_slack(X, C, X.dtype)[total.far_index]).all()
    others = np.setdiff1d(np.arange(n), total.far_index)
    if others.size and total.far_d2.size:
        assert d2[others].max() <= total.far_d2.min() + slack


@KERNEL_SETTINGS
@given(data=datasets())
def test_update_centers_are_cluster_means(data):
    X, k = data
    C = X[:k].astype(np.float64)
    labels, stats = kernels.lloyd_chunk(X, C, k)
    empty = stats.counts == 0
    far_rows = X[stats.far_index[: int(empty.sum())]] if empty.any() else None
    new = kernels.update_centers(stats, C, far_rows)
    assert np.isfinite(new).all()
    Xf = X.astype(np.float64)
    moved = set(stats.far_index[: int(empty.sum())].tolist())
    for j in range(k):
        members = [i for i in np.flatnonzero(labels == j) if i not in moved]
        if not empty[j] and members:
            np.testing.assert_allclose(new[j], Xf[members].mean(axis=0), rtol=1e-9, atol=1e-9 * np.abs(Xf).max())


def test_float32_too_large_to_square_in_float32_is_computed_in_float64():
    """Squares are taken in float64 whatever the input: float32 rows of 1e20 cluster correctly."""
    X = np.array([[1e20, 0], [1.1e20, 0], [0, 3e20]], dtype=np.float32)
    C = np.array([[1e20, 0.0], [0.0, 3e20]])
    labels, stats = kernels.lloyd_chunk(X, C, 1)
    np.testing.assert_array_equal(labels, [0, 0, 1])
    np.testing.assert_array_equal(stats.counts, [2, 1])
    exact = ((X.astype(np.float64) - C[labels]) ** 2).sum()
    np.testing.assert_allclose(kernels.inertia(stats, C), exact, rtol=1e-6)


def test_values_too_large_to_square_in_float64_are_a_clear_error():
    X = np.full((3, 4), 1e200)
    with pytest.raises(ValueError, match="too large to square in float64"):
        kernels.lloyd_chunk(X, np.zeros((1, 4)), 1)


# --- estimator, against a numpy Lloyd ----------------------------------------------------


def numpy_lloyd(X, init, n_iter):
    """Lloyd by direct differences; empty clusters take the farthest rows, as the estimator documents.

    Returns (centres, labels, inertia, ambiguous): ambiguous when some row was within rounding of two
    centres, where correct implementations may legitimately choose differently. That includes identical
    centres: a BLAS product may round identical columns differently, so even their tie is not
    guaranteed to go to the lower index.
    """
    X = np.asarray(X, dtype=np.float64)
    C = np.array(init, dtype=np.float64)
    k = len(C)
    ambiguous = False

    def assign(C):
        nonlocal ambiguous
        d2 = direct_d2(X, C)
        labels = d2.argmin(axis=1)
        best = d2[np.arange(len(X)), labels]
        near = d2 <= best[:, None] + 4 * slack[:, None]
        ambiguous |= bool((near.sum(axis=1) > 1).any())
        return labels, best

    for _ in range(n_iter):
        slack = rounding_slack(X, C, X_dtype)
        labels, best = assign(C)
        sums = np.array([X[labels == j].sum(axis=0) for j in range(k)])
        counts = np.bincount(labels, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            order = np.lexsort((np.arange(len(X)), -best))
            for j, row in zip(empty, order):
                sums[labels[row]] -= X[row]
                counts[labels[row]] -= 1
                sums[j], counts[j] = X[row], 1
        new = C.copy()
        keep = counts > 0
        new[keep] = sums[keep] / counts[keep, None]
        if (new == C).all():
            break
        C = new
    slack = rounding_slack(X, C, X_dtype)
    labels, best = assign(C)
    return C, labels, best.sum(), ambiguous


X_dtype = np.float64  # set per example, read by numpy_lloyd's rounding slack


# The shared cluster's client threads use the `random` module (reconnection jitter) while Hypothesis
# draws an example, which it reports as a strategy using `random`; the strategies here do not.
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
@ESTIMATOR_SETTINGS
@given(
    data=datasets(max_rows=20, max_features=4),
    split=st.data(),
    as_dask=st.booleans(),
    max_iter=st.integers(1, 4),
    init_seed=st.integers(0, 2**32 - 1),
)
def test_estimator_matches_numpy_lloyd(client, data, split, as_dask, max_iter, init_seed):
    global X_dtype
    X, k = data
    X_dtype = X.dtype
    n = len(X)
    init = X[np.random.default_rng(init_seed).choice(n, k, replace=False)].astype(np.float64)
    if as_dask:
        sizes = split.draw(chunkings(n))
        data_in, chunk_rows = da.from_array(X, chunks=(tuple(sizes), (X.shape[1],))), None
    else:
        data_in, chunk_rows = X, split.draw(st.integers(1, n))
    note(f"n={n} k={k} dtype={X.dtype} chunks={data_in.chunks if as_dask else chunk_rows}")
    km = KMeans(k, init=init, max_iter=max_iter, tol=0, chunk_rows=chunk_rows, client=client).fit(data_in)

    assert km.cluster_centers_.shape == (k, X.shape[1]) and np.isfinite(km.cluster_centers_).all()
    assert km.labels_.shape == (n,) and km.labels_.min() >= 0 and km.labels_.max() < k
    assert_nearest(X, km.cluster_centers_, km.labels_, X.dtype)
    assert km.n_iter_ <= max_iter and len(km.loss_history_) == km.n_iter_ + 1
    assert km.loss_history_[-1] == pytest.approx(km.inertia_ / n, rel=1e-9, abs=1e-300)

    C, labels, inertia, ambiguous = numpy_lloyd(X, init, max_iter)
    event("tie: properties only" if ambiguous else "no tie: equal to the numpy reference")
    if ambiguous:
        return  # from a tie on, both answers are right; the properties above still had to hold
    np.testing.assert_array_equal(km.labels_, labels)
    scale = np.abs(X.astype(np.float64)).max() + 1e-300
    tol = 1e-5 if X.dtype == np.float32 else 1e-9
    np.testing.assert_allclose(km.cluster_centers_, C, rtol=tol, atol=tol * scale)
    assert km.inertia_ == pytest.approx(inertia, rel=1e-4 if X.dtype == np.float32 else 1e-7, abs=tol * scale**2 * n)
