"""Tests for dkmeans.kernels: the pure numpy per-chunk kernels, against plain numpy references."""

import numpy as np
import pytest
from test_screening import ref_sq_distances  # pytest puts tests/ on sys.path

from dkmeans import kernels

# --- plain numpy references -------------------------------------------------------


def ref_stats(x, centers):
    """Labels, per-row min distances, sums (np.add.at), counts (bincount), inertia."""
    d2 = ref_sq_distances(x, centers)
    labels = np.argmin(d2, axis=1)
    min_d2 = d2[np.arange(len(x)), labels]
    sums = np.zeros(centers.shape, dtype=np.float64)
    np.add.at(sums, labels, np.asarray(x, dtype=np.float64))
    counts = np.bincount(labels, minlength=centers.shape[0])
    return labels, min_d2, sums, counts, min_d2.sum()


def ref_farthest(d2, m, offset):
    """Largest m values, descending, ties by lower index."""
    order = np.lexsort((np.arange(d2.size), -d2))[:m]
    return d2[order], order + offset


@pytest.fixture(scope="module")
def mnist_slice(mnist_numpy):
    """3001 real MNIST rows (uint8); an odd size so tiles and chunks never divide evenly."""
    X, _ = mnist_numpy
    return np.ascontiguousarray(X[1000:4001])


@pytest.fixture(scope="module")
def mnist_centers(mnist_numpy):
    """10 non-integer centres: means of random groups of MNIST rows (no exact distance ties)."""
    X, _ = mnist_numpy
    rng = np.random.default_rng(20240)
    idx = rng.choice(len(X), size=(10, 7), replace=False)
    return X[idx].astype(np.float64).mean(axis=1)


# --- dtype handling ---------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, expected",
    [
        (np.float32, np.float32),
        (np.float64, np.float64),
        (np.float16, np.float64),
        (np.uint8, np.float64),
        (np.int64, np.float64),
    ],
)
def test_compute_dtype(dtype, expected):
    assert kernels.compute_dtype(np.dtype(dtype)) == np.dtype(expected)


# --- distances ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_sq_distances_float_matches_reference(dtype, rtol):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(257, 13)) * 3 + 1).astype(dtype)
    c = (rng.normal(size=(7, 13)) * 3).astype(dtype)
    c[3] = x[10]  # an exact coincidence: distance must come out as 0, never negative
    got = kernels.sq_distances(x, c)
    assert got.dtype == np.dtype(dtype)
    assert got.shape == (257, 7)
    ref = ref_sq_distances(x, c)
    # The expansion |x|^2 - 2x.c + |c|^2 loses precision relative to the norms, not to d2.
    scale = (ref_sq_distances(x, np.zeros((1, 13))) + ref_sq_distances(c, np.zeros((1, 13))).T).max()
    np.testing.assert_allclose(got, ref, rtol=0, atol=rtol * scale)
    assert (got >= 0).all()
    assert got[10, 3] <= rtol * scale


def test_sq_distances_accepts_precomputed_norms():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 4))
    c = rng.normal(size=(3, 4))
    direct = kernels.sq_distances(x, c)
    given = kernels.sq_distances(x, c, x_sq=(x * x).sum(1), c_sq=(c * c).sum(1))
    np.testing.assert_allclose(given, direct, rtol=1e-12, atol=1e-12)


def test_sq_distances_mnist_in_float64_is_exact(mnist_slice, mnist_numpy):
    """Integer pixels converted to float64 with integer centres: every term is exact."""
    X, _ = mnist_numpy
    x = mnist_slice[:500].astype(np.float64)
    c = X[[5, 50, 500, 5000]].astype(np.float64)
    np.testing.assert_array_equal(kernels.sq_distances(x, c), ref_sq_distances(x, c))


def test_sq_distances_uint8_chunk(mnist_slice, mnist_centers):
    x = mnist_slice[:200]  # uint8, as stored
    got = kernels.sq_distances(x, mnist_centers)
    ref = ref_sq_distances(x, mnist_centers)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("as_float32", [False, True])
