"""`dkmeans` command line: fit K-means on MNIST on a local or remote Dask cluster."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from pathlib import Path

import click
import numpy as np

from . import __version__
from .estimator import ALGORITHMS
from .seeding import INIT_NAMES


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="dkmeans")
def main():
    """Distributed, out-of-core K-means clustering on Dask."""
    _show_progress_logs()


def _show_progress_logs() -> None:
    """dkmeans's INFO messages (downloads, store conversion) go to stderr, once."""
    logger = logging.getLogger("dkmeans")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _compose(*decorators):
    """Several click options as one decorator, so the commands share them."""

    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


data_options = _compose(
    click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Folder with the four MNIST .gz files [default: $DKMEANS_DATA_DIR, else download to the cache].",
    ),
    click.option(
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Where downloads and the chunked store live [default: $DKMEANS_CACHE_DIR or the user cache].",
    ),
    click.option("--chunk-rows", type=click.IntRange(min=1), default=6000, help="Rows per chunk of the Dask array."),
    click.option(
        "--store",
        "store_url",
        default=None,
        metavar="URL",
        help="Chunked store location every worker can read: a folder or an fsspec URL (file://, s3://, gs://...) "
        "[default: the store folder in the cache].",
    ),
)

subsample_options = _compose(
    click.option(
        "--train-per-digit",
        type=click.IntRange(min=1),
        default=None,
        help="Subsample: this many training images per digit [default: all 60,000].",
    ),
    click.option(
        "--test-size",
        type=click.IntRange(min=1),
        default=None,
        help="Subsample: this many random test images [default: all 10,000].",
    ),
)

cluster_options = _compose(
    click.option(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="Connect to a running scheduler (tcp://HOST:PORT) instead of starting a LocalCluster.",
    ),
    click.option("--workers", type=click.IntRange(min=1), default=2, help="LocalCluster worker processes."),
    click.option(
        "--threads-per-worker", type=click.IntRange(min=1), default=1, help="LocalCluster threads per worker."
    ),
    click.option("--memory-limit", default="auto", help="LocalCluster memory limit per worker, e.g. 4GiB."),
    click.option(
        "--dashboard-address", default=":8787", help="LocalCluster dashboard address (':0' for any free port)."
    ),
    click.option(
        "--connect-timeout", type=click.FloatRange(min=0.1), default=10.0, help="Seconds to wait for --scheduler."
    ),
    click.option(
        "--tls-ca-file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="CA certificate of a TLS cluster (with --tls-cert, --tls-key and a tls:// --scheduler).",
    ),
    click.option(
        "--tls-cert", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Client certificate."
    ),
    click.option(
        "--tls-key", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Client private key."
    ),
)

seed_option = click.option(
    "--seed", type=click.IntRange(min=0), default=0, help="Random seed; results depend on it only."
)


algorithm_option = click.option(
    "--algorithm",
    type=click.Choice(ALGORITHMS),
    default="auto",
    show_default=True,
    help="yinyang (= auto) skips rows whose Yinyang bounds show their centroid cannot change; lloyd computes "
    "every distance. Same result, iteration by iteration.",
)


@main.command()
@click.option("--k", "k", type=click.IntRange(min=1), default=10, help="Number of clusters.")
@click.option("--init", type=click.Choice(INIT_NAMES), default="k-means||", help="Initialisation.")
@click.option("--n-init", type=click.IntRange(min=1), default=1, help="Restarts; the lowest inertia wins.")
@click.option("--max-iter", type=click.IntRange(min=1), default=300, help="Most Lloyd iterations per run.")
@click.option(
    "--tol", type=click.FloatRange(min=0), default=1e-4, help="Stop once every centroid moves less than this."
)
@algorithm_option
@seed_option
@data_options
@subsample_options
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write metrics.json, model.npz, loss.png, centroids.png and confusion.png here.",
)
@click.option(
    "--expanded",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Fit on the training images of an expanded store (`dkmeans data expand`), in its own chunks, "
    "instead of MNIST's 60,000; the test set stays MNIST's.",
)
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Save the fit's state to this file after every iteration (atomically).",
)
@click.option("--resume", is_flag=True, help="Continue the fit saved in --checkpoint.")
@cluster_options
def fit(**opts):
    """Fit K-means on MNIST, report J_clust per iteration and train/test accuracy."""
    out_dir = opts["out_dir"]
    if opts["resume"] and opts["checkpoint"] is None:
        raise click.UsageError("--resume needs --checkpoint PATH")
    if opts["expanded"] is not None and opts["train_per_digit"] is not None:
        raise click.UsageError("--expanded and --train-per-digit cannot be combined")
    if out_dir is not None:
        _check_writable(out_dir)
    with _client(opts) as client:
        click.echo(f"Dask dashboard: {client.dashboard_link}")
        run(client, opts)


