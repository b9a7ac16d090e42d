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
computing any distance. Pure numpy: nothing here knows about Dask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROUNDING = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float64): 2.0**-53}
# Above this magnitude a float32 product could overflow: such data is screened in float64.
FLOAT32_SAFE = 1e15
# Relative slack added to bounds and shifts for their own float64 rounding.
BOUND_SLACK = 1e-9
# Lower bounds kept per row: one per centre for small k, else one per group of neighbouring indices.
GROUPS = 32


@dataclass
class RowNorms:
    """What a chunk's rows need, computed once per chunk (and kept on its worker between passes)."""

    sq: np.ndarray  # float64 squared norms
    norm: np.ndarray  # float64 norms
    total: float  # their sum, in a fixed order
    screen: np.dtype  # the dtype the distances are screened in
    integral: bool  # whole numbers small enough that int64 sums of them are exact


@dataclass
class Centres:
    """One model's centres, prepared once per pass for the screening product."""

    c64: np.ndarray  # (k, d) float64
    sq64: np.ndarray  # (k,) float64 squared norms
    cs: np.ndarray  # (k, d) in the screening dtype
    cst: np.ndarray  # (d, k) contiguous, for x @ cst
    sqs: np.ndarray  # (k,) squared norms in the screening dtype
    cmax: float  # largest centre norm
    slack: float  # relative error of a screened score, per unit of cmax * (cmax + 2 |x|)

    @property
    def k(self) -> int:
        return self.c64.shape[0]


@dataclass
class ModelState:
    """A model's assignment of a chunk: what the next pass starts from (kept on the chunk's worker)."""

    centers: np.ndarray  # the centres the labels and bounds refer to
    labels: np.ndarray  # int32
    upper: np.ndarray  # >= distance to the own centre
    lower: np.ndarray  # (n, groups): <= distance to every other centre of the group
    sums: np.ndarray | None  # exact int64 per-cluster sums of the labels (integral rows only)


def row_norms(chunk: np.ndarray, tile_rows: int, check) -> RowNorms:
    """Squared norms in float64 (exact for integers), tile by tile; ``check(x, sq, start)`` sees each float tile."""
    n = chunk.shape[0]
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


def prepare(centers: np.ndarray, screen: np.dtype) -> Centres:
    c64 = np.ascontiguousarray(centers, dtype=np.float64)
    sq64 = np.einsum("ij,ij->i", c64, c64)
    cs = c64.astype(screen)
    cmax = float(np.sqrt(sq64.max())) if sq64.size else 0.0
    if screen == np.float32 and cmax > FLOAT32_SAFE:
        return prepare(centers, np.dtype(np.float64))
    d = c64.shape[1]
    # Worst case of a d-term dot product plus the roundings of x, c, |c|^2 and the score itself.
    slack = (2 * d + 16) * ROUNDING[np.dtype(screen)]
    return Centres(c64, sq64, cs, np.ascontiguousarray(cs.T), sq64.astype(screen), cmax, slack)


def _error(rows: RowNorms, idx, model: Centres, slack: float) -> np.ndarray:
    """Bound on the error of a screened squared distance for the given rows."""
    d = model.c64.shape[1]
    return slack * model.cmax * (model.cmax + 2 * rows.norm[idx]) + (d + 4) * 2.0**-53 * rows.sq[idx]