def test_assign_matches_argmin_on_mnist(mnist_slice, mnist_centers, as_float32):
    chunk = mnist_slice.astype(np.float32) / 255 if as_float32 else mnist_slice
    centers = mnist_centers / 255 if as_float32 else mnist_centers
    labels, min_d2 = kernels.assign(chunk, centers)
    assert labels.shape == (len(chunk),)
    ref = ref_sq_distances(chunk, centers)
    ref_labels = ref.argmin(axis=1)
    best = ref.min(axis=1)
    scale = ref.max()
    tol = (1e-5 if as_float32 else 1e-10) * scale
    # The chosen centre is always a nearest one ...
    chosen = ref[np.arange(len(chunk)), labels]
    np.testing.assert_allclose(chosen, best, rtol=0, atol=tol)
    np.testing.assert_allclose(min_d2, best, rtol=0, atol=tol)
    # ... and exactly argmin's wherever the runner-up is not within rounding of the best.
    second = np.partition(ref, 1, axis=1)[:, 1]
    clear = second - best > 2 * tol
    assert clear.sum() >= 0.99 * len(chunk)
    np.testing.assert_array_equal(labels[clear], ref_labels[clear])
    if not as_float32:
        np.testing.assert_array_equal(labels, ref_labels)


@pytest.mark.parametrize("as_float32", [False, True])
def test_transform_matches_reference(mnist_slice, mnist_centers, as_float32):
    chunk = mnist_slice[:700].astype(np.float32) / 255 if as_float32 else mnist_slice[:700]
    centers = mnist_centers / 255 if as_float32 else mnist_centers
    got = kernels.transform(chunk, centers)
    assert got.dtype == (np.float32 if as_float32 else np.float64)
    ref = np.sqrt(ref_sq_distances(chunk, centers))
    np.testing.assert_allclose(got, ref, rtol=1e-4 if as_float32 else 1e-9, atol=1e-3 if as_float32 else 1e-6)


def test_min_sq_distances_and_nearest_counts(mnist_slice, mnist_centers):
    ref = ref_sq_distances(mnist_slice, mnist_centers)
    first = kernels.min_sq_distances(mnist_slice, mnist_centers[:4])
    np.testing.assert_allclose(first, ref[:, :4].min(axis=1), rtol=1e-9, atol=1e-6)
    folded = kernels.min_sq_distances(mnist_slice, mnist_centers[4:], previous=first)
    np.testing.assert_allclose(folded, ref.min(axis=1), rtol=1e-9, atol=1e-6)
    counts = kernels.nearest_counts(mnist_slice, mnist_centers)
    np.testing.assert_array_equal(counts, np.bincount(ref.argmin(axis=1), minlength=10))
    assert counts.dtype == np.int64


# --- one Lloyd pass over a chunk ------------------------------------------------------