def run(client, opts) -> dict:
    """The `fit` command's work, given a connected client."""
    from .estimator import KMeans
    from .metrics import centroid_labels, clustering_scores

    started = time.perf_counter()
    data = _load(opts)
    X, y = data.train_images, data.train_labels
    if opts["expanded"] is not None:
        from .data.expand import open_expanded

        try:
            store = open_expanded(opts["expanded"])
            X, y = store.images(), store.labels()
        except (ValueError, OSError) as exc:
            raise click.ClickException(f"--expanded: {exc}") from exc
        click.echo(
            f"Expanded store {store.path}: {store.nbytes / 1e9:.2f} GB, factor {store.manifest['settings']['factor']}"
        )
    _check_ks([opts["k"]], X.shape[0], "--k")
    _describe(client, X)
    from .engine import fits_in_memory, placement_message

    placement = placement_message(client, X.nbytes, fits_in_memory(client, X.nbytes))
    click.echo(placement[0].upper() + placement[1:])
    click.echo(f"Fitting k={opts['k']} init={opts['init']} n_init={opts['n_init']} seed={opts['seed']}")
    if opts["resume"]:
        click.echo(f"Resuming from checkpoint {opts['checkpoint']}")
    restarts = opts["n_init"] > 1 and opts["checkpoint"] is None  # restarts run side by side: label them
    click.echo(("restart " if restarts else "") + f"{'iter':>5} {'J_clust':>14} {'shift':>12} {'seconds':>8}")

    pass_seconds: dict[int, float] = {}  # one entry per pass over the data, however many restarts shared it

    def progress(iteration, j_clust, shift, seconds, restart=0):
        pass_seconds[iteration if restarts else len(pass_seconds)] = seconds
        line = f"{iteration:>5} {j_clust:>14.2f} {shift:>12.6g} {seconds:>8.3f}"
        click.echo(f"{restart:>7} {line}" if restarts else line)

    model = KMeans(
        opts["k"],
        init=opts["init"],
        n_init=opts["n_init"],
        max_iter=opts["max_iter"],
        tol=opts["tol"],
        random_state=opts["seed"],
        client=client,
        callback=progress,
        checkpoint=opts["checkpoint"],
        resume=opts["resume"],
        algorithm=opts["algorithm"],
    )
    fit_start = time.perf_counter()
    _fit_with_clear_errors(lambda: model.fit(X), client)
    fit_seconds = time.perf_counter() - fit_start
    train_clusters = np.asarray(model.labels_)
    mapping = centroid_labels(train_clusters, y, opts["k"])
    test_clusters = client.compute(model.predict(data.test_images), sync=True)
    n_classes = int(max(np.max(y), np.max(data.test_labels))) + 1
    scores = {
        "train": clustering_scores(train_clusters, y, mapping, n_classes),
        "test": clustering_scores(test_clusters, data.test_labels, mapping, n_classes),
    }
    metrics = {
        "k": opts["k"],
        "init": opts["init"],
        "n_init": opts["n_init"],
        "seed": opts["seed"],
        "n_train": int(X.shape[0]),
        "n_test": int(data.test_images.shape[0]),
        "n_iter": int(model.n_iter_),
        "inertia": float(model.inertia_),
        "J_clust": float(model.loss_history_[-1]),
        "loss_history": [float(v) for v in model.loss_history_],
        **_flat_scores(scores),
        "confusion_matrix_axes": "rows: true digit, columns: predicted digit (majority label of the cluster)",
        "fit_seconds": fit_seconds,
        "seconds": time.perf_counter() - started,
        "median_seconds_per_iteration": float(np.median(list(pass_seconds.values()))) if pass_seconds else None,
        "data_persisted": bool(model.data_persisted_),
        "data_placement": "persisted" if model.data_persisted_ else "streamed",
        "data_bytes": int(X.nbytes),
    }
    per_pass = f"{metrics['median_seconds_per_iteration']:.3f} s per pass, median" if pass_seconds else "no pass run"
    click.echo(
        f"Done: {model.n_iter_} iterations in {fit_seconds:.2f} s ({per_pass}), "
        f"inertia {model.inertia_:.6g}, J_clust {metrics['J_clust']:.2f}"
    )
    _echo_scores(scores)
    if opts["out_dir"] is not None:
        try:
            _write_outputs(Path(opts["out_dir"]), model, mapping, metrics)
        except OSError as exc:
            raise click.ClickException(
                f"Could not write the results to {opts['out_dir']}: {exc.strerror or exc} "
                "(each file is written whole or not at all: none is left half-written)"
            ) from exc
        click.echo(f"Wrote metrics.json, model.npz, loss.png, centroids.png, confusion.png to {opts['out_dir']}")
    return metrics


