"""The `dkmeans` command line, end to end: real subprocesses, real clusters, real MNIST.

Every number the CLI reports is recomputed here with plain numpy from the
centroids it saved, on the same subsample loaded independently.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import sklearn.metrics as skm
from click.testing import CliRunner

from dkmeans.cli import main

SUBSAMPLE = dict(train_per_digit=100, test_size=50, seed=72)
FIT_ARGS = [
    "--k",
    "10",
    "--train-per-digit",
    "100",
    "--test-size",
    "50",
    "--seed",
    "72",
    "--init",
    "sample",
    "--max-iter",
    "50",
]
LOCAL_ARGS = ["--workers", "2", "--threads-per-worker", "1", "--dashboard-address", ":0"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OUTPUT_FILES = {"metrics.json", "model.npz", "loss.png", "centroids.png", "confusion.png"}
SCORES = ("accuracy", "purity", "nmi", "ari", "confusion_matrix", "unlabelled")
PROGRESS = re.compile(r"^\s*(\d+)\s+(\d+\.\d{2})\s+(\S+)\s+(\d+\.\d{3})\s*$")
BIN = Path(sys.executable).parent
DKMEANS = BIN / "dkmeans"


def env_for(tmp: Path, data_dir: Path) -> dict:
    env = dict(os.environ)
    env["DKMEANS_DATA_DIR"] = str(data_dir)
    env["DKMEANS_CACHE_DIR"] = str(tmp / "env-cache")  # never the real user cache
    env.pop("DISPLAY", None)
    return env


def run_cli(args, env, timeout=240):
    start = time.perf_counter()
    proc = subprocess.run(
        [str(DKMEANS), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return proc, time.perf_counter() - start


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def closed_port() -> int:
    """A port nothing listens on: bind one, then close it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- independent oracle -----------------------------------------------------------


def majority_reference(clusters, labels, k):
    """Plain-Python majority vote: most common label, ties to the smaller label, empty cluster -1."""
    votes = [Counter() for _ in range(k)]
    for c, y in zip(clusters.tolist(), labels.tolist()):
        votes[c][y] += 1
    out = []
    for v in votes:
        if not v:
            out.append(-1)
        else:
            top = max(v.values())
            out.append(min(y for y, n in v.items() if n == top))
    return np.array(out)


def nearest(X, centers):
    """Nearest centre and squared distance by direct differences (no |x|^2 - 2x.c + |c|^2 trick)."""
    d2 = np.stack([((X - c) ** 2).sum(axis=1) for c in centers], axis=1)
    idx = d2.argmin(axis=1)
    return idx, d2[np.arange(len(X)), idx]


@pytest.fixture(scope="module")
def subsample(mnist_dir, cache_dir):
    from dkmeans.data import load_mnist

    data = load_mnist(data_dir=mnist_dir, cache_dir=cache_dir, **SUBSAMPLE)
    return (
        data.train_images.compute(scheduler="synchronous").astype(np.float64),
        np.asarray(data.train_labels),
        data.test_images.compute(scheduler="synchronous").astype(np.float64),
        np.asarray(data.test_labels),
    )


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, mnist_dir):
    """One `dkmeans fit` on a LocalCluster, as a real subprocess through the console script."""
    tmp = tmp_path_factory.mktemp("cli-local")
    out = tmp / "out"
    args = ["fit", *FIT_ARGS, *LOCAL_ARGS, "--out", str(out), "--cache-dir", str(tmp / "cache")]
    proc, elapsed = run_cli(args, env_for(tmp, mnist_dir))
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc, out, elapsed


def load_outputs(out: Path):
    metrics = json.loads((out / "metrics.json").read_text())
    with np.load(out / "model.npz", allow_pickle=False) as z:
        model = {name: z[name] for name in z.files}
    return metrics, model


# --- end to end on a LocalCluster -------------------------------------------------------


