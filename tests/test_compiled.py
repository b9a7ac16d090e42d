"""Tests for dkmeans.compiled: the compiled kernels give the numpy kernels' results (labels, bounds, sums, norms).

Oracles: plain numpy squared distances by direct differences (their argmin), and the numpy bounded pass
(screening.bounds_filter + assign_rows + settle), run on the same MNIST rows from the same states.
"""

import subprocess
import sys

import numpy as np
import pytest
from test_screening import check_bounds, ref_sq_distances  # pytest puts tests/ on sys.path

from dkmeans import compiled, kernels, screening


@pytest.fixture(scope="module")
def rows(mnist_numpy):
    X, _ = mnist_numpy
    return np.ascontiguousarray(X[20000:23001])


def numpy_path(monkeypatch):
    monkeypatch.setattr(kernels, "_use_compiled", False)


def run_passes(x, centers, k, passes, split=False):
    """Lloyd passes with bounds; every pass's (state, stats), and the centres they were computed for."""
    norms = kernels.chunk_norms(x, split=split)
    assert (norms.columns is not None) == (split and kernels._compiled() is not None)
    state, out = None, []
    for _ in range(passes):
        states, stats = kernels.lloyd_chunk_many(x, centers, (k,), (k,), norms=norms, states=[state], bounds=True)
        state = states[0]
        out.append((state, stats[0], centers))
        far = x[stats[0].far_index[: int((stats[0].counts == 0).sum())]]  # rows for empty clusters
        centers = kernels.update_centers(stats[0], centers, far)
    return out


@pytest.mark.parametrize("k", [1, 3, 10, 64, 200])
@pytest.mark.parametrize("split", [False, True])
def test_compiled_passes_equal_the_numpy_passes_and_brute_force(rows, k, split, monkeypatch):
    """Twelve Lloyd iterations from the same start: the same labels and exact sums, pass by pass; bounds hold.
    With ``split``, the compiled passes score the rows split (ColumnSplit: MNIST's rare pixels from lists)."""
    start = rows[np.random.default_rng(k).choice(len(rows), k, replace=False)].astype(np.float64)
    compiled = run_passes(rows, start, k, 12, split)
    numpy_path(monkeypatch)
    reference = run_passes(rows, start, k, 12)
    for (state, stats, centers), (ref_state, ref_stats, ref_centers) in zip(compiled, reference):
        np.testing.assert_array_equal(centers, ref_centers)
        np.testing.assert_array_equal(state.labels, ref_state.labels)
        np.testing.assert_array_equal(stats.sums, ref_stats.sums)
        np.testing.assert_array_equal(stats.counts, ref_stats.counts)
        check_bounds(rows, centers, state.labels, state.upper, state.group_bounds(), state.nearest)


@pytest.mark.parametrize("dense_share", [0.0, 0.6, 2.0])
def test_rows_sent_to_the_matrix_product_or_kept_in_the_loop_agree(rows, dense_share, monkeypatch):
    """DENSE_SHARE only moves work between the loop and BLAS (0: every reached row to BLAS; 2: none)."""
    monkeypatch.setattr(compiled, "DENSE_SHARE", dense_share)
    k = 64
    start = rows[np.random.default_rng(1).choice(len(rows), k, replace=False)].astype(np.float64)
    for state, _, centers in run_passes(rows, start, k, 6):
        check_bounds(rows, centers, state.labels, state.upper, state.group_bounds(), state.nearest)


@pytest.mark.parametrize("form", ["read-only", "strided", "float32", "float64", "empty"])
def test_chunk_forms(rows, form):
    """Stored chunks are read-only arrays; views may be strided; floats are converted as screening does."""
    x = rows[:800].copy()
    if form == "read-only":
        x.setflags(write=False)
    elif form == "strided":
        x = rows[:1600:2]
    elif form == "float32":
        x = (x / 255).astype(np.float32)
    elif form == "float64":
        x = x / 7.0
    elif form == "empty":
        x = x[:0]
    k = 12
    start = np.random.default_rng(2).random((k, x.shape[1])) * 0.5
    if not x.size:  # no rows: a fresh pass, then a bounded one, each with nothing to do
        norms, state = kernels.chunk_norms(x), None
        for centers in (start, start + 1):
            states, stats = kernels.lloyd_chunk_many(x, centers, (k,), (0,), norms=norms, states=[state], bounds=True)
            state = states[0]
            assert (
                state.labels.shape == (0,)
                and stats[0].counts.sum() == 0
                and state.drift.shape[0] == 1 + (centers is not start)
            )
        return
    start = x[np.random.default_rng(2).choice(x.shape[0], k, replace=False)].astype(np.float64) + start
    for state, _, centers in run_passes(x, start, k, 5):
        check_bounds(x, centers, state.labels, state.upper, state.group_bounds(), state.nearest)


