"""Kernels compiled with numba: the bounded (Yinyang) pass, the labels and bounds of a block of screened products,
integer cluster sums and integer row norms.

Imported only where kernels.use_compiled allows it: numba's runtime and this
module's code take about 120 MB of a process's memory (engine.COMPILED_MIN_MEMORY
has the measurements), too much for a small worker, which then runs the numpy
versions (same results).

The bounded pass: screening.bounds_filter checks the bounds in numpy and
recomputes every distance of each row it cannot settle, with one matrix
product. Here each such row first gets its distance to its own centre
(tightening the upper bound), then only the groups of centres whose lower
bound it does not clear (Ding et al., 2015, the local filter). In numpy that
would cost a gather per group; compiled, it is a loop. The rows that reach
the local filter are scored in batches, group by group and two rows at a
time, so each centre read from cache serves several rows. The screened
distances, their error bounds, the state's layout and the rows left to
float64 are exactly screening's, so both paths give the same labels and
bounds (tests/test_compiled.py).

The products skip the block's rare columns (ColumnSplit): a column that is
zero in most rows (an MNIST border pixel) costs a multiply-add per row and
centre in a dense product, but only per non-zero when taken from a list.
Zeros add nothing, and the error bound holds for any summation order, so the
products stay within the same bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from . import screening

# Reassociation lets LLVM vectorise the float32 dot products; the screening error bound holds for any
# summation order. Nothing else of fast-math: the kernel relies on infinities.
_DOT_MATH = {"reassoc", "contract"}
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# A row whose filters leave more than this share of the centres goes to one matrix product with the other such
# rows (screening.assign_rows). With the loop batched, the share matters little: 20 passes over 30,000 MNIST rows
# at k=256 took 1.13 s at 0.6, 1.16 s at 0.8, 1.14 s with no row sent to BLAS and 1.25 s at 0.3.
DENSE_SHARE = 0.6
# Rows the local filter scores together (_local_filter): measured on MNIST at k=256, 256 rows took 8 % less time
# than 64, and 12 % less than 1024, whose rows no longer stay in a core's cache.
BATCH_ROWS = 256
# The first pass after every row's distances were computed goes to one matrix product over every row when more
# than DENSE_PASS of every SAMPLE_EVERY-th row would (bounded_pass). 20 passes over 30,000 MNIST rows from a
# random start, two runs each: k=64 0.48 s at 0.5 against 0.50-0.51 s at 0.8; k=10 and k=256 the same either way.
SAMPLE_EVERY = 16
DENSE_PASS = 0.5
# A block's column is rare when at most RARE_SHARE of its rows are non-zero there. The split is made when the
# products' estimated cost, d_core + RARE_COST x (rare non-zeros a row), falls to SPLIT_GAIN x d or less. In
# the local filter a rare non-zero costs about RARE_COST times a dense column (9 ns against 0.3 ns for a group of
# 8 centres); in BLAS about 5 times. 30,000 MNIST rows, k=256, one thread, the bounded passes 3-20 of a fit
# replayed, and a dense pass: 701-772 and 151-155 ms unsplit; at 0.005 (523 dense columns) 609-628 and 110-116
# ms, 0.02 (458) 587-626 and 104-107 ms, 0.05 (395) 621-773 and 94-103 ms, 0.1 (343) 698-801 and 91-96 ms.
RARE_SHARE = 0.02
RARE_COST = 30.0
SPLIT_GAIN = 0.8
# The dense columns are made a multiple of CORE_MULTIPLE, taking back the most common rare ones: the dot loops
# then run in whole AVX-512 steps (32 float32 a step, unrolled twice), with no scalar tail. MNIST at k=256
# (458 -> 480 columns): a pair of rows against a group of 8 centres 15.2 -> 12.6 ns a distance, the bounded
# passes 3-20 replayed 641 -> 606 ms (medians of 4, one thread).
CORE_MULTIPLE = 32


@dataclass
class ColumnSplit:
    """A block's rows as the screening products read them: its common columns dense, its rare ones as lists.

    Built once per block (split_columns) and kept with its RowNorms; the block itself still serves the float64
    distances and the sums.
    """

    core: np.ndarray  # (n, d_core) the block's common columns, in its dtype, C-contiguous
    core_columns: np.ndarray  # intp, ascending
    rare_columns: np.ndarray  # intp, ascending
    ptr: np.ndarray  # int64 (n + 1): row i's rare non-zeros are entries ptr[i] to ptr[i + 1]
    rare: np.ndarray  # int32: each entry's position in rare_columns
    values: np.ndarray  # each entry, in the screening dtype (rounded as the screening rounds the rows)

    @property
    def nbytes(self) -> int:
        parts = (self.core, self.core_columns, self.rare_columns, self.ptr, self.rare, self.values)
        return sum(a.nbytes for a in parts)

    def take(self, at: np.ndarray) -> ColumnSplit:
        """The split of rows ``at`` alone."""
        starts, lengths = self.ptr[at], self.ptr[at + 1] - self.ptr[at]
        ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        entries = np.repeat(starts - ptr[:-1], lengths) + np.arange(ptr[-1])
        return ColumnSplit(
            self.core[at], self.core_columns, self.rare_columns, ptr, self.rare[entries], self.values[entries]
        )

    def serves(self, dtype: np.dtype) -> bool:
        """Whether products in ``dtype`` may use the split: its values are rounded as the rows' screening rounds
        them, and centres screened in another dtype (float64, past FLOAT32_SAFE) need the rows' own values."""
        return self.values.dtype == dtype

    def centres(self, cst: np.ndarray) -> tuple:
        """The products' centres (d, k), as products takes them: their common rows, then their rare rows."""
        return cst[self.core_columns], cst[self.rare_columns]

    def products(self, rows, centres: tuple, out: np.ndarray) -> None:
        """out = x @ cst for the block's rows ``rows`` (a slice or indices), x rounded to cst's dtype; ``centres``
        is centres(cst)."""
        core, rare = centres
        np.matmul(self.core[rows].astype(core.dtype, copy=False), core, out=out)
        index = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
        _add_rare_rows(self.ptr, self.rare, self.values, rare, index, out)


