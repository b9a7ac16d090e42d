"""Kernels for one chunk of rows (numpy, and dkmeans.compiled where allowed); nothing here knows about Dask.

Every function takes a chunk as it is stored (uint8 for MNIST) and converts it
to floating point itself, tile by tile, so the data sits in memory at one byte
per pixel and only a bounded float tile exists at any time.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from . import screening

# Upper bound on the number of float elements in one (rows x k) distance tile
# or (rows x d) converted tile: 2**18 float64 values are 2 MiB, within L2+L3 on
# one core and under the allocator threshold (allocator.THRESHOLD) that lets
# tiles reuse heap memory instead of fresh pages.
TILE_ELEMENTS = 2**18


_use_compiled = True


def use_compiled(allowed: bool) -> None:
    """Let this process use dkmeans.compiled (numba), or keep it to the numpy kernels; the results are the same.

    The engine turns it off in workers with little memory (engine.COMPILED_MIN_MEMORY): numba takes about
    100 MB of a process. Nothing imports numba until a compiled kernel is first needed.
    """
    global _use_compiled
    _use_compiled = allowed


def _compiled():
    """dkmeans.compiled where this process may use it, else None."""
    return importlib.import_module(".compiled", __package__) if _use_compiled else None


def _settle():
    """What turns blocks of screened products into labels and bounds: compiled where allowed (same labels)."""
    fast = _compiled()
    return screening.bounds_from_products if fast is None else fast.bounds_from_products


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float32 input stays float32, everything else is computed in float64 (as scikit-learn)."""
    return np.dtype(np.float32) if np.dtype(dtype) == np.float32 else np.dtype(np.float64)