def rebuilt(split) -> np.ndarray:
    """The rows a ColumnSplit holds, in float32: its dense columns, and its rare ones from their lists."""
    n = split.core.shape[0]
    out = np.zeros((n, split.core_columns.size + split.rare_columns.size), dtype=np.float32)
    out[:, split.core_columns] = split.core
    out[np.repeat(np.arange(n), np.diff(split.ptr)), split.rare_columns[split.rare]] = split.values
    return out


@pytest.mark.parametrize("form", ["uint8", "float64", "strided"])
def test_column_split_holds_every_value_once(rows, form):
    """The split's dense columns and rare lists give back the block exactly (values in the screening dtype), the
    columns it calls rare are non-zero in at most RARE_SHARE of the rows, the dense ones are a multiple of
    CORE_MULTIPLE (rare columns taken back, the most common first), and take(at) holds rows ``at``."""
    x = {"uint8": rows, "float64": rows / 3.0, "strided": rows[::2]}[form]
    split = compiled.split_columns(x, np.dtype(np.float32))
    assert split is not None and split.rare_columns.size and split.core.dtype == x.dtype
    assert np.intersect1d(split.core_columns, split.rare_columns).size == 0
    np.testing.assert_array_equal(rebuilt(split), x.astype(np.float32))
    nonzero = (x != 0).sum(axis=0)
    assert (nonzero[split.rare_columns] <= compiled.RARE_SHARE * x.shape[0]).all()
    assert split.core_columns.size % compiled.CORE_MULTIPLE == 0
    taken_back = split.core_columns[nonzero[split.core_columns] <= compiled.RARE_SHARE * x.shape[0]]
    assert taken_back.size < compiled.CORE_MULTIPLE
    assert nonzero[taken_back].min(initial=x.shape[0]) >= nonzero[split.rare_columns].max()
    at = np.arange(3, x.shape[0], 7)
    np.testing.assert_array_equal(rebuilt(split.take(at)), x[at].astype(np.float32))


def test_a_split_serves_only_products_in_its_own_dtype(rows):
    """Rows screened in float32 (values under FLOAT32_SAFE) keep their rare values rounded to float32; centres
    whose norms pass FLOAT32_SAFE screen in float64, where those values would break the float64 error bound:
    such products ignore the split. Labels and bounds against brute force."""
    x = rows * 1e12 + (rows > 0) * 12345.678  # float32 cannot hold these values
    norms = kernels.chunk_norms(x, split=True)
    assert norms.screen == np.float32 and norms.columns is not None
    k = 20
    centers = x[np.random.default_rng(4).choice(len(x), k, replace=False)] + 0.25e12
    model = screening.prepare(centers, norms.screen)
    assert model.cs.dtype == np.float64
    labels, upper, lower = screening.assign_rows(x, norms, model, 300)
    check_bounds(x, centers, labels, upper, lower)


def test_no_split_where_it_would_not_pay():
    """Rows with no rare columns (every pixel often non-zero), and no rows, are scored whole."""
    dense = np.random.default_rng(0).integers(1, 256, (500, 50), dtype=np.uint8)
    assert compiled.split_columns(dense, np.dtype(np.float32)) is None
    assert compiled.split_columns(dense[:0], np.dtype(np.float32)) is None


def test_duplicate_centres_tie_to_the_lowest_index(rows):
    """Equal centres give equal screened scores: the row goes to float64, where the lowest index wins."""
    k = 6
    start = rows[np.random.default_rng(3).choice(len(rows), 3, replace=False)].astype(np.float64)
    start = np.repeat(start, 2, axis=0)  # centres 2j and 2j+1 coincide
    for state, _, centers in run_passes(rows, start, k, 4):
        np.testing.assert_array_equal(state.labels, ref_sq_distances(rows, centers).argmin(axis=1))
        assert (state.labels % 2 == 0).all() or not np.array_equal(centers[0], centers[1])


