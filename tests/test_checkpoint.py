"""Checkpoints: saved after every update, atomically; a resumed fit equals an uninterrupted one;
a checkpoint of another fit is refused with an error that says what differs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_sweep import assert_identical  # pytest puts tests/ on sys.path

from dkmeans import KMeans
from dkmeans.checkpoint import CheckpointError

BIN = Path(sys.executable).parent


class Crash(Exception):
    """Stands in for the client dying: raised from the progress callback."""


@pytest.fixture(scope="module")
def small(mnist_numpy):
    X, _ = mnist_numpy
    return X[::10][:4000]  # 4000 real MNIST rows, enough for a few dozen updates


def _fit(X, client, **kw):
    params = dict(n_clusters=12, init="k-means++", max_iter=25, tol=0, random_state=7, chunk_rows=1000)
    params.update(kw)
    return KMeans(client=client, **params).fit(X)


def _crash_at(iteration):
    def callback(i, *_):
        if i == iteration:
            raise Crash(f"crash at iteration {i}")

    return callback


@pytest.fixture(scope="module")
def reference(small, client):
    return _fit(small, client)


def test_resume_after_a_crash_equals_an_uninterrupted_fit(small, client, reference, tmp_path):
    path = tmp_path / "fit.ckpt"
    with pytest.raises(Crash) as info:
        _fit(small, client, checkpoint=path, callback=_crash_at(6))
    # the error says where the last checkpoint is
    assert any(str(path) in note and "after 6 update(s)" in note for note in info.value.__notes__)
    assert [p.name for p in tmp_path.iterdir()] == ["fit.ckpt"]  # no temporary files left behind
    resumed = _fit(small, client, checkpoint=path, resume=True)
    assert_identical(resumed, reference)
    # the checkpoint of a finished fit resumes to the same result (one labelling pass)
    assert_identical(_fit(small, client, checkpoint=path, resume=True), reference)


def test_resume_with_restarts(small, client, tmp_path):
    params = dict(n_init=3, max_iter=5, init="k-means||")
    reference = _fit(small, client, **params)
    path = tmp_path / "fit.ckpt"
    calls = []

    def crash_in_second_restart(i, *_):
        calls.append(i)
        if calls.count(0) == 2 and i == 3:  # restart 2's update 3
            raise Crash("restart 2")

    with pytest.raises(Crash) as info:
        _fit(small, client, checkpoint=path, callback=crash_in_second_restart, **params)
    assert any("restart 2 of 3, after 3 update(s)" in note for note in info.value.__notes__)
    assert_identical(_fit(small, client, checkpoint=path, resume=True, **params), reference)


def test_checkpoint_without_a_seed_keeps_its_seeds(small, client, tmp_path):
    path = tmp_path / "fit.ckpt"
    with pytest.raises(Crash):
        _fit(small, client, random_state=None, n_init=2, max_iter=6, checkpoint=path, callback=_crash_at(4))
    first = _fit(small, client, random_state=None, n_init=2, max_iter=6, checkpoint=path, resume=True)
    again = _fit(small, client, random_state=None, n_init=2, max_iter=6, checkpoint=path, resume=True)
    assert_identical(first, again)


@pytest.fixture(scope="module")
def short_checkpoint(small, client, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "fit.ckpt"
    _fit(small, client, max_iter=2, checkpoint=path)
    return path


@pytest.mark.parametrize(
    "change, names",
    [
        (dict(n_clusters=11), ["n_clusters"]),
        (dict(tol=1e-3), ["tol"]),
        (dict(random_state=8), ["random_state"]),
        (dict(init="random"), ["init"]),
        (dict(max_iter=30), ["max_iter"]),
    ],
)
def test_resume_refuses_other_parameters(small, client, short_checkpoint, change, names):
    path = short_checkpoint
    params = {"max_iter": 2, **change}
    with pytest.raises(CheckpointError, match="other parameters") as info:
        _fit(small, client, checkpoint=path, resume=True, **params)
    for name in names:
        assert name in str(info.value)
    assert str(path) in str(info.value)


def test_resume_refuses_other_data(small, client, short_checkpoint):
    path = short_checkpoint
    other = small.copy()
    other[0, 0] ^= 1
    with pytest.raises(CheckpointError, match="other data"):
        _fit(other, client, max_iter=2, checkpoint=path, resume=True)
    with pytest.raises(CheckpointError, match="shape"):
        _fit(small[:-1], client, max_iter=2, checkpoint=path, resume=True)


def test_resume_without_a_checkpoint_is_a_clear_error(small, client, tmp_path):
    with pytest.raises(CheckpointError, match="No checkpoint to resume from"):
        _fit(small, client, checkpoint=tmp_path / "missing.ckpt", resume=True)
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        _fit(small, client, checkpoint=tmp_path / "garbage.ckpt", resume=True)
    with pytest.raises(ValueError, match="needs a checkpoint"):
        _fit(small, client, resume=True)


def test_checkpoint_is_replaced_atomically(small, client, tmp_path, monkeypatch):
    """Every save goes through a temporary file renamed over the checkpoint."""
    import dkmeans.checkpoint as ck

    path = tmp_path / "fit.ckpt"
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        renames.append((Path(src).name, Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", replace, raising=False)
    monkeypatch.setattr("dkmeans.atomic.os.replace", replace)
    model = _fit(small, client, max_iter=4, checkpoint=path)
    saves = [r for r in renames if r[1] == "fit.ckpt"]
    assert len(saves) == model.n_iter_ + 2  # after init, after each update that goes on, at the end
    assert all(src.startswith(".fit.ckpt.") and src.endswith(".tmp") for src, _ in saves)


# --- the client process killed for real ------------------------------------------------


def test_killed_client_process_resumes_to_the_same_result(tmp_path, mnist_dir, cache_dir, mnist, client):
    """`dkmeans fit --checkpoint` SIGKILLed mid-fit (with its LocalCluster), then `--resume`: same result."""
    ckpt = tmp_path / "fit.ckpt"
    args = [
        str(BIN / "dkmeans"),
        "fit",
        "--k",
        "10",
        "--max-iter",
        "8",
        "--tol",
        "0",
        "--seed",
        "3",
        "--init",
        "sample",
        "--cache-dir",
        str(cache_dir),
        "--data-dir",
        str(mnist_dir),
        "--workers",
        "2",
        "--dashboard-address",
        ":0",
        "--checkpoint",
        str(ckpt),
    ]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed_after = None
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            n_iter = _saved_updates(ckpt)
            if n_iter is not None and n_iter >= 3:
                os.killpg(proc.pid, signal.SIGKILL)  # the client and its LocalCluster, mid-fit
                killed_after = n_iter
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
    assert killed_after is not None, (tmp_path / "first.log").read_text()
    assert killed_after < 8, "the fit finished before it could be killed"

    out = tmp_path / "out"
    resumed = subprocess.run(
        [*args, "--resume", "--out", str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"Resuming from checkpoint {ckpt}" in resumed.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    with np.load(out / "model.npz") as z:
        centres = z["cluster_centers"]

    reference = KMeans(10, init="sample", max_iter=8, tol=0, random_state=3, client=client).fit(mnist.train_images)
    np.testing.assert_array_equal(centres, reference.cluster_centers_)
    assert metrics["n_iter"] == reference.n_iter_ == 8
    assert metrics["loss_history"] == reference.loss_history_
    assert metrics["inertia"] == reference.inertia_


def _saved_updates(path: Path):
    try:
        with np.load(path) as z:
            return json.loads(str(z["meta"]))["n_iter"]
    except (OSError, ValueError, KeyError, EOFError):
        return None


def test_cli_resume_errors_are_clear(tmp_path, mnist_dir, cache_dir):
    base = [str(BIN / "dkmeans"), "fit", "--cache-dir", str(cache_dir), "--data-dir", str(mnist_dir)]
    proc = subprocess.run([*base, "--resume"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--resume needs --checkpoint PATH" in proc.stderr, proc.stderr
    missing = tmp_path / "missing.ckpt"
    proc = subprocess.run(
        [*base, "--checkpoint", str(missing), "--resume", "--workers", "1", "--dashboard-address", ":0",
         "--train-per-digit", "10", "--test-size", "10"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"Error: No checkpoint to resume from at {missing}" in proc.stderr
    assert "Traceback" not in proc.stderr