def check_lloyd_chunk(chunk, centers, offset, n_far, exact):
    labels, stats = kernels.lloyd_chunk(chunk, centers, n_far=n_far, offset=offset)
    r_labels, r_min, r_sums, r_counts, r_inertia = ref_stats(chunk, centers)
    np.testing.assert_array_equal(labels, r_labels)
    np.testing.assert_array_equal(stats.counts, r_counts)
    assert stats.counts.dtype == np.int64
    # Whole-number rows are summed exactly, in int64; other rows in float64.
    assert stats.sums.dtype == (np.int64 if exact else np.float64)
    if exact:
        np.testing.assert_array_equal(stats.sums, r_sums)
    else:
        np.testing.assert_allclose(stats.sums, r_sums, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(kernels.inertia(stats, centers), r_inertia, rtol=1e-9 if exact else 1e-5)
    f_d2, f_idx = ref_farthest(r_min, n_far, offset)
    np.testing.assert_array_equal(stats.far_index, f_idx)
    np.testing.assert_allclose(stats.far_d2, f_d2, rtol=1e-9 if exact else 1e-5)
    np.testing.assert_array_equal(stats.far_label, r_labels[f_idx - offset])
    return labels, stats


def test_lloyd_chunk_matches_reference(mnist_slice, mnist_centers):
    check_lloyd_chunk(mnist_slice, mnist_centers, offset=1000, n_far=10, exact=True)


def test_lloyd_chunk_float32(mnist_slice, mnist_centers):
    check_lloyd_chunk(mnist_slice.astype(np.float32) / 255, mnist_centers / 255, offset=0, n_far=5, exact=False)


@pytest.mark.parametrize("tile_elements", [1, 784 * 7, 784 * 100 + 3])
def test_lloyd_chunk_tiled(monkeypatch, mnist_slice, mnist_centers, tile_elements):
    """A tiny TILE_ELEMENTS forces many row tiles (down to one row each); results are unchanged."""
    chunk = mnist_slice[:1201]
    untiled = kernels.lloyd_chunk(chunk, mnist_centers, n_far=10, offset=77)
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", tile_elements)
    tiles = list(kernels.row_tiles(len(chunk), chunk.shape[1]))
    assert len(tiles) > 1
    assert tiles[0].start == 0 and tiles[-1].stop == len(chunk)
    assert all(a.stop == b.start for a, b in zip(tiles, tiles[1:]))
    labels, stats = check_lloyd_chunk(chunk, mnist_centers, offset=77, n_far=10, exact=True)
    np.testing.assert_array_equal(labels, untiled[0])
    np.testing.assert_array_equal(stats.sums, untiled[1].sums)
    # assign and transform tile too
    a_labels, a_d2 = kernels.assign(chunk, mnist_centers)
    np.testing.assert_array_equal(a_labels, untiled[0])
    ref = ref_sq_distances(chunk, mnist_centers)
    np.testing.assert_allclose(kernels.transform(chunk, mnist_centers), np.sqrt(ref), rtol=1e-9, atol=1e-6)


def assert_same_stats(a, b):
    """Bit-for-bit equality of two ChunkStats."""
    np.testing.assert_array_equal(a.sums, b.sums)
    np.testing.assert_array_equal(a.counts, b.counts)
    assert a.sq_total == b.sq_total
    np.testing.assert_array_equal(a.far_d2, b.far_d2)
    np.testing.assert_array_equal(a.far_index, b.far_index)
    np.testing.assert_array_equal(a.far_label, b.far_label)


@pytest.mark.parametrize("as_float32", [False, True])
def test_lloyd_chunk_many_equals_each_model_alone(mnist_slice, mnist_numpy, as_float32):
    """Stacked models (k = 1, 2, 5, 20, 3) give each model exactly what lloyd_chunk gives it alone."""
    X, _ = mnist_numpy
    rng = np.random.default_rng(5)
    groups = [rng.choice(len(X), size=(k, 3), replace=False) for k in (1, 2, 5, 20, 3)]
    models = [X[g].astype(np.float64).mean(axis=1) for g in groups]
    chunk = mnist_slice.astype(np.float32) / 255 if as_float32 else mnist_slice
    models = [m / 255 for m in models] if as_float32 else models
    sizes = tuple(len(m) for m in models)
    n_far = tuple(2 * k for k in sizes)
    states, stats = kernels.lloyd_chunk_many(chunk, np.concatenate(models), sizes, n_far, offset=40)
    labels = [s.labels for s in states]
    assert len(labels) == len(stats) == len(models)
    for m, centers in enumerate(models):
        alone_labels, alone = kernels.lloyd_chunk(chunk, centers, n_far=n_far[m], offset=40)
        np.testing.assert_array_equal(labels[m], alone_labels)
        assert_same_stats(stats[m], alone)
    if not as_float32:  # and each one is right, against the plain numpy reference
        for m, centers in enumerate(models):
            r_labels, _, r_sums, r_counts, r_inertia = ref_stats(chunk, centers)
            np.testing.assert_array_equal(labels[m], r_labels)
            np.testing.assert_array_equal(stats[m].sums, r_sums)
            np.testing.assert_allclose(kernels.inertia(stats[m], centers), r_inertia, rtol=1e-9)


def test_combine_stats_many_is_combine_stats_per_model(mnist_slice, mnist_centers):
    sizes, n_far = (4, 6), (4, 6)
    parts = [
        kernels.lloyd_chunk_many(mnist_slice[a:b], mnist_centers, sizes, n_far, offset=a)[1]
        for a, b in ((0, 1000), (1000, 1001), (1001, len(mnist_slice)))
    ]
    combined = kernels.combine_stats_many(parts, n_far)
    for m, (start, k) in enumerate(((0, 4), (4, 6))):
        _, whole = kernels.lloyd_chunk(mnist_slice, mnist_centers[start : start + k], n_far=k, offset=0)
        np.testing.assert_array_equal(combined[m].sums, whole.sums)
        np.testing.assert_array_equal(combined[m].counts, whole.counts)
        assert combined[m].sq_total == whole.sq_total  # whole-number rows: exact, however they are split
        np.testing.assert_array_equal(combined[m].far_index, whole.far_index)


def test_combine_stats_of_split_chunks_equals_whole(mnist_slice, mnist_centers):
    n_far = 10
    _, whole = kernels.lloyd_chunk(mnist_slice, mnist_centers, n_far=n_far, offset=0)
    bounds = [0, 700, 701, 701, 1500, 1501, 2900, len(mnist_slice)]  # includes 1-row and 0-row chunks
    parts = [
        kernels.lloyd_chunk(mnist_slice[a:b], mnist_centers, n_far=n_far, offset=a)[1]
        for a, b in zip(bounds, bounds[1:])
    ]
    for combined in (
        kernels.combine_stats(parts, n_far),
        # a two-level tree gives the same as a flat one
        kernels.combine_stats(
            [kernels.combine_stats(parts[:3], n_far), kernels.combine_stats(parts[3:], n_far)], n_far
        ),
    ):
        np.testing.assert_array_equal(combined.sums, whole.sums)
        np.testing.assert_array_equal(combined.counts, whole.counts)
        assert kernels.inertia(combined, mnist_centers) == kernels.inertia(whole, mnist_centers)
        np.testing.assert_array_equal(combined.far_index, whole.far_index)
        np.testing.assert_allclose(combined.far_d2, whole.far_d2, rtol=1e-12)
        np.testing.assert_array_equal(combined.far_label, whole.far_label)
        assert len(combined.far_index) == n_far


def test_combine_stats_widens_int32_partials_and_adds_floats_in_order(mnist_slice, mnist_centers):
    """Chunk hosts send int32 sums (engine._narrowed): they add up in int64, past int32's range too. Float sums
    add left to right, bit for bit np.sum over the stacked partials (the float64 rounding depends on it)."""
    _, stats = kernels.lloyd_chunk(mnist_slice, mnist_centers, n_far=0, offset=0)
    big = kernels.ChunkStats(stats.sums.astype(np.int32), stats.counts, stats.sq_total, *[np.empty(0)] * 3)
    big.sums[0, 0] = 2**31 - 1
    total = kernels.combine_stats([big, big, big], 0)
    assert total.sums.dtype == np.int64 and total.sums[0, 0] == 3 * (2**31 - 1)
    np.testing.assert_array_equal(total.sums[1:], 3 * stats.sums[1:].astype(np.int64))
    floats = [np.random.default_rng(s).normal(size=(4, 5)) * 10.0 ** (3 * s) for s in range(5)]
    parts = [kernels.ChunkStats(f, np.ones(4, dtype=np.int64), 0.0, *[np.empty(0)] * 3) for f in floats]
    assert kernels.combine_stats(parts, 0).sums.tobytes() == np.sum(floats, axis=0).tobytes()


def test_combine_stats_far_ties_across_chunks():
    """Equal distances in different chunks: the lower global row index comes first."""
    centers = np.array([[0.0]])
    a = np.array([[3.0], [1.0]])  # rows 0, 1
    b = np.array([[3.0], [2.0]])  # rows 2, 3
    sa = kernels.lloyd_chunk(a, centers, n_far=2, offset=0)[1]
    sb = kernels.lloyd_chunk(b, centers, n_far=2, offset=2)[1]
    for order in ([sa, sb], [sb, sa]):
        c = kernels.combine_stats(order, 3)
        np.testing.assert_array_equal(c.far_index, [0, 2, 3])
        np.testing.assert_array_equal(c.far_d2, [9.0, 9.0, 4.0])


# --- farthest rows -------------------------------------------------------------------


def test_farthest_order_and_ties():
    d2 = np.array([1.0, 3.0, 3.0, 2.0, 3.0, 0.5])
    got_d2, got_idx = kernels.farthest(d2, 2, 10)
    np.testing.assert_array_equal(got_d2, [3.0, 3.0])
    np.testing.assert_array_equal(got_idx, [11, 12])  # ties by lower index, with the offset added
    got_d2, got_idx = kernels.farthest(d2, 4, 0)
    np.testing.assert_array_equal(got_idx, [1, 2, 4, 3])
    got_d2, got_idx = kernels.farthest(d2, 100, 5)  # more than available: all, sorted
    np.testing.assert_array_equal(got_idx, np.array([1, 2, 4, 3, 0, 5]) + 5)
    np.testing.assert_array_equal(got_d2, [3, 3, 3, 2, 1, 0.5])
    got_d2, got_idx = kernels.farthest(d2, 0, 0)
    assert got_d2.size == 0 and got_idx.size == 0
    assert got_idx.dtype == np.int64


def test_farthest_random_with_many_ties():
    rng = np.random.default_rng(3)
    for _ in range(50):
        d2 = rng.integers(0, 6, size=rng.integers(1, 40)).astype(np.float64)
        m = int(rng.integers(0, 45))
        offset = int(rng.integers(0, 1000))
        got_d2, got_idx = kernels.farthest(d2, m, offset)
        ref_d2, ref_idx = ref_farthest(d2, m, offset)
        np.testing.assert_array_equal(got_idx, ref_idx)
        np.testing.assert_array_equal(got_d2, ref_d2)


# --- centre update and empty clusters ------------------------------------------------


def test_update_centers_without_empty_clusters(mnist_slice, mnist_centers):
    _, stats = kernels.lloyd_chunk(mnist_slice, mnist_centers, n_far=10)
    labels, _, sums, counts, _ = ref_stats(mnist_slice, mnist_centers)
    assert (counts > 0).all()
    new = kernels.update_centers(stats, mnist_centers)
    ref = np.stack([mnist_slice[labels == j].astype(np.float64).mean(axis=0) for j in range(10)])
    np.testing.assert_allclose(new, ref, rtol=1e-12, atol=1e-12)


def test_update_centers_relocates_empty_clusters_to_farthest_rows():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [9.0, 0.0], [1.0, 1.0]])
    old = np.array([[1.0, 0.0], [100.0, 100.0], [200.0, 200.0]])  # every row is nearest to centre 0
    _, stats = kernels.lloyd_chunk(x, old, n_far=3)
    np.testing.assert_array_equal(stats.counts, [5, 0, 0])
    # distances to centre 0: 1, 0, 1, 64, 1 -> farthest row 3, then rows 0, 2, 4 tied (lower index first)
    np.testing.assert_array_equal(stats.far_index, [3, 0, 2])
    counts_before, sums_before = stats.counts.copy(), stats.sums.copy()
    new = kernels.update_centers(stats, old, far_rows=x[stats.far_index[:2]])
    # Empty cluster 1 takes the farthest row, 2 the next; both rows leave cluster 0.
    np.testing.assert_array_equal(new[1], [9.0, 0.0])
    np.testing.assert_array_equal(new[2], [0.0, 0.0])
    np.testing.assert_allclose(new[0], x[[1, 2, 4]].mean(axis=0), rtol=1e-15)
    # the stats themselves are not modified
    np.testing.assert_array_equal(stats.counts, counts_before)
    np.testing.assert_array_equal(stats.sums, sums_before)


