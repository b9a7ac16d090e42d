"""Faults on a cluster of real `dask scheduler` and `dask worker` processes over TCP:
a worker SIGKILLed mid-fit (its nanny restarts it) and the scheduler going away mid-fit."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from distributed import Client

from dkmeans import KMeans

BIN = Path(sys.executable).parent


class RealCluster:
    """A scheduler and nanny-managed workers as subprocesses, each in its own process group."""

    def __init__(self, folder: Path, n_workers: int):
        self.folder, self.procs, self.logs = folder, [], []
        scheduler_file = folder / "scheduler.json"
        self.scheduler = self._spawn(
            [
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
            assert self.scheduler.poll() is None, self.log("scheduler")
            assert time.monotonic() < deadline, "scheduler did not start"
            time.sleep(0.1)
        self.address = json.loads(scheduler_file.read_text())["address"]
        for i in range(n_workers):
            self._spawn(
                ["worker", self.address, "--host", "127.0.0.1", "--nthreads", "1", "--nworkers", "1",
                 "--no-dashboard", "--local-directory", str(folder / f"worker{i}")],
                f"worker{i}",
            )  # fmt: skip

    def _spawn(self, args, name):
        log = open(self.folder / f"{name}.log", "w")
        self.logs.append(log)
        proc = subprocess.Popen(
            [str(BIN / "dask"), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def log(self, name) -> str:
        return (self.folder / f"{name}.log").read_text()

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            p.wait(timeout=30)
        for log in self.logs:
            log.close()


@pytest.fixture
def real_cluster(tmp_path):
    cluster = RealCluster(tmp_path, n_workers=2)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_worker_killed_mid_fit_gives_the_undisturbed_result(real_cluster, mnist, caplog):
    """Full MNIST; one worker is SIGKILLed mid-fit, its nanny starts a new one, the fit goes on (in tasks)."""
    X = mnist.train_images
    params = dict(n_clusters=10, init="k-means||", max_iter=12, tol=0, random_state=11)
    with Client(real_cluster.address, timeout=30) as client:
        client.wait_for_workers(2, timeout=60)
        undisturbed = KMeans(client=client, **params).fit(X)
        assert undisturbed.data_persisted_  # the persisted chunks on the killed worker must be recomputed

        pids = client.run(os.getpid)
        victim = sorted(pids.values())[0]
        killed = threading.Event()

        def kill_during_next_pass(iteration, *_):
            if iteration == 3:
                # 50 ms into the passes after pass 3, while a chunk host computes
                threading.Timer(0.05, lambda: (os.kill(victim, signal.SIGKILL), killed.set())).start()

        with caplog.at_level(logging.WARNING, logger="dkmeans.engine"):
            started = time.monotonic()
            disturbed = KMeans(client=client, callback=kill_during_next_pass, **params).fit(X)
            disturbed_seconds = time.monotonic() - started
        assert killed.is_set()
        # Not a hang: a host call to the dead worker once waited out Dask's 30 s connect timeout (retrying the
        # refused connection, then again through the scheduler's relay) before the fit went on in tasks.
        assert disturbed_seconds < 25, disturbed_seconds
        # The pass the kill interrupted failed on its chunk host; the fit went on in tasks, which the
        # scheduler recomputed (with the lost chunks) on the workers left.
        assert "chunk hosts failed" in caplog.text, caplog.text
        with pytest.raises(ProcessLookupError):
            os.kill(victim, 0)
        client.wait_for_workers(2, timeout=60)
        assert victim not in client.run(os.getpid).values()  # a new worker process took its place

    np.testing.assert_array_equal(disturbed.cluster_centers_, undisturbed.cluster_centers_)
    np.testing.assert_array_equal(disturbed.labels_, undisturbed.labels_)
    assert disturbed.n_iter_ == undisturbed.n_iter_ == 12
    assert disturbed.loss_history_ == undisturbed.loss_history_
    assert disturbed.inertia_ == undisturbed.inertia_


def test_scheduler_lost_mid_fit_is_a_clear_error_naming_the_checkpoint(real_cluster, tmp_path, mnist_dir, cache_dir):
    ckpt = tmp_path / "fit.ckpt"
    args = [
        str(BIN / "dkmeans"),
        "fit",
        "--scheduler",
        real_cluster.address,
        "--connect-timeout",
        "5",
        "--k",
        "10",
        "--init",
        "sample",
        "--max-iter",
        "300",
        "--tol",
        "0",
        "--cache-dir",
        str(cache_dir),
        "--data-dir",
        str(mnist_dir),
        "--checkpoint",
        str(ckpt),
    ]
    with Client(real_cluster.address, timeout=30) as c:
        c.wait_for_workers(2, timeout=60)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _updates(ckpt) >= 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.05)
        os.killpg(real_cluster.scheduler.pid, signal.SIGKILL)
        lost_at = time.monotonic()
        stdout, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - lost_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, stdout + stderr
    assert took < 60, f"took {took:.0f} s to notice the scheduler was gone"
    assert "Lost the connection to the Dask scheduler" in stderr, stderr
    assert str(ckpt) in stderr and "--resume" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert _updates(ckpt) >= 2  # the checkpoint it names is intact


def _updates(path: Path) -> int:
    try:
        with np.load(path) as z:
            return json.loads(str(z["meta"]))["n_iter"]
    except (OSError, ValueError, KeyError, EOFError):
        return -1
