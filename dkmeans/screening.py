"""Exact nearest centres at float32 speed, and Yinyang bounds that skip rows whose centre cannot change.

A float32 matrix product ranks the centres for every row. Its worst-case
rounding error is known (it grows with the number of features and the norms
of the row and the centres), so a row whose two nearest centres are further
apart than twice that error has its label settled; only the few rows closer
than that are recomputed in float64. The labels are therefore those of the
float64 computation, at the cost of the float32 one.

The same error bounds give rigorous Yinyang bounds (an upper bound on the
distance to the row's own centre, a lower bound per group of other centres).
When the centres move, the bounds move by at most the centres' shifts, and a
row whose upper bound stays below its lower bounds keeps its centre without
computing any distance. Pure numpy (dkmeans.compiled has the bounded pass
and bounds_from_products compiled): nothing here knows about Dask.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

ROUNDING = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float64): 2.0**-53}
# Above this magnitude a float32 product could overflow: such data is screened in float64.
FLOAT32_SAFE = 1e15
# Relative slack added to bounds and shifts for their own float64 rounding.
BOUND_SLACK = 1e-9
# Models with fewer centres recompute a doubtful row outright rather than first tightening its upper bound.
TIGHTEN_MIN_K = 128
# Passes of group shifts a chunk's state remembers before its bounds are brought up to date (_rebased).
DRIFT_HISTORY = 64
# Lower bounds kept per row: one per centre up to PER_CENTRE_MAX centres, else one per group of neighbouring
# indices, at most GROUPS groups of GROUP_SIZE_MIN centres or more (see n_groups).
GROUPS = 32
PER_CENTRE_MAX = 16
GROUP_SIZE_MIN = 4


@dataclass
class RowNorms:
    """What a chunk's rows need, computed once per chunk (and kept on its worker between passes)."""

    sq: np.ndarray  # float64 squared norms
    norm: np.ndarray  # float64 norms
    total: float  # their sum, in a fixed order
    screen: np.dtype  # the dtype the distances are screened in
    integral: bool  # whole numbers small enough that int64 sums of them are exact
    columns: object = None  # the rows for the screening products (dkmeans.compiled.ColumnSplit), where made

    def split_for(self, dtype: np.dtype):
        """The rows split for products in ``dtype``, or None: a split serves only its own dtype (ColumnSplit.serves)."""
        return self.columns if self.columns is not None and self.columns.serves(dtype) else None


@dataclass
class Centres:
    """One model's centres, prepared once per pass for the screening product."""

    c64: np.ndarray  # (k, d) float64
    sq64: np.ndarray  # (k,) float64 squared norms
    cs: np.ndarray  # (k, d) in the screening dtype
    cst: np.ndarray  # (d, k) contiguous, for x @ cst
    sqs: np.ndarray  # (k,) squared norms in the screening dtype
    cmax: float  # largest centre norm
    rounding: float  # unit roundoff of the screening dtype (error_terms)

    @property
    def k(self) -> int:
        return self.c64.shape[0]


@dataclass
class ModelState:
    """A model's assignment of a chunk: what the next pass starts from (kept on the chunk's worker).

    The group bounds are refreshed only for rows whose distances are
    recomputed: ``lower[i]`` holds at pass ``stamp[i]``, and ``drift[t]`` is
    the sum of the groups' largest shifts over passes before t, so a bound of
    today is ``lower[i] - (drift[now] - drift[stamp[i]])`` (see group_bounds).
    ``nearest`` is one lower bound for all other centres, kept current every
    pass at O(1) per row: most rows are settled by it alone.
    """

    centers: np.ndarray  # the centres the labels and bounds refer to
    labels: np.ndarray  # int32
    upper: np.ndarray  # float64, >= distance to the own centre
    nearest: np.ndarray  # float64, <= distance to every other centre
    lower: np.ndarray  # (n, groups) float32: <= distance to every other centre of the group, at pass stamp
    stamp: np.ndarray  # int32 pass of each row's group bounds
    drift: np.ndarray  # (passes + 1, groups) float64 cumulative largest group shifts
    sums: np.ndarray | None  # exact int64 per-cluster sums of the labels (integral rows only)

    def group_bounds(self, which=slice(None)) -> np.ndarray:
        """Today's per-group lower bounds of rows ``which`` (float64, rounded down)."""
        now = self.drift.shape[0] - 1
        stamp = self.stamp[which]
        moved = (self.drift[now] - self.drift[stamp]) * (1 + BOUND_SLACK)
        # The cumulative sums' own rounding: at most one ulp of the largest total per pass summed.
        moved += ((now - stamp + 1) * 2.0**-52)[:, None] * self.drift[now]
        bounds = self.lower[which].astype(np.float64) - moved
        bounds *= 1 - BOUND_SLACK  # the subtraction's rounding (a negative bound settles nothing either way)
        return bounds