def test_update_centers_relocation_takes_row_from_its_own_cluster():
    x = np.array([[0.0], [1.0], [10.0], [11.0], [30.0]])
    old = np.array([[0.5], [10.5], [500.0]])  # cluster 2 is empty; row 4 (30) is farthest, in cluster 1
    labels, stats = kernels.lloyd_chunk(x, old, n_far=3)
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 1])
    assert stats.far_index[0] == 4 and stats.far_label[0] == 1
    new = kernels.update_centers(stats, old, far_rows=x[[4]])
    np.testing.assert_allclose(new, [[0.5], [10.5], [30.0]], rtol=1e-15)


def test_update_centers_needs_far_rows_for_empty_clusters():
    x = np.array([[0.0], [1.0]])
    old = np.array([[0.0], [50.0]])
    _, stats = kernels.lloyd_chunk(x, old, n_far=2)
    with pytest.raises(ValueError, match="empty cluster"):
        kernels.update_centers(stats, old)


# --- NaN and infinity ----------------------------------------------------------------


def test_check_finite_names_rows():
    x = np.ones((10, 3))
    kernels.check_finite(x, kernels.squared_norms(x), 0)  # finite: no error
    x[3, 1] = np.nan
    x[7, 0] = np.inf
    with pytest.raises(ValueError, match=r"NaN or infinity.*2 row\(s\).*starting at row 100.*\[103, 107\]"):
        kernels.check_finite(x, kernels.squared_norms(x), 100)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_chunks_are_checked_with_global_row(monkeypatch, bad):
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 8)  # 2 rows per tile: the bad row is in a later tile
    chunk = np.ones((9, 4), dtype=np.float32)
    chunk[6, 2] = bad
    centers = np.zeros((2, 4))
    for call in (
        lambda: kernels.assign(chunk, centers, offset=500),
        lambda: kernels.lloyd_chunk(chunk, centers, n_far=2, offset=500),
        lambda: kernels.min_sq_distances(chunk, centers, offset=500),
        lambda: kernels.data_range(chunk, offset=500),
    ):
        with pytest.raises(ValueError, match=r"NaN or infinity.*\[506\]"):
            call()


