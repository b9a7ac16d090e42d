"""`dkmeans elbow` and `dkmeans reproduce` end to end, checked against in-process fits and a plain numpy Lloyd."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_cli import LOCAL_ARGS, PNG_MAGIC, env_for, run_cli  # pytest puts tests/ on sys.path

from dkmeans import KMeans, cli
from dkmeans.data import load_mnist
from dkmeans.metrics import accuracy, centroid_labels, predict_labels

SUBSAMPLE = ["--train-per-digit", "100", "--test-size", "50"]


@pytest.fixture(scope="module")
def notebook_data(mnist_dir, cache_dir):
    """The course notebook's subsample, loaded independently of the CLI."""
    return load_mnist(data_dir=mnist_dir, cache_dir=cache_dir, train_per_digit=100, test_size=50, seed=72)


def test_elbow_end_to_end(tmp_path, mnist_dir, client):
    out = tmp_path / "out"
    args = ["elbow", "--k", "5:7", "--init", "sample,random", "--seed", "72", "--max-iter", "60"]
    proc, _ = run_cli([*args, *SUBSAMPLE, "--out", str(out), *LOCAL_ARGS], env_for(tmp_path, mnist_dir))
    assert proc.returncode == 0, proc.stderr
    assert "Fitting 6 models together: k in 5..7, init in sample, random, seed=72" in proc.stdout
    assert (out / "elbow.png").read_bytes()[:8] == PNG_MAGIC
    report = json.loads((out / "elbow.json").read_text())
    assert report["ks"] == [5, 6, 7] and report["inits"] == ["sample", "random"]
    # one pass per iteration of the longest fit (+1 unless it ended on a fixed point, whose no-op update counts)
    longest = max(r["n_iter"] for r in report["results"])
    assert longest <= report["passes"] <= longest + 1
    data = load_mnist(data_dir=mnist_dir, cache_dir=tmp_path / "own-cache", train_per_digit=100, test_size=50, seed=72)
    X, y = data.train_images.compute(), np.asarray(data.train_labels)
    X_test, y_test = data.test_images.compute(), np.asarray(data.test_labels)
    assert [(r["init"], r["k"]) for r in report["results"]] == [(i, k) for i in ("sample", "random") for k in (5, 6, 7)]
    for r in report["results"]:
        alone = KMeans(r["k"], init=r["init"], random_state=72, max_iter=60, chunk_rows=6000, client=client).fit(X)
        assert r["inertia"] == alone.inertia_  # JSON keeps every digit of a float
        assert r["n_iter"] == alone.n_iter_
        assert r["J_clust"] == pytest.approx(alone.inertia_ / len(X), rel=1e-12)
        mapping = centroid_labels(alone.labels_, y, r["k"])
        assert r["train_accuracy"] == accuracy(y, predict_labels(alone.labels_, mapping))
        assert r["test_accuracy"] == accuracy(y_test, predict_labels(alone.predict(X_test), mapping))
        # and the table printed it
        assert f"{r['J_clust']:.2f}" in proc.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--k", "20:5"], "inverted"),
        (["--k", "0:3"], "at least 1"),
        (["--k", ""], "expected START:STOP"),
        (["--init", "sample,kmeans"], "unknown init 'kmeans'"),
    ],
)
def test_elbow_bad_arguments_fail_before_any_work(tmp_path, extra, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.main, ["elbow", *extra, "--out", str(out)])
    assert result.exit_code == 2
    assert message in result.output
    assert "Loading MNIST" not in result.output
    assert not out.exists()


def test_elbow_k_above_the_sample_count_fails_before_fitting(tmp_path, mnist_dir):
    proc, _ = run_cli(
        ["elbow", "--k", "5,2000", *SUBSAMPLE, "--out", str(tmp_path / "o"), *LOCAL_ARGS], env_for(tmp_path, mnist_dir)
    )
    assert proc.returncode == 2
    assert "2000 clusters but only 1000 training images" in proc.stderr
    assert "Fitting" not in proc.stdout
    assert not (tmp_path / "o" / "elbow.json").exists()


def test_elbow_unwritable_output_fails_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(cli.main, ["elbow", "--out", str(blocker / "sub")])
    assert result.exit_code == 2
    assert "cannot write there" in result.output
    assert "Loading MNIST" not in result.output


def numpy_lloyd(X, centers, max_iter, tol):
    """The notebook's loop in plain numpy, with dkmeans's stopping rule; refuses empty clusters."""
    X = X.astype(np.float64)
    C = centers.astype(np.float64)
    losses = []
    for p in range(max_iter + 1):
        d2 = ((X[:, None, :] - C[None, :, :]) ** 2).sum(axis=2)
        labels = d2.argmin(axis=1)
        losses.append(d2[np.arange(len(X)), labels].mean())
        counts = np.bincount(labels, minlength=len(C))
        assert counts.min() > 0, "the oracle does not relocate empty clusters"
        new = np.stack([X[labels == j].mean(axis=0) for j in range(len(C))])
        shift = np.sqrt(((new - C) ** 2).sum(axis=1)).max()
        if shift == 0 and p < max_iter:
            return C, labels, p + 1, losses
        if shift < tol or p == max_iter:
            return C, labels, p, losses
        C = new