def test_fit_prints_dashboard_progress_and_accuracies(local_run):
    proc, out, _ = local_run
    metrics, _ = load_outputs(out)
    lines = proc.stdout.splitlines()
    assert re.fullmatch(r"Dask dashboard: http://\S+", lines[0]), lines[0]

    rows = [m.groups() for m in map(PROGRESS.match, lines) if m]
    assert rows, proc.stdout
    iters = [int(r[0]) for r in rows]
    assert iters == list(range(len(rows)))
    header = lines.index(next(line for line in lines if line.split() == ["iter", "J_clust", "shift", "seconds"]))
    assert lines[header + 1 : header + 1 + len(rows)] == [line for line in lines if PROGRESS.match(line)]
    # A fixed point is counted as an update (n_iter passes printed); a tol/max_iter stop prints n_iter + 1.
    assert len(rows) in (metrics["n_iter"], metrics["n_iter"] + 1)
    printed_j = [float(r[1]) for r in rows]
    for i, j in enumerate(printed_j):
        assert j == pytest.approx(metrics["loss_history"][i], abs=0.0051)
    assert printed_j[-1] == pytest.approx(metrics["J_clust"], abs=0.0051)
    shifts = [float(r[2]) for r in rows]
    assert all(s >= 0 for s in shifts)
    assert all(float(r[3]) >= 0 for r in rows)

    done = next(line for line in lines if line.startswith("Done:"))
    assert f"{metrics['n_iter']} iterations" in done
    assert float(done.rsplit("J_clust", 1)[1]) == pytest.approx(metrics["J_clust"], abs=0.0051)
    train = re.search(r"^Train accuracy:\s+([\d.]+)$", proc.stdout, re.M)
    test = re.search(r"^Test accuracy:\s+([\d.]+)$", proc.stdout, re.M)
    assert train and test, proc.stdout
    assert float(train.group(1)) == pytest.approx(metrics["train_accuracy"], abs=5e-5)
    assert float(test.group(1)) == pytest.approx(metrics["test_accuracy"], abs=5e-5)
    for part in ("train", "test"):
        line = re.search(rf"^{part.capitalize()}\s+purity ([\d.]+)  NMI ([\d.]+)  ARI (-?[\d.]+)$", proc.stdout, re.M)
        assert line, proc.stdout
        for printed, name in zip(line.groups(), ("purity", "nmi", "ari")):
            assert float(printed) == pytest.approx(metrics[f"{part}_{name}"], abs=5e-5)
    confused = re.search(
        r"^Most confused on test: (\d) read as (\d) \((\d+) of (\d+) test images of \1\)$", proc.stdout, re.M
    )
    assert confused, proc.stdout
    true, predicted, count, total = map(int, confused.groups())
    matrix = np.array(metrics["test_confusion_matrix"])
    assert true != predicted and matrix[true, predicted] == count and matrix[true].sum() == total
    off_diagonal = matrix - np.diag(np.diag(matrix))
    assert count == off_diagonal.max()
    assert re.search(r"1000 training x 784 features", proc.stdout)
    assert "2 workers with 2 threads" in proc.stdout


def test_fit_metrics_are_sane(local_run):
    _, out, elapsed = local_run
    assert files_in(out) == OUTPUT_FILES  # nothing else: no temporary or probe files left
    metrics, _ = load_outputs(out)
    assert metrics["k"] == 10
    assert metrics["init"] == "sample"
    assert metrics["seed"] == 72
    assert metrics["n_init"] == 1
    assert metrics["n_train"] == 1000
    assert metrics["n_test"] == 50
    assert 1 <= metrics["n_iter"] <= 50
    assert 0.3 < metrics["train_accuracy"] <= 1
    assert 0.3 < metrics["test_accuracy"] <= 1
    for part, n in (("train", 1000), ("test", 50)):
        assert {f"{part}_{name}" for name in SCORES} <= set(metrics)
        matrix = np.array(metrics[f"{part}_confusion_matrix"])
        assert matrix.shape == (10, 10) and matrix.sum() == n - metrics[f"{part}_unlabelled"]
        assert np.trace(matrix) == round(metrics[f"{part}_accuracy"] * n)
        assert 0 < metrics[f"{part}_nmi"] <= 1 and 0 < metrics[f"{part}_ari"] <= 1
        assert metrics[f"{part}_accuracy"] <= metrics[f"{part}_purity"] <= 1
    assert metrics["train_unlabelled"] == 0  # every training row is in a cluster with a majority
    assert metrics["train_purity"] == metrics["train_accuracy"]  # the vote is taken on these rows
    assert "rows: true digit" in metrics["confusion_matrix_axes"]
    assert metrics["inertia"] > 0
    assert metrics["J_clust"] == pytest.approx(metrics["inertia"] / metrics["n_train"], rel=1e-12)
    history = metrics["loss_history"]
    assert len(history) == metrics["n_iter"] + 1
    assert history[-1] == metrics["J_clust"]
    for before, after in zip(history, history[1:]):
        assert after <= before * (1 + 1e-12), history
    assert history[0] > history[-1]
    assert 0 < metrics["fit_seconds"] <= metrics["seconds"] < elapsed


