"""Full convergence with and without Yinyang bounds: dkmeans algorithm="yinyang" against "lloyd", same run.

Full MNIST (the uint8 store), a 2-worker LocalCluster (1 thread each), the same initial centres (k distinct
training rows, fixed seed), default tol and max_iter. Prints each fit's time, passes and median pass, checks
that both end with identical labels, centres and loss history, and prints the speed-up. Usage:

    DKMEANS_DATA_DIR=../shared/data/mnist python benchmarks/bench_bounds.py --k 256
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from distributed import Client, LocalCluster

from dkmeans import KMeans
from dkmeans.data import load_mnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[256])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    X = load_mnist().train_images
    rows = X.compute()
    with (
        LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        Xp = client.persist(X)
        for k in args.k:
            init = rows[np.random.default_rng(k).choice(len(rows), k, replace=False)].astype(np.float64)
            fits, seconds, passes = {}, {}, {}
            for algorithm in ("lloyd", "yinyang"):
                pass_s = []
                model = KMeans(k, init=init, client=client, algorithm=algorithm)
                model.callback = lambda i, j, shift, s, out=pass_s: out.append(s)
                start = time.perf_counter()
                fits[algorithm] = model.fit(Xp)
                seconds[algorithm] = time.perf_counter() - start
                passes[algorithm] = pass_s
                print(
                    f"k={k} {algorithm:>8}: {seconds[algorithm]:6.1f} s, {model.n_iter_} iterations, "
                    f"median pass {np.median(pass_s):.3f} s",
                    flush=True,
                )
            a, b = fits["lloyd"], fits["yinyang"]
            same = (
                np.array_equal(a.labels_, b.labels_)
                and np.array_equal(a.cluster_centers_, b.cluster_centers_)
                and a.loss_history_ == b.loss_history_
            )
            print(f"k={k}: identical labels, centres and loss history: {same}")
            speedup = seconds["lloyd"] / seconds["yinyang"]
            print(f"k={k}: yinyang is {speedup:.2f}x faster to convergence (target >= 2x)")


if __name__ == "__main__":
    main()
