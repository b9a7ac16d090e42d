"""Tests for dkmeans.screening: float32-screened labels equal the float64 ones, and the bounds are bounds.

The oracle is plain numpy: squared distances by direct differences in
float64, and their argmin.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dkmeans import compiled, kernels, screening


def ref_sq_distances(x, c):
    """Squared distances by direct differences, a few rows at a time (all at once: gigabytes at k=200)."""
    x, c = np.asarray(x, dtype=np.float64), np.asarray(c, dtype=np.float64)
    out = np.empty((x.shape[0], c.shape[0]))
    step = max(1, 2**22 // max(1, c.size))
    for i in range(0, x.shape[0], step):
        out[i : i + step] = ((x[i : i + step, None, :] - c[None, :, :]) ** 2).sum(axis=2)
    return out


@pytest.fixture(scope="module")
def rows(mnist_numpy):
    X, _ = mnist_numpy
    return np.ascontiguousarray(X[7000:9001])


def centres_of(X, k, seed):
    """Means of random groups of rows: realistic, non-integer centres."""
    idx = np.random.default_rng(seed).choice(len(X), size=(k, 5), replace=False)
    return X[idx].astype(np.float64).mean(axis=1)


def check_bounds(x, centers, labels, upper, lower, nearest=None):
    """labels are the brute-force nearest centres (lowest index on ties); upper >= distance to the own centre,
    lower[:, g] (nearest) <= distance to every other centre of group g (all). One brute force for both."""
    d2 = ref_sq_distances(x, centers)
    np.testing.assert_array_equal(labels, d2.argmin(axis=1))
    d = np.sqrt(d2)
    at = np.arange(len(x))
    assert (upper >= d[at, labels] * (1 - 1e-12)).all()
    starts = screening.group_starts(centers.shape[0])
    d[at, labels] = np.inf
    group_min = np.minimum.reduceat(d, starts, axis=1)
    assert (lower <= group_min * (1 + 1e-12)).all()
    if nearest is not None:
        assert (nearest <= group_min.min(axis=1) * (1 + 1e-12)).all()


@pytest.mark.parametrize("k", [1, 2, 10, 64, 200])
@pytest.mark.parametrize("form", ["uint8", "float32", "float64-shifted"])
def test_screened_labels_are_the_float64_argmin(rows, mnist_numpy, k, form):
    X, _ = mnist_numpy
    centers = centres_of(X, k, seed=k)
    x = rows
    if form == "float32":
        x, centers = (rows / 255).astype(np.float32), centers / 255
    elif form == "float64-shifted":  # an offset far from zero: the error bound must scale with the norms
        x, centers = rows + 1e4, centers + 1e4
    norms = kernels.chunk_norms(x)
    model = screening.prepare(centers, norms.screen)
    labels, upper, lower = screening.assign_rows(x, norms, model, tile_rows=256)
    check_bounds(x, centers, labels, upper, lower)


@pytest.mark.parametrize(
    "k, dtype, plain, rows",
    [(10, np.float32, True, 127), (5, np.float32, True, 255), (39, np.float32, True, 32), (40, np.float32, True, 334),
     (10, np.float64, True, 334), (10, np.float32, False, 334), (1, np.float32, True, 334)],
)  # fmt: skip
def test_few_centres_take_tiles_within_openblas_direct_sgemm(k, dtype, plain, rows):
    """rows x 784 x k stays within DIRECT_PRODUCT, unless the tile would fall under DIRECT_ROWS_MIN rows, the
    product is not one plain float32 matmul, or the usual tile is smaller already."""
    cst = np.zeros((784, k), dtype=dtype)
    got = screening._product_rows(334, cst, plain)
    assert got == rows
    if got != 334:
        assert got * 784 * k <= screening.DIRECT_PRODUCT < (got + 1) * 784 * k


def test_ties_go_to_the_lowest_index_as_in_float64():
    """Rows exactly halfway between two centres (and duplicate centres) are too close to call in float32."""
    c = np.array([[0.0, 0.0], [2.0, 0.0], [2.0, 0.0], [10.0, 10.0]])
    x = np.array([[1.0, 0.0], [1.0, 5.0], [2.0, 0.0], [3.0, 1.0], [6.0, 5.0]])
    norms = kernels.chunk_norms(x)
    labels, _, _ = screening.assign_rows(x, norms, screening.prepare(c, norms.screen), tile_rows=2)
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 1])


def test_near_ties_are_settled_in_float64(rows):
    """A centre moved a hair (below float32 resolution) from the midpoint still decides as float64 does."""
    a, b = rows[0].astype(np.float64), rows[1].astype(np.float64)
    mid = (a + b) / 2
    for eps in (1e-7, -1e-7):
        x = mid[None, :]
        c = np.stack([a, b + eps])  # |x - b'| differs from |x - a| in the 7th significant digit or below
        norms = kernels.chunk_norms(x)
        labels, _, _ = screening.assign_rows(x, norms, screening.prepare(c, norms.screen), tile_rows=1)
        assert labels[0] == ref_sq_distances(x, c).argmin(axis=1)[0]


def test_huge_values_are_screened_in_float64():
    x = np.array([[1e17, 0.0], [0.0, 1e17], [5e16, 5e16 + 1e6]])
    norms = kernels.chunk_norms(x)
    assert norms.screen == np.float64
    c = np.array([[1e17, 0.0], [0.0, 1e17]])
    labels, _, _ = screening.assign_rows(x, norms, screening.prepare(c, norms.screen), tile_rows=8)
    np.testing.assert_array_equal(labels, ref_sq_distances(x, c).argmin(axis=1))


@pytest.mark.parametrize("form", ["uint8", "float32", "float64-shifted", "signed", "wide"])
@pytest.mark.parametrize("rare", [False, True])
def test_screened_scores_stay_within_their_error_bound(rows, mnist_numpy, form, rare):
    """Every float32 score, from BLAS and from the compiled loop, is within _error of the exact squared distance
    (computed in extended precision); the bound is also no more than a few thousand times the largest error seen,
    so a bound that only holds by being huge would fail too. With ``rare``, every third column is non-zero in
    about 1 % of the rows, and the rows are also scored split (compiled.ColumnSplit: those columns' non-zeros
    added from lists, after BLAS or the loop)."""
    rng = np.random.default_rng(5)
    x, c = rows[:400], centres_of(mnist_numpy[0], 64, seed=5)
    if form == "float32":
        x, c = (x / 255).astype(np.float32), c / 255
    elif form == "float64-shifted":
        x, c = x + 1e4, c + 1e4
    elif form == "signed":
        x, c = rng.normal(0, 1e3, (400, 300)), rng.normal(0, 1e3, (64, 300))
    elif form == "wide":  # more features: the bound grows with d
        x, c = rng.integers(0, 256, (200, 5000), dtype=np.uint8), rng.uniform(0, 255, (32, 5000))
    if rare:
        x = np.array(x)
        x[:, ::3] *= (rng.random(x[:, ::3].shape) < 0.01).astype(x.dtype)
    norms = kernels.chunk_norms(x, split=rare)
    assert (norms.columns is not None) == rare
    model = screening.prepare(c, norms.screen)
    assert model.cs.dtype == np.float32
    xl, cl = np.asarray(x, dtype=np.longdouble), c.astype(np.longdouble)
    exact = (xl * xl).sum(axis=1)[:, None] - 2 * np.einsum("ik,jk->ij", xl, cl) + (cl * cl).sum(axis=1)[None, :]
    error = screening._error(norms, np.arange(len(x)), model, model.rounding)[:, None]
    blas = np.asarray(x, dtype=np.float32) @ model.cst
    if rare:
        norms.columns.products(slice(0, len(x)), norms.columns.centres(model.cst), blas)
    blas *= -2
    blas += model.sqs
    loop = np.empty_like(blas)
    layout = compiled._layout(x, norms.split_for(model.cs.dtype), model)
    for i in range(len(x)):
        compiled.score_row(*layout, i, model.sqs, 0, model.k, loop[i])
    for scores in (blas, loop):
        off = np.abs(norms.sq[:, None] + scores.astype(np.float64) - exact).astype(np.float64)
        assert (off <= error).all()
        assert error.min() <= 5000 * max(off.max(), np.finfo(np.float32).tiny)


@pytest.fixture(params=["compiled", "numpy"])
def bounded_path(request, monkeypatch):
    """Run a test with the compiled kernels (dkmeans.compiled), then with the numpy ones."""
    if request.param == "numpy":
        monkeypatch.setattr(kernels, "_use_compiled", False)
    return request.param


@pytest.mark.parametrize("k", [10, 64, 200])  # 200: doubtful rows first tighten their upper bound
def test_bounded_passes_follow_lloyd_exactly_and_skip_rows(rows, k, bounded_path):
    """Ten Lloyd iterations: with bounds, every pass has the brute-force labels and sums, with fewer distances."""
    centers = rows[np.random.default_rng(k).choice(len(rows), k, replace=False)].astype(np.float64)
    norms = kernels.chunk_norms(rows)
    state, recomputed = None, []
    for _ in range(10):
        brute_states, brute = kernels.lloyd_chunk_many(rows, centers, (k,), (0,), norms=norms)
        states, fast = kernels.lloyd_chunk_many(rows, centers, (k,), (0,), norms=norms, states=[state], bounds=True)
        if state is not None and bounded_path == "numpy":  # rows with all their distances computed
            recomputed.append(int((states[0].stamp == states[0].drift.shape[0] - 1).sum()))
        elif state is not None:  # distances computed, as rows' worth (the local filter computes parts of rows)
            model = screening.prepare(centers, norms.screen)
            recomputed.append(compiled.bounded_pass(rows, norms, model, state, 256)[1] // k)
        np.testing.assert_array_equal(states[0].labels, brute_states[0].labels)
        np.testing.assert_array_equal(fast[0].sums, brute[0].sums)  # incremental exact sums = full sums
        np.testing.assert_array_equal(fast[0].counts, brute[0].counts)
        assert fast[0].sq_total == brute[0].sq_total
        s = states[0]
        check_bounds(rows, centers, s.labels, s.upper, s.group_bounds(), s.nearest)
        state = states[0]
        centers = kernels.update_centers(fast[0], centers)
    assert len(recomputed) == 9  # every pass after the first used the bounds
    assert recomputed[-1] < len(rows) / 2, recomputed  # and they spared most rows by the end


def test_state_for_other_centres_shape_is_ignored(rows, mnist_numpy):
    """A state of another model size (or chunk) is not used: the pass starts from scratch."""
    X, _ = mnist_numpy
    c5, c6 = centres_of(X, 5, 1), centres_of(X, 6, 2)
    states, _ = kernels.lloyd_chunk_many(rows, c5, (5,), (0,))
    again, _ = kernels.lloyd_chunk_many(rows, c6, (6,), (0,), states=states, bounds=True)
    np.testing.assert_array_equal(again[0].labels, ref_sq_distances(rows, c6).argmin(axis=1))


def test_float_rows_with_fractions_are_summed_in_float64(rows):
    x = rows[:500] / 7.0
    norms = kernels.chunk_norms(x)
    assert not norms.integral
    c = x[:3].copy()
    _, stats = kernels.lloyd_chunk_many(x, c, (3,), (0,), norms=norms)
    assert stats[0].sums.dtype == np.float64
    labels = ref_sq_distances(x, c).argmin(axis=1)
    np.testing.assert_allclose(stats[0].sums, [x[labels == j].sum(axis=0) for j in range(3)], rtol=1e-12)


def test_stacked_products_give_each_model_its_own_labels_and_bounds(rows, mnist_numpy, monkeypatch):
    """Several models over overlapping row sets (a sweep's pass): stacked or alone, each gets the float64 argmin."""
    X, _ = mnist_numpy
    products = []  # the number of models in each product
    real = screening._assign_together

    def counting(chunk, rows_, models, *args):
        products.append(len(models))
        return real(chunk, rows_, models, *args)

    monkeypatch.setattr(screening, "_assign_together", counting)
    x = rows[:1500]
    norms = kernels.chunk_norms(x)
    ks = [1, 3, 7, 40, 64]
    models = [screening.prepare(centres_of(X, k, seed=k), norms.screen) for k in ks]
    rng = np.random.default_rng(3)
    # all rows, most rows, a few rows, none, and a strided half
    most, few = np.sort(rng.choice(1500, 1200, replace=False)), np.array([5, 900, 1499])
    whiches = [None, most, few, np.array([], int), np.arange(0, 1500, 2)]
    results = screening.assign_rows_many(x, norms, models, whiches, lambda width: 97)
    assert sorted(products) == [1, 1, 3]  # all, most and the half stacked; the few and the empty alone
    for model, which, (labels, upper, lower) in zip(models, whiches, results):
        sub = x if which is None else x[which]
        check_bounds(sub, model.c64, labels, upper, lower)
        alone = screening.assign_rows(x, norms, model, 97, which)
        np.testing.assert_array_equal(alone[0], labels)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16])