def test_fit_model_npz(local_run):
    _, out, _ = local_run
    metrics, model = load_outputs(out)
    assert model["cluster_centers"].shape == (10, 784)
    assert model["cluster_centers"].dtype == np.float64
    assert np.isfinite(model["cluster_centers"]).all()
    assert model["centroid_labels"].shape == (10,)
    assert set(model["centroid_labels"].tolist()) <= set(range(10))
    assert int(model["n_clusters"]) == 10
    assert str(model["init"]) == "sample"
    assert int(model["max_iter"]) == 50
    assert float(model["tol"]) == 1e-4
    assert int(model["random_state"]) == 72
    assert int(model["n_iter"]) == metrics["n_iter"]
    assert float(model["inertia"]) == metrics["inertia"]


def test_fit_numbers_match_numpy_recomputation(local_run, subsample):
    _, out, _ = local_run
    metrics, model = load_outputs(out)
    X, y, X_test, y_test = subsample
    centers = model["cluster_centers"]
    assert X.shape == (1000, 784) and X_test.shape == (50, 784)

    clusters, d2 = nearest(X, centers)
    assert d2.sum() == pytest.approx(metrics["inertia"], rel=1e-9)
    assert d2.mean() == pytest.approx(metrics["J_clust"], rel=1e-9)
    mapping = majority_reference(clusters, y, 10)
    np.testing.assert_array_equal(model["centroid_labels"], mapping)
    assert metrics["train_accuracy"] == np.mean(mapping[clusters] == y)

    test_clusters, _ = nearest(X_test, centers)
    assert metrics["test_accuracy"] == np.mean(mapping[test_clusters] == y_test)

    # Purity, NMI, ARI and the confusion matrix from scikit-learn on the recomputed assignments.
    for part, c, t in (("train", clusters, y), ("test", test_clusters, y_test)):
        assert metrics[f"{part}_nmi"] == pytest.approx(skm.normalized_mutual_info_score(t, c), abs=1e-12)
        assert metrics[f"{part}_ari"] == pytest.approx(skm.adjusted_rand_score(t, c), abs=1e-12)
        assert metrics[f"{part}_purity"] == pytest.approx(
            skm.cluster.contingency_matrix(t, c).max(axis=0).sum() / len(t), abs=1e-15
        )
        np.testing.assert_array_equal(
            metrics[f"{part}_confusion_matrix"], skm.confusion_matrix(t, mapping[c], labels=range(10))
        )

    # The centroids are a fixed point of Lloyd's update up to tol (or max_iter was hit).
    means = np.stack([X[clusters == j].mean(axis=0) for j in range(10)])
    if metrics["n_iter"] < 50:
        assert np.sqrt(((means - centers) ** 2).sum(axis=1)).max() < 1e-4


@pytest.mark.parametrize("name", ["loss.png", "centroids.png", "confusion.png"])
def test_fit_writes_valid_pngs(local_run, name):
    _, out, _ = local_run
    path = out / name
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert 5_000 < path.stat().st_size < 5_000_000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert 200 <= image.shape[0] <= 4000 and 200 <= image.shape[1] <= 4000
    assert image[..., :3].std() > 0.01  # not a blank canvas


# --- remote scheduler ---------------------------------------------------------------


def _stop(procs):
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)