def split_columns(chunk: np.ndarray, screen: np.dtype) -> ColumnSplit | None:
    """The block's ColumnSplit, or None where it would not make the products cheaper (see SPLIT_GAIN)."""
    n, d = chunk.shape
    if not n or not d:
        return None
    counts = np.zeros(d, dtype=np.int64)
    _nonzero_counts(chunk, counts)
    rare = counts <= RARE_SHARE * n
    if (d - rare.sum() + RARE_COST * counts[rare].sum() / n) > SPLIT_GAIN * d:
        return None
    common_first = np.flatnonzero(rare)[np.argsort(-counts[rare], kind="stable")]
    rare[common_first[: -int(d - rare.sum()) % CORE_MULTIPLE]] = False
    if not rare.any():
        return None
    core_columns, rare_columns = np.flatnonzero(~rare), np.flatnonzero(rare)
    core = np.empty((n, core_columns.size), dtype=chunk.dtype)
    ptr = np.empty(n + 1, dtype=np.int64)
    entries = int(counts[rare].sum())
    positions, values = np.empty(entries, dtype=np.int32), np.empty(entries, dtype=screen)
    _split_rows(chunk, core_columns, rare_columns, core, ptr, positions, values)
    return ColumnSplit(core, core_columns, rare_columns, ptr, positions, values)


def _layout(chunk, split: ColumnSplit | None, model: screening.Centres) -> tuple:
    """What the compiled loops score from: the rows' dense columns and those centres' columns, then the rows'
    rare non-zeros (ptr, positions, values) and the centres' rare columns, transposed (none without a split).
    ``split`` is one that serves the model's dtype (RowNorms.split_for), or None."""
    if split is None:
        none = np.zeros(chunk.shape[0] + 1, dtype=np.int64)
        empty = np.empty((0, model.k), dtype=model.cs.dtype)
        return chunk, model.cs, none, np.empty(0, dtype=np.int32), np.empty(0, dtype=model.cs.dtype), empty
    cc = np.ascontiguousarray(model.cs[:, split.core_columns])
    return split.core, cc, split.ptr, split.rare, split.values, model.cst[split.rare_columns]


