"""`dkmeans` command line: fit K-means on MNIST on a local or remote Dask cluster."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import click
import numpy as np

from . import __version__
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


@main.command()
@click.option("--k", "k", type=click.IntRange(min=1), default=10, help="Number of clusters.")
@click.option("--init", type=click.Choice(INIT_NAMES), default="k-means||", help="Initialisation.")
@click.option("--n-init", type=click.IntRange(min=1), default=1, help="Restarts; the lowest inertia wins.")
@click.option("--max-iter", type=click.IntRange(min=1), default=300, help="Most Lloyd iterations per run.")
@click.option(
    "--tol", type=click.FloatRange(min=0), default=1e-4, help="Stop once every centroid moves less than this."
)
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Random seed; results depend on it only.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder with the four MNIST .gz files [default: $DKMEANS_DATA_DIR, else download to the cache].",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where downloads and the chunked store live [default: $DKMEANS_CACHE_DIR or the user cache].",
)
@click.option("--chunk-rows", type=click.IntRange(min=1), default=6000, help="Rows per chunk of the Dask array.")
@click.option(
    "--train-per-digit",
    type=click.IntRange(min=1),
    default=None,
    help="Subsample: this many training images per digit [default: all 60,000].",
)
@click.option(
    "--test-size",
    type=click.IntRange(min=1),
    default=None,
    help="Subsample: this many random test images [default: all 10,000].",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write metrics.json, model.npz, loss.png and centroids.png here.",
)
@click.option(
    "--scheduler",
    default=None,
    metavar="ADDRESS",
    help="Connect to a running scheduler (tcp://HOST:PORT) instead of starting a LocalCluster.",
)
@click.option("--workers", type=click.IntRange(min=1), default=2, help="LocalCluster worker processes.")
@click.option("--threads-per-worker", type=click.IntRange(min=1), default=1, help="LocalCluster threads per worker.")
@click.option("--memory-limit", default="auto", help="LocalCluster memory limit per worker, e.g. 4GiB.")
@click.option("--dashboard-address", default=":8787", help="LocalCluster dashboard address (':0' for any free port).")
@click.option(
    "--connect-timeout", type=click.FloatRange(min=0.1), default=10.0, help="Seconds to wait for --scheduler."
)
@click.option(
    "--tls-ca-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="CA certificate of a TLS cluster (with --tls-cert, --tls-key and a tls:// --scheduler).",
)
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Client certificate.")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Client private key.")
@click.option(
    "--store",
    "store_url",
    default=None,
    metavar="URL",
    help="Chunked store location every worker can read: a folder or an fsspec URL (file://, s3://, gs://...) "
    "[default: the store folder in the cache].",
)
def fit(**opts):
    """Fit K-means on MNIST, report J_clust per iteration and train/test accuracy."""
    out_dir = opts["out_dir"]
    if out_dir is not None:
        _check_writable(out_dir)
    with _client(opts) as client:
        click.echo(f"Dask dashboard: {client.dashboard_link}")
        run(client, opts)


def run(client, opts) -> dict:
    """The `fit` command's work, given a connected client."""
    from .data import load_mnist
    from .estimator import KMeans
    from .labeling import accuracy, centroid_labels, predict_labels

    started = time.perf_counter()
    click.echo("Loading MNIST (verified, converted to the chunked store on first use)...")
    try:
        data = load_mnist(
            data_dir=opts["data_dir"],
            cache_dir=opts["cache_dir"],
            chunk_rows=opts["chunk_rows"],
            train_per_digit=opts["train_per_digit"],
            test_size=opts["test_size"],
            seed=opts["seed"],
            store=opts.get("store_url"),
        )
    except (ValueError, OSError) as exc:  # bad files, failed downloads, impossible subsample sizes
        raise click.ClickException(f"MNIST data: {exc}") from exc
    if opts["k"] > data.train_images.shape[0]:
        raise click.BadParameter(
            f"{opts['k']} clusters but only {data.train_images.shape[0]} training images", param_hint="--k"
        )
    X, y = data.train_images, data.train_labels
    workers = client.scheduler_info()["workers"]
    click.echo(
        f"MNIST: {X.shape[0]} training x {X.shape[1]} features in {X.numblocks[0]} chunks of <= {X.chunks[0][0]} rows, "
        f"{len(workers)} workers with {sum(w['nthreads'] for w in workers.values())} threads"
    )
    click.echo(f"Fitting k={opts['k']} init={opts['init']} n_init={opts['n_init']} seed={opts['seed']}")
    click.echo(f"{'iter':>5} {'J_clust':>14} {'shift':>12} {'seconds':>8}")

    pass_seconds: list[float] = []

    def progress(iteration, j_clust, shift, seconds):
        pass_seconds.append(seconds)
        click.echo(f"{iteration:>5} {j_clust:>14.2f} {shift:>12.6g} {seconds:>8.3f}")

    model = KMeans(
        opts["k"],
        init=opts["init"],
        n_init=opts["n_init"],
        max_iter=opts["max_iter"],
        tol=opts["tol"],
        random_state=opts["seed"],
        client=client,
        callback=progress,
    )
    fit_start = time.perf_counter()
    model.fit(X)
    fit_seconds = time.perf_counter() - fit_start
    mapping = centroid_labels(model.labels_, y, opts["k"])
    train_acc = accuracy(y, predict_labels(model.labels_, mapping))
    test_clusters = client.compute(model.predict(data.test_images), sync=True)
    test_acc = accuracy(data.test_labels, predict_labels(test_clusters, mapping))
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
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "fit_seconds": fit_seconds,
        "seconds": time.perf_counter() - started,
        "median_seconds_per_iteration": float(np.median(pass_seconds)),
        "data_persisted": bool(model.data_persisted_),
    }
    click.echo(
        f"Done: {model.n_iter_} iterations in {fit_seconds:.2f} s ({metrics['median_seconds_per_iteration']:.3f} s "
        f"per pass, median), inertia {model.inertia_:.6g}, J_clust {metrics['J_clust']:.2f}"
    )
    click.echo(f"Train accuracy: {train_acc:.4f}")
    click.echo(f"Test accuracy:  {test_acc:.4f}")
    if opts["out_dir"] is not None:
        _write_outputs(Path(opts["out_dir"]), model, mapping, metrics)
        click.echo(f"Wrote metrics.json, model.npz, loss.png, centroids.png to {opts['out_dir']}")
    return metrics


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


if __name__ == "__main__":
    sys.exit(main())