def test_small_integer_norms_are_exact(dtype):
    """8- and 16-bit rows take an integer path (int32 or int64 sums of squares): the float64 values, exactly."""
    info = np.iinfo(dtype)
    x = np.random.default_rng(1).integers(info.min, info.max, (700, 784), endpoint=True).astype(dtype)
    x[0] = info.max  # the largest squares the accumulator must hold
    norms = kernels.chunk_norms(x)
    ref = (x.astype(np.float64) ** 2).sum(axis=1)
    np.testing.assert_array_equal(norms.sq, ref)
    assert norms.total == float(ref.sum()) and norms.integral and norms.screen == np.float32


def test_bounds_brought_up_to_date_when_the_drift_history_is_full(rows, monkeypatch, bounded_path):
    """With a history of 2 passes, the state is rebased every other pass: still Lloyd's labels, still bounds."""
    monkeypatch.setattr(screening, "DRIFT_HISTORY", 2)
    k = 64
    centers = rows[np.random.default_rng(5).choice(len(rows), k, replace=False)].astype(np.float64)
    norms = kernels.chunk_norms(rows)
    state = None
    for _ in range(8):
        states, stats = kernels.lloyd_chunk_many(rows, centers, (k,), (0,), norms=norms, states=[state], bounds=True)
        state = states[0]
        check_bounds(rows, centers, state.labels, state.upper, state.group_bounds(), state.nearest)
        assert state.drift.shape[0] <= 2 and state.stamp.max() < state.drift.shape[0]
        centers = kernels.update_centers(stats[0], centers)