@njit(cache=True, nogil=True, boundscheck=False)
def _nonzero_counts(chunk, counts):
    for i in range(chunk.shape[0]):
        row = chunk[i]
        for t in range(row.size):
            if row[t] != 0:
                counts[t] += 1


@njit(cache=True, nogil=True, boundscheck=False)
def _split_rows(chunk, core_columns, rare_columns, core, ptr, positions, values):
    """core[i] = chunk[i, core_columns]; row i's non-zeros among ``rare_columns`` into entries ptr[i]:ptr[i + 1]."""
    p = 0
    for i in range(chunk.shape[0]):
        row = chunk[i]
        out = core[i]
        for c in range(core_columns.size):
            out[c] = row[core_columns[c]]
        ptr[i] = p
        for r in range(rare_columns.size):
            v = row[rare_columns[r]]
            if v != 0:
                positions[p] = r
                values[p] = v
                p += 1
    ptr[chunk.shape[0]] = p


@njit(cache=True, nogil=True, boundscheck=False)
def _add_rare_rows(ptr, positions, values, cr, rows, out):
    """out[r] += row rows[r]'s rare non-zeros times the centres' rare columns ``cr`` (d_rare, k)."""
    for r in range(rows.size):
        i = rows[r]
        o = out[r]
        for p in range(ptr[i], ptr[i + 1]):
            v = values[p]
            c = cr[positions[p]]
            for j in range(o.size):
                o[j] += v * c[j]


def available(model: screening.Centres) -> bool:
    """Whether the compiled pass applies: the model screens in float32 (data beyond FLOAT32_SAFE does not)."""
    return model.cs.dtype == np.float32


def bounded_pass(
    chunk, rows: screening.RowNorms, model: screening.Centres, state: screening.ModelState, tile_rows: int
):
    """screening.bounds_filter, assign_rows and settle in one: the state of the chunk under the new centres.

    ``tile_rows`` sizes the tiles of the matrix product that takes the rows needing most of their distances.
    Also returns how many distances the pass computed (brute force: rows x k), a measure of the filters.
    Returns no state (None, rows x k) when one matrix product over every row costs less (_mostly_dense): the
    caller makes it, with other models' where several go together.

    The returned state's sums are the old ones (the caller updates them from the labels).
    """
    moved, drifted = screening.drift_by(model, state)
    if state.drift.shape[0] == 1 and _mostly_dense(chunk, rows, model, state, drifted, moved):
        return None, state.labels.size * model.k
    labels, upper, nearest, new_lower, new_stamp, unsure, dense, n_scores = _filtered(
        _layout(chunk, rows.split_for(model.cs.dtype), model), rows.sq, rows.norm,
        state.labels, state.upper, state.nearest, drifted.lower, drifted.stamp, drifted.drift, moved, model,
    )  # fmt: skip
    new = screening.ModelState(model.c64, labels, upper, nearest, new_lower, new_stamp, drifted.drift, state.sums)
    if unsure.size:
        _overwrite(new, unsure, *screening.exact_rows(chunk, rows, unsure, model))
    if dense.size:
        _overwrite(new, dense, *screening.assign_rows(chunk, rows, model, tile_rows, dense, bounds_from_products))
    return new, n_scores + (unsure.size + dense.size) * model.k


def _filtered(layout, x_sq, x_norm, labels, upper, nearest, lower, stamp, drift, moved, model: screening.Centres):
    """The kernel over the given rows (their _layout): their new labels and bounds, and the rows it left to
    float64 (unsure) and to the matrix product (dense)."""
    starts, ends, cross, centre, round64 = _screen_terms(model)
    new_labels = np.empty_like(labels)  # the kernel writes every row's label, upper bound and nearest
    new_upper, new_nearest = np.empty_like(upper), np.empty_like(nearest)
    new_lower, new_stamp = lower.copy(), stamp.copy()
    unsure, dense = np.empty(labels.size, dtype=np.intp), np.empty(labels.size, dtype=np.intp)
    n_unsure, n_dense, n_scores = _kernel(
        *layout, x_sq, x_norm, labels, upper, nearest, lower, stamp, drift, moved,
        model.sqs, starts, ends, cross, centre, round64, screening.BOUND_SLACK, DENSE_SHARE,
        new_labels, new_upper, new_nearest, new_lower, new_stamp, unsure, dense,
    )  # fmt: skip
    return (
        new_labels, new_upper, new_nearest, new_lower, new_stamp, unsure[:n_unsure].copy(), dense[:n_dense].copy(),
        n_scores,
    )  # fmt: skip