@pytest.mark.parametrize("k", [1, 3, 20, 64, 256])
def test_compiled_settle_gives_the_numpy_labels_and_valid_bounds(rows, k):
    """compiled.bounds_from_products against screening's and the brute force: the same labels, upper bounds and
    rows left to float64; lower bounds valid and at most one float32 step from numpy's. The products are a
    strided view of a stacked block (another model's centres beside them), as _assign_together passes them,
    and two centres coincide (a tie only float64 settles)."""
    x = rows[:1500]
    norms = kernels.chunk_norms(x)
    centers = x[np.random.default_rng(k).choice(len(x), k, replace=False)].astype(np.float64) + 0.25
    if k > 1:
        centers[-1] = centers[0]
    model = screening.prepare(centers, norms.screen)
    other = screening.prepare(centers[:1] + 3, norms.screen)
    stacked = x.astype(np.float32) @ np.hstack([other.cst, model.cst])
    idx = np.arange(len(x))
    labels, upper, lower = compiled.bounds_from_products(stacked[:, 1:], x, norms, idx, model)
    ref_labels, ref_upper, ref_lower = screening.bounds_from_products(stacked[:, 1:].copy(), x, norms, idx, model)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(upper, ref_upper)
    steps = np.abs(lower.view(np.int32).astype(np.int64) - ref_lower.view(np.int32).astype(np.int64))
    assert steps.max() <= 1
    check_bounds(x, centers, labels, upper, lower)


def test_float32_down_is_a_float32_lower_bound():
    values = [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 3.0e38, 1e39, -1e39, np.inf, -np.inf, np.pi, 2.0**-149]
    values += [1.0e-45, 2.2e-45, -1.0e-45, 1e-40, 3.3e-39, 1e-300]  # float32 subnormals and below
    values += list(np.random.default_rng(0).normal(size=200) * 10.0 ** np.random.default_rng(1).integers(-20, 20, 200))
    for v in values:
        down = compiled._float32_down(v)
        assert isinstance(down, float) or np.float32(down) == down
        assert np.float64(down) <= v, v
        assert np.isfinite(down) or v < -float(np.finfo(np.float32).max), v  # -inf: below every float32
        if np.isfinite(v) and abs(v) < 1e38 and abs(v) > 1e-37:
            assert v - np.float64(down) <= abs(v) * 2.0**-22  # at most about two float32 ulps below


def test_applies_only_to_float32_screening():
    assert compiled.available(screening.prepare(np.ones((2, 3)), np.dtype(np.float32)))
    assert not compiled.available(screening.prepare(np.ones((2, 3)), np.dtype(np.float64)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [10, 256])
def test_float_sums_are_the_numpy_bits(mnist_numpy, dtype, k, monkeypatch):
    """Compiled float sums add in row order in float64, as numpy's reduction does: the same bits, not just close."""
    x_train = mnist_numpy[0]
    chunk = (x_train[:20000] / np.pi).astype(dtype)  # fractional values, so the order of the additions shows
    chunk[:50] *= 1e7  # large rows next to small ones: any reordering would change the low bits
    labels = np.random.default_rng(k).integers(0, k, chunk.shape[0]).astype(np.int32)
    labels[labels == 3] = 4  # an empty cluster
    fast = kernels.cluster_sums(chunk, labels, k)
    numpy_path(monkeypatch)
    slow = kernels.cluster_sums(chunk, labels, k)
    assert fast.dtype == slow.dtype == np.float64
    assert np.array_equal(fast, slow)
    assert not fast[3].any()


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16])
@pytest.mark.parametrize("n", [0, 1, 3001, 70000])
def test_integer_sums_and_norms_equal_the_numpy_ones(dtype, n, monkeypatch):
    """Compiled integer sums and squared norms are exact: the numpy kernels' values, at the dtypes' extremes."""
    info = np.iinfo(dtype)
    rng = np.random.default_rng(n)
    chunk = rng.choice(np.array([info.min, info.max, 0, 1, -1 if info.min else 2], dtype=dtype), size=(n, 7))
    labels = rng.integers(0, 5, n).astype(np.int32)
    fast_sums, fast_norms = kernels.cluster_sums(chunk, labels, 6), kernels.chunk_norms(chunk)
    numpy_path(monkeypatch)
    np.testing.assert_array_equal(fast_sums, kernels.cluster_sums(chunk, labels, 6))
    slow_norms = kernels.chunk_norms(chunk)
    np.testing.assert_array_equal(fast_norms.sq, slow_norms.sq)
    assert (fast_norms.total, fast_norms.integral, fast_norms.screen) == (
        slow_norms.total,
        slow_norms.integral,
        slow_norms.screen,
    )


