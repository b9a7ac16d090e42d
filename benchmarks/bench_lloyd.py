"""Lloyd iterations on full MNIST (60000 x 784): dkmeans against scikit-learn, faiss and dask-ml, in one run.

Every figure comes from the same process run on the same machine, so the ratios are meaningful even when
the absolute times are noisy (a shared machine). Parts:

1. Seconds per Lloyd iteration for each k in --k: --iters iterations, tol=0, the same initial centres for
   every system (k distinct training rows chosen by a fixed seed; float32 for scikit-learn, faiss and
   dask-ml, float64 for dkmeans, which keeps its centres in float64). Median of --repeats fits, made in
   rounds of one fit per system.
   Seconds per iteration = fit time / passes over the data, where a pass assigns every row once:
     scikit-learn  n_iter_ + 1   (n_iter_ assign+update iterations, then a final assignment for labels_)
     faiss         niter         (niter assign+update iterations; it returns no labels, so no final pass)
     dask-ml       n_iter_ + 1   (n_iter_ loop passes, then the final labels/inertia pass that fit()
                                  computes for inertia_; its NaN/inf scan of the input is not counted)
     dkmeans       n_iter_ + 1   (n_iter_ updates; the last pass keeps its centres and gives labels_)
   Each result is checked independently with numpy in float64: the inertia of its final centres under
   its own labels (faiss: under the nearest-centre assignment) against the inertia it reports and
   against scikit-learn's; and its final centres against scikit-learn's.
2. The whole fit, initialisation included, with each system's default init, max_iter and tol, for each
   k in --fit-k and seeds 0 .. --fit-seeds - 1 (medians compared): scikit-learn, dask-ml (float32) and
   dkmeans on its native uint8 data (dask-ml's k-means|| is very slow at large k: it runs seed 0 only
   there, and --skip-slow skips it at k > 64).
3. Roofline: the machine's float32 matrix-product rate and memory read bandwidth on 2 threads, measured
   here, and each system's achieved GFLOP/s counting brute-force work (2 n d k flops per pass).
4. Dask overhead of dkmeans: wall time per pass against the busiest worker's compute (see dask_overhead()).
5. Worker memory of a dkmeans fit at k=--mem-k (1024) on a fresh 2-worker cluster, against the data each
   worker holds and the engine's tile bound.

Needs the bench extra (pip install -e ".[bench]"). Usage:

    DKMEANS_DATA_DIR=../shared/data/mnist python benchmarks/bench_lloyd.py
    python benchmarks/bench_lloyd.py --k 10 --iters 3 --repeats 1 --fit-k 10 --fit-seeds 1 --skip-slow  # quick
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import os
import statistics
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import psutil
from distributed import Client, LocalCluster, wait
from distributed.utils import key_split
from sklearn.cluster import KMeans as SKKMeans
from threadpoolctl import threadpool_limits

from dkmeans import KMeans
from dkmeans import allocator as dk_allocator
from dkmeans import compiled as dk_compiled
from dkmeans import kernels as dk_kernels
from dkmeans import screening as dk_screening
from dkmeans.data import load_mnist

with warnings.catch_warnings():
    # dask-ml imports numba, pandas and old dask/sklearn APIs; their deprecation notes are not our results.
    warnings.simplefilter("ignore")
    import dask_ml.cluster
    import faiss

SYSTEMS = ("sklearn", "faiss", "dask-ml", "dkmeans-u8", "dkmeans-f32")
THREADS = 2  # cores for every system: 2 BLAS/OpenMP threads in-process, or 2 one-thread worker processes
REL_NOISE = 1e-4  # relative inertia difference still counted as float32 rounding noise
CENTRE_NOISE = 1e-3  # relative (Frobenius) difference of final centres still counted as float32 noise


@contextlib.contextmanager
def quiet():
    """Silence dask-ml's (and its dependencies') warnings around its calls; they would bury the tables.

    dask-ml's k-means|| also resubmits keys with new tasks, which the (in-process) scheduler logs as a
    long "Detected different `run_spec`" warning; that logger is raised to ERROR meanwhile.
    """
    scheduler_log = logging.getLogger("distributed.scheduler")
    level = scheduler_log.level
    scheduler_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        scheduler_log.setLevel(level)


# --- independent numpy checks (float64) -----------------------------------------------------------


def nearest(X64: np.ndarray, centers: np.ndarray, block: int = 8192) -> np.ndarray:
    """Nearest-centre labels in float64, block by block."""
    c = np.asarray(centers, dtype=np.float64)
    c_sq = (c * c).sum(axis=1)
    out = np.empty(X64.shape[0], dtype=np.int64)
    for s in range(0, X64.shape[0], block):
        x = X64[s : s + block]
        out[s : s + block] = np.argmin(c_sq - 2.0 * (x @ c.T), axis=1)
    return out


def inertia_of(X64: np.ndarray, centers: np.ndarray, labels: np.ndarray, block: int = 8192) -> float:
    """Sum of squared distances of every row to its labelled centre, float64."""
    c = np.asarray(centers, dtype=np.float64)
    total = 0.0
    for s in range(0, X64.shape[0], block):
        diff = X64[s : s + block] - c[labels[s : s + block]]
        total += float(np.einsum("ij,ij->", diff, diff))
    return total


# --- one fit per system, from given centres ----------------------------------------------------------


@dataclass
class Result:
    system: str
    k: int
    seconds: list = field(default_factory=list)  # fit seconds of every repeat
    passes: int = 0
    n_iter: int = 0
    centers: np.ndarray | None = None
    labels: np.ndarray | None = None
    reported: float = float("nan")  # the system's own inertia
    overhead: dict | None = None  # dkmeans only: dask_overhead() of the last repeat

    @property
    def per_pass(self) -> float:
        return statistics.median(self.seconds) / self.passes


def fit_sklearn(X32, init, iters):
    with threadpool_limits(THREADS):
        start = time.perf_counter()
        est = SKKMeans(init.shape[0], init=init.astype(np.float32), n_init=1, max_iter=iters, tol=0, algorithm="lloyd")
        est.fit(X32)
        seconds = time.perf_counter() - start
    return seconds, est.n_iter_ + 1, est.n_iter_, est.cluster_centers_, est.labels_, est.inertia_


def fit_faiss(X32, init, iters):
    faiss.omp_set_num_threads(THREADS)
    k, d = init.shape
    # max_points_per_centroid: faiss otherwise trains on a sample of 256 k rows; we want every row.
    est = faiss.Kmeans(d, k, niter=iters, max_points_per_centroid=X32.shape[0], verbose=False)
    start = time.perf_counter()
    est.train(X32, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
    seconds = time.perf_counter() - start
    # obj[-1] is the inertia of its last assignment, i.e. of the centres *before* its last update.
    return seconds, iters, iters, est.centroids, None, float(est.obj[-1])


def fit_daskml(Xd32, init, iters):
    with quiet():
        start = time.perf_counter()
        est = dask_ml.cluster.KMeans(init.shape[0], init=init.astype(np.float32), max_iter=iters, tol=0).fit(Xd32)
        seconds = time.perf_counter() - start
        labels = est.labels_.compute()  # lazy in dask-ml; computed outside the timing
    return seconds, est.n_iter_ + 1, est.n_iter_, est.cluster_centers_, labels, est.inertia_


def fit_dkmeans(client, Xd, init, iters, algorithm):
    marks, kernels = [], []  # wall-clock end of every pass, and its compute time where measured (dask_overhead)

    def progress(*_, kernel_seconds=None):
        marks.append(time.time())
        kernels.append(kernel_seconds)

    kwargs = {} if algorithm is None else {"algorithm": algorithm}
    est = KMeans(
        init.shape[0],
        init=init.astype(np.float64),
        max_iter=iters,
        tol=0,
        client=client,
        callback=progress,
        **kwargs,
    )
    began = time.time()
    start = time.perf_counter()
    est.fit(Xd)
    seconds = time.perf_counter() - start
    ended = time.time()
    overhead = dask_overhead(client, began, ended, marks, kernels)
    return seconds, est.n_iter_ + 1, est.n_iter_, est.cluster_centers_, est.labels_, est.inertia_, overhead


def dask_overhead(client, began: float, ended: float, marks: list, kernels: list) -> dict | None:
    """How much of each dkmeans pass is not kernel compute.

    Pass p's wall window runs from the end of pass p-1 (the fit's start for p=0) to the moment the
    fit's callback reports pass p (its update is computed on the client then). Kernel time of a pass
    = the busiest worker's compute time in it: as the fit's callback reports it (kernel_seconds) for
    passes run by chunk hosts, else from the scheduler's task stream: every task whose name starts
    with "dkmeans-" (assign, reduce, broadcast, ...) belongs to the window its compute began in, and
    each worker's "compute" durations in the window are summed. Overhead = 1 - kernel / wall:
    scheduling or actor calls, transfers, (de)serialisation, the client's update and the idle time of
    the busiest worker. Pass 0 (which also places the data) is left out of the medians.
    """
    if not marks:
        return None
    edges = [began] + list(marks)
    n_pass = len(marks)
    walls = np.diff(edges)
    if all(k is not None for k in kernels):
        kernel = np.array(kernels, dtype=float)
    else:
        stream = client.get_task_stream(start=began - 1, stop=ended + 1)
        if not stream:
            return None
        busy = [dict() for _ in range(n_pass)]
        for task in stream:
            if not key_split(task["key"]).startswith("dkmeans-"):
                continue
            for ss in task.get("startstops", ()):
                if ss.get("action") != "compute":
                    continue
                p = int(np.searchsorted(edges, ss["start"], side="right")) - 1
                if 0 <= p < n_pass:
                    w = task.get("worker", "?")
                    busy[p][w] = busy[p].get(w, 0.0) + (ss["stop"] - ss["start"])
        kernel = np.array([max(b.values()) if b else 0.0 for b in busy])
    later = slice(1, None) if n_pass > 1 else slice(None)
    return {
        "wall": float(np.median(walls[later])),
        "kernel": float(np.median(kernel[later])),
        "overhead": float(np.median(1.0 - kernel[later] / walls[later])),
        "fit_wall": ended - began,
        "fit_kernel": float(kernel.sum()),
    }


# --- parts -------------------------------------------------------------------------------------------


def part_iterations(args, client, data, X64, dk_algorithms):
    """Part 1: seconds per pass from the same centres; returns every Result for the roofline."""
    results = []
    for k in args.k:
        init = data["u8"][np.random.default_rng(k).choice(data["u8"].shape[0], k, replace=False)]
        runs = []
        for system in args.systems:
            if system.startswith("dkmeans"):
                runs += [(f"{system}/{a or 'lloyd'}", system, a) for a in dk_algorithms]
            else:
                runs.append((system, system, None))
        rows = [Result(label, k) for label, _, _ in runs]
        # Round by round, every system once a round: the machine's speed drifts by tens of % within minutes,
        # and each system's median then comes from the same stretch of time as the others'.
        for round_ in range(args.repeats):
            for res, (label, system, algorithm) in zip(rows, runs):
                if system == "sklearn":
                    out = fit_sklearn(data["f32"], init, args.iters)
                elif system == "faiss":
                    out = fit_faiss(data["f32"], init, args.iters)
                elif system == "dask-ml":
                    out = fit_daskml(data["dask_f32"], init, args.iters)
                else:
                    src = data["dask_u8"] if system == "dkmeans-u8" else data["dask_f32"]
                    out = fit_dkmeans(client, src, init, args.iters, algorithm)
                    res.overhead = out[6]
                res.seconds.append(out[0])
                res.passes, res.n_iter, res.centers, res.labels, res.reported = out[1:6]
                print(f"  round {round_ + 1}: {label:<22} k={k:<5} {out[0] / res.passes:.4f} s/iter", flush=True)
        results += rows
        report_iterations([r for r in results if r.k == k], X64)
    return results


def report_iterations(rows, X64):
    k = rows[0].k
    ref = next((r for r in rows if r.system == "sklearn"), None)
    dml = next((r for r in rows if r.system == "dask-ml"), None)
    print(f"\nk={k}: seconds per Lloyd iteration (median of {len(rows[0].seconds)} fits)")
    print(f"{'system':<22} {'passes':>6} {'s/iter':>9} {'this/sklearn':>13} {'dask-ml/this':>13}")
    for r in rows:
        vs_sk = f"{r.per_pass / ref.per_pass:12.2f}x" if ref else f"{'-':>13}"
        vs_dml = f"{dml.per_pass / r.per_pass:12.2f}x" if dml else f"{'-':>13}"
        print(f"{r.system:<22} {r.passes:>6} {r.per_pass:>9.4f} {vs_sk} {vs_dml}")

    print(f"\nk={k}: results checked with numpy (float64) from each system's final centres")
    print(
        f"{'system':<22} {'reported inertia':>17} {'recomputed':>17} {'rel.diff':>9} "
        f"{'vs sklearn':>10} {'centres vs sklearn':>19}"
    )
    notes = []
    ref_inertia = None
    if ref is not None:
        ref_inertia = inertia_of(X64, ref.centers, ref.labels)
    for r in rows:
        labels = r.labels if r.labels is not None else nearest(X64, r.centers)
        own = inertia_of(X64, r.centers, labels)
        rel = abs(r.reported - own) / own
        vs_ref = abs(own - ref_inertia) / ref_inertia if ref is not None else float("nan")
        if ref is not None:
            c_ref = np.asarray(ref.centers, dtype=np.float64)
            c_diff = np.linalg.norm(np.asarray(r.centers, dtype=np.float64) - c_ref) / np.linalg.norm(c_ref)
        else:
            c_diff = float("nan")
        print(f"{r.system:<22} {r.reported:>17.6e} {own:>17.6e} {rel:>9.1e} {vs_ref:>10.1e} {c_diff:>19.1e}")
        if r.labels is not None:
            best = nearest(X64, r.centers)
            moved = int(np.count_nonzero(best != r.labels))
            if moved and inertia_of(X64, r.centers, best) < own * (1 - REL_NOISE):
                notes.append(f"{r.system}: {moved} labels are not the nearest centre (beyond float32 ties)")
        if rel > REL_NOISE:
            why = ""
            if r.system == "faiss":
                why = " (faiss reports the inertia of its last assignment, made before its final update)"
            elif r.system == "dask-ml":
                why = " (dask-ml's inertia_ after max_iter sums unsquared distances: a known dask-ml bug)"
            notes.append(f"{r.system}: reported inertia differs from the recomputed one by {rel:.1e}{why}")
        if c_diff > CENTRE_NOISE:
            notes.append(
                f"{r.system}: final centres differ from scikit-learn's by {c_diff:.1e} (relative Frobenius norm), "
                "beyond float32 noise: the runs took different paths (rounding at near-ties, empty clusters)"
            )
    groups = agreeing_groups(rows)
    if len(groups) > 1:
        listed = "; ".join(", ".join(g) for g in groups)
        notes.append(f"systems whose final centres agree within {CENTRE_NOISE:.0e} of each other: {listed}")
    for note in notes:
        print(f"  NOTE {note}")


def agreeing_groups(rows) -> list[list[str]]:
    """Systems grouped by final centres equal within CENTRE_NOISE (relative), each joined to the first it matches."""
    groups = []
    for r in rows:
        c = np.asarray(r.centers, dtype=np.float64)
        for g in groups:
            first = g[0]
            c0 = np.asarray(first.centers, dtype=np.float64)
            if np.linalg.norm(c - c0) / np.linalg.norm(c0) <= CENTRE_NOISE:
                g.append(r)
                break
        else:
            groups.append([r])
    return [[r.system for r in g] for g in groups]


def part_whole_fit(args, client, data):
    """Part 2: default init, default max_iter and tol, whole fit timed, for seeds 0 .. --fit-seeds - 1.

    The iteration count a default start leads to varies by a factor of 2-3 with the seed, in every system,
    so a single seed says little: the ratios are of the medians over the seeds.
    """
    seeds = range(args.fit_seeds)
    print(f"\nWhole fit with each system's default init, default max_iter and tol, random_state = {list(seeds)}")
    print("  (tol means different things: scikit-learn's is relative to the data's variance, dask-ml's")
    print("   bounds the squared centre shift, dkmeans' bounds every centre's move in pixel units)")
    X64 = data["X64"]
    # scikit-learn stops once the squared shifts sum to at most tol * mean feature variance; a model whose
    # every centre moved less than sqrt(that / k) meets it too, so "dkmeans-u8/sk-tol" stops no earlier.
    sk_tol = 1e-4 * float(np.var(X64, axis=0).mean())
    print(f"  dkmeans-u8/sk-tol: dkmeans with tol = sqrt({sk_tol:.4g} / k), at least scikit-learn's convergence")
    print(f"  dask-ml at k > 64: seed 0 only (about 2 minutes a fit){'; skipped (--skip-slow)' * args.skip_slow}")
    print(f"{'system':<18} {'k':>5} {'seed':>4} {'seconds':>9} {'n_iter':>7} {'inertia (numpy)':>16}")
    for k in args.fit_k:
        times = {}
        for seed in seeds:
            for system in ("sklearn", "dask-ml", "dkmeans-u8", "dkmeans-u8/sk-tol"):
                if system.split("/")[0] not in args.systems:
                    continue
                if system == "dask-ml" and k > 64 and (args.skip_slow or seed > 0):
                    continue
                start = time.perf_counter()
                if system == "sklearn":
                    with threadpool_limits(THREADS):
                        est = SKKMeans(k, n_init=1, random_state=seed).fit(data["f32"])
                    labels = est.labels_
                elif system == "dask-ml":
                    with quiet():
                        est = dask_ml.cluster.KMeans(k, random_state=seed).fit(data["dask_f32"])
                        seconds = time.perf_counter() - start
                        labels = est.labels_.compute()
                else:
                    tol = float(np.sqrt(sk_tol / k)) if system.endswith("sk-tol") else 1e-4
                    est = KMeans(k, client=client, random_state=seed, tol=tol).fit(data["dask_u8"])
                    labels = est.labels_
                if system != "dask-ml":
                    seconds = time.perf_counter() - start
                inertia = inertia_of(X64, est.cluster_centers_, labels)
                times.setdefault(system, []).append(seconds)
                print(f"{system:<18} {k:>5} {seed:>4} {seconds:>9.2f} {est.n_iter_:>7} {inertia:>16.6e}", flush=True)
        medians = {system: statistics.median(t) for system, t in times.items()}
        ref, slow = medians.get("sklearn"), medians.get("dask-ml")
        for system, median in medians.items():
            vs_sk = f"{median / ref:.2f}x scikit-learn" if ref else ""
            vs_dask = f", dask-ml {slow / median:.1f}x slower" if slow and system != "dask-ml" else ""
            n = len(times[system])
            print(f"  k={k} {system:<18} median of {n} seed{'s' * (n > 1)}: {median:.2f} s, {vs_sk}{vs_dask}")


def measure_peak(repeats: int = 10):
    """float32 GEMM rate (GFLOP/s) and read bandwidth (GB/s), both on THREADS threads."""
    rng = np.random.default_rng(0)
    m, kk, n = 4096, 784, 1024
    a = rng.random((m, kk), dtype=np.float32)
    b = rng.random((kk, n), dtype=np.float32)
    with threadpool_limits(THREADS):
        a @ b
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    gflops = 2 * m * n * kk / statistics.median(times) / 1e9

    big = np.ones(2**28, dtype=np.float32)  # 1 GiB
    halves = np.array_split(big, THREADS)
    with ThreadPoolExecutor(THREADS) as pool:  # numpy's sum releases the GIL: one half per core
        list(pool.map(np.sum, halves))
        times = []
        for _ in range(5):
            t = time.perf_counter()
            list(pool.map(np.sum, halves))
            times.append(time.perf_counter() - t)
    gbps = big.nbytes / statistics.median(times) / 1e9
    return gflops, gbps


def part_roofline(results, gflops, gbps, n, d):
    print(f"\nRoofline: float32 matrix product {gflops:.1f} GFLOP/s, memory read {gbps:.1f} GB/s, {THREADS} threads")
    print("  (measured now: median (4096x784)@(784x1024) product; sum of a 1 GiB float32 array, one half per thread)")
    print(f"{'system':<22} {'k':>5} {'GFLOP/s':>8} {'of peak':>8} {'data GB/s':>10} {'of bandwidth':>13}")
    for r in results:
        rate = 2 * n * d * r.k / r.per_pass / 1e9
        itemsize = 1 if "u8" in r.system else 4
        read = n * d * itemsize / r.per_pass / 1e9
        print(f"{r.system:<22} {r.k:>5} {rate:>8.1f} {rate / gflops:>8.0%} {read:>10.2f} {read / gbps:>13.0%}")
    print("  GFLOP/s counts brute-force work, 2 n d k flops per pass; bound-accelerated algorithms (yinyang)")
    print("  skip most distance computations, so their figure is an equivalent rate, not work done.")
    print("  dkmeans ranks distances with a float32 product and recomputes the rare near-ties in float64.")


def part_overhead(results):
    rows = [r for r in results if r.overhead]
    if not rows:
        return
    print("\nDask overhead of dkmeans (last fit of each run)")
    print("  per pass (median over passes 1..n): wall = time between the ends of consecutive passes;")
    print("  kernel = busiest worker's compute time in that pass (chunk hosts report it; for passes of tasks,")
    print("  the summed compute time of the dkmeans-* tasks that began in it, from the scheduler's task stream);")
    print("  overhead = 1 - kernel / wall (actor calls or scheduling, transfers, serialisation, the client's update)")
    print(f"{'system':<22} {'k':>5} {'wall s':>8} {'kernel s':>9} {'overhead':>9} {'whole fit: 1-kernel/wall':>25}")
    for r in rows:
        o = r.overhead
        whole = 1 - o["fit_kernel"] / o["fit_wall"]
        print(f"{r.system:<22} {r.k:>5} {o['wall']:>8.4f} {o['kernel']:>9.4f} {o['overhead']:>9.1%} {whole:>25.1%}")


class RssSampler(threading.Thread):
    """Samples the RSS of the given processes every `period` seconds from this process; keeps each peak."""

    def __init__(self, pids: dict, period: float = 0.05):
        super().__init__(daemon=True)
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = {name: 0 for name in pids}
        self.period = period
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            for name, proc in self.procs.items():
                self.peak[name] = max(self.peak[name], proc.memory_info().rss)
            time.sleep(self.period)


def _reset_hwm(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of a process; False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _load_compiled_kernels(rows):
    """A fresh pass and a bounded one over a few rows, as a fit's first passes run them."""
    centres = rows[:4].astype(np.float64)
    states, _ = dk_kernels.lloyd_chunk_many(rows, centres, (4,), (0,), bounds=True)
    dk_kernels.lloyd_chunk_many(rows, centres + 1.0, (4,), (0,), states=states, bounds=True)


