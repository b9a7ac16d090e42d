"""`KMeans`: scikit-learn's estimator contract on top of the Dask engine."""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers

import dask.array as da
import numpy as np
from distributed import Client, LocalCluster, get_client, span

from . import kernels
from .checkpoint import BestRun, Checkpoint, CheckpointError, FitState, data_fingerprint
from .engine import LloydResult, chunk_data, chunk_labels, lloyd, lloyd_many
from .seeding import INIT_NAMES, init_centers, init_centers_many

ALGORITHMS = ("auto", "yinyang", "lloyd")


class KMeans:
    """K-means clustering by Lloyd's algorithm, distributed over a Dask cluster.

    Parameters follow scikit-learn's ``KMeans`` where they share a name. ``tol``
    is the notebook's rule: stop once every centre moved less than ``tol``
    (Euclidean distance, in the data's units). ``client`` is a
    ``distributed.Client``; by default the current one is used, or a temporary
    in-process cluster when there is none. ``callback(iteration, j_clust,
    shift, seconds)`` is called after every iteration (with a ``restart=``
    keyword too, if it takes one: n_init restarts run side by side; and
    ``kernel_seconds=``, the busiest worker's compute time in the pass, where
    the engine measured it: None for passes run as tasks).

    ``algorithm`` is ``"yinyang"`` (also ``"auto"``, the default): each
    chunk's Yinyang bounds stay on its worker between iterations, and rows
    whose bounds show their centre cannot change are not recomputed; or
    ``"lloyd"``, every distance every iteration. Both give the same labels and
    centres, iteration by iteration.
    Labels are the float64 nearest centres either way: distances are ranked
    in float32 and the rare rows too close to call are recomputed in float64.

    ``checkpoint`` (a file path) saves the fit's state after every update,
    atomically; with ``resume=True`` the fit continues from that file and
    reaches the same result as an uninterrupted run. A checkpoint of other
    parameters or other data is refused (CheckpointError).

    Attributes: ``cluster_centers_``, ``labels_`` (nearest centre of every
    training row), ``inertia_`` (sum of squared distances to those centres),
    ``n_iter_`` (Lloyd updates, counted as scikit-learn does) and
    ``loss_history_`` (the notebook's J_clust, mean squared distance, of the
    centres after 0, 1, ..., n_iter_ updates; the last one is inertia_ / n).
    """

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        init="k-means||",
        n_init: int = 1,
        max_iter: int = 300,
        tol: float = 1e-4,
        random_state=None,
        chunk_rows: int | None = None,
        client: Client | None = None,
        callback=None,
        checkpoint=None,
        resume: bool = False,
        algorithm: str = "auto",
    ):
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.chunk_rows = chunk_rows
        self.client = client
        self.callback = callback
        self.checkpoint = checkpoint
        self.resume = resume
        self.algorithm = algorithm

    # -- scikit-learn plumbing -----------------------------------------------------

    def get_params(self, deep: bool = True) -> dict:
        return {
            name: getattr(self, name) for name in inspect.signature(type(self).__init__).parameters if name != "self"
        }

    def set_params(self, **params):
        valid = self.get_params()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"Invalid parameter {name!r} for KMeans; valid ones are {sorted(valid)}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        return f"KMeans(n_clusters={self.n_clusters}, init={self.init if isinstance(self.init, str) else 'array'!r})"

    # -- fitting -------------------------------------------------------------------

    def fit(self, X, y=None):
        if self.checkpoint is None:
            if self.resume:
                raise ValueError("resume=True needs a checkpoint path")
            return fit_many([self], X)[0]
        return self._fit_with_checkpoint(X)

    def _fit_with_checkpoint(self, X):
        """The restarts one after another, each update saved, so a fit can resume where it stopped."""
        X = _check_data(X)
        init = self._check_params(X.shape)
        n_init = 1 if not isinstance(init, str) else self.n_init
        ckpt, state = self._open_checkpoint(X, init)
        if ckpt is not None and self.random_state is None:
            # Resumable restarts need reproducible seeds: draw the entropy once and keep it in the checkpoint.
            entropy = state.seed_entropy if state is not None else np.random.SeedSequence().entropy
            seeds = np.random.SeedSequence(entropy).spawn(n_init)
        else:
            entropy = None
            seeds = _restart_seeds(self.random_state, n_init)
        with _client(self.client) as client, span("dkmeans-fit") as span_id:
            data = chunk_data(client, X, self.chunk_rows, self.n_clusters)
            try:
                best = self._fit_restarts(client, data, init, seeds, ckpt, state, entropy)
            except Exception as exc:
                if ckpt is not None and ckpt.last is not None:
                    exc.add_note(
                        f"The last checkpoint ({ckpt.last.describe(n_init)}) is at {ckpt.path}; "
                        "fit again with resume=True (dkmeans fit --resume) to continue from it."
                    )
                raise
            persisted = data.persisted
            del data
        self._set_fitted(best, X.shape[1], persisted, span_id)
        return self

    def _set_fitted(self, result: LloydResult, n_features: int, persisted: bool, span_id) -> None:
        self.cluster_centers_ = result.centers
        self.labels_ = result.labels
        self.inertia_ = result.inertia
        self.n_iter_ = result.n_iter
        self.loss_history_ = result.loss_history
        self.n_features_in_ = n_features
        self.data_persisted_ = persisted
        self.span_id_ = span_id

    def _fit_restarts(self, client, data, init, seeds, ckpt, state, entropy) -> LloydResult:
        """Run (or finish) every restart and keep the lowest inertia, checkpointing after each update."""
        best = None
        if state is not None and state.best is not None:
            b = state.best
            best = LloydResult(b.centers, None, b.inertia, b.n_iter, b.loss_history)
        best_restart = None if state is None or state.best is None else state.best.restart

        def save(restart, n_iter, centers, losses):
            if ckpt is not None:
                kept = (
                    None
                    if best is None
                    else BestRun(best_restart, best.centers, best.inertia, best.n_iter, best.loss_history)
                )
                ckpt.save(FitState(restart, n_iter, centers, list(losses), entropy, kept))

        first = 0 if state is None else state.restart
        for restart in range(first, len(seeds)):
            if state is not None and restart == state.restart and state.centers is not None:
                centers, start, losses = state.centers, state.n_iter, state.loss_history
            else:
                rng = np.random.default_rng(seeds[restart])
                centers = init if not isinstance(init, str) else init_centers(client, data, self.n_clusters, init, rng)
                start, losses = 0, []
                save(restart, 0, centers, losses)
            result = lloyd(
                client,
                data,
                centers,
                self.max_iter,
                self.tol,
                _forward_progress([self], [0]),
                start_iter=start,
                loss_history=losses,
                on_update=lambda n, c, lo, r=restart: save(r, n, c, lo),
                bounds=self.algorithm != "lloyd",
            )
            if best is None or result.inertia < best.inertia:
                best, best_restart = result, restart
            save(restart + 1, 0, None, [])
        if best.labels is None:
            # The best restart finished before a resume: its labels are one pass over its centres away.
            best.labels = np.concatenate(chunk_labels(client, data, best.centers)).astype(np.int64)
        return best

    def _open_checkpoint(self, X, init):
        """The Checkpoint of this fit and, when resuming, its saved state."""
        if self.random_state is not None and not isinstance(self.random_state, numbers.Integral):
            raise ValueError("checkpoints need random_state to be None or an int, so restarts can be reproduced")
        params = {
            name: getattr(self, name)
            for name in ("n_clusters", "n_init", "max_iter", "tol", "random_state", "chunk_rows")
        }
        params["init"] = init
        ckpt = Checkpoint(self.checkpoint, params, data_fingerprint(X))
        state = ckpt.load() if self.resume else None
        if state is not None and state.restart > (1 if not isinstance(init, str) else self.n_init):
            raise CheckpointError(f"Checkpoint {ckpt.path} is inconsistent: restart {state.restart}")
        return ckpt, state

    def fit_predict(self, X, y=None):
        return self.fit(X).labels_

    def predict(self, X):
        """Nearest centre of each row; a Dask array in gives a (lazy) Dask array out."""
        X = self._check_fitted_input(X)
        if isinstance(X, da.Array):
            return X.map_blocks(_predict_block, self.cluster_centers_, drop_axis=1, dtype=np.int64)
        return kernels.labels_of(X, self.cluster_centers_).astype(np.int64)

    def transform(self, X):
        """Euclidean distance of each row to every centre."""
        X = self._check_fitted_input(X)
        if isinstance(X, da.Array):
            k = self.n_clusters
            dtype = kernels.compute_dtype(X.dtype)
            return X.map_blocks(kernels.transform, self.cluster_centers_, chunks=(X.chunks[0], (k,)), dtype=dtype)
        return kernels.transform(X, self.cluster_centers_)

    def fit_transform(self, X, y=None):
        return self.fit(X).transform(X)

    def score(self, X, y=None) -> float:
        """Opposite of the inertia of X (scikit-learn's convention: higher is better)."""
        d = self.transform(X)
        d2 = (d.min(axis=1) ** 2).sum()
        return -float(d2.compute() if isinstance(d2, da.Array) else d2)

    # -- validation ----------------------------------------------------------------

    def _check_params(self, shape):
        n, d = shape
        k = self.n_clusters
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
            raise ValueError(f"n_clusters must be an integer >= 1, got {k!r}")
        if k > n:
            raise ValueError(f"n_samples={n} should be >= n_clusters={k}")
        for name, low in (("n_init", 1), ("max_iter", 1)):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.tol, numbers.Real) or not self.tol >= 0:
            raise ValueError(f"tol must be a number >= 0, got {self.tol!r}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"Unknown algorithm {self.algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
        if self.chunk_rows is not None and (not isinstance(self.chunk_rows, numbers.Integral) or self.chunk_rows < 1):
            raise ValueError(f"chunk_rows must be an integer >= 1 or None, got {self.chunk_rows!r}")
        if isinstance(self.init, str):
            if self.init not in INIT_NAMES:
                raise ValueError(
                    f"Unknown init {self.init!r}; expected one of {', '.join(INIT_NAMES)} or a (k, d) array"
                )
            return self.init
        init = np.asarray(self.init)
        if init.dtype.kind not in "biuf":
            raise TypeError(f"init array must be numeric, got dtype {init.dtype}")
        if init.shape != (k, d):
            raise ValueError(f"init array has shape {init.shape}, expected (n_clusters, n_features) = ({k}, {d})")
        if not np.isfinite(init).all():
            raise ValueError("init array contains NaN or infinity")
        return init.astype(np.float64)

    def _check_fitted_input(self, X):
        if not hasattr(self, "cluster_centers_"):
            raise AttributeError("This KMeans instance is not fitted yet; call fit first")
        X = _check_data(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but KMeans was fitted with {self.n_features_in_}")
        if isinstance(X, da.Array) and X.numblocks[1] != 1:
            X = X.rechunk({1: -1})  # the kernels need whole rows
        return X


def fit_many(models, X, *, client: Client | None = None) -> list:
    """Fit several KMeans models on the same X together: one pass over the data per iteration for all.

    Every model, restarts included, ends exactly as its own ``fit(X)`` would
    leave it; models that converge drop out of later passes. This is what
    makes a sweep over k (an elbow plot) cost far less than fitting the models
    one after another. The client is ``client``, else the first model's.
    """
    models = list(models)
    if not models:
        raise ValueError("fit_many needs at least one model")
    if any(model.checkpoint is not None or model.resume for model in models):
        raise ValueError("fit_many does not checkpoint; fit a model with a checkpoint on its own")
    X = _check_data(X)
    inits = [model._check_params(X.shape) for model in models]
    chunk_rows = {model.chunk_rows for model in models}
    if len(chunk_rows) > 1:
        raise ValueError(f"Models fitted together must share chunk_rows, got {sorted(chunk_rows, key=str)}")
    bounds = {model.algorithm != "lloyd" for model in models}
    if len(bounds) > 1:
        raise ValueError("Models fitted together must all use algorithm='lloyd' or all use bounds")
    seeds = [_restart_seeds(m.random_state, m.n_init if isinstance(i, str) else 1) for m, i in zip(models, inits)]
    owners = [i for i, s in enumerate(seeds) for _ in s]
    # One named span per fit: the dashboard groups its tasks, and span_id_ finds it in the scheduler.
    with _client(client if client is not None else models[0].client) as client, span("dkmeans-fit") as span_id:
        n_centres = sum(model.n_clusters * len(restarts) for model, restarts in zip(models, seeds))
        data = chunk_data(client, X, chunk_rows.pop(), n_centres)
        requests = [
            (model.n_clusters, init, np.random.default_rng(seed)) if isinstance(init, str) else init
            for model, init, restarts in zip(models, inits, seeds)
            for seed in restarts
        ]
        drawn = iter(init_centers_many(client, data, [r for r in requests if isinstance(r, tuple)]))
        starts = [next(drawn) if isinstance(r, tuple) else r for r in requests]
        results = lloyd_many(
            client,
            data,
            starts,
            [models[i].max_iter for i in owners],
            [models[i].tol for i in owners],
            callback=_forward_progress(models, owners),
            bounds=bounds.pop(),
        )
        persisted = data.persisted
        del data
    for i, model in enumerate(models):
        # The first restart with the lowest inertia, as when the restarts run one after another.
        best = min((r for r, owner in zip(results, owners) if owner == i), key=lambda r: r.inertia)
        model._set_fitted(best, X.shape[1], persisted, span_id)
    return models


def _forward_progress(models, owners):
    """Turn the engine's Iteration reports into each model's callback(iteration, j_clust, shift, seconds).

    A callback that takes a ``restart`` keyword also learns which of the
    model's n_init restarts (0, 1, ...) the report is about: they run together.
    One that takes ``kernel_seconds`` learns the pass's compute time.
    """
    if all(model.callback is None for model in models):
        return None
    restart = [owners[:i].count(owner) for i, owner in enumerate(owners)]
    wants = {id(m.callback): _parameters(m.callback) for m in models if m.callback is not None}

    def forward(it):
        callback = models[owners[it.model]].callback
        if callback is None:
            return
        extra = {"restart": restart[it.model], "kernel_seconds": it.kernel_seconds}
        wanted = {name: value for name, value in extra.items() if name in wants[id(callback)]}
        callback(it.n_iter, it.loss, it.shift, it.seconds, **wanted)

    return forward


def _parameters(func) -> set:
    try:
        return set(inspect.signature(func).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return set()


def _predict_block(block, centers):
    return kernels.labels_of(block, centers).astype(np.int64)


def _check_data(X):
    """Shape and dtype checks that need no pass over the data (NaN is caught in the first pass)."""
    if not isinstance(X, da.Array):
        if hasattr(X, "__dask_graph__"):
            raise TypeError(f"Expected a dask.array.Array or array-like, got {type(X).__name__}")
        X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"Expected a 2-D array of shape (n_samples, n_features), got {X.ndim}-D with shape {X.shape}")
    if X.dtype.kind not in "biuf":
        raise TypeError(f"Expected numeric data, got dtype {X.dtype}")
    if X.dtype.kind == "b":
        X = X.astype(np.uint8)
    if any(math.isnan(s) for s in X.shape):
        raise ValueError("X has unknown chunk sizes; call X.compute_chunk_sizes() first")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X is empty: shape {X.shape}")
    return X


def _restart_seeds(random_state, n_init: int) -> list:
    """One independent seed per restart, all determined by random_state."""
    if isinstance(random_state, np.random.Generator):
        return [int(s) for s in random_state.integers(2**63, size=n_init)]
    if isinstance(random_state, np.random.RandomState):
        return [int(s) for s in random_state.randint(2**31, size=n_init)]
    if random_state is not None and (not isinstance(random_state, numbers.Integral) or random_state < 0):
        raise ValueError(f"random_state must be None, a non-negative int or a numpy Generator, got {random_state!r}")
    return np.random.SeedSequence(random_state).spawn(n_init)


@contextlib.contextmanager
def _client(client: Client | None):
    """The given client, else the current one, else a temporary in-process cluster."""
    if client is None:
        try:
            client = get_client()
        except ValueError:
            pass
    if client is not None:
        yield client
        return
    with LocalCluster(processes=False, dashboard_address=":0") as cluster, Client(cluster) as local:
        yield local