def bounds_from_products(scores, chunk, rows: screening.RowNorms, idx, model: screening.Centres):
    """screening.bounds_from_products in one loop over each row's scores instead of a dozen numpy passes over the
    block: the same labels, upper bounds and rows left to float64; the lower bounds rounded down to float32 as
    this module rounds them (_float32_down). For 30,000 MNIST rows: 1.6-1.8 ms against numpy's 3.1-4.6 at k=10,
    2.8-3.3 against 6.5-11 at k=20, 7-10 against 23-29 at k=256 (a dense pass's product itself: 12-111 ms)."""
    if scores.dtype != np.float32:
        return screening.bounds_from_products(scores, chunk, rows, idx, model)
    starts, ends, cross, centre, round64 = _screen_terms(model)
    n = idx.size
    labels, upper = np.empty(n, dtype=np.int32), np.empty(n)
    lower, unsure = np.empty((n, starts.size), dtype=np.float32), np.empty(n, dtype=np.intp)
    n_unsure = _settle_scores(
        scores, model.sqs, starts, ends, rows.sq[idx], rows.norm[idx], cross, centre, round64,
        labels, upper, lower, unsure,
    )  # fmt: skip
    if n_unsure:
        unsure = unsure[:n_unsure]
        labels[unsure], upper[unsure], lower[unsure] = screening.exact_rows(chunk, rows, idx[unsure], model)
    return labels, upper, lower


def _screen_terms(model: screening.Centres):
    """What the compiled loops take of a model: its groups' first and end centres, and the terms of
    screening._error (the bound on a screened score's rounding)."""
    starts = screening.group_starts(model.k).astype(np.intp)
    ends = np.append(starts[1:], model.k).astype(np.intp)
    return starts, ends, *screening.error_terms(model, model.rounding)


@njit(cache=True, nogil=True, inline="always")
def _screen_error(x_norm, x_sq, cross, centre, round64):
    """screening._error for one row."""
    return cross * x_norm + centre + round64 * x_sq


@njit(cache=True, nogil=True, boundscheck=False)
def _settle_scores(products, sqs, starts, ends, x_sq, x_norm, cross, centre, round64, labels, upper, lower, unsure):
    """Each row's label (lowest index of the least score), bounds and doubt, from its products x.c; the scores
    -2 x.c + |c|^2 rounded as numpy rounds them. Returns how many rows it left to float64."""
    m, k = products.shape
    scores = np.empty(k, dtype=np.float32)
    lows = np.empty(starts.size, dtype=np.float32)
    n_unsure = 0
    grouped = starts.size < k
    for i in range(m):
        _row_scores(products[i], sqs, scores)
        if grouped:
            for g in range(starts.size):
                lows[g] = _least(scores, starts[g], ends[g])
            least = _least(lows, 0, starts.size)
        else:  # a group per centre
            least = _least(scores, 0, k)
        best = 0
        while scores[best] != least:  # the lowest index of the least score
            best += 1
        if grouped:
            g = 0
            while ends[g] <= best:
                g += 1
            lows[g] = min(_least(scores, starts[g], best), _least(scores, best + 1, ends[g]))  # without best
        else:
            lows[:] = scores
            lows[best] = np.inf
        error = _screen_error(x_norm[i], x_sq[i], cross, centre, round64)
        upper2 = x_sq[i] + np.float64(least) + error
        floor = x_sq[i] - error
        near = np.inf
        for g in range(starts.size):
            near = min(near, np.float64(lows[g]))
            lower[i, g] = _float32_down(np.sqrt(max(np.float64(lows[g]) + floor, 0.0)))
        if near + floor <= upper2:  # a near-tie within the screening error: float64 decides
            unsure[n_unsure] = i
            n_unsure += 1
        labels[i] = best
        upper[i] = np.sqrt(max(upper2, 0.0))
    return n_unsure