def test_large_finite_float32_is_not_reported_as_nan():
    chunk = np.full((3, 2), 1e20, dtype=np.float32)
    assert np.isfinite(chunk).all()
    try:
        kernels.assign(chunk, np.zeros((1, 2)))
    except ValueError as error:
        assert "NaN or infinity" not in str(error)


def test_data_range():
    chunk = np.array([[1, 5, 3], [4, 2, 3]], dtype=np.uint8)
    lo, hi = kernels.data_range(chunk)
    np.testing.assert_array_equal(lo, [1, 2, 3])
    np.testing.assert_array_equal(hi, [4, 5, 3])
    assert kernels.data_range(chunk[:0]) is None


# --- seeding kernels -----------------------------------------------------------------


def test_uniform_by_index_range_and_purity():
    idx = np.arange(200_000, dtype=np.uint64)
    u = kernels.uniform_by_index(7, 2, idx)
    assert u.dtype == np.float64
    assert u.min() >= 0.0 and u.max() < 1.0
    # a pure function of (seed, stream, index): any subset, order or call gives the same values
    pick = np.random.default_rng(0).permutation(idx.size)[:5000].astype(np.uint64)
    np.testing.assert_array_equal(kernels.uniform_by_index(7, 2, pick), u[pick.astype(np.int64)])
    np.testing.assert_array_equal(kernels.uniform_by_index(7, 2, idx[123:124]), u[123:124])
    np.testing.assert_array_equal(kernels.uniform_by_index(7, 2, idx), u)
    # seed and stream both matter
    for other in (kernels.uniform_by_index(8, 2, idx), kernels.uniform_by_index(7, 3, idx)):
        assert np.mean(other == u) < 0.001
    # roughly uniform: every tenth of [0, 1) holds ~10% (200k draws, std of a bin share ~0.07%)
    hist = np.histogram(u, bins=10, range=(0, 1))[0] / u.size
    np.testing.assert_allclose(hist, 0.1, atol=0.005)
    # huge seeds and indices do not overflow into errors
    big = kernels.uniform_by_index(2**62 + 5, 4, np.array([2**63 + 1, 0], dtype=np.uint64))
    assert ((big >= 0) & (big < 1)).all()


