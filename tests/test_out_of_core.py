"""The expanded store and streaming fits: built chunk by chunk and atomically, read back checked,
streamed when it does not fit in worker memory, corrupted or half-built stores and full disks."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pytest
from dask.utils import key_split
from distributed import Client, LocalCluster, get_task_stream

from dkmeans import KMeans
from dkmeans.data.expand import _bilinear, _to_uint8, deform, expand_mnist, open_expanded
from dkmeans.data.store import CorruptChunkError, StoreError
from dkmeans.engine import _chunk_loaders, chunk_data

BIN = Path(sys.executable).parent
# Tiny memory limits are only numbers for the placement decision: the worker's own guards are off.
NO_MEMORY_GUARDS = {
    "distributed.worker.memory.target": False,
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": False,
    "distributed.worker.memory.terminate": False,
}
NO_GUARDS_ENV = {"DASK_" + k.upper().replace(".", "__").replace("-", "_"): "False" for k in NO_MEMORY_GUARDS}


@pytest.fixture(scope="module")
def store2(tmp_path_factory, mnist_dir, cache_dir):
    """Factor-2 store (120,000 rows, 94 MB) built through the CLI."""
    out = tmp_path_factory.mktemp("expanded") / "x2"
    proc = subprocess.run(
        [str(BIN / "dkmeans"), "data", "expand", "--factor", "2", "--out", str(out), "--cache-dir", str(cache_dir),
         "--data-dir", str(mnist_dir)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Fit on it with: dkmeans fit --expanded {out}" in proc.stdout
    return open_expanded(out)


def test_expanded_store_content(store2, mnist_numpy):
    X, y = mnist_numpy
    images, labels = store2.images(), store2.labels()
    assert images.shape == (120000, 784) and images.dtype == np.uint8
    assert images.chunks[0] == (6000,) * 20
    first = images[:60000].compute()
    np.testing.assert_array_equal(first, X)  # variant 0 is MNIST itself
    np.testing.assert_array_equal(labels, np.concatenate([y, y]))
    copies = images[60000:].compute().astype(np.int64)
    moved = (copies != X).any(axis=1).mean()
    assert moved > 0.95  # the copies are shifted...
    # ...but still the same digits: each copy is far closer to its own original than to the average digit
    own = ((copies[:2000] - X[:2000]) ** 2).sum(axis=1)
    other = ((copies[:2000] - X[2000:4000]) ** 2).sum(axis=1)
    assert np.median(own) < 0.5 * np.median(other)
    # pixel mass is (nearly) preserved by a sub-pixel shift of at most 2 pixels
    np.testing.assert_allclose(copies.sum(axis=1), X.sum(axis=1), rtol=0.1)


def test_integer_shift_is_an_exact_translation():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)

    class FixedShift:
        def uniform(self, low, high, size):
            return np.tile([1.0, -2.0], (size[0], 1))

    shifted = deform(images, FixedShift(), np.ones(5, bool), 2.0, elastic=False)
    expected = np.zeros_like(images)
    expected[:, 1:, : 28 - 2] = images[:, :-1, 2:]  # down 1 row, left 2 columns
    np.testing.assert_array_equal(shifted, expected)
    # and the gather-based bilinear resampling used for elastic deformations agrees
    gy, gx = np.meshgrid(np.arange(28.0), np.arange(28.0), indexing="ij")
    gathered = _to_uint8(_bilinear(images.astype(np.float32), gy[None] - 1.0, gx[None] + 2.0))
    np.testing.assert_array_equal(gathered, expected)


def test_elastic_expansion_is_deterministic(tmp_path, mnist_dir, cache_dir):
    a = expand_mnist(1, out=tmp_path / "a", data_dir=mnist_dir, cache_dir=cache_dir, chunk_rows=30000)
    assert len(a.manifest["chunks"]) == 2
    images = np.random.default_rng(1).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    which = np.ones(50, bool)
    one = deform(images, np.random.default_rng(5), which, 2.0, elastic=True)
    two = deform(images, np.random.default_rng(5), which, 2.0, elastic=True)
    np.testing.assert_array_equal(one, two)
    assert (one != images).any()


def test_streaming_fit_matches_scikit_learn(store2, tmp_path):
    """Two workers with 80 MB each: 94 MB of data is over half their memory, so it is streamed.

    Its chunks are read inside the pass's tasks, several to a task, and their
    bounds go to files between passes (disk_state): seen during the fit, gone after it.
    """
    from sklearn.cluster import KMeans as SKKMeans

    X = store2.images()
    X_mem = X.compute()
    init = X_mem[np.random.default_rng(4).choice(len(X_mem), 10, replace=False)].astype(np.float64)
    saved = []

    def look(*progress):
        saved.append(sorted(p.name for p in (tmp_path / "dkmeans-state").glob("*/chunk-*.bin")))

    with (
        dask.config.set({**NO_MEMORY_GUARDS, "temporary-directory": str(tmp_path)}),
        LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="80MB", dashboard_address=":0") as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        km = KMeans(10, init=init, max_iter=8, tol=0, client=client, callback=look).fit(X)
        # 28 chunks would make 128 MB, but 20 chunks for 2 threads go 3 to a task: at least 4 tasks per thread.
        assert chunk_data(client, X).chunks_per_task == 3
        # The workers import dkmeans for its kernels alone, not dask.array (nor what it imports: data.store.dask_rows).
        assert not any(client.run(lambda: "dask.array" in sys.modules).values())
    assert not km.data_persisted_
    assert saved and all(names == sorted(f"chunk-{i}.bin" for i in range(20)) for names in saved)
    assert not list((tmp_path / "dkmeans-state").iterdir())
    sk = SKKMeans(10, init=init, n_init=1, max_iter=8, tol=0, algorithm="lloyd").fit(X_mem)
    np.testing.assert_array_equal(km.labels_, sk.labels_)
    np.testing.assert_allclose(km.cluster_centers_, sk.cluster_centers_, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(km.inertia_, sk.inertia_, rtol=1e-9)
    assert km.n_iter_ == sk.n_iter_


def test_streamed_seeding_reads_its_chunks_and_matches_the_same_chunks_in_memory(store2, tmp_path):
    """k-means|| over streamed chunks: each seeding and labelling task reads its own chunk (no read tasks,
    no chunk sent between workers), and the fit is the same fit, bit for bit, as over the same chunks persisted."""
    X = store2.images()
    rows = X.chunks[0][0]
    with (
        dask.config.set({**NO_MEMORY_GUARDS, "temporary-directory": str(tmp_path)}),
        LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="80MB", dashboard_address=":0") as cluster,
        Client(cluster, set_as_default=False) as client,
        get_task_stream(client=client) as stream,
    ):
        streamed = KMeans(10, random_state=3, max_iter=6, tol=0, client=client).fit(X)
        labels = streamed.predict(X)
    keys = [task["key"] for task in stream.data]
    assert not streamed.data_persisted_
    assert any(key_split(key) == "dkmeans-seed-distances" for key in keys)
    assert not [key for key in keys if isinstance(key, tuple) and key[0] == X.name]
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        kept = KMeans(10, random_state=3, max_iter=6, tol=0, chunk_rows=rows, client=client).fit(X)
    assert kept.data_persisted_
    np.testing.assert_array_equal(streamed.cluster_centers_, kept.cluster_centers_)
    np.testing.assert_array_equal(streamed.labels_, kept.labels_)
    np.testing.assert_array_equal(labels, kept.labels_)


def test_streamed_chunks_are_read_inside_the_pass_unless_they_need_other_tasks(store1):
    loaders, inputs = _chunk_loaders(store1.images())
    rows = store1.rows()
    assert len(loaders) == 3 and len(inputs) == 1
    for i, loader in enumerate(loaders):
        np.testing.assert_array_equal(loader(inputs), rows.chunk(i))
    # A chunk that merges two files needs their tasks: it keeps its own graph.
    assert _chunk_loaders(store1.images().rechunk({0: 30000})) == (None, None)


def test_read_buffers_are_reused_only_once_no_array_uses_them(store1):
    rows = store1.rows()
    first = rows.chunk(0)
    expected = first.copy()
    second = rows.chunk(1)  # first is alive: a new buffer
    assert not np.shares_memory(first, second)
    view = first[5:10]
    del first
    third = rows.chunk(0)  # a view keeps the buffer in use
    assert not np.shares_memory(view, third)
    np.testing.assert_array_equal(view, expected[5:10])
    address = second.__array_interface__["data"][0]
    del second
    again = rows.chunk(1)  # nothing refers to the second buffer any more
    assert again.__array_interface__["data"][0] == address
    assert not again.flags.writeable


def test_cli_fit_on_a_store_says_it_streams(store2, tmp_path, mnist_dir, cache_dir):
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(BIN / "dkmeans"), "fit", "--expanded", str(store2.path), "--memory-limit", "80MB", "--max-iter", "2",
         "--init", "sample", "--dashboard-address", ":0", "--cache-dir", str(cache_dir), "--data-dir", str(mnist_dir),
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, **NO_GUARDS_ENV, "MPLBACKEND": "Agg"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Data: streamed from storage every iteration (94.1 MB exceeds 50% of 160 MB)" in proc.stdout
    assert "120000 training x 784 features in 20 chunks" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data_placement"] == "streamed" and metrics["n_train"] == 120000


# --- damaged and half-built stores ---------------------------------------------------


@pytest.fixture
def store1(tmp_path, mnist_dir, cache_dir):
    """MNIST itself (factor 1) in 3 chunk files: quick to build and to damage."""
    return expand_mnist(1, out=tmp_path / "x1", data_dir=mnist_dir, cache_dir=cache_dir, chunk_rows=20000)


def test_corrupted_chunk_is_named(store1, client):
    victim = store1.path / "images-000001.npy"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte in the pixels
    victim.write_bytes(bytes(raw))
    with pytest.raises(CorruptChunkError, match=f"chunk {victim} is corrupted"):
        KMeans(5, init="random", max_iter=2, client=client, random_state=0).fit(store1.images())


def test_truncated_or_missing_chunk_is_named(store1):
    victim = store1.path / "images-000002.npy"
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(StoreError, match=f"damaged: chunk {victim} has 1000 bytes"):
        open_expanded(store1.path)
    victim.unlink()
    with pytest.raises(StoreError, match=f"incomplete: chunk {victim} is missing"):
        open_expanded(store1.path)


def test_half_built_store_is_rebuilt_not_read(store1, tmp_path, mnist_dir, cache_dir):
    (store1.path / "manifest.json").unlink()  # as if the build died before its manifest
    with pytest.raises(StoreError, match="not a finished expanded store"):
        open_expanded(store1.path)
    rebuilt = expand_mnist(1, out=store1.path, data_dir=mnist_dir, cache_dir=cache_dir, chunk_rows=20000)
    assert rebuilt.manifest["chunks"] == store1.manifest["chunks"]


def test_interrupted_build_installs_nothing(tmp_path, mnist_dir, cache_dir):
    dest = tmp_path / "x1"

    def interrupt(rows, total):
        if rows >= 20000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        expand_mnist(1, out=dest, data_dir=mnist_dir, cache_dir=cache_dir, chunk_rows=10000, progress=interrupt)
    assert list(tmp_path.iterdir()) == []  # neither the store nor its temporary folder


def test_build_killed_mid_way_leaves_no_store_and_is_cleaned_up(tmp_path, mnist_dir, cache_dir):
    code = (
        "import os, signal; from dkmeans.data.expand import expand_mnist\n"
        f"expand_mnist(1, out={str(tmp_path / 'x1')!r}, data_dir={str(mnist_dir)!r}, cache_dir={str(cache_dir)!r},"
        " chunk_rows=10000, progress=lambda r, t: r >= 20000 and os.kill(os.getpid(), signal.SIGKILL))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".mnist-expanded.tmp-")  # only the dead build's folder
    expand_mnist(1, out=tmp_path / "x1", data_dir=mnist_dir, cache_dir=cache_dir, chunk_rows=30000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x1"]  # the dead build's folder was removed


def test_store_path_holding_other_files_is_not_deleted(tmp_path, mnist_dir, cache_dir):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(StoreError, match="not an expanded store"):
        expand_mnist(1, out=tmp_path / "mine", data_dir=mnist_dir, cache_dir=cache_dir)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


# --- full disk -------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path) -> None:
    with open(folder / "filler", "ab") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()


def test_store_on_a_too_small_disk_is_refused_up_front(tmp_path, mnist_dir, cache_dir):
    with small_disk(tmp_path / "disk", "20m") as disk:
        with pytest.raises(OSError, match="not enough free disk space"):
            expand_mnist(1, out=disk / "x1", data_dir=mnist_dir, cache_dir=cache_dir)
        assert list(disk.iterdir()) == []


def test_disk_filling_up_while_writing_the_store(tmp_path, mnist_dir, cache_dir):
    with small_disk(tmp_path / "disk", "60m") as disk:

        def fill_after_first_chunk(rows, total):
            if rows == 10000:
                _fill(disk)  # someone else takes the rest of the disk

        with pytest.raises(OSError) as info:
            expand_mnist(1, out=disk / "x1", data_dir=mnist_dir, cache_dir=cache_dir, chunk_rows=10000,
                         progress=fill_after_first_chunk)  # fmt: skip
        assert info.value.errno == errno.ENOSPC
        assert "nothing was installed" in str(info.value)
        assert [p.name for p in disk.iterdir()] == ["filler"]


def test_disk_full_while_writing_model_and_checkpoint(tmp_path, client):
    from dkmeans.checkpoint import Checkpoint, FitState
    from dkmeans.cli import _write_outputs

    X = np.random.default_rng(0).normal(size=(300, 784))
    model = KMeans(3, init="sample", max_iter=3, random_state=0, client=client).fit(X)
    metrics = {"k": 3}
    with small_disk(tmp_path / "disk", "1m") as disk:
        out = disk / "out"
        ckpt = Checkpoint(disk / "fit.ckpt", {"k": 3}, {"shape": [300, 784]})
        ckpt.save(FitState(0, 1, model.cluster_centers_, [1.0]))
        good = (disk / "fit.ckpt").read_bytes()
        _fill(disk)
        with pytest.raises(OSError) as info:
            _write_outputs(out, model, np.arange(3), metrics)
        assert info.value.errno == errno.ENOSPC
        assert list(out.iterdir()) == []  # not even a temporary file
        with pytest.raises(OSError):
            ckpt.save(FitState(0, 2, model.cluster_centers_, [1.0, 0.5]))
        assert (disk / "fit.ckpt").read_bytes() == good  # the previous checkpoint is intact
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "fit.ckpt", "out"]