def test_compiled_kernels_are_loaded_only_when_allowed():
    """Processes kept to the numpy kernels (small workers) never load the compiled ones (nor numba, for them)."""
    code = (
        "import sys, numpy as np; from dkmeans import kernels, estimator, engine; kernels.use_compiled(False);"
        "x = np.arange(20, dtype=np.uint8).reshape(4, 5); c = x[:2].astype(float);"
        "s, _ = kernels.lloyd_chunk_many(x, c, (2,), (0,), bounds=True);"
        "kernels.lloyd_chunk_many(x, c + 1, (2,), (0,), states=s, bounds=True);"
        "print('dkmeans.compiled' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_small_workers_run_the_numpy_kernels_with_the_same_result(mnist, client):
    """Under engine.COMPILED_MIN_MEMORY a worker never loads the compiled kernels; the fit is bit for bit the same."""
    from distributed import Client, LocalCluster

    from dkmeans import KMeans

    # A lambda travels by value: running a function of this module would import it there, and with it
    # dkmeans.compiled.
    report = lambda: ("dkmeans.compiled" in sys.modules, kernels._use_compiled)  # noqa: E731
    X = mnist.train_images[:12000]
    init = X[:8].compute().astype(np.float64)
    big = KMeans(8, init=init, max_iter=6, tol=0, client=client).fit(X)
    assert all(report == (True, True) for report in client.run(report).values())
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="700MB", dashboard_address=":0") as cluster:
        with Client(cluster) as small_client:
            small = KMeans(8, init=init, max_iter=6, tol=0, client=small_client).fit(X)
            reports = small_client.run(report)
            assert all(report == (False, False) for report in reports.values()), reports
    np.testing.assert_array_equal(small.cluster_centers_, big.cluster_centers_)
    np.testing.assert_array_equal(small.labels_, big.labels_)
    assert small.inertia_ == big.inertia_ and small.n_iter_ == big.n_iter_


@pytest.mark.parametrize("dense_pass, everything", [(0.0, True), (2.0, False)])
def test_a_first_pass_the_filters_cannot_thin_is_one_product_over_every_row(rows, dense_pass, everything, monkeypatch):
    """After a pass that computed every distance, a sample of rows decides between the filters and one product
    over every row (DENSE_PASS 0: always the product; 2: never); both give the brute-force labels and valid bounds."""
    monkeypatch.setattr(compiled, "DENSE_PASS", dense_pass)
    k = 64
    start = rows[np.random.default_rng(2).choice(len(rows), k, replace=False)].astype(np.float64)
    ((fresh, stats, _),) = run_passes(rows, start, k, 1)
    centers = kernels.update_centers(stats, start)
    norms = kernels.chunk_norms(rows)
    state, computed = compiled.bounded_pass(rows, norms, screening.prepare(centers, norms.screen), fresh, 300)
    assert (state is None) is everything and (computed == rows.shape[0] * k) is everything
    states, stats = kernels.lloyd_chunk_many(rows, centers, (k,), (0,), norms=norms, states=[fresh], bounds=True)
    state = states[0]
    assert (state.drift.shape[0] == 1) is everything  # a fresh state from the product, or the bounds moved on
    check_bounds(rows, centers, state.labels, state.upper, state.group_bounds(), state.nearest)
    # Exact sums either way, moved from the previous pass's by the rows that changed cluster.
    np.testing.assert_array_equal(stats[0].sums, kernels.cluster_sums(rows, state.labels, k).astype(np.int64))