def _ks_option(ctx, param, value):
    from .sweep import parse_k_range

    try:
        return parse_k_range(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _inits_option(ctx, param, value):
    from .sweep import parse_inits

    try:
        return parse_inits(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@main.command()
@click.option(
    "--k",
    "ks",
    default="5:20",
    metavar="RANGE",
    callback=_ks_option,
    help="The ks to fit: START:STOP (inclusive), START:STOP:STEP, or a list like 10,20,64,256.",
)
@click.option(
    "--init",
    "inits",
    default="sample,random",
    metavar="NAMES",
    callback=_inits_option,
    help=f"Comma-separated initialisations, one elbow line each; from {', '.join(INIT_NAMES)}.",
)
@click.option("--max-iter", type=click.IntRange(min=1), default=300, help="Most Lloyd iterations per model.")
@click.option(
    "--tol", type=click.FloatRange(min=0), default=1e-4, help="Stop a model once every centroid moves less than this."
)
@algorithm_option
@seed_option
@data_options
@subsample_options
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("results"),
    help="Write elbow.json and elbow.png here.",
)
@cluster_options
def elbow(**opts):
    """Fit every k with every init together, one pass over the data per iteration for all, and draw the elbow."""
    from .sweep import elbow as sweep

    _check_writable(opts["out_dir"])
    with _client(opts) as client:
        click.echo(f"Dask dashboard: {client.dashboard_link}")
        started = time.perf_counter()
        data = _load(opts)
        _check_ks(opts["ks"], data.train_images.shape[0], "--k")
        X = data.train_images
        _describe(client, X)
        n_models = len(opts["ks"]) * len(opts["inits"])
        click.echo(
            f"Fitting {n_models} models together: k in {_ks_text(opts['ks'])}, init in {', '.join(opts['inits'])}, "
            f"seed={opts['seed']}"
        )
        progress = _PassProgress()
        X_test = client.compute(data.test_images, sync=True)
        points = _fit_with_clear_errors(
            lambda: sweep(
                X,
                opts["ks"],
                opts["inits"],
                y=data.train_labels,
                X_test=X_test,
                y_test=data.test_labels,
                random_state=opts["seed"],
                max_iter=opts["max_iter"],
                tol=opts["tol"],
                algorithm=opts["algorithm"],
                client=client,
                callback=progress,
            ),
            client,
        )
        progress.flush()
        fit_seconds = time.perf_counter() - progress.started
    click.echo(f"{'init':>10} {'k':>4} {'n_iter':>6} {'J_clust':>14} {'inertia':>14} {'train acc':>9} {'test acc':>9}")
    for p in points:
        r = p.summary()
        click.echo(
            f"{r['init']:>10} {r['k']:>4} {r['n_iter']:>6} {r['J_clust']:>14.2f} {r['inertia']:>14.6g} "
            f"{r['train_accuracy']:>9.4f} {r['test_accuracy']:>9.4f}"
        )
    _write_elbow(Path(opts["out_dir"]), opts, points, fit_seconds, time.perf_counter() - started, progress)


def _ks_text(ks) -> str:
    contiguous = len(ks) > 2 and ks == list(range(ks[0], ks[-1] + 1))
    return f"{ks[0]}..{ks[-1]}" if contiguous else ",".join(map(str, ks))


class _PassProgress:
    """Prints one line per pass of a sweep: how many models ran in it and how long it took."""

    def __init__(self):
        self.started = time.perf_counter()
        self.iteration = None
        self.running = 0
        self.seconds = 0.0
        self.pass_seconds: list[float] = []
        click.echo(f"{'iter':>5} {'models':>6} {'seconds':>8}")

    def __call__(self, k, init, iteration, j_clust, shift, seconds):
        if iteration != self.iteration:
            self.flush()
            self.iteration, self.running = iteration, 0
        self.running += 1
        self.seconds = seconds

    def flush(self):
        if self.iteration is not None and self.running:
            self.pass_seconds.append(self.seconds)
            click.echo(f"{self.iteration:>5} {self.running:>6} {self.seconds:>8.3f}")
            self.running = 0


def _write_elbow(out: Path, opts, points, fit_seconds, seconds, progress) -> None:
    from . import plots
    from .atomic import write_json

    curves = {init: [(p.k, p.j_clust) for p in points if p.init == init] for init in opts["inits"]}
    plots.elbow(curves, path=out / "elbow.png")
    write_json(
        out / "elbow.json",
        {
            "ks": opts["ks"],
            "inits": opts["inits"],
            "seed": opts["seed"],
            "max_iter": opts["max_iter"],
            "tol": opts["tol"],
            "n_train": int(points[0].model.labels_.size),
            "fit_seconds": fit_seconds,
            "seconds": seconds,
            "passes": len(progress.pass_seconds),
            "median_seconds_per_pass": float(np.median(progress.pass_seconds)),
            "results": [p.summary() for p in points],
        },
    )
    passes = len(progress.pass_seconds)
    click.echo(f"Fitted in {fit_seconds:.1f} s ({passes} passes); wrote elbow.json, elbow.png to {out}")


# The course notebook's experiment: its subsample, seed, k, and the two runs it compared.
NOTEBOOK = {"train_per_digit": 100, "test_size": 50, "seed": 72, "k": 20}
NOTEBOOK_RUNS = (("sample", 1000, 1e-6), ("random", 100, 1e-6))


@main.command()
@data_options
@click.option(
    "--full/--no-full",
    default=True,
    help="Also run the same two fits on all 60,000 training and 10,000 test images.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write reproduce.json and one centroid grid per run here.",
)
@cluster_options
def reproduce(**opts):
    """The course notebook's experiment, exactly, next to the same fits on the full data.

    100 training images per digit, 50 random test images, seed 72, k=20:
    sample init (max_iter=1000, tol=1e-6), then random init (max_iter=100,
    tol=1e-6). With --full, the same two fits on all of MNIST.
    """
    from .estimator import KMeans, fit_many
    from .metrics import accuracy, centroid_labels, predict_labels

    if opts["out_dir"] is not None:
        _check_writable(opts["out_dir"])
    opts = dict(opts, seed=NOTEBOOK["seed"])
    settings = [("notebook", NOTEBOOK["train_per_digit"], NOTEBOOK["test_size"])]
    if opts["full"]:
        settings.append(("full", None, None))
    rows = []
    with _client(opts) as client:
        click.echo(f"Dask dashboard: {client.dashboard_link}")
        for name, per_digit, test_size in settings:
            data = _load(opts, train_per_digit=per_digit, test_size=test_size)
            X, y = data.train_images, data.train_labels
            test_images = client.compute(data.test_images, sync=True)
            click.echo(f"{name}: {X.shape[0]} training, {test_images.shape[0]} test images; fitting both runs together")
            progress = _PassProgress()
            models = [
                KMeans(
                    NOTEBOOK["k"],
                    init=init,
                    max_iter=max_iter,
                    tol=tol,
                    random_state=NOTEBOOK["seed"],
                    callback=functools.partial(progress, NOTEBOOK["k"], init),
                )
                for init, max_iter, tol in NOTEBOOK_RUNS
            ]
            _fit_with_clear_errors(functools.partial(fit_many, models, X, client=client), client)
            progress.flush()
            seconds = time.perf_counter() - progress.started
            for model, (init, max_iter, tol) in zip(models, NOTEBOOK_RUNS):
                mapping = centroid_labels(model.labels_, y, model.n_clusters)
                test_predicted = predict_labels(model.predict(test_images), mapping)
                rows.append(
                    {
                        "data": name,
                        "n_train": int(X.shape[0]),
                        "n_test": int(test_images.shape[0]),
                        "init": init,
                        "max_iter": max_iter,
                        "tol": tol,
                        "n_iter": int(model.n_iter_),
                        "J_clust": float(model.loss_history_[-1]),
                        "inertia": float(model.inertia_),
                        "train_accuracy": accuracy(y, predict_labels(model.labels_, mapping)),
                        "test_accuracy": accuracy(data.test_labels, test_predicted),
                        "fit_seconds_both_runs": seconds,
                    }
                )
                if opts["out_dir"] is not None:
                    from . import plots

                    plots.centroid_grid(
                        model.cluster_centers_,
                        mapping,
                        title=f"{name} data, {init} init: k={model.n_clusters} centroids and their majority label",
                        path=Path(opts["out_dir"]) / f"centroids-{name}-{init}.png",
                    )
    click.echo(f"{'data':>9} {'n_train':>7} {'init':>7} {'n_iter':>6} {'J_clust':>12} {'train acc':>9} {'test acc':>9}")
    for r in rows:
        click.echo(
            f"{r['data']:>9} {r['n_train']:>7} {r['init']:>7} {r['n_iter']:>6} {r['J_clust']:>12.2f} "
            f"{r['train_accuracy']:>9.4f} {r['test_accuracy']:>9.4f}"
        )
    if opts["out_dir"] is not None:
        from .atomic import write_json

        write_json(Path(opts["out_dir"]) / "reproduce.json", {"setting": NOTEBOOK, "runs": rows})
        click.echo(f"Wrote reproduce.json and the centroid grids to {opts['out_dir']}")


def _load(opts, **overrides):
    """MNIST as chunked Dask arrays, from the options of a command; bad data is a clean error."""
    from .data import load_mnist

    keys = ("data_dir", "cache_dir", "chunk_rows", "train_per_digit", "test_size", "seed")
    params = {key: opts.get(key) for key in keys}
    params["store"] = opts.get("store_url")
    params.update(overrides)
    click.echo("Loading MNIST (verified, converted to the chunked store on first use)...")
    try:
        return load_mnist(**params)
    except (ValueError, OSError) as exc:  # bad files, failed downloads, impossible subsample sizes
        raise click.ClickException(f"MNIST data: {exc}") from exc


def _check_ks(ks, n: int, hint: str) -> None:
    if max(ks) > n:
        raise click.BadParameter(f"{max(ks)} clusters but only {n} training images", param_hint=hint)


def _describe(client, X) -> None:
    workers = client.scheduler_info()["workers"]
    click.echo(
        f"MNIST: {X.shape[0]} training x {X.shape[1]} features in {X.numblocks[0]} chunks of <= {X.chunks[0][0]} rows, "
        f"{len(workers)} workers with {sum(w['nthreads'] for w in workers.values())} threads"
    )


def _flat_scores(scores: dict) -> dict:
    """{"train": {"accuracy": ..}, ..} -> {"train_accuracy": .., ..}, the keys metrics.json has always used."""
    return {f"{part}_{name}": value for part, values in scores.items() for name, value in values.items() if name != "n"}


def _echo_scores(scores: dict) -> None:
    from .metrics import most_confused

    click.echo(f"Train accuracy: {scores['train']['accuracy']:.4f}")
    click.echo(f"Test accuracy:  {scores['test']['accuracy']:.4f}")
    for part in ("train", "test"):
        s = scores[part]
        click.echo(f"{part.capitalize():<5} purity {s['purity']:.4f}  NMI {s['nmi']:.4f}  ARI {s['ari']:.4f}")
    confused = most_confused(scores["test"]["confusion_matrix"])
    if confused is not None:
        true, predicted, count = confused
        total = sum(scores["test"]["confusion_matrix"][true])
        click.echo(f"Most confused on test: {true} read as {predicted} ({count} of {total} test images of {true})")
    if scores["train"]["unlabelled"] or scores["test"]["unlabelled"]:
        click.echo(
            f"Unlabelled (in a cluster without training rows): {scores['train']['unlabelled']} train, "
            f"{scores['test']['unlabelled']} test"
        )


def _fit_with_clear_errors(fit, client):
    """Fit; turn a corrupted chunk or a refused checkpoint into one clear message, and let a lost scheduler through."""
    from .checkpoint import CheckpointError
    from .data.store import StoreError

    try:
        return fit()
    except (CheckpointError, StoreError) as exc:
        raise click.ClickException(_with_notes(exc)) from exc
    except Exception as exc:
        if client.status not in ("running", "connecting") or _is_connection_error(exc):
            raise  # cluster.remote_client names the scheduler that was lost; the checkpoint note travels along
        if getattr(exc, "__notes__", None):
            raise click.ClickException(_with_notes(exc)) from exc
        raise


def _with_notes(exc: BaseException) -> str:
    return " ".join([str(exc), *getattr(exc, "__notes__", [])])


def _is_connection_error(exc: BaseException) -> bool:
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError

    if isinstance(exc, FutureCancelledError):
        return exc.reason == "scheduler-connection-lost"
    return isinstance(exc, (CommClosedError, OSError, TimeoutError))


def _write_outputs(out: Path, model, mapping, metrics) -> None:
    from . import plots
    from .atomic import atomic_path, write_json

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "model.npz") as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            cluster_centers=model.cluster_centers_,
            centroid_labels=mapping,
            n_clusters=model.n_clusters,
            init=str(model.init),
            n_iter=model.n_iter_,
            tol=model.tol,
            max_iter=model.max_iter,
            random_state=model.random_state,
            inertia=model.inertia_,
        )
    plots.loss_curve(
        model.loss_history_, title=f"J_clust per iteration (k={model.n_clusters}, {model.init})", path=out / "loss.png"
    )
    plots.centroid_grid(model.cluster_centers_, mapping, path=out / "centroids.png")
    plots.confusion_matrix(
        metrics["test_confusion_matrix"],
        title=f"Test confusion (k={model.n_clusters}, {model.init}, accuracy {metrics['test_accuracy']:.3f})",
        path=out / "confusion.png",
    )
    write_json(out / "metrics.json", metrics)