def centres_digest(centers: np.ndarray) -> bytes:
    """16 bytes that tell centre sets apart (which centres a state or labels refer to), in place of the centres."""
    return hashlib.blake2b(np.ascontiguousarray(centers, dtype=np.float64).tobytes(), digest_size=16).digest()


def row_norms(chunk: np.ndarray, tile_rows: int, check) -> RowNorms:
    """Squared norms in float64 (exact for integers), tile by tile; ``check(x, sq, start)`` sees each float tile."""
    n = chunk.shape[0]
    if chunk.dtype.kind in "ui" and chunk.dtype.itemsize <= 2 and n:
        return _small_integer_norms(chunk, tile_rows)
    sq = np.empty(n, dtype=np.float64)
    floating = chunk.dtype.kind == "f"
    integral = not floating
    largest = 0.0
    for start in range(0, n, tile_rows):
        x = chunk[start : start + tile_rows].astype(np.float64)
        sq[start : start + x.shape[0]] = np.einsum("ij,ij->i", x, x)
        if floating:
            check(x, sq[start : start + x.shape[0]], start)
            integral = integral and bool(np.all(np.rint(x) == x))
        if x.size:
            largest = max(largest, float(np.abs(x).max()))
    # Exact int64 sums need whole numbers whose total cannot pass 2**53 (where float64 stops being exact).
    integral = integral and largest * max(n, 1) < 2**52
    screen = np.dtype(np.float32) if largest <= FLOAT32_SAFE else np.dtype(np.float64)
    return RowNorms(sq, np.sqrt(sq), float(sq.sum()), screen, integral)


def _small_integer_norms(chunk: np.ndarray, tile_rows: int) -> RowNorms:
    """row_norms of 8- and 16-bit integers (MNIST's uint8) in integer arithmetic: exact, and 4-5x faster."""
    n, d = chunk.shape
    largest = max(abs(int(chunk.min())), int(chunk.max()))
    accumulator = np.int32 if d * largest**2 < 2**31 else np.int64
    sq = np.empty(n, dtype=np.float64)
    for start in range(0, n, tile_rows):
        x = chunk[start : start + tile_rows]
        sq[start : start + x.shape[0]] = np.einsum("ij,ij->i", x, x, dtype=accumulator)
    return integer_norms(sq, largest)


def integer_norms(sq: np.ndarray, largest: int) -> RowNorms:
    """RowNorms of whole-number rows from their exact squared norms and their largest absolute value."""
    return RowNorms(sq, np.sqrt(sq), float(sq.sum()), np.dtype(np.float32), largest * sq.size < 2**52)


def prepare(centers: np.ndarray, screen: np.dtype) -> Centres:
    c64 = np.ascontiguousarray(centers, dtype=np.float64)
    sq64 = np.einsum("ij,ij->i", c64, c64)
    cs = c64.astype(screen)
    cmax = float(np.sqrt(sq64.max())) if sq64.size else 0.0
    if screen == np.float32 and cmax > FLOAT32_SAFE:
        return prepare(centers, np.dtype(np.float64))
    screen = np.dtype(screen)
    return Centres(c64, sq64, cs, np.ascontiguousarray(cs.T), sq64.astype(screen), cmax, ROUNDING[screen])


def _error(rows: RowNorms, idx, model: Centres, rounding: float) -> np.ndarray:
    """Bound on the error of a squared distance computed with unit roundoff ``rounding``, for the given rows."""
    cross, centre, round64 = error_terms(model, rounding)
    return cross * rows.norm[idx] + centre + round64 * rows.sq[idx]