def test_oversample_keeps_rows_by_their_coin():
    rng = np.random.default_rng(4)
    chunk = rng.integers(0, 255, size=(1000, 3)).astype(np.uint8)
    d2 = rng.random(1000) * 10
    factor = 0.05
    idx, rows = kernels.oversample(chunk, d2, factor, seed=11, stream=3, offset=5000)
    coins = kernels.uniform_by_index(11, 3, np.arange(5000, 6000, dtype=np.uint64))
    expected = np.flatnonzero(coins < factor * d2)
    assert 0 < expected.size < 1000
    np.testing.assert_array_equal(idx, expected + 5000)
    np.testing.assert_array_equal(rows, chunk[expected])
    # the same rows are kept when the chunk is split differently
    a = kernels.oversample(chunk[:333], d2[:333], factor, seed=11, stream=3, offset=5000)
    b = kernels.oversample(chunk[333:], d2[333:], factor, seed=11, stream=3, offset=5333)
    np.testing.assert_array_equal(np.concatenate([a[0], b[0]]), idx)
    # a row at distance zero is never kept
    zero = kernels.oversample(chunk, np.zeros(1000), 1e9, seed=11, stream=3)
    assert zero[0].size == 0


def test_pick_by_weight():
    w = np.array([0.0, 2.0, 0.0, 3.0, 0.0])
    assert kernels.pick_by_weight(w, 0.0) == 1
    assert kernels.pick_by_weight(w, 1.999) == 1
    assert kernels.pick_by_weight(w, 2.0) == 3
    assert kernels.pick_by_weight(w, 4.9) == 3
    # only positive weights are ever picked for targets in [0, total)
    targets = np.linspace(0, 5, 1000, endpoint=False)
    assert {kernels.pick_by_weight(w, t) for t in targets} == {1, 3}


