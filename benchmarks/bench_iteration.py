"""Seconds per Lloyd iteration on full MNIST: dkmeans on a 2-worker LocalCluster vs scikit-learn.

Both start from the same initial centres (k distinct training rows) and run the same number of
iterations with tol=0, in the same process run, so their ratio is meaningful on a noisy machine.
Needs the test extras (scikit-learn). Usage:

    DKMEANS_DATA_DIR=../shared/data/mnist python benchmarks/bench_iteration.py --k 10 20 --iters 20
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from distributed import Client, LocalCluster
from sklearn.cluster import KMeans as SKKMeans

from dkmeans import KMeans
from dkmeans.data import load_mnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="runs per system; the median is reported")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    mnist = load_mnist()
    X_dask = mnist.train_images
    X = X_dask.compute()
    print(f"full MNIST {X.shape}, {os.cpu_count()} cores, {args.iters} iterations, median of {args.repeats} runs")
    print(f"{'k':>5} {'dkmeans s/iter':>15} {'sklearn s/iter':>15} {'ratio':>7} {'inertia rel. diff':>18}")
    with (
        LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        for k in args.k:
            init = X[np.random.default_rng(k).choice(X.shape[0], k, replace=False)].astype(np.float64)
            dk_times, sk_times = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                dk = KMeans(k, init=init, max_iter=args.iters, tol=0, client=client).fit(X_dask)
                dk_times.append((time.perf_counter() - start) / (dk.n_iter_ + 1))  # n_iter_ updates, n_iter_+1 passes
                start = time.perf_counter()
                sk = SKKMeans(k, init=init, n_init=1, max_iter=args.iters, tol=0, algorithm="lloyd").fit(X)
                sk_times.append(
                    (time.perf_counter() - start) / (sk.n_iter_ + 1)
                )  # scikit-learn also makes a final E-step
            dk_s, sk_s = np.median(dk_times), np.median(sk_times)
            rel = abs(dk.inertia_ - sk.inertia_) / sk.inertia_
            print(f"{k:>5} {dk_s:>15.3f} {sk_s:>15.3f} {dk_s / sk_s:>6.2f}x {rel:>18.2e}")


if __name__ == "__main__":
    main()