def error_terms(model: Centres, rounding: float):
    """The terms of _error's bound, cross |x| + centre + round64 |x|^2; dkmeans.compiled evaluates it row by row.

    With u = ``rounding`` and c any centre (|c| <= cmax), a score -2 x.c + |c|^2 computed in that precision
    from rounded x and c (any summation order: Higham's gamma_(d+2) for the dot product), |c|^2 rounded from
    float64, and one rounding of the sum, is off by at most (2d + 6) u |x||c| + 2u |c|^2 + O(u^2); the
    margins below cover the O(u^2) terms, the float64 squared norms (d ulps) and the float64 sum
    |x|^2 + score + error (round64, also covering |x|^2's own rounding). A looser cmax (cmax + 2|x|) scale,
    used before, left three to four times as many rows to float64 on MNIST (k=256).
    """
    d = model.c64.shape[1]
    cross = (2 * d + 16) * rounding * model.cmax
    centre = (4 * rounding + (d + 2) * 2.0**-53) * model.cmax**2
    return cross, centre, (d + 4) * 2.0**-53


def n_groups(k: int) -> int:
    """Lower bounds kept per row: one per centre up to PER_CENTRE_MAX; beyond, groups of neighbouring indices,
    as many as GROUPS allows with GROUP_SIZE_MIN centres or more each.

    A group of one or two centres gives the tightest bounds, but the compiled local filter scores a group's
    centres four at a time: 21 passes over 30,000 MNIST rows from a random start, one thread, took at k=20
    259 ms in 5 groups against 285 in 20, at k=40 360 (10 groups) against 393 (20), at k=64 457 (16)
    against 541 (32), at k=10 216 (10) against 221 (5), at k=128 695 (32) against 672 (16), and at k=256
    1155 (32) against 1260 (16). Equal groups (a divisor of k near the target) let strided elementwise
    minima take the group minima, several times faster than np.minimum.reduceat.
    """
    if k <= PER_CENTRE_MAX:
        return k
    target = min(GROUPS, k // GROUP_SIZE_MIN)
    even = [g for g in range(max(1, target // 2), target + 1) if k % g == 0]
    return max(even) if even else target


def group_starts(k: int) -> np.ndarray:
    """First centre of each group."""
    return np.linspace(0, k, n_groups(k) + 1).astype(np.intp)[:-1]


def group_min(values: np.ndarray, k: int) -> np.ndarray:
    """Minimum of each group of columns of a (rows, k) array."""
    g = n_groups(k)
    if k % g:
        return np.minimum.reduceat(values, group_starts(k), axis=1)
    size = k // g  # column j*size + r is member r of group j: size - 1 elementwise minima over strided views
    out = values[:, 0::size].copy()
    for r in range(1, size):
        np.minimum(out, values[:, r::size], out=out)
    return out


def row_min(values: np.ndarray) -> np.ndarray:
    """Minimum of each row; column by column for narrow arrays, several times faster than min(axis=1) there."""
    if values.shape[1] > GROUPS:
        return values.min(axis=1)
    out = values[:, 0].copy()
    for j in range(1, values.shape[1]):
        np.minimum(out, values[:, j], out=out)
    return out


def bounds_from_products(scores: np.ndarray, chunk: np.ndarray, rows: RowNorms, idx: np.ndarray, model: Centres):
    """Labels and bounds of the chunk's rows ``idx`` from their screened products ``x @ model.cst`` (overwritten).

    The label is the argmin of the float64 squared distances (clipped at zero,
    lowest index on ties), computed in float64 only where screening cannot
    settle it. Returns labels (int32), ``upper`` (float64, >= the distance to
    the own centre) and ``lower`` (float32 rounded down, ``lower[:, g]`` <= the
    distance to every other centre of group g). The error bound holds for any
    summation order, so a product against many models' centres stacked gives
    the same labels.
    """
    scores *= -2
    scores += model.sqs
    labels = np.argmin(scores, axis=1)
    at = np.arange(labels.size)
    best = scores[at, labels].astype(np.float64)
    scores[at, labels] = np.inf
    others = group_min(scores, model.k)
    x_sq = rows.sq[idx]
    error = _error(rows, idx, model, model.rounding)
    upper2 = x_sq + best + error
    floor = x_sq - error
    # min over groups commutes with adding the same float64 floor, so this is min(lower2) <= upper2, per row
    unsure = np.flatnonzero(row_min(others).astype(np.float64) + floor <= upper2)
    lower2 = others.astype(np.float64)
    lower2 += floor[:, None]
    lower = float32_down(np.sqrt(np.maximum(lower2, 0, out=lower2), out=lower2))
    labels, upper = labels.astype(np.int32), np.sqrt(np.maximum(upper2, 0))
    if unsure.size:
        labels[unsure], upper[unsure], lower[unsure] = exact_rows(chunk, rows, idx[unsure], model)
    return labels, upper, lower


def exact_rows(chunk: np.ndarray, rows: RowNorms, idx: np.ndarray, model: Centres):
    """bounds_from_products' triple for rows ``idx`` from their float64 distances (the rows screening left open)."""
    d2 = _exact_sq_distances(chunk[idx], rows.sq[idx], model)
    labels = np.argmin(d2, axis=1)
    at = np.arange(labels.size)
    error = _error(rows, idx, model, ROUNDING[np.dtype(np.float64)])
    upper2 = d2[at, labels] + error
    d2[at, labels] = np.inf
    lower2 = group_min(d2, model.k) - error[:, None]
    lower = float32_down(np.sqrt(np.maximum(lower2, 0, out=lower2), out=lower2))
    return labels.astype(np.int32), np.sqrt(np.maximum(upper2, 0)), lower


def _exact_sq_distances(x: np.ndarray, x_sq: np.ndarray, model: Centres) -> np.ndarray:
    """The float64 reference: |x|^2 - 2 x.c + |c|^2, clipped at zero."""
    d2 = x.astype(np.float64) @ model.c64.T
    d2 *= -2.0
    d2 += x_sq[:, None]
    d2 += model.sq64[None, :]
    np.maximum(d2, 0.0, out=d2)
    return d2


def assign_rows(chunk: np.ndarray, rows: RowNorms, model: Centres, tile_rows: int, which=None, settle=None):
    """Labels and bounds (bounds_from_products) of the chunk's rows ``which`` (all when None)."""
    return assign_rows_many(chunk, rows, [model], [which], lambda width: tile_rows, settle)[0]


# A model joins the stacked product when it needs at least this share of the rows being computed.
STACK_SHARE = 0.3
# Screened products held at once: 2 MiB of float32. Their post-processing runs per model over a whole
# block, so its Python overhead is paid per block rather than per tile of the matrix product.
BLOCK_ELEMENTS = 2**19
# OpenBLAS's direct sgemm (its AVX-512 builds) multiplies without first copying the operands into its
# packed layout when rows x features x centres <= 100**3: tiles that small cost less for few centres. One
# 6000-row MNIST chunk, one thread: k=5 1.14 against 2.18 ms in the usual 334-row tiles, k=10 2.07 against
# 2.66 (127 rows), k=20 2.84 against 3.29, k=32 3.96 against 4.15; a row more than that limit and the
# tile costs more than before. No gain from k=48, so a tile never drops below DIRECT_ROWS_MIN rows.
DIRECT_PRODUCT = 100**3
DIRECT_ROWS_MIN = 32


def assign_rows_many(chunk: np.ndarray, rows: RowNorms, models: list[Centres], whiches: list, tile_rows, settle=None):
    """assign_rows for several models, each over its own rows (None: all), sharing the matrix products.

    Models that need at least STACK_SHARE of the rows any of them needs get
    one product against all their centres stacked: each tile is converted
    once and the product runs at the speed of a large k (computing some rows
    a model does not need costs less than converting them again for it). The
    others go alone.
    ``tile_rows(width)`` sizes the tiles. ``settle`` turns a block of products into labels and bounds
    (bounds_from_products, or dkmeans.compiled's, which gives the same labels). Returns assign_rows' triple
    per model.
    """
    settle = settle or bounds_from_products
    n = chunk.shape[0]
    wanted = [np.arange(n) if w is None else np.asarray(w, dtype=np.intp) for w in whiches]
    needed = np.zeros(n, dtype=bool)
    for w in wanted:
        needed[w] = True
    union = np.flatnonzero(needed)
    dense = [m for m, w in enumerate(wanted) if w.size and w.size >= STACK_SHARE * union.size]
    stacked = [m for m in dense if models[m].cs.dtype == models[dense[0]].cs.dtype]
    groups = [[m] for m in range(len(models)) if len(stacked) < 2 or m not in stacked]
    if len(stacked) > 1:
        groups.append(stacked)
    out = [None] * len(models)
    for group in groups:
        over = union if len(group) > 1 else wanted[group[0]]
        done = _assign_together(
            chunk, rows, [models[m] for m in group], [wanted[m] for m in group], over, tile_rows, settle
        )
        for m, result in zip(group, done):
            out[m] = result
    return out


def _assign_together(chunk, rows, models, wanted, over, tile_rows, settle):
    """One stacked product over the rows ``over``, block by block; each model keeps its ``wanted`` rows."""
    cst = models[0].cst if len(models) == 1 else np.hstack([model.cst for model in models])
    edges = np.cumsum([0] + [model.k for model in models])
    out = [
        (np.empty(w.size, dtype=np.int32), np.empty(w.size), np.empty((w.size, n_groups(model.k)), dtype=np.float32))
        for model, w in zip(models, wanted)
    ]
    member = np.zeros((len(models), chunk.shape[0]), dtype=bool)
    for j, w in enumerate(wanted):
        member[j, w] = True
    filled = [0] * len(models)
    contiguous = over.size and over[-1] - over[0] + 1 == over.size  # read tiles as slices, not gathers
    split = rows.split_for(cst.dtype)
    step = _product_rows(tile_rows(max(chunk.shape[1], cst.shape[1])), cst, split is None)
    block = max(step, BLOCK_ELEMENTS // max(1, cst.shape[1]))
    centres = None if split is None else split.centres(cst)
    for start in range(0, over.size, block):
        idx = over[start : start + block]
        products = np.empty((idx.size, cst.shape[1]), dtype=cst.dtype)
        for t in range(0, idx.size, step):
            tile = slice(idx[t], idx[t] + min(step, idx.size - t)) if contiguous else idx[t : t + step]
            if split is None:
                np.matmul(chunk[tile].astype(cst.dtype, copy=False), cst, out=products[t : t + step])
            else:  # the same products, the rare columns' few non-zeros added from their lists
                split.products(tile, centres, products[t : t + step])
        for j, model in enumerate(models):
            mine = member[j, idx]
            columns = slice(edges[j], edges[j + 1])
            if mine.all():  # a view: the model's columns are its own to overwrite
                scores, sel = products[:, columns], idx
            else:
                scores, sel = products[mine, columns], idx[mine]
            got = settle(scores, chunk, rows, sel, model)
            part = slice(filled[j], filled[j] + sel.size)
            for target, value in zip(out[j], got):
                target[part] = value
            filled[j] = part.stop
    return out


def _product_rows(step: int, cst: np.ndarray, plain: bool) -> int:
    """Rows per tile of a plain float32 product (np.matmul over every column): DIRECT_PRODUCT's size where
    that leaves at least DIRECT_ROWS_MIN rows."""
    if not plain or cst.dtype != np.float32:
        return step
    direct = DIRECT_PRODUCT // max(1, cst.shape[0] * cst.shape[1])
    return min(step, direct) if direct >= DIRECT_ROWS_MIN else step


def float32_down(x: np.ndarray) -> np.ndarray:
    """float64 lower bounds in float32 (half the worker memory), rounded down: still lower bounds.

    np.nextafter(float32(x), -inf) bit for bit, on the bit patterns: twice as fast (1M bounds: 2.5 -> 1.2 ms).
    """
    f = np.array(x, dtype=np.float32)
    f[f == 0] = np.float32(-0.0)  # +0 steps to the smallest negative float32, as -0 does
    bits = f.view(np.int32)
    # one step down for positive patterns (+inf and NaN among them), one step away from zero for negative ones
    step = np.where(bits < 0, np.int32(1), np.int32(-1))
    step[f == -np.inf] = 0
    bits += step
    return f


def shifts(new: Centres, old_centers: np.ndarray) -> np.ndarray:
    """How far each centre moved, rounded up."""
    moved = np.sqrt(((new.c64 - old_centers) ** 2).sum(axis=1))
    return moved * (1 + BOUND_SLACK)


def fresh_state(centers, labels, upper, lower) -> ModelState:
    """The state of rows whose every distance was just computed (pass 0 of their bounds; sums not yet known)."""
    nearest = row_min(lower).astype(np.float64)
    stamp = np.zeros(labels.size, dtype=np.int32)
    return ModelState(centers, labels, upper, nearest, lower, stamp, np.zeros((1, lower.shape[1])), None)


def bounds_filter(chunk: np.ndarray, rows: RowNorms, model: Centres, state: ModelState, tile_rows: int):
    """First half of a bounded pass: move the bounds by the shifts and find the rows they cannot settle.

    The bounds are Yinyang's (Ding et al., 2015), checked cheapest first: one
    lower bound for all other centres (shrinks by the largest shift), then
    for rows it cannot settle the per-group bounds (shrink by their group's
    largest shift), then (for large k) the one distance to the own centre
    (tightening the upper bound, which grows by the own centre's shift). Returns the moved
    state, not yet updated for the returned rows, which need all k distances
    (one matrix product; Yinyang's per-group local filter would cost a gather
    per group, more than the product saves in numpy). This numpy path serves
    data screened in float64, and processes that do not use compiled kernels
    (kernels.use_compiled); the others take dkmeans.compiled, which compiles
    the local filter.
    """
    labels = state.labels
    moved, drifted = drift_by(model, state)
    upper = (state.upper + moved[labels]) * (1 + BOUND_SLACK)
    nearest = (state.nearest - moved.max()) * (1 - BOUND_SLACK)
    moved_state = ModelState(model.c64, labels, upper, nearest, drifted.lower, drifted.stamp, drifted.drift, state.sums)
    loose = np.flatnonzero(~(upper < nearest))
    if loose.size:
        nearest[loose] = row_min(moved_state.group_bounds(loose))
        loose = loose[~(upper[loose] < nearest[loose])]
    # Tighten the upper bound with the one distance to the own centre (screened, with its error): one dot
    # product per row against k for recomputing the row, and the product would give fresh bounds. Measured on
    # MNIST, it pays from about k = 128, and only after the first passes, when most rows are settled.
    if model.k < TIGHTEN_MIN_K or loose.size > 0.9 * labels.size:
        return moved_state, loose
    for start in range(0, loose.size, tile_rows):
        idx = loose[start : start + tile_rows]
        own = labels[idx]
        xs = chunk[idx].astype(model.cs.dtype, copy=False)
        dots = np.einsum("ij,ij->i", xs, model.cs[own]).astype(np.float64)
        d2 = rows.sq[idx] - 2 * dots + model.sq64[own] + _error(rows, idx, model, model.rounding)
        upper[idx] = np.sqrt(np.maximum(d2, 0))
    return moved_state, loose[~(upper[loose] < nearest[loose])]


def drift_by(model: Centres, state: ModelState):
    """How far each centre moved since ``state``, and the state with this pass's group shifts in its drift.

    The upper bounds and ``nearest`` are left as they were; the drift history is rebased when full.
    """
    moved = shifts(model, state.centers)
    group_shift = np.maximum.reduceat(moved, group_starts(model.k)) * (1 + BOUND_SLACK)
    drift = np.vstack([state.drift, state.drift[-1] + group_shift])
    drifted = ModelState(state.centers, state.labels, state.upper, state.nearest, state.lower, state.stamp, drift, None)
    return moved, _rebased(drifted) if drift.shape[0] > DRIFT_HISTORY else drifted


def _rebased(state: ModelState) -> ModelState:
    """The same bounds, every row's brought up to date: the drift history starts again from one row.

    The history is the same for every chunk of a model, and each chunk keeps
    its own: without a limit, a long fit over many chunks would fill the
    workers' state budget with it. One O(n x groups) pass every DRIFT_HISTORY
    passes keeps it small.
    """
    lower = float32_down(state.group_bounds())
    stamp = np.zeros_like(state.stamp)
    drift = np.zeros((1, state.drift.shape[1]))
    return ModelState(state.centers, state.labels, state.upper, state.nearest, lower, stamp, drift, state.sums)


def settle(state: ModelState, which: np.ndarray, labels, upper, lower) -> ModelState:
    """Second half of a bounded pass: the rows ``which`` with all their distances computed (assign_rows).

    ``state`` is bounds_filter's moved state; its fresh bound arrays are updated in place.
    """
    if not which.size:
        return state
    now = state.drift.shape[0] - 1
    new_labels, new_upper, new_lower = state.labels.copy(), state.upper, state.lower.copy()
    new_stamp, nearest = state.stamp.copy(), state.nearest
    new_labels[which], new_upper[which] = labels, upper
    new_lower[which], new_stamp[which] = lower, now
    nearest[which] = row_min(lower)
    return ModelState(state.centers, new_labels, new_upper, nearest, new_lower, new_stamp, state.drift, state.sums)