def part_memory(args, mnist):
    """Part 5: worker RSS during a k=mem_k fit on a fresh cluster (no leftovers of the other parts)."""
    k, X = args.mem_k, mnist.train_images
    n, d = X.shape
    print(f"\nMemory: dkmeans k={k}, {args.mem_iters} iterations, uint8 data, a fresh {args.workers}-worker cluster")
    with (
        LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        Xp = client.persist(X)
        wait(Xp)
        pids = client.run(os.getpid)
        held = {w: 0 for w in pids}
        nbytes = client.nbytes(summary=False)
        client_who_has = client.who_has(Xp)
        for key, workers in client_who_has.items():
            for w in workers:
                held[w] += nbytes.get(key, 0)
        init = X[np.random.default_rng(k).choice(n, k, replace=False)].compute().astype(np.float64)
        # The compiled (numba) kernels are loaded first, on 64 rows: code, not the fit's working memory.
        fresh = {w: psutil.Process(pid).memory_info().rss for w, pid in pids.items()}
        client.run(_load_compiled_kernels, X[:64].compute())
        before = {w: psutil.Process(pid).memory_info().rss for w, pid in pids.items()}
        loaded = ", ".join(f"{(before[w] - fresh[w]) / 1e6:+.1f}" for w in pids)
        print(f"  compiled kernels loaded in each worker beforehand (two passes over 64 rows): RSS {loaded} MB")
        hwm_ok = all(_reset_hwm(pid) for pid in pids.values())
        sampler = RssSampler(pids)
        sampler.start()
        est = KMeans(k, init=init, max_iter=args.mem_iters, tol=0, client=client)
        start = time.perf_counter()
        est.fit(Xp)
        seconds = time.perf_counter() - start
        sampler.stop.set()
        sampler.join()
        hwm = {w: _hwm(pid) if hwm_ok else None for w, pid in pids.items()}
    # In memory, the engine regroups the data into one chunk per worker thread, or (whole numbers already
    # persisted, as here) the chunk hosts join each worker's chunks into one: either way at most one copy.
    rows = n // len(pids)
    tile = dk_kernels.TILE_ELEMENTS
    kd = k * d * 8  # one k x d 8-byte array: centres, or one chunk's partial sums
    groups = dk_screening.n_groups(k)
    block = dk_screening.BLOCK_ELEMENTS * 4
    # From SPLIT_MIN_CENTRES centres, the rows split for the products: a copy of their dense columns (at most the
    # chunk) and their rare non-zeros (at most RARE_SHARE of the rest, 8 bytes each, and 8 bytes a row).
    split = rows * d + int(8 * dk_compiled.RARE_SHARE * rows * d) + 8 * rows if k >= dk_kernels.SPLIT_MIN_CENTRES else 0
    print(f"  fit: {seconds:.1f} s, {est.n_iter_ + 1} passes")
    print(
        f"{'worker':<26} {'data MB':>8} {'RSS before':>11} {'peak RSS':>9} {'VmHWM':>12} {'increase':>9} {'bound':>7}"
    )
    for w in pids:
        peak = max(sampler.peak[w], hwm[w] or 0)
        # What a fit adds to a worker, at most: regrouping or joining its rows into one chunk (the pieces and the
        # joined copy), six tile-sized 8-byte temporaries, one block of float32 products, the per-row state (int32 label
        # and bound stamp, float64 upper bound and bound for all other centres, float32 lower bound per group,
        # float64 squared norm and norm), seven k x d arrays (float64 centres
        # and their two float32 copies, the sums as float64 and int64, the previous pass's sums kept in the
        # state and the partial sums awaiting the client) and the allocator's retained heap.
        bound = 2 * rows * d + split + 6 * tile * 8 + block + rows * (40 + 4 * groups) + 7 * kd + dk_allocator.THRESHOLD
        kp = f"{hwm[w] / 1e6:12.1f}" if hwm[w] else f"{'-':>12}"
        print(
            f"{w:<26} {held[w] / 1e6:>8.1f} {before[w] / 1e6:>11.1f} "
            f"{sampler.peak[w] / 1e6:>9.1f} {kp} {(peak - before[w]) / 1e6:>9.1f} {bound / 1e6:>7.1f}"
        )
    print(
        "  MB throughout. peak RSS: sampled every 0.05 s from the benchmark process; VmHWM: the kernel's peak RSS mark,"
        f" reset before the fit{'' if hwm_ok else ' (not available here)'}; increase = peak - RSS before"
    )
    print(
        f"  bound: regrouping into one chunk ({2 * rows * d / 1e6:.1f} MB), the rows split ({split / 1e6:.1f} MB), "
        f"six tiles of TILE_ELEMENTS={tile:,} values "
        f"({6 * tile * 8 / 1e6:.1f} MB), a block of products ({block / 1e6:.1f} MB), per-row state with {groups} "
        f"lower bounds ({rows * (40 + 4 * groups) / 1e6:.1f} MB), seven k x d arrays ({7 * kd / 1e6:.1f} MB) and "
        f"{dk_allocator.THRESHOLD >> 20} MiB of allocator slack"
    )
    print(
        f"  an n_chunk x k float64 distance matrix would take {rows * k * 8 / 1e6:.1f} MB per {rows}-row chunk, "
        f"{n / len(pids) * k * 8 / 1e6:.1f} MB for each worker's {n // len(pids)} rows, {n * k * 8 / 1e6:.1f} MB "
        "for all of MNIST"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="*", default=[10, 64, 256], help="k values of part 1 (none: skip)")
    parser.add_argument("--iters", type=int, default=20, help="Lloyd iterations per fit in part 1 (tol=0)")
    parser.add_argument("--repeats", type=int, default=3, help="fits per system in part 1; the median is reported")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--dk-algorithms", nargs="+", default=["lloyd", "yinyang"])
    parser.add_argument("--fit-k", type=int, nargs="*", default=[10, 256], help="k values of part 2 (none: skip)")
    parser.add_argument("--fit-seeds", type=int, default=5, help="random_state 0 .. N-1 for each whole fit of part 2")
    parser.add_argument("--skip-slow", action="store_true", help="skip dask-ml's whole fit at k > 64 (~2 min)")
    parser.add_argument("--mem-k", type=int, default=1024, help="k of the memory check (0: skip)")
    parser.add_argument("--mem-iters", type=int, default=3)
    parser.add_argument("--workers", type=int, default=THREADS)
    args = parser.parse_args()
    logging.getLogger("dask_ml").setLevel(logging.ERROR)

    if "algorithm" in inspect.signature(KMeans).parameters:
        dk_algorithms = list(args.dk_algorithms)
        dk_note = f"dkmeans algorithms: {', '.join(dk_algorithms)}"
    else:
        dk_algorithms = [None]
        dk_note = "dkmeans.KMeans has no algorithm parameter: one dkmeans run per data form, labelled lloyd"

    mnist = load_mnist()
    u8 = mnist.train_images.compute()
    n, d = u8.shape
    data = {"u8": u8, "f32": u8.astype(np.float32), "X64": u8.astype(np.float64)}
    print(
        f"full MNIST {n} x {d}; {os.cpu_count()} cores here, every system on {THREADS}; "
        f"{args.iters} iterations, tol=0, median of {args.repeats}"
    )
    print(f"numpy {np.__version__}, faiss {faiss.__version__}, {dk_note}")
    print("timings on a shared machine are noisy; compare the ratios, measured in this one run\n")

    gflops, gbps = measure_peak()
    with (
        LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        client.get_task_stream()  # the scheduler records its task stream from the first request on
        # Both data forms persisted on the workers before any timing: iterations, not loading, are measured.
        data["dask_u8"] = client.persist(mnist.train_images)
        data["dask_f32"] = client.persist(mnist.train_images.astype(np.float32))
        results = part_iterations(args, client, data, data["X64"], dk_algorithms) if args.k else []
        part_roofline(results, gflops, gbps, n, d)
        part_overhead(results)
        if args.fit_k:
            part_whole_fit(args, client, data)
    if args.mem_k:
        part_memory(args, mnist)


if __name__ == "__main__":
    main()