@njit(cache=True, nogil=True, inline="always")
def _screened(product, sq):
    """A screened score |c|^2 - 2 x.c from the product x.c, rounded once as numpy's scores *= -2; scores += sqs
    rounds it (-2 x.c is exact)."""
    return np.float32(-2.0) * product + sq


@njit(cache=True, nogil=True, boundscheck=False)
def _row_scores(products, sqs, scores):
    """_screened for every centre."""
    for j in range(scores.size):
        scores[j] = _screened(products[j], sqs[j])


@njit(fastmath={"nnan", "nsz"}, cache=True, nogil=True, boundscheck=False)
def _least(scores, start, stop):
    """min(scores[start:stop]), +inf when empty; vectorised (screened scores are never NaN)."""
    low = np.float32(np.inf)
    for j in range(start, stop):
        low = min(low, scores[j])
    return low


def _mostly_dense(chunk, rows, model, state, drifted, moved) -> bool:
    """Whether the filters would leave most rows to the matrix product, judged on every SAMPLE_EVERY-th row.

    Asked in the first pass after every row's distances were computed: from a random start the centres then
    move by more than the bounds can absorb, and the filters cost more than they save (MNIST, k=64: 75 ms for
    that pass over 30,000 rows, against 58 ms for a product over every row, whose fresh bounds also made the
    next pass 35 -> 21 ms).
    """
    if state.labels.size < SAMPLE_EVERY * 64:
        return False
    at = np.arange(0, state.labels.size, SAMPLE_EVERY)
    split = rows.split_for(model.cs.dtype)
    layout = _layout(chunk[at], None, model) if split is None else _layout(None, split.take(at), model)
    dense = _filtered(
        layout, rows.sq[at], rows.norm[at], state.labels[at], state.upper[at], state.nearest[at],
        drifted.lower[at], drifted.stamp[at], drifted.drift, moved, model,
    )[6]  # fmt: skip
    return dense.size > DENSE_PASS * at.size


def _overwrite(state: screening.ModelState, which, labels, upper, lower) -> None:
    """Rows ``which`` of the kernel's fresh state arrays, with all their distances computed in numpy."""
    state.labels[which], state.upper[which], state.lower[which] = labels, upper, lower
    state.nearest[which] = screening.row_min(lower)
    state.stamp[which] = state.drift.shape[0] - 1


@njit(fastmath=_DOT_MATH, cache=True, nogil=True, boundscheck=False)
def _scores(row, cs, start, stop, sqs, out):
    """Screened scores |c|^2 - 2 x.c of centres start..stop-1 into out, which holds the row's rare products
    (_rare_products): the dense columns' products are added to them, up to four centres per sweep of the row.

    The row is converted to float32 as it is read (the screening's rounding of x), so stored integers
    never take a float copy. Each score is rounded once, as numpy's (_screened).
    """
    d = row.size
    j = start
    while j + 4 <= stop:
        a0 = out[j]
        a1 = out[j + 1]
        a2 = out[j + 2]
        a3 = out[j + 3]
        for t in range(d):
            v = np.float32(row[t])
            a0 += v * cs[j, t]
            a1 += v * cs[j + 1, t]
            a2 += v * cs[j + 2, t]
            a3 += v * cs[j + 3, t]
        out[j] = _screened(a0, sqs[j])
        out[j + 1] = _screened(a1, sqs[j + 1])
        out[j + 2] = _screened(a2, sqs[j + 2])
        out[j + 3] = _screened(a3, sqs[j + 3])
        j += 4
    while j < stop:
        out[j] = _screened(out[j] + _dot(row, cs[j]), sqs[j])
        j += 1


@njit(fastmath=_DOT_MATH, cache=True, nogil=True, boundscheck=False)
def _dot(x, c):
    """x.c with x converted to float32 as it is read: one centre, a third faster than _scores' general loop."""
    a = np.float32(0.0)
    for t in range(x.size):
        a += np.float32(x[t]) * c[t]
    return a