def check_bounds_squared(x, centers, labels, upper, lower, nearest):
    """check_bounds up to float64's rounding of squared norms, where offsets dwarf the distances."""
    d2 = ref_sq_distances(x, centers)
    slack = 1e-12 * (np.einsum("ij,ij->i", x, x)[:, None] + np.einsum("ij,ij->i", centers, centers)[None, :])
    at = np.arange(len(x))
    assert (upper**2 >= d2[at, labels] - slack[at, labels]).all()
    low = d2 + slack
    low[at, labels] = np.inf
    group_min = np.minimum.reduceat(low, screening.group_starts(centers.shape[0]), axis=1)
    assert (np.maximum(lower, 0) ** 2 <= group_min).all()
    assert (np.maximum(nearest, 0) ** 2 <= group_min.min(axis=1)).all()


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 60),
    d=st.integers(1, 6),
    k=st.integers(1, 40),
    scale=st.sampled_from([1e-3, 1.0, 255.0, 1e6, 1e12]),
    offset=st.sampled_from([0.0, 1.0, 1e4]),
    duplicates=st.booleans(),
    history=st.integers(2, 5),
    seed=st.integers(0, 2**32 - 1),
    path=st.sampled_from(["compiled", "numpy"]),
)
def test_bounded_passes_equal_brute_force_on_random_data(n, d, k, scale, offset, duplicates, history, seed, path):
    """Any data (tiny or huge values, offsets, repeated rows), any k: bounded passes are brute force's, bounds hold.

    (Against distances by direct differences the labels may differ here: with an offset 1e7 times the
    spread, float64's |x|^2 - 2 x.c + |c|^2 cannot tell the nearest centre, in dkmeans as in scikit-learn.)
    """
    k = min(k, n)  # as the estimator requires
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * scale + offset
    if duplicates:
        x = x[rng.integers(0, n, n)]
    centers = x[rng.integers(0, n, k)] + rng.normal(size=(k, d)) * scale * 0.1
    norms = kernels.chunk_norms(x)
    state = None
    old, screening.DRIFT_HISTORY = screening.DRIFT_HISTORY, history
    kernels.use_compiled(path == "compiled")
    try:
        for _ in range(6):
            states, stats = kernels.lloyd_chunk_many(x, centers, (k,), (k,), norms=norms, states=[state], bounds=True)
            brute, _ = kernels.lloyd_chunk_many(x, centers, (k,), (k,), norms=norms)
            state = states[0]
            np.testing.assert_array_equal(state.labels, brute[0].labels)
            check_bounds_squared(x, centers, state.labels, state.upper, state.group_bounds(), state.nearest)
            far = x[stats[0].far_index[: int((stats[0].counts == 0).sum())]]
            centers = kernels.update_centers(stats[0], centers, far)
    finally:
        screening.DRIFT_HISTORY = old
        kernels.use_compiled(True)