def _check_writable(out: Path) -> None:
    """Fail before any work if the output folder cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".dkmeans-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise click.UsageError(f"--out {out}: cannot write there ({exc.strerror or exc})") from exc


@contextlib.contextmanager
def _client(opts):
    from distributed import Client, LocalCluster

    address = opts["scheduler"]
    if address:
        from .cluster import ClusterError, remote_client, tls_security

        try:
            security = tls_security(opts.get("tls_ca_file"), opts.get("tls_cert"), opts.get("tls_key"))
            with remote_client(address, opts["connect_timeout"], security) as client:
                yield client
        except ClusterError as exc:
            raise click.ClickException(str(exc)) from exc
        return
    if any(opts.get(name) for name in ("tls_ca_file", "tls_cert", "tls_key")):
        raise click.UsageError("--tls-ca-file, --tls-cert and --tls-key are for a remote --scheduler")
    with (
        LocalCluster(
            n_workers=opts["workers"],
            threads_per_worker=opts["threads_per_worker"],
            memory_limit=opts["memory_limit"],
            dashboard_address=opts["dashboard_address"],
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@main.group()
def data():
    """Build datasets in the chunked on-disk store."""


@data.command()
@click.option("--factor", type=click.IntRange(min=1), required=True, help="Copies of each training digit (1 = MNIST).")
@click.option("--elastic", is_flag=True, help="Also deform the copies elastically (Simard et al. 2003).")
@click.option("--max-shift", type=click.FloatRange(min=0), default=2.0, help="Largest translation, in pixels.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Random seed of the deformations.")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=6000, help="Rows per chunk file.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Store folder [default: a folder named after the settings in the cache].",
)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="As for fit.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="As for fit.")
def expand(factor, elastic, max_shift, seed, chunk_rows, out, data_dir, cache_dir):
    """Expand MNIST's training set by shifted (and deformed) copies, chunk by chunk, into a store on disk."""
    from .data.expand import expand_mnist
    from .data.store import StoreError

    total = factor * 60000
    with click.progressbar(length=total, label=f"Writing {total:,} images", file=sys.stderr) as bar:
        done = [0]

        def progress(rows, _total):
            bar.update(rows - done[0])
            done[0] = rows

        try:
            store = expand_mnist(
                factor,
                out=out,
                data_dir=data_dir,
                cache_dir=cache_dir,
                seed=seed,
                elastic=elastic,
                max_shift=max_shift,
                chunk_rows=chunk_rows,
                progress=progress,
            )
        except (StoreError, OSError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"Expanded store: {store.path} ({store.n_rows:,} images, {store.nbytes / 1e9:.2f} GB)")
    click.echo(f"Fit on it with: dkmeans fit --expanded {store.path}")


if __name__ == "__main__":
    sys.exit(main())