@njit(fastmath=_DOT_MATH, cache=True, nogil=True, boundscheck=False)
def _scores_pair(x0, x1, cs, start, stop, sqs, s0, s1):
    """_scores of two rows at once (each converted to float32 as it is read): every centre value read serves both."""
    d = x0.size
    j = start
    while j + 4 <= stop:
        a0 = s0[j]
        a1 = s0[j + 1]
        a2 = s0[j + 2]
        a3 = s0[j + 3]
        b0 = s1[j]
        b1 = s1[j + 1]
        b2 = s1[j + 2]
        b3 = s1[j + 3]
        for t in range(d):
            u = np.float32(x0[t])
            v = np.float32(x1[t])
            a0 += u * cs[j, t]
            a1 += u * cs[j + 1, t]
            a2 += u * cs[j + 2, t]
            a3 += u * cs[j + 3, t]
            b0 += v * cs[j, t]
            b1 += v * cs[j + 1, t]
            b2 += v * cs[j + 2, t]
            b3 += v * cs[j + 3, t]
        s0[j] = _screened(a0, sqs[j])
        s0[j + 1] = _screened(a1, sqs[j + 1])
        s0[j + 2] = _screened(a2, sqs[j + 2])
        s0[j + 3] = _screened(a3, sqs[j + 3])
        s1[j] = _screened(b0, sqs[j])
        s1[j + 1] = _screened(b1, sqs[j + 1])
        s1[j + 2] = _screened(b2, sqs[j + 2])
        s1[j + 3] = _screened(b3, sqs[j + 3])
        j += 4
    while j < stop:
        a0 = s0[j]
        b0 = s1[j]
        for t in range(d):
            a0 += np.float32(x0[t]) * cs[j, t]
            b0 += np.float32(x1[t]) * cs[j, t]
        s0[j] = _screened(a0, sqs[j])
        s1[j] = _screened(b0, sqs[j])
        j += 1


@njit(cache=True, nogil=True, boundscheck=False)
def _rare_products(ptr, positions, values, cr, i, out):
    """out = row i's rare non-zeros times every centre's rare columns: where its products start (zeros without)."""
    out[:] = 0.0
    for p in range(ptr[i], ptr[i + 1]):
        v = values[p]
        c = cr[positions[p]]
        for j in range(out.size):
            out[j] += v * c[j]


@njit(cache=True, nogil=True, boundscheck=False)
def _score(core, cc, ptr, positions, values, cr, i, sqs, j):
    """Row i's screened score against centre j alone (its own, before the filters): the dense columns' dot
    completed by its rare non-zeros, then _screened."""
    a = _dot(core[i], cc[j])
    for p in range(ptr[i], ptr[i + 1]):
        a += values[p] * cr[positions[p], j]
    return _screened(a, sqs[j])


@njit(cache=True, nogil=True, boundscheck=False)
def score_row(core, cc, ptr, positions, values, cr, i, sqs, start, stop, out):
    """Screened scores of row i against centres start..stop-1, from a _layout (what the local filter computes)."""
    _rare_products(ptr, positions, values, cr, i, out)
    _scores(core[i], cc, start, stop, sqs, out)


@njit(cache=True, nogil=True)
def _float32_down(v):
    """A float32 no larger than v: moved one float32 ulp (relative) towards -inf, then rounded to nearest."""
    w = v - abs(v) * 2.0**-23
    down = np.float32(w if w < _FLOAT32_MAX else _FLOAT32_MAX)  # +inf (no other centre in the group) gives NaN
    if np.float64(down) > v:  # only among float32's subnormals, too coarse for the nudge
        down = np.nextafter(down, np.float32(-np.inf))
    return down