def test_fit_on_remote_scheduler_matches_local_cluster(tmp_path, mnist_dir, local_run):
    from distributed import Client

    env = env_for(tmp_path, mnist_dir)
    dask = str(BIN / "dask")
    scheduler_file = tmp_path / "scheduler.json"
    logs = []
    procs = []

    def spawn(args, name):
        log = open(tmp_path / f"{name}.log", "w")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                args,
                env=env,
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        )

    try:
        spawn(
            [
                dask,
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                str(scheduler_file),
            ],
            "scheduler",
        )
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            assert procs[0].poll() is None, (tmp_path / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "scheduler did not start"
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")

        # A scheduler without workers is a clear error, not a hang.
        proc, elapsed = run_cli(["fit", *FIT_ARGS, "--scheduler", address, "--connect-timeout", "2"], env, timeout=120)
        assert proc.returncode != 0
        assert elapsed < 30, elapsed
        assert f"The Dask scheduler at {address} has no workers" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr

        for i in range(2):
            spawn(
                [
                    dask,
                    "worker",
                    address,
                    "--host",
                    "127.0.0.1",
                    "--nthreads",
                    "1",
                    "--nworkers",
                    "1",
                    "--no-dashboard",
                    "--local-directory",
                    str(tmp_path / f"worker{i}"),
                ],
                f"worker{i}",
            )
        with Client(address, timeout=30) as c:
            c.wait_for_workers(2, timeout=60)

        out = tmp_path / "out"
        proc, _ = run_cli(
            ["fit", *FIT_ARGS, "--scheduler", address, "--out", str(out), "--cache-dir", str(tmp_path / "cache")], env
        )
        assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        assert proc.stdout.startswith("Dask dashboard:")
        assert "2 workers with 2 threads" in proc.stdout
        assert files_in(out) == OUTPUT_FILES
    finally:
        _stop(procs)
        for log in logs:
            log.close()

    remote, remote_model = load_outputs(out)
    local, local_model = load_outputs(local_run[1])
    np.testing.assert_allclose(remote_model["cluster_centers"], local_model["cluster_centers"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(remote_model["centroid_labels"], local_model["centroid_labels"])
    scores = [f"{part}_{name}" for part in ("train", "test") for name in SCORES]
    for key in ("k", "init", "seed", "n_train", "n_test", "n_iter", *scores):
        assert remote[key] == local[key], key
    assert remote["inertia"] == pytest.approx(local["inertia"], rel=1e-9)
    np.testing.assert_allclose(remote["loss_history"], local["loss_history"], rtol=1e-9)


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "no-such-host.invalid:8786"])
def test_unreachable_scheduler_fails_fast_and_names_it(tmp_path, mnist_dir, host):
    address = "tcp://" + host.format(port=closed_port())
    out = tmp_path / "out"
    proc, elapsed = run_cli(
        ["fit", "--scheduler", address, "--out", str(out), "--cache-dir", str(tmp_path / "c")],
        env_for(tmp_path, mnist_dir),
        timeout=120,
    )
    assert proc.returncode != 0
    assert elapsed < 30, elapsed
    assert address in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert files_in(out) == set()


def test_connect_timeout_is_honoured(tmp_path, mnist_dir):
    address = f"tcp://127.0.0.1:{closed_port()}"
    proc, elapsed = run_cli(
        ["fit", "--scheduler", address, "--connect-timeout", "1"], env_for(tmp_path, mnist_dir), timeout=120
    )
    assert proc.returncode != 0
    assert address in proc.stderr
    assert elapsed < 8, elapsed


# --- help, version, argument errors (in process) ------------------------------------------

FIT_FLAGS = [
    "--k",
    "--init",
    "--max-iter",
    "--tol",
    "--seed",
    "--n-init",
    "--data-dir",
    "--chunk-rows",
    "--out",
    "--scheduler",
    "--workers",
    "--threads-per-worker",
    "--memory-limit",
    "--cache-dir",
    "--train-per-digit",
    "--test-size",
    "--dashboard-address",
    "--connect-timeout",
]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_group_help(flag):
    result = CliRunner().invoke(main, [flag])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert re.search(r"^\s+fit\s+Fit K-means on MNIST", result.output, re.M), result.output
    assert "--version" in result.output


def test_fit_help_lists_every_flag():
    result = CliRunner().invoke(main, ["fit", "--help"])
    assert result.exit_code == 0, result.output
    for flag in FIT_FLAGS:
        assert re.search(rf"^\s+{re.escape(flag)}\b", result.output, re.M), flag
    for init in ("k-means||", "k-means++", "sample", "cluster", "random"):
        assert init in result.output


def test_module_entry_point_help(tmp_path, mnist_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "dkmeans.cli", "fit", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env_for(tmp_path, mnist_dir),
    )
    assert proc.returncode == 0, proc.stderr
    assert "--scheduler" in proc.stdout and "--memory-limit" in proc.stdout


def test_version():
    from dkmeans import __version__

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"dkmeans, version {__version__}"


@pytest.mark.parametrize(
    "args, names",
    [
        (["--k", "0"], ["--k", "0"]),
        (["--k", "ten"], ["--k", "ten"]),
        (["--init", "bogus"], ["--init", "bogus"]),
        (["--tol", "-1"], ["--tol", "-1"]),
        (["--max-iter", "0"], ["--max-iter", "0"]),
        (["--n-init", "0"], ["--n-init", "0"]),
        (["--chunk-rows", "0"], ["--chunk-rows", "0"]),
        (["--workers", "0"], ["--workers", "0"]),
        (["--seed", "-1"], ["--seed", "-1"]),
        (["--data-dir", "{tmp}/file.txt"], ["--data-dir", "file.txt"]),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path, args, names):
    (tmp_path / "file.txt").write_text("not a folder")
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path) for a in args]
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["fit", *args, "--out", str(out)])
    assert time.perf_counter() - start < 5
    assert result.exit_code == 2, result.output
    assert "Dask dashboard" not in result.output
    for name in names:
        assert name in result.output, result.output
    assert not out.exists()
    assert files_in(tmp_path) == {"file.txt"}