def rows_index(points, chosen):
    """Index of each chosen row among the points (must match exactly one distinct value)."""
    out = []
    for c in chosen:
        hit = np.flatnonzero((points == c).all(axis=1))
        assert hit.size >= 1, "a centre that is not one of the candidates"
        out.append(hit[0])
    return np.array(out)


def test_weighted_kmeans_plusplus_picks_distinct_candidates(mnist_slice):
    points = np.unique(mnist_slice[:400], axis=0).astype(np.float64)  # distinct candidate rows
    rng = np.random.default_rng(5)
    weights = rng.integers(1, 50, size=len(points)).astype(np.float64)
    for k in (1, 2, 10, 25):
        centers = kernels.weighted_kmeans_plusplus(points, k, weights, np.random.default_rng(k))
        assert centers.shape == (k, points.shape[1])
        idx = rows_index(points, centers)
        assert len(set(idx.tolist())) == k
    # deterministic for a given generator state
    a = kernels.weighted_kmeans_plusplus(points, 10, weights, np.random.default_rng(9))
    b = kernels.weighted_kmeans_plusplus(points, 10, weights, np.random.default_rng(9))
    np.testing.assert_array_equal(a, b)


def test_weighted_kmeans_plusplus_ignores_zero_weights(mnist_slice):
    """While unchosen positive-weight points remain, a zero-weight point has no chance at all."""
    points = np.unique(mnist_slice[:300], axis=0).astype(np.float64)
    n, k = len(points), 8
    rng = np.random.default_rng(6)
    for trial in range(10):
        weights = np.zeros(n)
        positive = rng.choice(n - 1, size=12, replace=False)  # the last point keeps weight 0 too
        weights[positive] = rng.integers(1, 100, size=12)
        centers = kernels.weighted_kmeans_plusplus(points, k, weights, np.random.default_rng(trial))
        idx = rows_index(points, centers)
        assert set(idx.tolist()) <= set(positive.tolist())
        assert len(set(idx.tolist())) == k
    # exactly k positive-weight points: those k are the result, in some order
    weights = np.zeros(n)
    weights[[3, 17, 40, 41, 99, 150, 200, 250]] = [1, 5, 2, 8, 1, 1, 3, 7]
    centers = kernels.weighted_kmeans_plusplus(points, k, weights, np.random.default_rng(1))
    assert sorted(rows_index(points, centers).tolist()) == [3, 17, 40, 41, 99, 150, 200, 250]


def test_weighted_kmeans_plusplus_too_few_points():
    with pytest.raises(ValueError, match="at least k=3 points, got 2"):
        kernels.weighted_kmeans_plusplus(np.eye(2), 3, np.ones(2), np.random.default_rng(0))


def test_weighted_kmeans_plusplus_degenerate_weights_still_distinct():
    """Fewer positive-weight points than k: the code then 'takes unused points in order'."""
    points = np.array([[0.0], [1.0], [2.0], [3.0]])
    weights = np.array([1.0, 0.0, 0.0, 0.0])
    centers = kernels.weighted_kmeans_plusplus(points, 3, weights, np.random.default_rng(0))
    assert centers[0, 0] == 0.0  # the only point with weight
    assert len(np.unique(centers[:, 0])) == 3


@pytest.mark.parametrize("k", [1, 7, 25])
def test_weighted_lloyd_equals_scikit_learn_with_sample_weight(mnist_slice, k):
    from sklearn.cluster import KMeans as SKKMeans

    points = mnist_slice[:500].astype(np.float64)
    weights = np.random.default_rng(k).integers(0, 40, size=len(points)).astype(np.float64)
    start = kernels.weighted_kmeans_plusplus(points, k, weights, np.random.default_rng(k))
    ours = kernels.weighted_lloyd(points, weights, start, max_iter=300)
    ref = SKKMeans(k, init=start, n_init=1, max_iter=300, tol=0, algorithm="lloyd")
    ref.fit(points, sample_weight=weights)
    np.testing.assert_allclose(ours, ref.cluster_centers_, rtol=1e-12, atol=1e-9)
    # few iterations: exactly where scikit-learn is after as many
    two = SKKMeans(k, init=start, n_init=1, max_iter=2, tol=0, algorithm="lloyd").fit(points, sample_weight=weights)
    np.testing.assert_allclose(
        kernels.weighted_lloyd(points, weights, start, max_iter=2), two.cluster_centers_, rtol=1e-12, atol=1e-9
    )


