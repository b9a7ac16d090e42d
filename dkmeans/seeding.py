"""Initial centres on the cluster: random, sample, k-means++ and k-means||.

Every random choice is made on the client from one numpy Generator, or (for
the per-row coins of k-means||) from a hash of the global row index, so the
centres depend on the seed only, never on chunking or the number of workers.
"""

from __future__ import annotations

import numpy as np
from dask import delayed
from distributed import Client

from . import kernels
from .engine import (
    MIN_ROUND_PICKS,
    OVERSAMPLING,
    PARALLEL_ROUNDS,
    RECLUSTER_ITER,
    ChunkedData,
    fetch_rows,
    map_chunks,
    shared,
    tree_reduce,
)

INIT_NAMES = ("k-means||", "k-means++", "sample", "cluster", "random")
# Inits that draw k distinct rows of the data ("cluster" is an alias of "sample").
SAMPLED_INITS = ("sample", "cluster")


def init_centers(client: Client, data: ChunkedData, k: int, init: str, rng: np.random.Generator) -> np.ndarray:
    if init == "random":
        return random_in_range(client, data, k, rng)
    if init in SAMPLED_INITS:
        return sample_rows(client, data, k, rng)
    if init == "k-means++":
        return kmeans_plusplus(client, data, k, rng)
    if init == "k-means||":
        return kmeans_parallel(client, data, k, rng)
    raise ValueError(f"Unknown init {init!r}; expected one of {', '.join(INIT_NAMES)} or an array")


def init_centers_many(client: Client, data: ChunkedData, requests: list) -> list[np.ndarray]:
    """init_centers for each (k, init, rng) of ``requests``, the same centres as one call each.

    A sweep's sample inits read all their rows in one round trip, and its
    random inits share one pass for the data's range (16 models: 16 round
    trips or passes become one).
    """
    out: list = [None] * len(requests)
    sampled = [i for i, (_, init, _) in enumerate(requests) if init in SAMPLED_INITS]
    if len(sampled) > 1:
        indices = [_sample_indices(data, requests[i][0], requests[i][2]) for i in sampled]
        rows = fetch_rows(client, data, np.concatenate(indices)).astype(np.float64)
        for i, part in zip(sampled, np.split(rows, np.cumsum([idx.size for idx in indices])[:-1])):
            out[i] = part
    uniform = [i for i, (_, init, _) in enumerate(requests) if init == "random"]
    if len(uniform) > 1:
        lo, hi = _data_range(client, data)
        for i in uniform:
            out[i] = requests[i][2].uniform(lo, hi, size=(requests[i][0], data.n_features))
    others = (init_centers(client, data, k, init, rng) if c is None else c for c, (k, init, rng) in zip(out, requests))
    return list(others)


def random_in_range(client, data, k, rng):
    """Uniform in each feature's [min, max], as the course notebook's random init."""
    lo, hi = _data_range(client, data)
    return rng.uniform(lo, hi, size=(k, data.n_features))


def _data_range(client, data):
    ranges = [r for r in client.compute(map_chunks(data, kernels.data_range, name="range"), sync=True) if r is not None]
    lo = np.min([r[0] for r in ranges], axis=0).astype(np.float64)
    hi = np.max([r[1] for r in ranges], axis=0).astype(np.float64)
    return lo, hi


def sample_rows(client, data, k, rng):
    """k distinct rows drawn uniformly, as the course notebook's sample init."""
    return fetch_rows(client, data, _sample_indices(data, k, rng)).astype(np.float64)


def _sample_indices(data, k, rng):
    return rng.choice(data.n_samples, size=k, replace=False)


def _min_d2(client, data, centers, previous=None):
    """Update every chunk's distance-to-nearest-centre (kept on the workers); return it and its chunk sums."""
    centers = shared(client, data, centers)
    per_chunk = None if previous is None else {"previous": previous}
    d2 = map_chunks(data, kernels.min_sq_distances, centers, name="seed-distances", per_chunk=per_chunk)
    futures = client.compute(d2 + [delayed(np.sum, pure=False)(p) for p in d2])
    return futures[: len(d2)], np.asarray(client.gather(futures[len(d2) :]), dtype=np.float64)


def kmeans_plusplus(client, data, k, rng):
    """Arthur and Vassilvitskii's D^2 sampling, one pass over the data per centre."""
    centers = sample_rows(client, data, 1, rng)
    d2, sums = _min_d2(client, data, centers)
    for _ in range(1, k):
        total = sums.sum()
        if total <= 0:
            raise ValueError(f"k-means++ could not find {k} distinct points in the data")
        target = rng.random() * total
        chunk = min(int(np.searchsorted(np.cumsum(sums), target, side="right")), data.n_chunks - 1)
        local_target = target - sums[:chunk].sum()
        local = client.submit(kernels.pick_by_weight, d2[chunk], local_target, pure=False).result()
        new = fetch_rows(client, data, [data.offsets[chunk] + local]).astype(np.float64)
        centers = np.vstack([centers, new])
        d2, sums = _min_d2(client, data, new, previous=d2)
    return centers


def kmeans_parallel(client, data, k, rng):
    """k-means|| (Bahmani et al.): a few rounds oversample ~2k rows by D^2, then recluster them, weighted.

    The recluster is greedy k-means++ on the candidates, then Lloyd on them
    (as Spark and dask-ml do): on MNIST it takes a third or more of the
    iterations off the fit that follows, for less client time than the
    k-means++ step (10 ms at k=10, 0.2 s at k=256).
    """
    seed = int(rng.integers(2**62))
    first = int(rng.integers(data.n_samples))
    candidates = fetch_rows(client, data, [first]).astype(np.float64)
    indices = [np.array([first])]
    d2, sums = _min_d2(client, data, candidates)
    factor = max(OVERSAMPLING * k, MIN_ROUND_PICKS)
    for round_ in range(PARALLEL_ROUNDS):
        phi = sums.sum()
        if phi <= 0:
            break
        picks = map_chunks(
            data,
            kernels.oversample,
            factor=factor / phi,
            seed=seed,
            stream=round_,
            name="oversample",
            per_chunk={"d2": d2},
        )
        chosen = [p for p in client.compute(picks, sync=True) if p[0].size]
        if not chosen:
            continue
        new_index = np.concatenate([c[0] for c in chosen])
        new_rows = np.concatenate([c[1] for c in chosen]).astype(np.float64)
        order = np.argsort(new_index)
        indices.append(new_index[order])
        candidates = np.vstack([candidates, new_rows[order]])
        if round_ < PARALLEL_ROUNDS - 1:  # the last round's distances would not be used
            d2, sums = _min_d2(client, data, new_rows[order], previous=d2)
    index = np.concatenate(indices)
    if index.size < k:
        # Too few candidates (tiny or degenerate data): top up with distinct random rows.
        extra = rng.choice(np.setdiff1d(np.arange(data.n_samples), index), size=k - index.size, replace=False)
        candidates = np.vstack([candidates, fetch_rows(client, data, np.sort(extra)).astype(np.float64)])
    counts = map_chunks(data, kernels.nearest_counts, shared(client, data, candidates), name="candidate-weight")
    weights = client.compute(tree_reduce(counts, _add, name="candidate-weight-sum"), sync=True)
    start = kernels.weighted_kmeans_plusplus(candidates, k, weights, rng)
    return kernels.weighted_lloyd(candidates, weights, start, RECLUSTER_ITER)


def _add(parts):
    return np.sum(parts, axis=0)