def test_unwritable_out_fails_before_any_work(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    out = blocker / "out"
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["fit", *FIT_ARGS, "--out", str(out)])
    assert time.perf_counter() - start < 5
    assert result.exit_code == 2, result.output
    assert "Dask dashboard" not in result.output
    assert str(out) in result.output
    assert "cannot write" in result.output
    assert blocker.read_text() == "keep me"
    assert files_in(tmp_path) == {"file.txt"}


def test_corrupted_data_file_is_named(tmp_path, mnist_dir):
    from dkmeans.data import MNIST_FILES

    data = tmp_path / "data"
    data.mkdir()
    for spec in MNIST_FILES.values():
        shutil.copy(mnist_dir / spec.filename, data / spec.filename)
    victim = data / MNIST_FILES["train-labels"].filename
    size = victim.stat().st_size - 100
    victim.write_bytes(victim.read_bytes()[:size])  # truncated
    out = tmp_path / "out"
    proc, elapsed = run_cli(
        [
            "fit",
            *FIT_ARGS,
            "--workers",
            "1",
            "--dashboard-address",
            ":0",
            "--data-dir",
            str(data),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(out),
        ],
        env_for(tmp_path, mnist_dir),
        timeout=120,
    )
    assert proc.returncode != 0
    assert elapsed < 60
    message = proc.stderr.strip().splitlines()[-1]
    assert str(victim) in message, proc.stderr
    assert "SHA-256" in message
    assert "Train accuracy" not in proc.stdout
    assert "Traceback" not in proc.stderr  # a clean error, not a crash
    assert files_in(out) == set()  # no partial outputs
    assert victim.stat().st_size == size  # a user's data_dir is never rewritten


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--train-per-digit", "6000"], r"train_per_digit must be between 1 and 5421"),
        (["--test-size", "10001"], r"test_size must be between 1 and 10000"),
        (["--train-per-digit", "2", "--k", "25"], r"--k.*25 clusters but only 20 training images"),
    ],
)
def test_impossible_subsample_is_a_clean_error(tmp_path, mnist_dir, args, pattern):
    out = tmp_path / "out"
    proc, elapsed = run_cli(
        ["fit", *args, *LOCAL_ARGS, "--workers", "1", "--out", str(out), "--cache-dir", str(tmp_path / "cache")],
        env_for(tmp_path, mnist_dir),
        timeout=120,
    )
    assert proc.returncode != 0
    assert re.search(pattern, proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr
    assert files_in(out) == set()