@njit(cache=True, nogil=True, boundscheck=False)
def _kernel(
    core, cc, ptr, positions, values, cr, x_sq, x_norm, labels, upper, nearest, lower, stamp, drift, moved,
    sqs, starts, ends, cross, centre, round64, bound_slack,
    dense_share, out_labels, out_upper, out_nearest, out_lower, out_stamp, unsure, dense,
):  # fmt: skip
    n = core.shape[0]
    k = cc.shape[0]
    n_groups = starts.size
    now = drift.shape[0] - 1
    grow = 1.0 + bound_slack
    shrink = 1.0 - bound_slack
    largest = 0.0
    for j in range(k):
        largest = max(largest, moved[j])
    since = np.empty((now + 1, n_groups))  # how far the group bounds of a row stamped at pass s have moved
    for s in range(now + 1):
        for g in range(n_groups):
            since[s, g] = (drift[now, g] - drift[s, g]) * grow + (now - s + 1) * 2.0**-52 * drift[now, g]
    group_of = np.empty(k, dtype=np.intp)
    for g in range(n_groups):
        group_of[starts[g] : ends[g]] = g
    # The batch of rows left to the local filter: their indices, scores, group bounds, upper bounds and errors,
    # and per group the batch slots that reach it.
    batch = np.empty(BATCH_ROWS, dtype=np.intp)
    scores = np.empty((BATCH_ROWS, k), dtype=np.float32)
    bounds = np.empty((BATCH_ROWS, n_groups))
    ups = np.empty(BATCH_ROWS)
    errors = np.empty(BATCH_ROWS)
    mine = np.empty(BATCH_ROWS, dtype=np.float32)  # the score of each row's own centre
    members = np.empty((n_groups, BATCH_ROWS), dtype=np.intp)
    n_members = np.zeros(n_groups, dtype=np.intp)
    n_batch = 0
    n_unsure = 0
    n_dense = 0
    n_scores = 0  # screened distances computed in the loop
    for i in range(n):
        own = labels[i]
        up = (upper[i] + moved[own]) * grow
        near = (nearest[i] - largest) * shrink
        out_labels[i] = own
        if up < near:  # the global filter
            out_upper[i] = up
            out_nearest[i] = near
            continue
        s = stamp[i]
        b = bounds[n_batch]
        near = np.inf
        for g in range(n_groups):  # screening.ModelState.group_bounds, for one row
            b[g] = (np.float64(lower[i, g]) - since[s, g]) * shrink
            near = min(near, b[g])
        if up < near:
            out_upper[i] = up
            out_nearest[i] = near
            continue
        error = _screen_error(x_norm[i], x_sq[i], cross, centre, round64)
        scores[n_batch, own] = _score(core, cc, ptr, positions, values, cr, i, sqs, own)
        n_scores += 1
        up = np.sqrt(max(x_sq[i] + np.float64(scores[n_batch, own]) + error, 0.0))
        if up < near:  # the upper bound, tightened by the one distance to the own centre
            out_upper[i] = up
            out_nearest[i] = near
            continue
        # The local filter: only groups whose lower bound the row's upper bound reaches.
        wanted = 0
        for g in range(n_groups):
            if b[g] <= up:
                wanted += ends[g] - starts[g]
        if wanted > dense_share * k:  # most distances needed: one matrix product does them faster
            dense[n_dense] = i
            n_dense += 1
            continue
        n_scores += wanted
        for g in range(n_groups):
            if b[g] <= up:
                members[g, n_members[g]] = n_batch
                n_members[g] += 1
        batch[n_batch] = i
        ups[n_batch] = up
        errors[n_batch] = error
        mine[n_batch] = scores[n_batch, own]
        _rare_products(ptr, positions, values, cr, i, scores[n_batch])  # once, for every group it reaches
        n_batch += 1
        if n_batch == BATCH_ROWS:
            n_unsure = _local_filter(
                core, cc, batch, n_batch, scores, mine, bounds, ups, errors, members, n_members, x_sq, labels, sqs,
                starts, ends, group_of, now, out_labels, out_upper, out_nearest, out_lower, out_stamp, unsure, n_unsure,
            )  # fmt: skip
            n_batch = 0
    n_unsure = _local_filter(
        core, cc, batch, n_batch, scores, mine, bounds, ups, errors, members, n_members, x_sq, labels, sqs,
        starts, ends, group_of, now, out_labels, out_upper, out_nearest, out_lower, out_stamp, unsure, n_unsure,
    )  # fmt: skip
    return n_unsure, n_dense, n_scores