@pytest.mark.parametrize("k", [1, 10, 16, 17, 20, 31, 64, 100, 128, 200, 256, 1000, 1024])
def test_groups_are_single_centres_up_to_16_then_runs_of_at_least_4(k):
    """n_groups: one bound per centre for small k, else at most GROUPS groups of GROUP_SIZE_MIN or more
    neighbouring centres, equal where a divisor of k allows (group_min then takes strided minima)."""
    g = screening.n_groups(k)
    starts = screening.group_starts(k)
    sizes = np.diff(np.append(starts, k))
    assert starts[0] == 0 and sizes.min() >= 1 and sizes.sum() == k and starts.size == g
    if k <= screening.PER_CENTRE_MAX:
        assert g == k
    else:
        assert g <= screening.GROUPS and sizes.min() >= screening.GROUP_SIZE_MIN
    values = np.random.default_rng(k).random((5, k))
    np.testing.assert_array_equal(screening.group_min(values, k), np.minimum.reduceat(values, starts, axis=1))


def test_float32_down_is_nextafter_towards_minus_infinity_bit_for_bit():
    rng = np.random.default_rng(0)
    values = [
        rng.standard_normal(100_000) * 10.0 ** rng.integers(-46, 40, 100_000),  # subnormals to overflow
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 2.0**-149, -(2.0**-149), 2.0**-126, 3.4028235e38, 1e39]),
        rng.standard_normal((300, 32)),
        np.float64(1.5),
    ]
    with np.errstate(over="ignore"):
        for x in values:
            expected = np.nextafter(np.asarray(x, dtype=np.float32), np.float32(-np.inf))
            got = screening.float32_down(x)
            assert got.dtype == np.float32 and got.shape == np.shape(x)
            np.testing.assert_array_equal(got.view(np.int32)[~np.isnan(got)], expected.view(np.int32)[~np.isnan(got)])
            np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
