"""Strong and weak scaling of dkmeans over worker processes, with measured per-iteration traffic and task counts.

Strong scaling: the same fit (full MNIST, fixed initial centres = k distinct training rows chosen by a fixed
seed, tol=0, --iters Lloyd iterations) on 1 and 2 worker processes (one thread each), for each k. Reports
the median seconds per pass, speed-up (t1 / tW) and efficiency (speed-up / W).

Weak scaling: the data grows with the workers. With W workers the data is W copies of MNIST, copy j shifted
by j pixels to the right (so no two rows repeat exactly); efficiency is t(1 worker, n) / t(W workers, W n).

Per-iteration traffic and tasks are measured, not estimated: every fit is run twice, with --iters and with
--iters / 2 iterations, and the difference of the two (divided by the difference in passes) leaves only what
one pass costs. Loading and persisting the data, the init and the final labels cancel out. Counted:
  tasks       tasks the scheduler ran, from its task stream, by name (dkmeans-assign, dkmeans-reduce, ...)
  get_data    bytes and messages the workers served to other workers and to the client (Worker.get_data:
              reduction partials, centre replicas, the result the client gathers)
  centres     bytes of centres the client sends each pass (k x d float64, in the graph of one
              dkmeans-broadcast task; its result is then fetched worker to worker, counted under get_data)
Graph messages (client -> scheduler -> workers) are not counted: a few hundred bytes per task.

Those counts are of passes as tasks (Dask config dkmeans.chunk-hosts off), what a large cluster runs. On a
few workers the engine runs the passes on chunk hosts instead (one actor per worker, its method called by the
client: the centres go to each host, every chunk's partial sums come back, no tasks); the strong-scaling
table also gives the seconds per pass that way, from a third fit of --iters iterations.

    DKMEANS_DATA_DIR=../shared/data/mnist python benchmarks/bench_scaling.py
    python benchmarks/bench_scaling.py --k 10 --iters 4 --workers 1 2 --weak-k 10   # a quick check
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections import Counter

import dask
import dask.array as da
import numpy as np
from distributed import Client, LocalCluster, get_task_stream
from distributed.utils import key_split

from dkmeans import KMeans
from dkmeans.data import load_mnist

BROADCAST = "dkmeans-broadcast"  # the task holding each pass's centres (engine.broadcast)


def _served(dask_worker):
    """Bytes this worker has served (Worker.get_data), by task name: partials, centres, data chunks."""
    out = Counter()
    for entry in dask_worker.transfer_outgoing_log:
        for key, nbytes in entry["keys"].items():
            out[key_split(key)] += nbytes
    return out, dask_worker.transfer_outgoing_count_total


def _totals(client):
    by_name, messages = Counter(), 0
    for served, count in client.run(_served).values():
        by_name.update(served)
        messages += count
    return by_name, messages


def measure_fit(client, X, init, iters, chunk_rows=None, hosts=False) -> dict:
    """One fit: median seconds per pass, tasks run and bytes served, by name."""
    seconds = []
    served_before, messages_before = _totals(client)
    with get_task_stream(client) as stream, dask.config.set({"dkmeans.chunk-hosts": hosts}):
        model = KMeans(
            init.shape[0],
            init=init,
            max_iter=iters,
            tol=0,
            chunk_rows=chunk_rows,
            client=client,
            callback=lambda *a: seconds.append(a[3]),
        ).fit(X)
    served_after, messages_after = _totals(client)
    assert model.n_iter_ == iters, (model.n_iter_, iters)
    served_after.subtract(served_before)
    return {
        "seconds": float(np.median(seconds[1:] or seconds)),
        "passes": len(seconds),
        "tasks": Counter(key_split(record["key"]) for record in stream.data),
        "served": served_after,
        "messages": messages_after - messages_before,
        "inertia": model.inertia_,
    }


def per_pass(client, X, init, iters, chunk_rows=None) -> dict:
    """Seconds per pass of the long fit; tasks and bytes per pass from the difference of two fits."""
    long = measure_fit(client, X, init, iters, chunk_rows)
    short = measure_fit(client, X, init, iters // 2, chunk_rows)
    passes = long["passes"] - short["passes"]

    def diff(a: Counter, b: Counter) -> dict:
        return {name: (a[name] - b[name]) / passes for name in set(a) | set(b) if a[name] != b[name]}

    served = diff(long["served"], short["served"])
    hosted = measure_fit(client, X, init, iters, chunk_rows, hosts=True)
    assert hosted["inertia"] == long["inertia"], (hosted["inertia"], long["inertia"])
    return {
        "seconds": long["seconds"],
        "hosted": hosted["seconds"],
        "tasks": diff(long["tasks"], short["tasks"]),
        "partials": sum(
            v for name, v in served.items() if name == "getitem" or (name.startswith("dkmeans-") and name != BROADCAST)
        ),
        "centres": served.get(BROADCAST, 0.0),  # the centres' task result, fetched worker to worker
        "chunks": sum(v for name, v in served.items() if name.startswith(("mnist-", "weak-"))),  # data moved
        "served": served,
        "messages": (long["messages"] - short["messages"]) / passes,
        "inertia": long["inertia"],
    }


def cluster(workers):
    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")


def fixed_init(X, k, seed=0):
    return X[np.random.default_rng(seed).choice(X.shape[0], k, replace=False)].astype(np.float64)


def shifted_copies(X: np.ndarray, copies: int) -> np.ndarray:
    images = X.reshape(-1, 28, 28)
    return np.concatenate([np.roll(images, j, axis=2).reshape(X.shape) for j in range(copies)])


def traffic(r) -> str:
    return f"{r['partials'] / 1e6:>11.3f} {r['centres'] / 1e6:>16.3f} {r['chunks'] / 1e6:>9.3f} {r['messages']:>5.1f}"


def fmt_tasks(tasks) -> str:
    return ", ".join(f"{n:g} {name}" for name, n in sorted(tasks.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[10, 64, 256])
    parser.add_argument("--iters", type=int, default=20, help="Lloyd iterations (tol=0) per timed fit")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--weak-k", type=int, nargs="*", default=[64], help="k for the weak-scaling runs")
    parser.add_argument("--chunk-rows", type=int, default=6000)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*large graph.*")  # the weak-scaling data is sent once, on purpose
    if args.iters < 2:
        parser.error("--iters must be at least 2 (two fits are differenced)")

    mnist = load_mnist(chunk_rows=args.chunk_rows)
    X_lazy = mnist.train_images
    X = X_lazy.compute()
    d = X.shape[1]
    print(
        f"full MNIST {X.shape}, {os.cpu_count()} cores, {args.iters} iterations per fit (tol=0), "
        f"{X_lazy.numblocks[0]} chunks of {args.chunk_rows} rows, 1 thread per worker process"
    )

    print("\nStrong scaling (same data, more workers); per pass: median seconds, measured traffic and tasks")
    print(
        f"{'k':>4} {'workers':>7} {'s/iter':>8} {'speed-up':>8} {'effic.':>7} {'centres sent MB':>15} "
        f"{'partials MB':>11} {'centre copies MB':>16} {'chunks MB':>9} {'msgs':>5}  tasks per pass"
        "  | chunk hosts: s/iter, speed-up"
    )
    results = {}
    for workers in args.workers:
        with cluster(workers) as cl, Client(cl) as client:
            client.wait_for_workers(workers)
            for k in args.k:
                results[k, workers] = per_pass(client, X_lazy, fixed_init(X, k), args.iters)
    for k in args.k:
        base = results[k, args.workers[0]]["seconds"] * args.workers[0]
        base_hosted = results[k, args.workers[0]]["hosted"] * args.workers[0]
        for workers in args.workers:
            r = results[k, workers]
            speedup = base / r["seconds"]
            print(
                f"{k:>4} {workers:>7} {r['seconds']:>8.3f} {speedup:>7.2f}x {speedup / workers:>7.2f} "
                f"{k * d * 8 / 1e6:>15.3f} {traffic(r)}  {fmt_tasks(r['tasks'])}"
                f"  | {r['hosted']:.3f} {base_hosted / r['hosted']:.2f}x"
            )
        inertias = [results[k, w]["inertia"] for w in args.workers]
        assert max(inertias) - min(inertias) <= 1e-9 * max(inertias), f"k={k}: results differ across workers"

    if not args.weak_k:
        return
    print("\nWeak scaling (W workers, W shifted copies of MNIST); per pass")
    print(
        f"{'k':>4} {'workers':>7} {'rows':>7} {'s/iter':>8} {'effic.':>7} "
        f"{'partials MB':>11} {'centre copies MB':>16} {'chunks MB':>9} {'msgs':>5}  tasks per pass"
        "  | chunk hosts: s/iter, effic."
    )
    for k in args.weak_k:
        base = base_hosted = None
        for workers in args.workers:
            # A named Dask array (not numpy, whose scattered chunks share the centres' "ndarray" name).
            data = da.from_array(shifted_copies(X, workers), chunks=(args.chunk_rows, d), name=f"weak-{workers}")
            with cluster(workers) as cl, Client(cl) as client:
                client.wait_for_workers(workers)
                r = per_pass(client, data, fixed_init(X, k), args.iters, args.chunk_rows)
            base, base_hosted = base or r["seconds"], base_hosted or r["hosted"]
            print(
                f"{k:>4} {workers:>7} {data.shape[0]:>7} {r['seconds']:>8.3f} {base / r['seconds']:>7.2f} "
                f"{traffic(r)}  {fmt_tasks(r['tasks'])}  | {r['hosted']:.3f} {base_hosted / r['hosted']:.2f}"
            )


if __name__ == "__main__":
    main()