def tile_rows(width: int) -> int:
    """Rows per tile, so that a tile holds at most TILE_ELEMENTS values of the given width."""
    return max(1, TILE_ELEMENTS // max(1, width))


def row_tiles(n_rows: int, width: int):
    """Row slices of tile_rows(width) rows."""
    step = tile_rows(width)
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def squared_norms(x: np.ndarray) -> np.ndarray:
    x = _as_float(x)
    return np.einsum("ij,ij->i", x, x)


def _as_float(x: np.ndarray) -> np.ndarray:
    return x if x.dtype.kind == "f" else x.astype(compute_dtype(x.dtype))


def check_finite(x: np.ndarray, x_sq: np.ndarray, offset: int) -> None:
    """Catch NaN and inf from the squared norms the pass computes anyway: no extra pass.

    A non-finite norm is either a NaN/inf in the row or a finite row too large
    to square in this precision; only the flagged rows are inspected to tell.
    """
    flagged = np.flatnonzero(~np.isfinite(x_sq))
    if not flagged.size:
        return
    bad = flagged[~np.isfinite(x[flagged]).all(axis=1)]
    if bad.size:
        raise ValueError(
            f"Input contains NaN or infinity ({bad.size} row(s) in the chunk starting "
            f"at row {offset}, first at rows {(bad[:5] + offset).tolist()})"
        )
    raise ValueError(
        f"Input values are too large to square in {x.dtype} (rows {(flagged[:5] + offset).tolist()}); "
        "rescale the data or pass it as float64"
    )


def sq_distances(x: np.ndarray, centers: np.ndarray, x_sq=None, c_sq=None) -> np.ndarray:
    """Squared Euclidean distances by the expansion |x|^2 - 2 x.c + |c|^2, clipped at zero."""
    x = _as_float(x)
    if x_sq is None:
        x_sq = squared_norms(x)
    if c_sq is None:
        c_sq = squared_norms(centers)
    d2 = x @ centers.T
    d2 *= -2.0
    d2 += x_sq[:, None]
    d2 += c_sq[None, :]
    np.maximum(d2, 0.0, out=d2)
    return d2


def assign(chunk: np.ndarray, centers: np.ndarray, offset: int = 0):
    """Nearest centre (the float64 argmin, screened in float32) and its float64 squared distance, per row."""
    norms = chunk_norms(chunk, offset)
    labels = _labels(chunk, norms, centers)
    return labels, own_sq_distances(chunk, norms, np.asarray(centers, dtype=np.float64), labels)


def transform(chunk: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Euclidean distances of every row to every centre (scikit-learn's transform)."""
    ftype = compute_dtype(chunk.dtype)
    c = centers.astype(ftype, copy=False)
    c_sq = squared_norms(c)
    out = np.empty((chunk.shape[0], c.shape[0]), dtype=ftype)
    for rows in row_tiles(chunk.shape[0], max(chunk.shape[1], c.shape[0])):
        out[rows] = np.sqrt(sq_distances(chunk[rows].astype(ftype), c, c_sq=c_sq))
    return out


@dataclass
class ChunkStats:
    """What one chunk contributes to a Lloyd update; partials combine by addition."""

    sums: np.ndarray  # (k, d) per-cluster sums of the rows: int64 (exact) for whole-number rows, else float64
    counts: np.ndarray  # (k,) int64 rows per cluster
    sq_total: float  # sum of the rows' squared norms (exact for whole numbers)
    far_d2: np.ndarray  # the chunk's largest squared distances, descending (only when asked for)
    far_index: np.ndarray  # their global row indices
    far_label: np.ndarray  # the clusters those rows are assigned to


def lloyd_chunk(chunk: np.ndarray, centers: np.ndarray, n_far: int, offset: int = 0):
    """One Lloyd pass over one chunk: labels plus the partial sums for the update.

    ``n_far`` farthest rows (by distance to their own centre) are kept so the
    reduction can relocate empty clusters; the engine asks for them only in
    the rare pass that leaves a cluster empty.
    """
    states, stats = lloyd_chunk_many(chunk, centers, (centers.shape[0],), (n_far,), offset)
    return states[0].labels, stats[0]


# Passes over at least this many centres (all models together) score rows split (compiled.ColumnSplit). One
# thread, 30,000 MNIST rows, 21 passes with the split made first: k=256 1007 against 1328 ms; k=10, 20, 64 the
# same either way (1.008, 0.989, 0.993), the split's making (18 ms) costing what it saves.
SPLIT_MIN_CENTRES = 128


def chunk_norms(chunk: np.ndarray, offset: int = 0, split: bool = False) -> screening.RowNorms:
    """The chunk's row norms, checking float rows for NaN and infinity on the way.

    Small integers go through one compiled pass where allowed (30,000 MNIST rows: 2 ms, where numpy's
    integer einsum plus a min and a max take 15-17 ms). With ``split`` and the compiled kernels, the norms
    also carry the chunk's rows split for the products (compiled.split_columns): for chunks that stay in
    memory over many passes, as the split copies the chunk's common columns (MNIST: 60 % of its bytes).
    """
    fast = _compiled()
    if fast is not None and chunk.dtype.kind in "ui" and chunk.dtype.itemsize <= 2 and chunk.shape[0]:
        sq = np.empty(chunk.shape[0])
        norms = screening.integer_norms(sq, int(fast.integer_squares(chunk, sq)))
    else:
        tile = tile_rows(chunk.shape[1])
        norms = screening.row_norms(chunk, tile, lambda x, sq, start: check_finite(x, sq, offset + start))
    if split and fast is not None:
        norms.columns = fast.split_columns(chunk, norms.screen)
    return norms


def lloyd_chunk_many(
    chunk: np.ndarray,
    centers: np.ndarray,
    sizes,
    n_far,
    offset: int = 0,
    *,
    norms: screening.RowNorms | None = None,
    states=None,
    bounds: bool = False,
):
    """lloyd_chunk for several models at once (a sweep over k, or restarts), and from a previous pass.

    ``centers`` stacks the models' centres, ``sizes[m]`` of them for model m,
    which keeps ``n_far[m]`` farthest rows. ``states[m]`` is model m's
    ModelState from an earlier pass over this chunk (or None): with
    ``bounds``, rows its Yinyang bounds settle are not recomputed; whole-number
    rows update its exact sums by the rows that changed cluster. Neither
    changes the result, only its cost. Returns per-model new ModelStates and
    ChunkStats.
    """
    if norms is None:
        norms = chunk_norms(chunk, offset)
    states = list(states or [None] * len(sizes))
    edges = np.cumsum((0,) + tuple(sizes))
    models, moved, todo = [], [], {}
    for m, k in enumerate(sizes):
        model = screening.prepare(centers[edges[m] : edges[m + 1]], norms.screen)
        state = states[m]
        if state is not None and (state.labels.shape[0] != chunk.shape[0] or state.centers.shape != model.c64.shape):
            state = states[m] = None
        if state is None:
            todo[m] = None  # every row, every distance
        elif not np.array_equal(state.centers, model.c64):
            tile = tile_rows(max(chunk.shape[1], k))
            fast = _compiled() if bounds else None
            if fast is not None and fast.available(model):
                state, _ = fast.bounded_pass(chunk, norms, model, state, tile)
                if state is None:  # the filters would leave most rows to it: one product over every row
                    todo[m] = None
            elif bounds:
                state, todo[m] = screening.bounds_filter(chunk, norms, model, state, tile)
            else:
                state, todo[m] = None, None
        models.append(model)
        moved.append(state)  # the same centres: the same state
    done = screening.assign_rows_many(
        chunk, norms, [models[m] for m in todo], list(todo.values()), tile_rows, _settle()
    )
    for m, assigned in zip(todo, done):
        if moved[m] is None:
            moved[m] = screening.fresh_state(models[m].c64, *assigned)
        else:
            moved[m] = screening.settle(moved[m], todo[m], *assigned)
    stats = []
    for m, k in enumerate(sizes):
        state = moved[m]
        sums = _sums_from(chunk, norms, state.labels, k, states[m])
        state.sums = sums if norms.integral else None
        counts = np.bincount(state.labels, minlength=k).astype(np.int64)
        if n_far[m]:
            d2 = own_sq_distances(chunk, norms, models[m].c64, state.labels)
            far_d2, far_index = farthest(d2, n_far[m], offset)
            far_label = state.labels[far_index - offset].astype(np.int64)
        else:
            far_d2, far_index, far_label = np.empty(0), np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        stats.append(ChunkStats(sums, counts, norms.total, far_d2, far_index, far_label))
    return moved, stats


def _sums_from(chunk, norms, labels, k, state) -> np.ndarray:
    """Per-cluster sums; for whole-number rows, the previous exact sums moved by the rows that changed cluster."""
    if not norms.integral:
        return cluster_sums(chunk, labels, k)
    if state is not None and state.sums is not None:
        changed = np.flatnonzero(labels != state.labels)
        fast = _compiled()
        if fast is not None and changed.size * 2 < labels.size:  # one pass over the changed rows, one copy
            sums = state.sums.copy()
            fast.move_rows(chunk, changed, state.labels, labels, sums)
            return sums
        if changed.size * 4 < labels.size:
            moved = chunk[changed]
            sums = state.sums + cluster_sums(moved, labels[changed], k).astype(np.int64)
            sums -= cluster_sums(moved, state.labels[changed], k).astype(np.int64)
            return sums
    return cluster_sums(chunk, labels, k).astype(np.int64)


def own_sq_distances(chunk: np.ndarray, norms: screening.RowNorms, centers: np.ndarray, labels) -> np.ndarray:
    """float64 squared distance of every row to its own centre, clipped at zero."""
    out = np.empty(chunk.shape[0])
    c_sq = np.einsum("ij,ij->i", centers, centers)
    for rows in row_tiles(chunk.shape[0], chunk.shape[1]):
        x = chunk[rows].astype(np.float64)
        own = labels[rows]
        out[rows] = norms.sq[rows] - 2 * np.einsum("ij,ij->i", x, centers[own]) + c_sq[own]
    return np.maximum(out, 0.0, out=out)


def labels_of(chunk: np.ndarray, centers: np.ndarray, offset: int = 0) -> np.ndarray:
    """Nearest centre of every row (the float64 argmin, lowest index on ties), screened in float32."""
    return _labels(chunk, chunk_norms(chunk, offset), centers)


def _labels(chunk, norms, centers) -> np.ndarray:
    model = screening.prepare(centers, norms.screen)
    tile = tile_rows(max(chunk.shape[1], model.k))
    return screening.assign_rows(chunk, norms, model, tile, settle=_settle())[0]


def cluster_sums(chunk: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, d) float64 sums of the chunk's rows per cluster.

    Small integers (MNIST's uint8) are summed as integers straight from the
    stored rows: exact, so bit for bit the float64 sums, at an eighth of the
    memory traffic. Compiled (where allowed), each row is added to its
    cluster's sums in one pass: 2.5-3 ms for 30,000 MNIST rows at k = 10 or
    256. In numpy, one boolean mask per present cluster: 9-26 ms, which beat
    masks over the float rows (1.3-2x), sorting plus np.add.reduceat (2-3x)
    and a one-hot matrix product (1.5-7x). Float rows are added in float64 in
    row order either way (numpy's reduction along rows is sequential), so the
    compiled pass gives numpy's bits: 30,000 float32 MNIST rows in 10-15 ms
    against 80-90 ms.
    """
    exact = chunk.dtype.kind in "ui" and chunk.dtype.itemsize <= 2
    accumulator = np.float64
    if exact:  # int32 sums are about twice as fast as int64; use them while no sum can overflow
        info = np.iinfo(chunk.dtype)
        fits = chunk.shape[0] * max(abs(int(info.min)), int(info.max)) < 2**31
        accumulator = np.int32 if fits else np.int64
    fast = _compiled()
    if fast is not None and (exact or chunk.dtype in (np.float32, np.float64)):
        sums = np.zeros((k, chunk.shape[1]), dtype=accumulator)
        fast.add_rows(chunk, np.asarray(labels), sums)
        return sums.astype(np.float64, copy=False)
    sums = np.zeros((k, chunk.shape[1]), dtype=np.float64)
    for j in np.unique(labels):
        sums[j] = chunk[labels == j].sum(axis=0, dtype=accumulator)
    return sums


def farthest(d2: np.ndarray, m: int, offset: int):
    """The m largest distances, descending, ties broken by lower row index (chunking-invariant)."""
    m = min(m, d2.size)
    if m == 0:
        return np.empty(0), np.empty(0, dtype=np.int64)
    idx = np.argpartition(-d2, m - 1)[:m] if m < d2.size else np.arange(d2.size)
    # The partition may cut through a run of ties: take every row equal to the cut value.
    cut = d2[idx].min()
    idx = np.flatnonzero(d2 >= cut)
    order = np.lexsort((idx, -d2[idx]))[:m]
    idx = idx[order]
    return d2[idx], idx.astype(np.int64) + offset


def combine_stats(parts: list[ChunkStats], n_far: int) -> ChunkStats:
    """Tree-reduction step: add partial sums and keep the overall farthest rows."""
    far_d2 = np.concatenate([p.far_d2 for p in parts])
    far_index = np.concatenate([p.far_index for p in parts])
    far_label = np.concatenate([p.far_label for p in parts])
    order = np.lexsort((far_index, -far_d2))[:n_far]
    return ChunkStats(
        sums=_added([p.sums for p in parts]),
        counts=_added([p.counts for p in parts]),
        sq_total=float(sum(p.sq_total for p in parts)),
        far_d2=far_d2[order],
        far_index=far_index[order],
        far_label=far_label[order],
    )


def _added(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays' sum, added left to right as np.sum(arrays, axis=0) adds them (the same float64 bits);
    integers in int64, so the int32 sums workers send (engine._narrowed) are widened as they are added,
    without a stacked copy (k=256, two partials: 0.7 ms against 1.3 ms widened first, then np.sum)."""
    first = arrays[0]
    total = first.astype(np.int64 if first.dtype.kind in "ui" else np.result_type(*arrays), copy=True)
    for a in arrays[1:]:
        total += a
    return total


def inertia(stats: ChunkStats, centers: np.ndarray) -> float:
    """Sum of squared distances to the assigned centres: sum |x|^2 - 2 sum_j c_j.S_j + sum_j n_j |c_j|^2.

    From the totals, not per chunk: for whole-number rows every total is an
    exact integer, so the inertia does not depend on how the rows are chunked.
    """
    c = np.asarray(centers, dtype=np.float64)
    cross = np.einsum("ij,ij->", c, stats.sums.astype(np.float64))
    return max(0.0, float(stats.sq_total - 2 * cross + stats.counts @ np.einsum("ij,ij->i", c, c)))


def combine_stats_many(parts: list[list[ChunkStats]], n_far) -> list[ChunkStats]:
    """combine_stats model by model, for partials of lloyd_chunk_many."""
    return [combine_stats([p[m] for p in parts], n_far[m]) for m in range(len(n_far))]


def update_centers(stats: ChunkStats, old_centers: np.ndarray, far_rows: np.ndarray | None = None) -> np.ndarray:
    """New centres as cluster means; empty clusters take the farthest rows.

    As in scikit-learn, a relocated row is also removed from the cluster it was
    assigned to, so every row still counts once. ``far_rows`` holds the rows of
    ``stats.far_index`` (fetched only when some cluster is empty).
    """
    sums = stats.sums.astype(np.float64)  # int64 sums of whole numbers are exact in float64 too
    counts = stats.counts.copy()
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        if far_rows is None or len(far_rows) < empty.size:
            have = 0 if far_rows is None else len(far_rows)
            raise ValueError(f"{empty.size} empty cluster(s) but only {have} rows to relocate them to")
        for j, row, old in zip(empty, far_rows, stats.far_label):
            row = np.asarray(row, dtype=np.float64)
            sums[old] -= row
            counts[old] -= 1
            sums[j] = row
            counts[j] = 1
    new_centers = np.array(old_centers, dtype=np.float64)
    nonempty = counts > 0  # a cluster that gave away its only row keeps its old centre
    np.divide(sums, counts[:, None], out=new_centers, where=nonempty[:, None])
    return new_centers


# --- seeding kernels: the per-chunk halves of k-means++ and k-means|| ---


def min_sq_distances(chunk: np.ndarray, centers: np.ndarray, previous=None, offset: int = 0) -> np.ndarray:
    """Squared distance of every row to its nearest centre, folded into ``previous`` when given."""
    _, d2 = assign(chunk, centers, offset)
    return d2 if previous is None else np.minimum(previous, d2)


def pick_by_weight(weights: np.ndarray, target: float) -> int:
    """Index i where the running sum of weights first exceeds target (D^2 sampling)."""
    cumulative = np.cumsum(weights)
    i = int(np.searchsorted(cumulative, target, side="right"))
    return min(i, weights.size - 1)


def oversample(chunk: np.ndarray, d2: np.ndarray, factor: float, seed: int, stream: int, offset: int = 0):
    """k-means|| round: keep each row with probability min(1, factor * d2), as (indices, rows).

    The coin for a row depends on (seed, stream, global row index) only, so the
    choice does not depend on how the data is chunked or which worker runs it.
    """
    coins = uniform_by_index(seed, stream, np.arange(offset, offset + d2.size, dtype=np.uint64))
    keep = np.flatnonzero(coins < factor * d2)
    return keep.astype(np.int64) + offset, np.asarray(chunk[keep])


def nearest_counts(chunk: np.ndarray, centers: np.ndarray, offset: int = 0) -> np.ndarray:
    """How many rows of the chunk each centre is nearest to (k-means|| candidate weights)."""
    labels = labels_of(chunk, centers, offset)  # not assign: no float64 distances needed
    return np.bincount(labels, minlength=centers.shape[0]).astype(np.int64)


def data_range(chunk: np.ndarray, offset: int = 0):
    """Per-feature (min, max) of a chunk, checking for NaN and infinity on the way."""
    if chunk.shape[0] == 0:
        return None
    if chunk.dtype.kind == "f":
        x = chunk.astype(np.float64)
        check_finite(x, squared_norms(x), offset)
    return chunk.min(axis=0), chunk.max(axis=0)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def uniform_by_index(seed: int, stream: int, index: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) floats that are a pure function of (seed, stream, index) (SplitMix64)."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) * _GOLDEN
        z += np.uint64((seed * 0x100000001B3 + stream * 0xC2B2AE3D27D4EB4F) % 2**64)
        z += _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def weighted_kmeans_plusplus(points: np.ndarray, k: int, weights: np.ndarray, rng: np.random.Generator):
    """Greedy k-means++ on an in-memory weighted set (scikit-learn's variant, 2 + log k trials)."""
    points = np.asarray(points, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    n = points.shape[0]
    if n < k:
        raise ValueError(f"k-means++ needs at least k={k} points, got {n}")
    trials = 2 + int(np.log(k))
    centers = np.empty((k, points.shape[1]))
    p_sq = squared_norms(points)
    first = pick_by_weight(weights, rng.random() * weights.sum())
    centers[0] = points[first]
    closest = sq_distances(points, centers[:1], p_sq)[:, 0]
    potential = float(weights @ closest)
    for c in range(1, k):
        if potential <= 0:
            # Every weighted point coincides with a centre: take the first point not yet
            # covered (or, with none left, repeat one), and keep `closest` current.
            uncovered = np.flatnonzero(closest > 0)
            candidates = uncovered[:1] if uncovered.size else np.array([c % n])
        else:
            targets = rng.random(trials) * potential
            candidates = np.searchsorted(np.cumsum(weights * closest), targets, side="right")
            candidates = np.minimum(candidates, n - 1)
        d2 = sq_distances(points, points[candidates], p_sq)
        np.minimum(d2, closest[:, None], out=d2)
        pots = weights @ d2
        best = int(np.argmin(pots))
        potential = float(pots[best])
        closest = d2[:, best]
        centers[c] = points[candidates[best]]
    return centers


def weighted_lloyd(points: np.ndarray, weights: np.ndarray, centers: np.ndarray, max_iter: int) -> np.ndarray:
    """Lloyd on an in-memory weighted set, until no point changes cluster (k-means||'s recluster step).

    A centre whose points all have zero weight, or that has none, stays where it is.
    """
    points = np.asarray(points, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    centers = np.array(centers, dtype=np.float64)
    p_sq = squared_norms(points)
    weighted = points * weights[:, None]
    labels = None
    for _ in range(max_iter):
        new = sq_distances(points, centers, p_sq).argmin(axis=1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        mass = np.bincount(labels, weights=weights, minlength=centers.shape[0])
        order = np.argsort(labels, kind="stable")
        starts = np.searchsorted(labels[order], np.arange(centers.shape[0]))
        held = np.flatnonzero(mass > 0)  # such clusters have points, so their starts increase strictly
        sums = np.add.reduceat(weighted[order], starts[held], axis=0)
        centers[held] = sums / mass[held, None]
    return centers
