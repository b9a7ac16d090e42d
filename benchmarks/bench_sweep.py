"""An elbow sweep fitted together against the same models fitted one after another, on full MNIST.

Measures, in one run on one 2-worker LocalCluster (1 thread each):
  single      one k=20 fit (the reference of the target: the sweep in at most 4x its time),
  sweep       every k of the range fitted together by dkmeans.sweep.elbow (one pass per iteration for all),
  sequential  the same models fitted one after another (skip with --no-sequential).
Every model uses the same init and seed in all three, and the script checks that the sweep's models are
bit for bit the lone fits. It also prints what sets the ratio: the compute time of the single fit and of
the sweep (each pass's busiest worker, as the chunk hosts report it), and the work the models must do to
be identical to their lone fits, in centre-passes (k x passes, summed over the models): the sweep's
compute grows with that work, and sharing passes saves only what a pass costs beyond its compute. Usage:

    DKMEANS_DATA_DIR=../shared/data/mnist python benchmarks/bench_sweep.py --ks 5:20 --init sample
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from distributed import Client, LocalCluster

from dkmeans import KMeans
from dkmeans.data import load_mnist
from dkmeans.sweep import elbow, parse_k_range


def same(a, b) -> bool:
    return (
        np.array_equal(a.cluster_centers_, b.cluster_centers_)
        and np.array_equal(a.labels_, b.labels_)
        and a.inertia_ == b.inertia_
        and a.n_iter_ == b.n_iter_
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="5:20", help="k range, as dkmeans elbow --k takes it")
    parser.add_argument("--init", default="sample")
    parser.add_argument("--reference-k", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-sequential", dest="sequential", action="store_false")
    args = parser.parse_args()
    ks = parse_k_range(args.ks)

    X = load_mnist().train_images
    print(f"full MNIST {X.shape}, {os.cpu_count()} cores, {args.workers} workers x 1 thread")
    print(f"sweep k={args.ks} init={args.init} seed={args.seed}; reference: one k={args.reference_k} fit")
    with (
        LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):

        def fit_alone(k, compute=None):
            def progress(iteration, j_clust, shift, seconds, kernel_seconds=None):
                compute[iteration] = kernel_seconds

            start = time.perf_counter()
            model = KMeans(
                k, init=args.init, random_state=args.seed, client=client, callback=None if compute is None else progress
            ).fit(X)
            return model, time.perf_counter() - start

        fit_alone(ks[0])  # warm-up: imports, worker start-up, page cache
        reference_compute: dict = {}
        reference, reference_s = fit_alone(args.reference_k, reference_compute)
        # Every model starts at pass 0 and makes one update a pass until it stops: pass p reports iteration p.
        sweep_compute: dict = {}

        def progress(k, init, iteration, j_clust, shift, seconds, kernel_seconds=None):
            sweep_compute[iteration] = kernel_seconds

        start = time.perf_counter()
        points = elbow(X, ks, [args.init], random_state=args.seed, client=client, callback=progress)
        sweep_s = time.perf_counter() - start
        n_passes = max(sweep_compute) + 1
        sequential_s, identical = 0.0, []
        if args.sequential:
            for p in points:
                model, seconds = fit_alone(p.k)
                sequential_s += seconds
                identical.append(same(model, p.model))
        by_k = {p.k: p.model for p in points}
        if args.reference_k in by_k:
            identical.append(same(reference, by_k[args.reference_k]))

    print(f"{'k':>4} {'n_iter':>6}")
    for p in points:
        print(f"{p.k:>4} {p.model.n_iter_:>6}")
    print(f"single k={args.reference_k}: {reference_s:8.1f} s ({reference.n_iter_} iterations)")
    print(f"sweep ({len(points)} models):  {sweep_s:8.1f} s ({n_passes} passes)")
    if args.sequential:
        print(f"sequential fits:     {sequential_s:8.1f} s")
    print(f"sweep / single k={args.reference_k}: {sweep_s / reference_s:.2f}x  (target <= 4x)")
    if args.sequential:
        print(f"sequential / sweep:  {sequential_s / sweep_s:.2f}x")
    print(f"sweep models identical to lone fits: {all(identical)} ({len(identical)} compared)")
    work = sum(p.k * (p.model.n_iter_ + 1) for p in points)
    reference_work = args.reference_k * (reference.n_iter_ + 1)
    print(
        f"work: {work:,} centre-passes (k x passes, summed over the models) against the single fit's "
        f"{reference_work:,}: {work / reference_work:.2f}x"
    )
    if None in sweep_compute.values() or None in reference_compute.values():
        print("compute: not reported (the passes ran as tasks, not on chunk hosts)")
    else:
        sweep_kernel, reference_kernel = sum(sweep_compute.values()), sum(reference_compute.values())
        print(
            f"compute (busiest worker, summed over passes): sweep {sweep_kernel:.2f} s, "
            f"single {reference_kernel:.2f} s: {sweep_kernel / reference_kernel:.2f}x"
        )
        print(f"the rest: sweep {sweep_s - sweep_kernel:.2f} s, single {reference_s - reference_kernel:.2f} s")


if __name__ == "__main__":
    main()
