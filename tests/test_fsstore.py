"""The chunked store at an fsspec URL (here fsspec's in-memory filesystem), against the local store and numpy."""

from __future__ import annotations

import json
import pickle
import uuid

import fsspec
import numpy as np
import pytest

from dkmeans.data.fetch import MNIST_FILES, locate_mnist
from dkmeans.data.fsstore import FsspecRows, ensure_fs_store, open_fs_store

SOURCES = {name: spec.sha256 for name, spec in MNIST_FILES.items()}


@pytest.fixture
def memory_url():
    url = f"memory://dkmeans-test/{uuid.uuid4().hex}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


@pytest.mark.parametrize(
    "key",
    [
        (slice(10, 20), slice(None)),
        (slice(None), slice(3, 9)),
        slice(95, 500),  # past the end
        slice(5, 5),
        7,
        -1,
        np.array([40, 3, 3, 99]),
        (slice(None, None, -7), 2),
        (np.array([1, 2]), slice(0, 4)),
    ],
)
def test_rows_match_numpy_for_every_kind_of_key(memory_url, key):
    expected = np.arange(100 * 6, dtype=np.uint16).reshape(100, 6)
    with fsspec.open(memory_url + "/a.npy", "wb") as f:
        np.save(f, expected)
    with fsspec.open(memory_url + "/a.npy", "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        offset = f.tell()
    rows = FsspecRows(memory_url + "/a.npy", expected.shape, expected.dtype, offset)
    np.testing.assert_array_equal(rows[key], expected[key])
    clone = pickle.loads(pickle.dumps(rows))
    np.testing.assert_array_equal(clone[key], expected[key])
    assert len(pickle.dumps(rows)) < 400  # tasks carry the URL, never the data


def test_store_built_at_a_url_equals_the_local_store_and_is_reused(memory_url, mnist_dir, mnist):
    calls = []

    def locate():
        calls.append(1)
        return locate_mnist(data_dir=mnist_dir)

    store = ensure_fs_store(memory_url, SOURCES, locate)
    assert calls == [1]
    for name in ("train-labels", "test-labels"):
        np.testing.assert_array_equal(
            store.load(name), mnist.train_labels if name == "train-labels" else mnist.test_labels
        )
    rows = store.rows("train-images")
    assert rows.shape == (60000, 784) and rows.dtype == np.uint8
    local = mnist.train_images
    np.testing.assert_array_equal(rows[59000:60000], local[59000:60000].compute(scheduler="synchronous"))
    np.testing.assert_array_equal(
        store.rows("test-images")[:50], mnist.test_images[:50].compute(scheduler="synchronous")
    )

    again = ensure_fs_store(memory_url, SOURCES, locate)
    assert calls == [1], "a valid store is opened, not rebuilt, and the source files are not even located"
    assert again.token == store.token


def test_store_without_a_valid_manifest_is_never_trusted(memory_url, mnist_dir):
    fs = fsspec.filesystem("memory")
    ensure_fs_store(memory_url, SOURCES, lambda: locate_mnist(data_dir=mnist_dir))
    manifest = memory_url + "/manifest.json"

    other_sources = dict(SOURCES, **{"train-images": "0" * 64})
    assert open_fs_store(memory_url, other_sources) is None  # built from different files

    text = json.loads(fs.cat_file(manifest))
    text["arrays"]["train-images"]["shape"] = [59999, 784]  # a manifest that lies about a file
    fs.pipe_file(manifest, json.dumps(text).encode())
    assert open_fs_store(memory_url, SOURCES) is None

    fs.rm(manifest)  # as an interrupted build leaves it: arrays written, manifest not yet
    assert open_fs_store(memory_url, SOURCES) is None
    rebuilt = ensure_fs_store(memory_url, SOURCES, lambda: locate_mnist(data_dir=mnist_dir))
    assert rebuilt.rows("train-images").shape == (60000, 784)


def test_load_mnist_reads_a_store_url_the_same_as_the_cache(memory_url, mnist_dir, tmp_path):
    from dkmeans.data import load_mnist

    subsample = dict(train_per_digit=30, test_size=40, seed=9, chunk_rows=128)
    remote = load_mnist(data_dir=mnist_dir, cache_dir=tmp_path, store=memory_url, **subsample)
    local = load_mnist(data_dir=mnist_dir, cache_dir=tmp_path, **subsample)
    for a, b in ((remote.train_images, local.train_images), (remote.test_images, local.test_images)):
        assert a.chunks == b.chunks
        np.testing.assert_array_equal(a.compute(scheduler="synchronous"), b.compute(scheduler="synchronous"))
    np.testing.assert_array_equal(remote.train_labels, local.train_labels)


@pytest.mark.parametrize("url", ["nosuch://bucket/store", "s3://bucket/store"])
def test_unusable_store_url_is_a_clear_error(url, mnist_dir, tmp_path):
    from dkmeans.data import load_mnist
    from dkmeans.data.store import StoreError

    if url.startswith("s3://"):
        try:
            import s3fs  # noqa: F401

            pytest.skip("s3fs is installed here; this checks the message when it is not")
        except ImportError:
            pass
    with pytest.raises(StoreError, match=f"store {url}: .*(Protocol not known|s3fs)"):
        load_mnist(data_dir=mnist_dir, cache_dir=tmp_path, store=url)