def test_weighted_lloyd_keeps_centres_without_weight():
    points = np.array([[0.0], [1.0], [10.0], [11.0], [50.0]])
    weights = np.array([1.0, 3.0, 1.0, 1.0, 0.0])  # the point at 50 counts for nothing
    start = np.array([[0.0], [10.0], [50.0], [100.0]])  # 50 holds only a weightless point, 100 holds none
    out = kernels.weighted_lloyd(points, weights, start, max_iter=30)
    np.testing.assert_array_equal(out, [[0.75], [10.5], [50.0], [100.0]])
    assert start[0, 0] == 0.0  # the caller's centres are not modified


# --- degenerate chunk sizes ------------------------------------------------------------


def test_zero_row_chunk():
    chunk = np.empty((0, 5), dtype=np.uint8)
    centers = np.arange(15, dtype=np.float64).reshape(3, 5)
    labels, stats = kernels.lloyd_chunk(chunk, centers, n_far=3, offset=40)
    assert labels.shape == (0,)
    np.testing.assert_array_equal(stats.sums, np.zeros((3, 5)))
    np.testing.assert_array_equal(stats.counts, [0, 0, 0])
    assert kernels.inertia(stats, centers) == 0.0
    assert stats.far_index.size == stats.far_d2.size == stats.far_label.size == 0
    labels, d2 = kernels.assign(chunk, centers)
    assert labels.size == d2.size == 0
    assert kernels.transform(chunk, centers).shape == (0, 3)
    assert kernels.min_sq_distances(chunk, centers).shape == (0,)
    np.testing.assert_array_equal(kernels.nearest_counts(chunk, centers), [0, 0, 0])
    idx, rows = kernels.oversample(chunk, np.empty(0), 1.0, seed=1, stream=0, offset=40)
    assert idx.size == 0 and rows.shape == (0, 5)
    # an empty chunk's stats are neutral in a combination
    x = np.array([[1, 2, 3, 4, 5]], dtype=np.uint8)
    one = kernels.lloyd_chunk(x, centers, n_far=3, offset=39)[1]
    both = kernels.combine_stats([stats, one], 3)
    np.testing.assert_array_equal(both.sums, one.sums)
    np.testing.assert_array_equal(both.counts, one.counts)
    np.testing.assert_array_equal(both.far_index, [39])


def test_one_row_chunk():
    x = np.array([[10, 0, 3]], dtype=np.uint8)
    centers = np.array([[0.0, 0.0, 0.0], [9.0, 1.0, 3.0]])
    labels, stats = kernels.lloyd_chunk(x, centers, n_far=2, offset=123)
    np.testing.assert_array_equal(labels, [1])
    np.testing.assert_array_equal(stats.counts, [0, 1])
    np.testing.assert_array_equal(stats.sums, [[0, 0, 0], [10, 0, 3]])
    assert kernels.inertia(stats, centers) == pytest.approx(2.0, rel=1e-12)
    np.testing.assert_array_equal(stats.far_index, [123])
    np.testing.assert_array_equal(stats.far_label, [1])
    np.testing.assert_allclose(stats.far_d2, [2.0], rtol=1e-12)
    lo, hi = kernels.data_range(x)
    np.testing.assert_array_equal(lo, x[0])
    np.testing.assert_array_equal(hi, x[0])


@pytest.mark.parametrize(
    "dtype, rows",
    [(np.uint8, 3001), (np.int8, 3001), (np.uint16, 3001), (np.uint16, 40000), (np.int16, 70000)],
)
def test_cluster_sums_of_small_integers_are_exact(dtype, rows):
    """Integer accumulators (int32 while no sum can overflow, else int64) give the exact sums, even at the extremes."""
    info = np.iinfo(dtype)
    rng = np.random.default_rng(rows)
    chunk = rng.choice(np.array([info.min, info.max, 0, 1], dtype=dtype), size=(rows, 3))
    chunk[:, 0] = info.max  # a column whose total exceeds int32 for the larger chunks
    labels = rng.integers(0, 4, rows)
    labels[: rows - 100] = 2  # one big cluster: its column-0 total overflows int32 for the larger chunks
    sums = kernels.cluster_sums(chunk, labels, 5)
    expected = np.zeros((5, 3))
    for j in range(5):
        expected[j] = [int(v) for v in chunk[labels == j].astype(object).sum(axis=0)] if (labels == j).any() else 0
    np.testing.assert_array_equal(sums, expected)
    assert sums.dtype == np.float64