def n_groups(k: int) -> int:
    """Lower bounds kept per row: one per centre up to GROUPS; beyond, equal groups of neighbouring indices.

    Equal groups (a divisor of k near GROUPS) let strided elementwise minima
    take the group minima, several times faster than np.minimum.reduceat.
    """
    if k <= GROUPS:
        return k
    even = [g for g in range(GROUPS // 2, GROUPS + 1) if k % g == 0]
    return max(even) if even else GROUPS


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


def nearest_with_bounds(x: np.ndarray, rows: RowNorms, idx, model: Centres):
    """Labels, upper bounds and per-group lower bounds for rows ``x`` (the chunk's rows ``idx``, as stored).

    The label is the argmin of the float64 squared distances (clipped at zero,
    lowest index on ties), computed in float64 only where screening cannot
    settle it. ``upper`` bounds the distance to the own centre, ``lower[:, g]``
    the distance to every other centre of group g.
    """
    idx = np.arange(idx.start, idx.stop) if isinstance(idx, slice) else idx
    xs = x.astype(model.cs.dtype, copy=False)
    scores = xs @ model.cst
    scores *= -2
    scores += model.sqs
    labels = np.argmin(scores, axis=1)
    at = np.arange(labels.size)
    best = scores[at, labels].astype(np.float64)
    scores[at, labels] = np.inf
    others = group_min(scores, model.k).astype(np.float64)
    x_sq = rows.sq[idx]
    error = _error(rows, idx, model, model.slack)
    upper2 = x_sq + best + error
    lower2 = others + (x_sq - error)[:, None]
    unsure = np.flatnonzero(lower2.min(axis=1) <= upper2)
    if unsure.size:
        d2 = _exact_sq_distances(x[unsure], x_sq[unsure], model)
        lab = np.argmin(d2, axis=1)
        at = np.arange(lab.size)
        error = _error(rows, idx[unsure], model, (2 * model.c64.shape[1] + 16) * 2.0**-53)
        labels[unsure] = lab
        upper2[unsure] = d2[at, lab] + error
        d2[at, lab] = np.inf
        lower2[unsure] = group_min(d2, model.k) - error[:, None]
    return labels.astype(np.int32), np.sqrt(np.maximum(upper2, 0)), np.sqrt(np.maximum(lower2, 0))


def _exact_sq_distances(x: np.ndarray, x_sq: np.ndarray, model: Centres) -> np.ndarray:
    """The float64 reference: |x|^2 - 2 x.c + |c|^2, clipped at zero."""
    d2 = x.astype(np.float64) @ model.c64.T
    d2 *= -2.0
    d2 += x_sq[:, None]
    d2 += model.sq64[None, :]
    np.maximum(d2, 0.0, out=d2)
    return d2


def assign_rows(chunk: np.ndarray, rows: RowNorms, model: Centres, tile_rows: int, which=None):
    """nearest_with_bounds over the chunk's rows ``which`` (all when None), tile by tile."""
    n = chunk.shape[0] if which is None else which.size
    labels = np.empty(n, dtype=np.int32)
    upper = np.empty(n)
    lower = np.empty((n, n_groups(model.k)))
    for start in range(0, n, tile_rows):
        part = slice(start, min(start + tile_rows, n))
        idx = part if which is None else which[part]
        labels[part], upper[part], lower[part] = nearest_with_bounds(chunk[idx], rows, idx, model)
    return labels, upper, lower


def float32_up(x: np.ndarray) -> np.ndarray:
    """x in float32 (half the memory on the workers), rounded up: still an upper bound."""
    return np.nextafter(np.asarray(x, dtype=np.float32), np.float32(np.inf))


def float32_down(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.float32:  # already a float32 bound
        return x
    return np.nextafter(np.asarray(x, dtype=np.float32), np.float32(-np.inf))


def shifts(new: Centres, old_centers: np.ndarray) -> np.ndarray:
    """How far each centre moved, rounded up."""
    moved = np.sqrt(((new.c64 - old_centers) ** 2).sum(axis=1))
    return moved * (1 + BOUND_SLACK)


def bounded_pass(chunk: np.ndarray, rows: RowNorms, model: Centres, state: ModelState, tile_rows: int):
    """Labels and bounds for the new centres, computing distances only for rows the bounds cannot settle.

    The bounds are Yinyang's (Ding et al., 2015): an upper bound on the
    distance to the own centre, which grows by that centre's shift, and a
    lower bound per group of centres, which shrinks by the group's largest
    shift. A row whose upper bound is below all its lower bounds keeps its
    centre. The others get the one distance to their own centre (tightening
    the upper bound), and those still in doubt all k distances, in one matrix
    product (Yinyang's per-group local filter would cost a gather per group,
    more than the product saves in numpy). Returns (labels, upper, lower,
    rows recomputed).
    """
    labels = state.labels.copy()
    moved = shifts(model, state.centers)
    upper = (state.upper + moved[labels]) * (1 + BOUND_SLACK)
    # The lower bounds stay float32 (n x groups is the bulk of the work): subtract the shifts rounded up,
    # then shave a few float32 ulps so that the subtraction's own rounding cannot lift a bound.
    group_shift = np.maximum.reduceat(moved, group_starts(model.k)).astype(np.float32)
    group_shift = np.nextafter(group_shift, np.float32(np.inf))
    lower = state.lower - group_shift
    lower *= np.float32(1 - 2.0**-20)
    nearest_other = lower.min(axis=1)
    loose = np.flatnonzero(~(upper < nearest_other))
    # Tighten the upper bound with the one distance to the own centre (screened, with its error); not worth
    # it when nearly all rows are in doubt anyway (the first passes): they all get every distance.
    if loose.size > 0.9 * labels.size:
        upper[loose] = np.inf
    for start in range(0, loose.size if loose.size <= 0.9 * labels.size else 0, tile_rows):
        idx = loose[start : start + tile_rows]
        own = labels[idx]
        xs = chunk[idx].astype(model.cs.dtype, copy=False)
        dots = np.einsum("ij,ij->i", xs, model.cs[own]).astype(np.float64)
        d2 = rows.sq[idx] - 2 * dots + model.sq64[own] + _error(rows, idx, model, model.slack)
        upper[idx] = np.sqrt(np.maximum(d2, 0))
    still = loose[~(upper[loose] < nearest_other[loose])]
    if still.size:
        labels[still], upper[still], fresh = assign_rows(chunk, rows, model, tile_rows, which=still)
        lower[still] = float32_down(fresh)
    return labels, upper, lower, int(still.size)