@njit(cache=True, nogil=True, boundscheck=False)
def _local_filter(
    core, cc, batch, n_batch, scores, mine, bounds, ups, errors, members, n_members, x_sq, labels, sqs,
    starts, ends, group_of, now, out_labels, out_upper, out_nearest, out_lower, out_stamp, unsure, n_unsure,
):  # fmt: skip
    """The batch's scores against the groups each row reaches, group by group, then each row's new label and bounds.

    Group by group, the group's centres stay in the core's fastest cache while two rows at a time are scored
    against them (_scores_pair): about twice the speed of scoring each row alone, against centres read from
    further away. Each row's scores start from its rare products (made once for all its groups). Returns the
    new count of rows left to float64.
    """
    n_groups = starts.size
    for g in range(n_groups):
        m = n_members[g]
        slots = members[g]
        for p in range(0, m - 1, 2):
            a, c = slots[p], slots[p + 1]
            _scores_pair(core[batch[a]], core[batch[c]], cc, starts[g], ends[g], sqs, scores[a], scores[c])
        if m % 2:
            a = slots[m - 1]
            _scores(core[batch[a]], cc, starts[g], ends[g], sqs, scores[a])
        n_members[g] = 0
    for slot in range(n_batch):
        i = batch[slot]
        own = labels[i]
        up = ups[slot]
        error = errors[slot]
        sc = scores[slot]
        b = bounds[slot]
        if b[group_of[own]] > up:  # the own centre's group was not scored again: its score from before
            sc[own] = mine[slot]
        best = own
        for g in range(n_groups):
            if b[g] <= up:
                for j in range(starts[g], ends[g]):
                    if sc[j] < sc[best] or (sc[j] == sc[best] and j < best):
                        best = j
        floor = x_sq[i] - error
        upper2 = x_sq[i] + np.float64(sc[best]) + error
        doubt = False
        for g in range(n_groups):
            if b[g] > up:  # groups not reached keep today's bound
                out_lower[i, g] = _float32_down(b[g])
                continue
            low = np.inf
            for j in range(starts[g], ends[g]):
                if j != best and sc[j] < low:
                    low = np.float64(sc[j])
            doubt |= low + floor <= upper2
            out_lower[i, g] = _float32_down(np.sqrt(max(low + floor, 0.0)))
        g = group_of[own]
        if best != own and b[g] > up:  # the old centre joins the others of its (unreached) group
            own2 = np.float64(sc[own]) + floor
            doubt |= own2 <= upper2
            out_lower[i, g] = min(out_lower[i, g], _float32_down(np.sqrt(max(own2, 0.0))))
        near = np.inf
        for g in range(n_groups):
            near = min(near, np.float64(out_lower[i, g]))
        if doubt:  # near-tie within the screening error: screening.exact_rows decides in float64
            unsure[n_unsure] = i
            n_unsure += 1
        out_labels[i] = best
        out_upper[i] = np.sqrt(max(upper2, 0.0))
        out_nearest[i] = near
        out_stamp[i] = now
    return n_unsure


@njit(cache=True, nogil=True, boundscheck=False)
def add_rows(chunk, labels, sums):
    """sums[labels[i]] += chunk[i] for every row, in row order, in the accumulators' type (kernels.cluster_sums)."""
    for i in range(chunk.shape[0]):
        total = sums[labels[i]]
        row = chunk[i]
        for t in range(row.size):
            total[t] += row[t]


@njit(cache=True, nogil=True, boundscheck=False)
def move_rows(chunk, rows, old_labels, new_labels, sums):
    """sums[new_labels[i]] += chunk[i] and sums[old_labels[i]] -= chunk[i] for each i in ``rows``, in place
    (integer sums: exact in any order)."""
    for i in rows:
        row = chunk[i]
        into = sums[new_labels[i]]
        out = sums[old_labels[i]]
        for t in range(row.size):
            into[t] += row[t]
            out[t] -= row[t]


@njit(cache=True, nogil=True, boundscheck=False)
def integer_squares(chunk, out):
    """out[i] = |row i|^2, exactly (int64); returns the largest absolute value in the chunk."""
    largest = 0
    for i in range(chunk.shape[0]):
        row = chunk[i]
        total = 0
        for t in range(row.size):
            v = np.int64(row[t])
            total += v * v
            largest = max(largest, abs(v))
        out[i] = total
    return largest