def test_reproduce_the_notebook_experiment(tmp_path, mnist_dir, notebook_data, client):
    out = tmp_path / "out"
    proc, _ = run_cli(["reproduce", "--no-full", "--out", str(out), *LOCAL_ARGS], env_for(tmp_path, mnist_dir))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "reproduce.json").read_text())
    assert report["setting"] == {"train_per_digit": 100, "test_size": 50, "seed": 72, "k": 20}
    runs = {r["init"]: r for r in report["runs"]}
    assert set(runs) == {"sample", "random"}
    assert (runs["sample"]["max_iter"], runs["sample"]["tol"]) == (1000, 1e-6)
    assert (runs["random"]["max_iter"], runs["random"]["tol"]) == (100, 1e-6)
    for name in ("centroids-notebook-sample.png", "centroids-notebook-random.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    X, y = notebook_data.train_images.compute(), np.asarray(notebook_data.train_labels)
    X_test, y_test = notebook_data.test_images.compute(), np.asarray(notebook_data.test_labels)
    assert runs["sample"]["n_train"] == len(X) == 1000 and runs["sample"]["n_test"] == len(X_test) == 50

    # sample init: the 20 rows dkmeans draws for seed 72, then the plain numpy loop
    rng = np.random.default_rng(np.random.SeedSequence(72).spawn(1)[0])
    start = X[rng.choice(len(X), size=20, replace=False)]
    C, labels, n_iter, losses = numpy_lloyd(X, start, max_iter=1000, tol=1e-6)
    sample = runs["sample"]
    assert sample["n_iter"] == n_iter
    assert sample["J_clust"] == pytest.approx(losses[-1], rel=1e-9)
    mapping = np.array([np.bincount(y[labels == j], minlength=10).argmax() for j in range(20)])
    assert sample["train_accuracy"] == np.mean(mapping[labels] == y)
    test_labels = ((X_test[:, None, :].astype(float) - C[None]) ** 2).sum(axis=2).argmin(axis=1)
    assert sample["test_accuracy"] == np.mean(mapping[test_labels] == y_test)

    # random init (uniform in each pixel's range) may empty clusters: compare with the estimator, itself
    # checked against scikit-learn's relocation elsewhere
    alone = KMeans(20, init="random", max_iter=100, tol=1e-6, random_state=72, chunk_rows=6000, client=client)
    alone.fit(X)  # one chunk, as the CLI has: the same summation order
    assert runs["random"]["inertia"] == alone.inertia_
    assert runs["random"]["n_iter"] == alone.n_iter_
    assert f"{runs['random']['test_accuracy']:.4f}" in proc.stdout


def test_reproduce_full_runs_the_same_fits_on_all_of_mnist(tmp_path, mnist_dir, cache_dir, monkeypatch):
    """--full adds the same two fits on all 60,000 images (iterations cut short here to keep the suite fast)."""
    monkeypatch.setattr(cli, "NOTEBOOK_RUNS", (("sample", 2, 1e-6), ("random", 1, 1e-6)))
    args = ["reproduce", "--full", "--data-dir", str(mnist_dir), "--cache-dir", str(cache_dir), *LOCAL_ARGS]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines() if line.strip().startswith(("notebook ", "full "))]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("notebook", "1000", "sample", "2"),
        ("notebook", "1000", "random", "1"),
        ("full", "60000", "sample", "2"),
        ("full", "60000", "random", "1"),
    ]


def test_fit_labels_the_progress_of_restarts_that_run_together(tmp_path, mnist_dir, notebook_data, client):
    """--n-init 3: the restarts share every pass, so each progress line says which restart it is about."""
    from dkmeans.engine import chunk_data, lloyd
    from dkmeans.seeding import init_centers

    out = tmp_path / "out"
    args = ["fit", "--k", "8", "--init", "random", "--n-init", "3", "--seed", "72", "--max-iter", "15", *SUBSAMPLE]
    proc, _ = run_cli([*args, "--out", str(out), *LOCAL_ARGS], env_for(tmp_path, mnist_dir))
    assert proc.returncode == 0, proc.stderr
    assert "restart  iter" in proc.stdout
    by_restart = {}
    for line in proc.stdout.splitlines():
        fields = line.split()
        if len(fields) == 5 and fields[0].isdigit():
            by_restart.setdefault(int(fields[0]), []).append((int(fields[1]), fields[2]))
    assert sorted(by_restart) == [0, 1, 2]
    # each restart's lines are its own fit, iteration by iteration: replay each restart alone through the engine
    data = chunk_data(client, notebook_data.train_images.compute(), 6000)
    for restart, seed in enumerate(np.random.SeedSequence(72).spawn(3)):
        lines = by_restart[restart]
        assert [i for i, _ in lines] == list(range(len(lines)))
        start = init_centers(client, data, 8, "random", np.random.default_rng(seed))
        history = lloyd(client, data, start, 15, 1e-4).loss_history
        assert [j for _, j in lines] == [f"{v:.2f}" for v in history[: len(lines)]]
    assert json.loads((out / "metrics.json").read_text())["n_init"] == 3
